"""Benchmark: the engine on the other family members, against transformers in the same run.

Parts (select with --parts, default all):
  decode  greedy decode tokens/s at batch 1 and 16 of `gemma4-nano-moe` (8 experts, top-2, a
          dense MLP beside them) and `recurrentgemma-nano` (Griffin: recurrent, recurrent,
          local attention) with random weights, float32: geode's engine (the torch runner: the
          native one refuses these families) against transformers `generate` of the same
          weights (saved by geode, loaded by `AutoModelForCausalLM`), random prompts of
          --prompt-len tokens, --new-tokens new ones, eos ignored. Decode rate excludes the
          prefill on both sides (bench/decode.py's `measure_decode` / `hf_decode`); medians of
          --reps interleaved repetitions.
  long    one sequence of --long-tokens generated tokens (default 8,192): tokens/s in each
          1K-token window and the decode state the cache holds at the window's end
          (`kv_cache_bytes`, which a one-row cache allocates; the engine's own `cache.nbytes`
          is checked against it at the end) for `recurrentgemma-nano` and a Gemma 3 of the
          same shape (hidden 128, 6 layers, 4 heads / 1 kv head of 32, window 64, vocab 4096,
          MLP width 384 = RecurrentGemma's intermediate_size / 2; 5 local : 1 global), Gemma 3 on
          the native runner and on the torch runner. Griffin's claim: the recurrent model's
          throughput does not fall with length and its state stays constant.

usage: python bench/family.py [--parts decode,long] [--reps 3] [--threads 2] [--long-tokens 8192]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import geode
from geode.config import ModelConfig
from geode.family import parameter_counts
from geode.infer import Engine, Request
from geode.infer.benchmark import measure_decode
from geode.infer.cache import kv_cache_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import ROWS, emit, hf_decode, interleaved  # noqa: E402  (same helpers)

FAMILIES = ("gemma4-nano-moe", "recurrentgemma-nano")
WINDOW = 1024  # tokens per throughput window of the long run


def _hf(model: torch.nn.Module, tmp: Path):
    """The same weights as a transformers model (geode saves, AutoModelForCausalLM loads)."""
    from transformers import AutoModelForCausalLM

    path = tmp / f"ckpt-{len(list(tmp.iterdir()))}"
    geode.save_model(model, path)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def _engine(model: torch.nn.Module, **kw) -> Engine:
    """An engine (the native runner's refusal of these families is expected: silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Engine(model, **kw)


def part_decode(args, tmp: Path) -> None:
    for preset in FAMILIES:
        model = geode.build_model(geode.get_preset(preset), seed=0)
        ref = _hf(model, tmp)
        for batch in (1, 16):
            eng = _engine(model, max_batch=batch)
            res = interleaved(
                {
                    "geode": lambda e=eng, b=batch: measure_decode(
                        e, b, args.prompt_len, args.new_tokens, reps=1
                    ),
                    "transformers": lambda r=ref, b=batch: hf_decode(
                        r, b, args.prompt_len, args.new_tokens, reps=1
                    ),
                },
                args.reps,
            )
            g, h = res["geode"]["tokens_per_s"], res["transformers"]["tokens_per_s"]
            emit(bench="decode", model=preset, batch=batch, runner=eng.runner.__class__.__name__,
                 geode_tokens_per_s=g, transformers_tokens_per_s=h, ratio=g / h,
                 new_tokens=args.new_tokens, prompt_len=args.prompt_len)  # fmt: skip


def same_size_gemma3(rg: ModelConfig) -> ModelConfig:
    """A Gemma 3 with RecurrentGemma's shape (see the module docstring)."""
    return ModelConfig(
        vocab_size=rg.vocab_size, hidden_size=rg.hidden_size,
        intermediate_size=rg.intermediate_size // 2, num_hidden_layers=rg.num_hidden_layers,
        num_attention_heads=rg.num_attention_heads, num_key_value_heads=rg.num_key_value_heads,
        head_dim=rg.head_dim, query_pre_attn_scalar=rg.head_dim, sliding_window=rg.sliding_window,
        max_position_embeddings=rg.max_position_embeddings, final_logit_softcapping=None,
        name="gemma3-same-size",
    )  # fmt: skip


def _long_run(engine: Engine, n: int) -> list[float]:
    """Stream one greedy sequence of n new tokens; the time of each token (perf_counter)."""
    times = []
    for d in engine.stream(Request([2, 17, 33, 41], max_new_tokens=n, temperature=0,
                                   ignore_eos=True)):  # fmt: skip
        times += [time.perf_counter()] * len(d.token_ids)
    return times


def part_long(args, tmp: Path) -> None:
    n = args.long_tokens
    rg = geode.get_preset("recurrentgemma-nano").replace(max_position_embeddings=n + 64)
    g3 = same_size_gemma3(rg)
    runs = [
        ("recurrentgemma-nano", rg, {}),
        ("gemma3-same-size", g3, {}),
        ("gemma3-same-size", g3, {"native": False}),
    ]
    for name, cfg, kw in runs:
        model = geode.build_model(cfg, seed=0)
        eng = _engine(model, max_batch=1, **kw)
        _long_run(eng, 64)  # warm-up
        times = _long_run(eng, n)
        held = eng.cache.nbytes  # the cache of the finished run (sized for prompt + n)
        assert held == kv_cache_bytes(cfg, 4 + n, model.dtype), (held, name)
        runner = "native" if eng.native else "torch"
        for w in range(0, n, WINDOW):
            a, b = times[max(w - 1, 0)], times[min(w + WINDOW, n) - 1]
            tokens = min(w + WINDOW, n) - max(w, 1)
            emit(bench="long", model=name, runner=runner, window=f"{w // 1024}K-{(w + WINDOW) // 1024}K",
                 tokens_per_s=tokens / (b - a),
                 state_bytes=kv_cache_bytes(cfg, 4 + min(w + WINDOW, n), model.dtype),
                 params=parameter_counts(cfg)["total"])  # fmt: skip


def table() -> None:
    """The readable tables of the rows emitted."""
    dec = [r for r in ROWS if r["bench"] == "decode"]
    if dec:
        print(
            "\n| model | batch | geode tok/s | transformers tok/s | ratio |\n|---|---|---|---|---|"
        )
        for r in dec:
            print(f"| {r['model']} | {r['batch']} | {r['geode_tokens_per_s']:.1f} | "
                  f"{r['transformers_tokens_per_s']:.1f} | {r['ratio']:.2f}x |")  # fmt: skip
    long = [r for r in ROWS if r["bench"] == "long"]
    if long:
        keys = list(dict.fromkeys((r["model"], r["runner"]) for r in long))
        windows = list(dict.fromkeys(r["window"] for r in long))
        head = " | ".join(f"{m} ({k}) tok/s, state" for m, k in keys)
        print(f"\n| window | {head} |\n|---|" + "---|" * len(keys))
        for w in windows:
            cells = []
            for m, k in keys:
                r = next(x for x in long if (x["model"], x["runner"], x["window"]) == (m, k, w))
                cells.append(f"{r['tokens_per_s']:.0f}, {r['state_bytes'] / 2**10:.0f} KiB")
            print(f"| {w} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="decode,long")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--long-tokens", type=int, default=8192)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    parts = {"decode": part_decode, "long": part_long}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.parts.split(","):
            parts[name](args, Path(tmp))
    table()


if __name__ == "__main__":
    main()
