"""Benchmark: the vision tower's images/s and the time to first token of a one-image chat
request, geode vs transformers' Gemma3ForConditionalGeneration, same weights, same run.

Rows: float32 and bfloat16 for
  nano     nano-5m's text decoder + the nano-vision tower (image 32, patch 4, width 64,
           2 layers, 16 soft tokens)
  siglip1  nano-5m's text decoder + Gemma 3's SigLIP tower at its real size (image 896,
           patch 14, width 1152, 4,096 patches -> 256 soft tokens) with one encoder layer of 27
Tower: `model.image_features(pixels)` (tower + projector) vs transformers'
`get_image_features`, a batch of --images images. TTFT: `Engine.generate` of one request
(a text prompt around one image, max_new_tokens=1: the tower, the prefill with the
bidirectional image mask, the first token) vs transformers `generate(..., max_new_tokens=1)`
with `token_type_ids`; the engine's vision cache is cleared before each rep (transformers has
none). The weights are geode's random init, saved by geode and loaded by transformers; the
first tokens are checked equal. Medians of --reps after a warm-up, and the ratio
(transformers time / geode time: > 1 means geode is faster).

usage: python bench/vision.py [--models nano,siglip1] [--dtypes float32,bfloat16] [--reps 5]
                              [--images 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

import geode
from geode.infer import Engine, Request
from geode.model.vision import get_vision_preset

ROWS: list[dict] = []


def emit(**row) -> None:
    """Record a measurement and print it as a JSON line."""
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of fn() over reps calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(name: str) -> tuple[torch.nn.Module, object]:
    """(geode VLM float32, transformers Gemma3ForConditionalGeneration float32), same weights."""
    from transformers import Gemma3ForConditionalGeneration

    text = geode.get_preset("nano-5m")
    V = text.vocab_size
    ids = dict(image_token_index=V - 1, boi_token_index=V - 3, eoi_token_index=V - 2)
    if name == "nano":
        vision = get_vision_preset("nano-vision").replace(**ids)
    elif name == "siglip1":
        vision = get_vision_preset("gemma3-vision").replace(num_hidden_layers=1, **ids)
    else:
        raise SystemExit(f"unknown model {name!r} (nano, siglip1)")
    model = geode.build_model(dataclasses.replace(text, layer_types=None), seed=0, vision=vision)
    with tempfile.TemporaryDirectory() as d:
        geode.save_model(model, d)
        ref = Gemma3ForConditionalGeneration.from_pretrained(d, attn_implementation="sdpa")
    return model.eval(), ref.eval()


def prompt_ids(model: torch.nn.Module, text: int = 24) -> list[int]:
    """<bos>, text, one image's placeholder run between its markers, text."""
    v = model.vision
    g = torch.Generator().manual_seed(0)
    words = torch.randint(3, v.boi_token_index - 1, (text,), generator=g).tolist()
    image = [v.boi_token_index, *[v.image_token_index] * v.mm_tokens_per_image, v.eoi_token_index]
    return [2, *words[: text // 2], *image, *words[text // 2 :]]


def run(name: str, dtype: torch.dtype, args: argparse.Namespace) -> None:
    """Tower images/s and one-image TTFT, geode vs transformers, in `dtype`."""
    base, ref = build(name)
    model, ref = base.to(dtype), ref.to(dtype)
    v = model.vision
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(args.images, 3, v.image_size, v.image_size, generator=g) * 2 - 1
    with torch.inference_mode():
        t_geode = median_time(lambda: model.image_features(pixels), args.reps)
        t_ref = median_time(
            lambda: ref.get_image_features(pixel_values=pixels.to(dtype)), args.reps
        )
    label = {"float32": "f32", "bfloat16": "bf16"}[str(dtype).removeprefix("torch.")]
    emit(
        model=name, dtype=label, test="tower", images=args.images,
        geode_images_per_s=args.images / t_geode, transformers_images_per_s=args.images / t_ref,
        ratio=t_ref / t_geode,
    )  # fmt: skip

    ids = prompt_ids(model)
    one = pixels[:1]
    engine = Engine(model)

    def geode_first() -> int:
        engine.vision_cache.clear()
        req = Request(ids, images=one, temperature=0, max_new_tokens=1, ignore_eos=True)
        return engine.generate(req)[0].token_ids[0]

    x = torch.tensor([ids])
    tt = (x == v.image_token_index).long()

    def ref_first() -> int:
        out = ref.generate(
            x, pixel_values=one.to(dtype), token_type_ids=tt, attention_mask=torch.ones_like(x),
            max_new_tokens=1, do_sample=False, pad_token_id=0,
        )  # fmt: skip
        return int(out[0, -1])

    with torch.inference_mode():
        same = geode_first() == ref_first()
        t_geode = median_time(geode_first, args.reps)
        t_ref = median_time(ref_first, args.reps)
    emit(
        model=name, dtype=label, test="ttft", prompt_tokens=len(ids),
        geode_ttft_ms=t_geode * 1e3, transformers_ttft_ms=t_ref * 1e3, ratio=t_ref / t_geode,
        first_token_equal=same,
    )  # fmt: skip


def table() -> str:
    """The rows as a markdown table."""
    out = [
        "| model | dtype | test | geode | transformers | ratio (transformers time / geode) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in ROWS:
        if r["test"] == "tower":
            g = f"{r['geode_images_per_s']:.1f} images/s"
            t = f"{r['transformers_images_per_s']:.1f} images/s"
        else:
            g = f"{r['geode_ttft_ms']:.1f} ms"
            t = f"{r['transformers_ttft_ms']:.1f} ms"
            if not r["first_token_equal"]:
                t += " (first token differs)"
        out.append(f"| {r['model']} | {r['dtype']} | {r['test']} | {g} | {t} | {r['ratio']:.2f} |")
    return "\n".join(out)


def main() -> None:
    """Parse the options, run every (model, dtype) row, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="nano,siglip1")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--images", type=int, default=8, help="tower batch (siglip1: at most 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a shared host: 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        for dt in args.dtypes.split(","):
            a = args
            if name == "siglip1":
                a = argparse.Namespace(**{**vars(args), "images": min(args.images, 2)})
            run(name, getattr(torch, dt), a)
    print(table())


if __name__ == "__main__":
    main()
