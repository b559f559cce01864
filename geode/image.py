"""Images for Gemma 3: decoding, the pixel pipeline with pan & scan, and the prompt expansion.

Equal to transformers' Gemma3ImageProcessor (its Pillow backend, `Gemma3ImageProcessorPil`) and
Gemma3Processor: RGB, optional pan & scan crops of wide or tall images (Gemma 3 Technical Report,
arXiv:2503.19786, section 2.1), each image and crop resized to size x size with Pillow's bilinear
filter, rescaled by 1/255 and normalised with mean = std = 0.5 to [-1, 1]. In the text, every
`<start_of_image>` becomes the image's soft-token sequence (with pan & scan: the original's, then
one per crop, with Gemma3Processor's wording).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

BOI_TOKEN = "<start_of_image>"  # begin-of-image; also the placeholder a prompt carries per image
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"  # one per soft token; the model's image placeholder id
IMAGE_MEAN = (0.5, 0.5, 0.5)  # Gemma 3's preprocessor_config.json: [-1, 1] inputs
IMAGE_STD = (0.5, 0.5, 0.5)
RESCALE_FACTOR = 1 / 255
# Decoders geode lets Pillow run on bytes from users (no EPS/PDF/PSD and the like).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

ImageSource = Image.Image | bytes | str | os.PathLike


class ImageError(ValueError):
    """An image cannot be decoded, is in an unsupported format, or does not fit the request."""


@dataclass
class ProcessedImages:
    """The model inputs of a list of images."""

    pixel_values: torch.Tensor  # (N, 3, size, size) float32; each image, then its crops
    num_crops: list[int]  # per input image, the pan & scan crops that follow it (0: none)


def open_source(
    source: bytes | str | os.PathLike,
    name: str | None,
    what: str = "image",
    error: type = ImageError,
) -> tuple[str, io.BytesIO | Path]:
    """(the name errors use, a file object or path) for media bytes or a file path; `error`
    for empty data, a missing file or another type."""
    if isinstance(source, bytes | bytearray):
        label = name or what
        if not source:
            raise error(f"{label}: empty {what} data")
        return label, io.BytesIO(source)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        label = name or str(path)
        if not path.is_file():
            raise error(f"{label}: no such {what} file")
        return label, path
    raise error(f"{name or what}: expected bytes or a path, got {type(source).__name__}")


def load_image(source: bytes | str | os.PathLike, name: str | None = None) -> Image.Image:
    """Decode an image file or its bytes, upright (EXIF orientation) and RGB, as transformers'
    `load_image` does; `name` (default: the path, or "image") is named in errors."""
    label, fp = open_source(source, name)
    try:
        with Image.open(fp, formats=FORMATS) as img:
            img.load()  # decode now: truncated or corrupt data fails here, not later
            image = ImageOps.exif_transpose(img)
            return image.convert("RGB")
    except Image.UnidentifiedImageError:
        raise ImageError(
            f"{label}: not an image in a supported format ({', '.join(FORMATS)})"
        ) from None
    except Exception as e:  # noqa: BLE001 -- Pillow's decoders raise many types on bad bytes
        raise ImageError(f"{label}: corrupt or truncated image data ({e})") from None


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


def media_source(
    ref: str, allowed_dir: str | os.PathLike | None, what: str = "image", error: type = ImageError
) -> bytes | Path:
    """The bytes of a `data:...;base64,` URL, or the path of a local file (a plain path or a
    `file://` URL) inside `allowed_dir`; nothing is fetched from the network. `error` (default
    `ImageError`) is raised naming `what` for http(s) URLs, corrupt data URLs, files outside
    `allowed_dir` (or any file when it is None) and missing files."""
    if not isinstance(ref, str) or not ref:
        raise error(f"{what}: expected a data: URL or a file path, got {ref!r}")
    short = ref if len(ref) <= 60 else ref[:57] + "..."
    scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
    if scheme in ("http", "https"):
        raise error(f"{what} {short}: not fetched: no network (send a data: URL instead)")
    if scheme == "data":
        m = _DATA_URL.match(ref)
        if not m:
            raise error(f"{what}: corrupt data: URL {short!r} (expected data:<type>;base64,<data>)")
        try:
            data = base64.b64decode(ref[m.end() :], validate=True)
        except (binascii.Error, ValueError) as e:
            raise error(f"{what}: corrupt data: URL {short!r}: bad base64 ({e})") from None
        if not data:
            raise error(f"{what}: corrupt data: URL {short!r}: no data")
        return data
    if scheme == "file":
        ref = ref[len("file://") :] if ref.lower().startswith("file://") else ref[5:]
    elif scheme and len(scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise error(f"{what} {short}: unsupported URL scheme {scheme!r} (data: or a local file)")
    if allowed_dir is None:
        raise error(f"{what} {short}: local files are not allowed here (no allowed directory)")
    root = Path(allowed_dir).resolve()
    path = (root / ref).resolve()  # an absolute ref stays absolute; symlinks are followed
    if not path.is_relative_to(root):
        raise error(f"{what} {short}: outside the allowed directory {root}")
    if not path.is_file():
        raise error(f"{what} {short}: no such file in {root}")
    return path


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited onto white (transformers' `convert_to_rgb`)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def pan_and_scan_boxes(
    width: int,
    height: int,
    min_crop_size: int = 256,
    max_num_crops: int = 4,
    min_ratio_to_activate: float = 1.2,
) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom) of pan & scan, row-major; [] when it does not apply.

    An image whose long side exceeds `min_ratio_to_activate` x its short side is cut along the
    long side into round(ratio) crops (at least 2, at most `max_num_crops`, none narrower than
    `min_crop_size`), each ceil(long / n) wide; the last crop ends at the image's edge.
    """
    if width >= height:
        if width / height < min_ratio_to_activate:
            return []
        across = min(math.floor(width / min_crop_size), math.floor(width / height + 0.5))
        across, down = min(max_num_crops, max(2, across)), 1
    else:
        if height / width < min_ratio_to_activate:
            return []
        down = min(math.floor(height / min_crop_size), math.floor(height / width + 0.5))
        across, down = 1, min(max_num_crops, max(2, down))
    crop_w, crop_h = math.ceil(width / across), math.ceil(height / down)
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [
        (x, y, min(x + crop_w, width), min(y + crop_h, height))
        for y in range(0, crop_h * down, crop_h)
        for x in range(0, crop_w * across, crop_w)
    ]


