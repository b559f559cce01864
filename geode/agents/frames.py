"""Episode frames -> an animated GIF (Pillow), written atomically (geode.fileio)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from geode.fileio import atomic_write_bytes


def save_gif(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: float = 4) -> Path:
    """Write RGB frames ((H, W, 3) uint8, all one size) as a looping GIF at `fps`; the path."""
    from PIL import Image

    if not frames:
        raise ValueError(f"save_gif: no frames to write to {path}")
    if not fps > 0:
        raise ValueError(f"save_gif: fps must be > 0, got {fps}")
    shape = np.shape(frames[0])
    images = []
    for i, f in enumerate(frames):
        a = np.asarray(f)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(
                f"save_gif: frame {i} must be (H, W, 3) uint8, got {a.shape} {a.dtype}"
            )
        if a.shape != shape:
            raise ValueError(f"save_gif: frame {i} is {a.shape}, frame 0 is {shape} (one size)")
        images.append(Image.fromarray(a))
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)  # fmt: skip
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
