"""Video for chat: frames sampled at a rate from a video file (PyAV), with their timestamps.

The sampling is transformers' (`video_utils.default_sample_indices_fn` with `fps`, read as
`read_video_pyav` reads): a video of T frames at F frames/s gives n = max(1, int(T / F * fps))
frames, frame indices arange(n) * T // n, timestamps index / F seconds. `max_frames` caps n (the
n frames are then spread over the whole video the same way). The chat expansion
(`geode.chat.render_multimodal`) gives each frame as an image preceded by its "mm:ss" timestamp,
the layout of transformers' Gemma4Processor for video (Gemini feeds video the same way).

Only container formats with a known signature are handed to FFmpeg (MP4/MOV, Matroska/WebM, AVI,
GIF, MPEG-TS, Ogg): playlists and concat lists, which make FFmpeg open other files or URLs, are
refused before it sees them.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

from PIL import Image

from .image import ImageError, open_source

DEFAULT_FPS = 1.0  # frames sampled per second of video
DEFAULT_MAX_FRAMES = 32  # 32 frames x 256 soft tokens = 8,192 tokens with Gemma 3


class VideoError(ImageError):
    """A video cannot be read: missing, not a supported container, no video stream, corrupt."""


@dataclass
class Video:
    """Frames sampled from a video, with where they are in it."""

    frames: list[Image.Image]  # RGB, in time order
    timestamps: list[float]  # seconds from the start, one per frame
    indices: list[int]  # frame numbers in the decoded stream
    fps: float  # the file's average frame rate
    total_frames: int


def timestamp_text(seconds: float) -> str:
    """ "mm:ss" of a time in seconds (minutes not wrapped at 60), as Gemma4Processor writes it."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def sample_indices(
    total_frames: int, video_fps: float, fps: float = DEFAULT_FPS, max_frames: int | None = None
) -> list[int]:
    """Frame indices sampled at `fps` (transformers' `default_sample_indices_fn`), at most
    `max_frames` of them."""
    if not fps > 0:
        raise VideoError(f"fps must be > 0, got {fps!r}")
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"max_frames must be >= 1, got {max_frames!r}")
    if total_frames < 1 or not video_fps > 0:
        raise VideoError(
            f"a video of {total_frames} frames at {video_fps} fps has nothing to sample"
        )
    n = max(1, int(total_frames / video_fps * fps))
    n = min(n, total_frames, max_frames or n)
    return [k * total_frames // n for k in range(n)]


_FORMATS = {  # FFmpeg demuxer names a signature-checked file may open as
    "mov,mp4,m4a,3gp,3g2,mj2",
    "matroska,webm",
    "avi",
    "gif",
    "mpegts",
    "ogg",
}


def _signature_ok(head: bytes) -> bool:
    """The first bytes are those of a container geode lets FFmpeg read."""
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # MP4 / MOV
        or head.startswith(b"\x1a\x45\xdf\xa3")  # Matroska / WebM (EBML)
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or head.startswith((b"GIF87a", b"GIF89a"))
        or head.startswith(b"OggS")
        or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47)  # MPEG-TS packets
    )


def load_video(
    source: bytes | str | os.PathLike,
    fps: float = DEFAULT_FPS,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
    name: str | None = None,
) -> Video:
    """Decode a video file (or its bytes) with PyAV and sample RGB frames at `fps`, at most
    `max_frames`; `name` (default: the path, or "video") is named in errors."""
    import av

    label, fp = open_source(source, name, "video", VideoError)
    sample_indices(1, 1.0, fps, max_frames)  # the options' errors, before any decoding
    if isinstance(fp, io.BytesIO):
        head = fp.getvalue()[:192]
    else:
        with open(fp, "rb") as f:
            head = f.read(192)
    if not _signature_ok(head):
        raise VideoError(
            f"{label}: not a video in a supported container (MP4/MOV, Matroska/WebM, AVI, GIF, "
            "MPEG-TS, Ogg)"
        )
    try:
        with av.open(fp if isinstance(fp, io.BytesIO) else str(fp), "r") as container:
            if container.format.name not in _FORMATS:
                raise VideoError(f"{label}: container {container.format.name!r} is not supported")
            if not container.streams.video:
                raise VideoError(f"{label}: no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0)
            total = stream.frames
            if not total:  # not in the header (WebM, GIF, ...): count the packets
                total = sum(1 for p in container.demux(stream) if p.size)
                container.seek(0)
            if not rate > 0:
                raise VideoError(f"{label}: no frame rate (a still image? send it as an image)")
            if not total:
                raise VideoError(f"{label}: the video stream has no frames")
            indices = sample_indices(total, rate, fps, max_frames)
            wanted, frames = set(indices), {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_image()  # RGB24, as read_video_pyav's to_ndarray
                if i >= indices[-1]:
                    break
    except VideoError:
        raise
    except Exception as e:  # noqa: BLE001 -- FFmpeg reports bad data through many error types
        raise VideoError(f"{label}: corrupt or unreadable video ({e})") from None
    if not frames:
        raise VideoError(f"{label}: no frame could be decoded")
    kept = [i for i in indices if i in frames]
    return Video(
        frames=[frames[i] for i in kept],
        timestamps=[i / rate for i in kept],
        indices=kept,
        fps=rate,
        total_frames=total,
    )


__all__ = [
    "DEFAULT_FPS",
    "DEFAULT_MAX_FRAMES",
    "Video",
    "VideoError",
    "load_video",
    "sample_indices",
    "timestamp_text",
]