def process_images(
    images: Sequence[ImageSource],
    size: int = 896,
    *,
    do_pan_and_scan: bool = False,
    pan_and_scan_min_crop_size: int = 256,
    pan_and_scan_max_num_crops: int = 4,
    pan_and_scan_min_ratio_to_activate: float = 1.2,
) -> ProcessedImages:
    """Images (PIL images, bytes or paths) -> pixel_values (N, 3, size, size) and crop counts.

    Equal to transformers' Gemma3ImageProcessor with Gemma 3's preprocessor_config.json and
    Gemma3Processor's pan & scan defaults. PIL images are made RGB with transparency on white;
    bytes and paths are decoded by `load_image`."""
    _check_options(size, pan_and_scan_min_crop_size, pan_and_scan_max_num_crops)
    if not pan_and_scan_min_ratio_to_activate > 0:
        raise ImageError(
            "pan_and_scan_min_ratio_to_activate must be > 0, "
            f"got {pan_and_scan_min_ratio_to_activate!r}"
        )
    rows: list[np.ndarray] = []  # each (size, size, 3) float32
    num_crops: list[int] = []
    for i, source in enumerate(images):
        if isinstance(source, Image.Image):
            image = to_rgb(source)
        else:
            name = f"image {i}" if isinstance(source, bytes | bytearray) else None
            image = load_image(source, name=name)
        boxes = []
        if do_pan_and_scan:
            boxes = pan_and_scan_boxes(
                image.width,
                image.height,
                pan_and_scan_min_crop_size,
                pan_and_scan_max_num_crops,
                pan_and_scan_min_ratio_to_activate,
            )
        num_crops.append(len(boxes))
        for part in [image, *(image.crop(box) for box in boxes)]:
            rows.append(_pixels(part, size))
    if not rows:
        return ProcessedImages(torch.empty(0, 3, size, size), [])
    stacked = np.stack(rows).transpose(0, 3, 1, 2)  # (N, 3, size, size)
    return ProcessedImages(torch.from_numpy(np.ascontiguousarray(stacked)), num_crops)


