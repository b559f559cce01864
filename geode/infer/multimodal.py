"""Images in the engine: a request's images, the vision-tower cache and image prefill chunks.

    engine.generate([Request(render_multimodal(messages, mm_tokens_per_image=256), ...)])
    engine.generate([Request(ids_with_placeholders, images=pixel_values)])   # (N, 3, S, S)

A request carries its images as a `geode.chat.MultimodalPrompt` (token ids through the
tokenizer, pixels through the image processor) or as token ids holding the config's
`image_token_index` placeholders plus `images=` pixel values, one image per
`mm_tokens_per_image` placeholders, in order. `prepare_images` checks them (a text-only model,
placeholder counts, the context) and records each run of placeholders as a span of stream
positions (`PromptImages`).

Prefill: the scheduler never cuts a chunk inside a span (`PromptImages.fit`; an image longer
than the chunk budget gets a chunk of its own), so each image's soft tokens attend to each
other bidirectionally inside one forward (the model's `image_groups` mask; the cache keeps
positions, not groups). A chunk holding image tokens runs through `run_image_chunk`: the
model's own `hidden` on `embeds` (text embeddings with the soft tokens placed, as
`Transformer.hidden` does with `pixel_values`) into the sequence's cache row; decode then runs
on the engine's runner as for text (the native C runner included: it reads the same cache).

`VisionCache`: the vision tower and projector run once per image; their soft tokens are kept by
a hash of the image's pixel values in a bounded LRU, so a repeated image (another turn of a
conversation, n samples, the same picture in several requests) is not encoded again.
Image requests skip the prefix cache (its block keys are token ids, and two images share
their placeholder ids); identical prompts share one prefill only when their images are equal.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..model.vision import image_group_ids, place_image_features
from .sampling import RequestError


@dataclass
class PromptImages:
    """A prompt's images: placeholder id, pixel values (N, C, S, S), a hash per image, and the
    placeholder runs as stream spans [a, b) with the images each run holds (in order)."""

    token: int
    pixels: torch.Tensor
    keys: list[str]
    spans: list[tuple[int, int]]
    span_images: list[range]

    @property
    def key(self) -> tuple[str, ...]:
        """The images' identity (two prompts with equal ids share a prefill only if equal)."""
        return tuple(self.keys)

    def fit(self, start: int, end: int) -> int:
        """The end of a chunk [start, end) moved so that it splits no image: back to the start
        of an image it would cut, or, when that image begins the chunk, past its end."""
        for a, b in self.spans:
            if a < end < b:
                return a if a > start else b
        return end

    def in_chunk(self, start: int, end: int) -> list[int]:
        """Indices of the spans inside [start, end) (a chunk never cuts one)."""
        return [k for k, (a, b) in enumerate(self.spans) if start <= a and b <= end]


