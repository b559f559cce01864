"""geode.video: frames sampled at a rate with PyAV equal transformers' `read_video_pyav` with its
`default_sample_indices_fn(fps=...)`, timestamps included; bad files are clear errors. The
videos are made here with PyAV (no downloads)."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geode.video import VideoError, load_video, sample_indices, timestamp_text


def write_video(
    path: Path | None, frames: int = 30, rate: int = 10, size: int = 32, fmt: str = "mp4"
) -> bytes:
    """A small video (codec mpeg4 in MP4, VP8 in WebM) whose frame i has red = 8 i; its bytes,
    also written to `path` when given."""
    import av

    buf = io.BytesIO()
    codec = {"mp4": "mpeg4", "webm": "libvpx"}[fmt]
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            pixels = np.zeros((size, size, 3), np.uint8)
            pixels[..., 0] = 8 * i
            pixels[: size // 2, :, 1] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = buf.getvalue()
    if path is not None:
        path.write_bytes(data)
    return data


@pytest.mark.parametrize(
    ("frames", "rate", "fps"), [(30, 10, 1.0), (30, 10, 2.5), (7, 10, 1.0), (25, 25, 24.0)]
)
def test_frames_and_timestamps_equal_transformers(tmp_path, frames, rate, fps) -> None:
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    path = tmp_path / "clip.mp4"
    write_video(path, frames, rate)
    want, meta = read_video_pyav(str(path), partial(default_sample_indices_fn, fps=fps))
    got = load_video(path, fps=fps, max_frames=None)
    assert got.indices == list(meta.frames_indices)
    assert got.timestamps == meta.timestamps and got.fps == meta.fps == rate
    assert got.total_frames == meta.total_num_frames == frames
    assert np.array_equal(np.stack([np.asarray(f) for f in got.frames]), want)
    assert [f.mode for f in got.frames] == ["RGB"] * len(got.frames)


def test_sampling_rule_and_cap() -> None:
    assert sample_indices(30, 10, 1.0) == [0, 10, 20]  # int(30 / 10 * 1) = 3 frames
    assert sample_indices(30, 10, 0.01) == [0]  # at least one frame
    assert sample_indices(30, 10, 100.0) == list(range(30))  # at most every frame
    assert sample_indices(300, 10, 1.0, max_frames=4) == [0, 75, 150, 225]  # spread over it all
    assert [timestamp_text(t) for t in (0, 1.9, 59.99, 61, 3725)] == [
        "00:00",
        "00:01",
        "00:59",
        "01:01",
        "62:05",
    ]
    with pytest.raises(VideoError, match="fps must be > 0"):
        sample_indices(30, 10, 0)
    with pytest.raises(VideoError, match="max_frames must be >= 1"):
        sample_indices(30, 10, 1.0, max_frames=0)


def test_webm_bytes_without_a_frame_count() -> None:
    """WebM stores no frame count: the packets are counted; bytes decode like a file."""
    data = write_video(None, frames=20, rate=10, fmt="webm")
    got = load_video(data, fps=1.0)
    assert got.total_frames == 20 and got.indices == [0, 10] and got.timestamps == [0.0, 1.0]
    red = [np.asarray(f)[24, 4, 0] for f in got.frames]  # ~8 i, lossy
    assert abs(int(red[1]) - 80) < 12 and int(red[0]) < 12


def test_bad_videos_are_clear_errors(tmp_path) -> None:
    good = write_video(None, frames=10, rate=10)
    with pytest.raises(VideoError, match="missing.mp4: no such video file"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="upload: empty video data"):
        load_video(b"", name="upload")
    with pytest.raises(VideoError, match="video: not a video in a supported container"):
        load_video(b"hello, this is text and no video at all")
    playlist = b"#EXTM3U\n#EXTINF:1,\nhttp://example.com/a.ts\n"
    with pytest.raises(VideoError, match="not a video in a supported container"):
        load_video(playlist)  # never handed to FFmpeg (it would fetch the URL)
    with pytest.raises(VideoError, match="clip: corrupt or unreadable video"):
        load_video(good[:200], name="clip")
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(VideoError, match=r"still.gif: no frame rate \(a still image\?"):
        load_video(gif.getvalue(), name="still.gif")
    with pytest.raises(VideoError, match="fps must be > 0"):
        load_video(good, fps=-1)
    with pytest.raises(VideoError, match="expected bytes or a path, got int"):
        load_video(3)  # type: ignore[arg-type]