def _pixels(image: Image.Image, size: int) -> np.ndarray:
    """RGB image -> (size, size, 3) float32: bilinear resize, x/255, (x - mean) / std."""
    resized = np.asarray(image.resize((size, size), resample=Image.Resampling.BILINEAR))
    scaled = (resized.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)  # as HF: in float64
    mean = np.array(IMAGE_MEAN, dtype=np.float32)
    std = np.array(IMAGE_STD, dtype=np.float32)
    return (scaled - mean) / std


def _check_options(size: int, min_crop: int, max_crops: int) -> None:
    """Positive integers for the size and the pan & scan counts."""
    for label, value in (
        ("size", size),
        ("pan_and_scan_min_crop_size", min_crop),
        ("pan_and_scan_max_num_crops", max_crops),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ImageError(f"{label} must be a positive integer, got {value!r}")


def image_parts(mm_tokens_per_image: int = 256, num_crops: int = 0) -> list[str | int]:
    """`image_sequence` as text pieces and soft-token counts: an int n stands for a run of n
    `<image_soft_token>`s (so a tokenizer can map it to the model's image id, see
    `Tokenizer.encode_with_images`)."""
    full: list[str | int] = [f"\n\n{BOI_TOKEN}", mm_tokens_per_image, f"{EOI_TOKEN}\n\n"]
    if not num_crops:
        return full
    out: list[str | int] = ["Here is the original image ", *full]
    out.append(" and here are some crops to help you see better ")
    for k in range(num_crops):
        out += [" ", *full] if k else full
    return merge_parts(out)


def merge_parts(parts: Sequence[str | int]) -> list[str | int]:
    """Adjacent text pieces joined, empty ones dropped (soft-token counts kept as they are)."""
    out: list[str | int] = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        elif p != "":
            out.append(p)
    return out


def parts_text(parts: Sequence[str | int]) -> str:
    """The prompt text of `image_parts`-style pieces: n -> n x `<image_soft_token>`."""
    return "".join(p if isinstance(p, str) else IMAGE_TOKEN * p for p in parts)


def image_sequence(mm_tokens_per_image: int = 256, num_crops: int = 0) -> str:
    """The text one image becomes: "\\n\\n<start_of_image>" + n x "<image_soft_token>" +
    "<end_of_image>\\n\\n", and with pan & scan crops Gemma3Processor's wording around the
    original's sequence followed by one sequence per crop."""
    return parts_text(image_parts(mm_tokens_per_image, num_crops))


def expand_image_tokens(text: str, num_crops: Sequence[int], mm_tokens_per_image: int = 256) -> str:
    """Replace the i-th `<start_of_image>` of `text` by image i's `image_sequence`; the text
    must hold one placeholder per image (`num_crops` from `process_images`)."""
    parts = text.split(BOI_TOKEN)
    if len(parts) - 1 != len(num_crops):
        raise ImageError(
            f"the text has {len(parts) - 1} {BOI_TOKEN} placeholders but {len(num_crops)} "
            "images were given; put one placeholder where each image goes"
        )
    out = [parts[0]]
    for crops, rest in zip(num_crops, parts[1:], strict=True):
        out += [image_sequence(mm_tokens_per_image, crops), rest]
    return "".join(out)