def image_hash(pixels: torch.Tensor) -> str:
    """A content hash of one image's pixel values (C, S, S): its dtype, shape and bytes."""
    x = pixels.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def placeholder_runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of `token` in ids."""
    runs, a = [], None
    for i, t in enumerate(ids):
        if t == token and a is None:
            a = i
        elif t != token and a is not None:
            runs.append((a, i))
            a = None
    if a is not None:
        runs.append((a, len(ids)))
    return runs


def is_multimodal(prompt: Any) -> bool:
    """The prompt is a rendered chat with images (`geode.chat.MultimodalPrompt`)."""
    from ..chat import MultimodalPrompt

    return isinstance(prompt, MultimodalPrompt)


def prepare_images(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: Any,
    images: torch.Tensor | None,
    max_seq_len: int,
) -> tuple[list[int], PromptImages | None]:
    """(prompt ids, their images) of a request with images; RequestError naming the problem
    (a text-only model, a count or shape mismatch, more image tokens than the context holds)."""
    vision = getattr(model, "vision", None)
    if vision is None:
        raise RequestError(
            "image inputs sent to a text-only model: this model has no vision tower (a "
            "text-only checkpoint, or loaded with vision=False)"
        )
    token, per_image = vision.image_token_index, vision.mm_tokens_per_image
    if is_multimodal(prompt):
        if images is not None:
            raise RequestError("pass images= with token ids, not with a MultimodalPrompt")
        if tokenizer is None:
            raise RequestError("a MultimodalPrompt needs an engine with a tokenizer")
        if any(isinstance(p, int) and p != per_image for p in prompt.parts):
            raise RequestError(
                f"the prompt was rendered with a soft-token count other than this model's "
                f"mm_tokens_per_image ({per_image}): pass mm_tokens_per_image={per_image} "
                "to render_multimodal"
            )
        try:
            ids = prompt.token_ids(tokenizer, image_token_index=token)
        except ValueError as e:
            raise RequestError(str(e)) from None
        images = prompt.process(vision.image_size).pixel_values
    else:
        ids = prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else prompt
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise RequestError("a prompt with images= must be token ids") from None
    want = (vision.num_channels, vision.image_size, vision.image_size)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise RequestError(f"images must be pixel values (N_images, {', '.join(map(str, want))}), "
                           f"got {got}")  # fmt: skip
    n = images.shape[0]
    runs = placeholder_runs(ids, token)
    slots = sum(b - a for a, b in runs)
    if slots != n * per_image:
        raise RequestError(
            f"the prompt has {slots} image placeholder tokens (id {token}) but {n} images give "
            f"{n * per_image} soft tokens ({per_image} per image)"
        )
    bad = next(((a, b) for a, b in runs if (b - a) % per_image), None)
    if bad is not None:
        raise RequestError(
            f"image placeholders at positions {bad[0]}..{bad[1] - 1} are not a whole number of "
            f"images ({per_image} soft tokens each)"
        )
    if len(ids) >= max_seq_len:
        raise RequestError(
            f"too many images for the context: {n} images take {slots} soft tokens, the prompt "
            f"{len(ids)} tokens, the context holds {max_seq_len} (prompt and output)"
        )
    span_images, i = [], 0
    for a, b in runs:
        k = (b - a) // per_image
        span_images.append(range(i, i + k))
        i += k
    keys = [image_hash(images[j]) for j in range(n)]
    return ids, PromptImages(token, images, keys, runs, span_images)


class VisionCache:
    """Soft tokens of recent images (mm_tokens_per_image, hidden) by pixel hash, LRU-bounded to
    `max_images`; `stats`: encoded (tower runs, one per image), hits, evictions."""

    def __init__(self, max_images: int = 64):
        if max_images < 0:
            raise ValueError(f"vision cache max_images must be >= 0, got {max_images}")
        self.max_images = max_images
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.stats = dict(encoded=0, hits=0, evictions=0)

    def __len__(self) -> int:
        return len(self._items)

    def features(
        self, model: torch.nn.Module, images: PromptImages, idx: list[int]
    ) -> torch.Tensor:
        """Soft tokens (len(idx), mm, hidden) of images[idx]; the tower runs once, batched, on
        the distinct images not cached."""
        missing: dict[str, int] = {}
        for j in idx:
            key = images.keys[j]
            if key in self._items:
                self._items.move_to_end(key)
                self.stats["hits"] += 1
            elif key in missing:
                self.stats["hits"] += 1  # the same image twice in one chunk
            else:
                missing[key] = j
        new: dict[str, torch.Tensor] = {}
        if missing:
            px = images.pixels[list(missing.values())]  # (M, C, S, S)
            feats = model.image_features(px)  # (M, mm, hidden)
            self.stats["encoded"] += len(missing)
            new = dict(zip(missing, feats, strict=True))
        keys = [images.keys[j] for j in idx]
        out = torch.stack([new[k] if k in new else self._items[k] for k in keys])
        for key, f in new.items():
            self._put(key, f)
        return out

    def _put(self, key: str, feats: torch.Tensor) -> None:
        if self.max_images == 0:
            return
        self._items[key] = feats
        while len(self._items) > self.max_images:
            self._items.popitem(last=False)
            self.stats["evictions"] += 1

    def clear(self) -> None:
        """Drop every cached image (counters kept)."""
        self._items.clear()


def chunk_has_images(seq: Any, start: int, end: int) -> bool:
    """A prompt chunk [start, end) of seq holds image soft tokens."""
    im = getattr(seq, "images", None)
    return im is not None and any(a < end and start < b for a, b in im.spans)


def run_image_chunk(
    model: torch.nn.Module,
    cache: Any,
    vision_cache: VisionCache,
    seq: Any,
    row: int,
    start: int,
    end: int,
    cols: list[int],
) -> torch.Tensor:
    """Run the prompt chunk [start, end) of seq, which holds whole images, into cache row
    `row`; float32 logits (len(cols), V) of its columns `cols`."""
    im: PromptImages = seq.images
    dev = model.device
    ids = torch.tensor([seq.tokens(start, end)], dtype=torch.long, device=dev)  # (1, T)
    pos = torch.arange(start, end, device=dev)[None]  # (1, T)
    idx = [j for k in im.in_chunk(start, end) for j in im.span_images[k]]
    feats = vision_cache.features(model, im, idx)  # (n, mm, hidden)
    x = place_image_features(model.embed_tokens(ids), ids, feats, im.token)  # (1, T, hidden)
    groups = image_group_ids(ids, im.token)  # (1, T): bidirectional within each image
    view = cache if row == 0 else cache.rows(row, row + 1)
    h = model.hidden(embeds=x, positions=pos, cache=view, image_groups=groups)  # (1, T, hidden)
    if not cols:  # a chunk before the prompt's end, no logprobs wanted
        return h.new_zeros(0, model.config.vocab_size, dtype=torch.float32)
    return model.logits(h[0, cols]).float()  # (K, V)
