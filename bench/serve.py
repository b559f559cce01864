"""Benchmark: serving throughput and latency, geode's server vs a transformers `generate` server
and llama.cpp's llama-server.

Each server runs in its own process on 127.0.0.1 (the clients in this one) and serves the same
checkpoint with the same tokenizer: a random preset (HF layout, tokenizer trained here) or, with
`--real`, the real Gemma 3 270M in float32 (bench/real.py's `prepare`). Clients are asyncio tasks
with httpx, streaming
`/v1/completions` (the same prompts, greedy, `ignore_eos` so every request produces exactly
`--max-tokens` tokens). At each concurrency C, C clients send `max(C, --min-requests)` requests
in all. Reported per server and concurrency: output tokens/s, time to first token (TTFT) and
inter-token latency (ITL) p50/p99, then the throughput ratio geode / reference.

The reference is the minimal FastAPI wrapper around `transformers` `generate` that a user would
write (streaming through `TextIteratorStreamer`, one `generate` at a time behind a lock, since
`generate` has no continuous batching). With `--llama-server PATH` (skipped with a message when
absent), llama.cpp's server serves the same weights as a float32 GGUF (geode's GGUF writer)
with `-np C --cont-batching -t THREADS` (C: the largest concurrency). Prints one JSON line per
measurement, then a table with geode / transformers and geode / llama.cpp side by side.

usage: python bench/serve.py [--preset nano-1m | --real] [--concurrency 1 8 32] [--max-tokens 64]
                             [--llama-server PATH] [--skip-reference]
e.g.   python bench/serve.py --preset nano-60m --concurrency 1 32 --min-requests 64 \\
           --skip-reference --llama-server ~/.cache/llama-build/.../build/bin/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import geode  # noqa: E402
from geode.config import get_preset  # noqa: E402
from geode.tokenizer import train_tokenizer  # noqa: E402
from tests.serve.helpers import free_port  # noqa: E402


def make_checkpoint(root: Path, preset: str) -> Path:
    """A random preset checkpoint with a tokenizer trained on some stdlib source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:60]
    cfg = get_preset(preset)
    tok = train_tokenizer(files=files, vocab_size=cfg.vocab_size, out=root / "tok")
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    model = geode.build_model(cfg, seed=0)
    path = root / "model"
    geode.save_model(model, path, files={"tokenizer.model": root / "tok" / "tokenizer.model"})
    return path


def reference_app(path: Path) -> Any:
    """FastAPI + transformers generate: streaming completions, one generation at a time."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = geode.load_tokenizer(path)

    class _Streamer(BaseStreamer):  # token ids -> an asyncio queue (None at the end)
        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate first puts the prompt
                self.prompt_seen = True
                return
            self.loop.call_soon_threadsafe(self.queue.put_nowait, value.flatten().tolist())

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    lock = threading.Lock()
    app = FastAPI()
    app.state.geode = None

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        ids = torch.tensor([[tok.bos_id, *tok.encode(body["prompt"])]])
        n = int(body.get("max_tokens", 16))
        queue: asyncio.Queue = asyncio.Queue()
        streamer = _Streamer(asyncio.get_running_loop(), queue)

        def run() -> None:
            with lock, torch.inference_mode():
                model.generate(
                    ids,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=0,
                )

        threading.Thread(target=run, daemon=True).start()

        async def events() -> Any:
            decoder = tok.stream_decoder(skip_special=True)
            while (new := await queue.get()) is not None:
                piece = decoder.extend(new)
                yield f"data: {json.dumps({'choices': [{'text': piece, 'index': 0}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; arrival times of its chunks."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    for attempt in range(3):
        t0 = time.perf_counter()
        times = []
        try:
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        times.append(time.perf_counter())
            return {"t0": t0, "times": times}
        except httpx.RemoteProtocolError:  # a kept-alive connection the server had just closed
            if times or attempt == 2:
                raise
    raise AssertionError("unreachable")


async def load(url: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    """C clients share n_requests; throughput and latency percentiles."""
    prompts = [f"def function_{i}(x, y):\n    return" for i in range(n_requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    out: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                p = queue.get_nowait()
                out.append(await one_request(client, url, p, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ttft = [r["times"][0] - r["t0"] for r in out if r["times"]]
    itl = [b - a for r in out for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = n_requests * max_tokens

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "requests": n_requests,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
        "ttft_p99_ms": round(1000 * pct(ttft, 0.99), 1),
        "itl_p50_ms": round(1000 * statistics.median(itl), 2) if itl else None,
        "itl_p99_ms": round(1000 * pct(itl, 0.99), 2) if itl else None,
    }


def llama_server_command(exe: Path, gguf: Path, slots: int, threads: int) -> Any:
    """llama-server on the GGUF: `slots` parallel sequences, continuous batching, 256 tokens each."""
    return lambda port: [
        str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(slots), "--cont-batching", "-t", str(threads), "-c", str(256 * slots),
    ]  # fmt: skip


def start_server(cmd: list[str], port: int, timeout: float = 300.0) -> subprocess.Popen:
    """Start a server process and wait for GET /health = 200."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {cmd}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not become healthy: {cmd}")


def main() -> None:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="nano-1m")
    ap.add_argument("--real", action="store_true", help="the real Gemma 3 270M (f32)")
    ap.add_argument("--workdir", type=Path,
                    default=Path.home() / ".cache" / "geode-bench" / "gemma3-270m")  # fmt: skip
    ap.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-requests", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each server")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--serve-reference", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_reference:  # child process: the transformers server
        import uvicorn

        torch.set_num_threads(args.threads)
        uvicorn.run(
            reference_app(Path(args.serve_reference)),
            host="127.0.0.1",
            port=args.port,
            log_level="warning",
        )
        return

    avg = os.getloadavg()
    print(f"# {os.cpu_count()} CPUs, load average {avg[0]:.2f} {avg[1]:.2f} {avg[2]:.2f}",
          flush=True)  # fmt: skip
    rows = []
    env_threads = ["env", f"OMP_NUM_THREADS={args.threads}"]
    preset = "gemma3-270m" if args.real else args.preset
    with tempfile.TemporaryDirectory() as tmp:
        if args.real:
            sys.path.insert(0, str(REPO / "bench"))
            from real import prepare

            files = prepare(args.workdir.expanduser(), None)
            path, gguf = files["hf"], files["f32"]
        else:
            path = make_checkpoint(Path(tmp), args.preset)
            gguf = Path(tmp) / "model-f32.gguf"
        servers = {
            "geode": lambda port: [
                *env_threads,
                sys.executable,
                "-m",
                "geode",
                "serve",
                str(path),
                "--port",
                str(port),
                "--max-batch",
                str(max(args.concurrency)),
            ],
        }
        if not args.skip_reference:
            servers["transformers"] = lambda port: [
                *env_threads,
                sys.executable,
                __file__,
                "--serve-reference",
                str(path),
                "--port",
                str(port),
                "--threads",
                str(args.threads),
            ]
        if args.llama_server is None or not args.llama_server.is_file():
            where = f" ({args.llama_server} does not exist)" if args.llama_server else ""
            print(f"# llama.cpp: skipped, no --llama-server binary{where}", flush=True)
        else:
            if not gguf.exists():
                from geode.gguf import hf_to_gguf

                hf_to_gguf(path, gguf, "f32")
            servers["llama.cpp"] = llama_server_command(
                args.llama_server, gguf, max(args.concurrency), args.threads
            )
        for name, command in servers.items():
            port = free_port()
            proc = start_server(command(port), port)
            url = f"http://127.0.0.1:{port}"
            try:
                # warm-up at the largest concurrency: one-time work for a large batch (weight
                # packing, cache growth) happens before the measurements
                top = max(args.concurrency)
                asyncio.run(load(url, top, top, 8))
                for c in args.concurrency:
                    m = asyncio.run(load(url, c, max(c, args.min_requests), args.max_tokens))
                    row = {
                        "bench": "serve",
                        "server": name,
                        "preset": preset,
                        "concurrency": c,
                        "max_tokens": args.max_tokens,
                        **m,
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    table(rows, args.concurrency)
    avg = os.getloadavg()
    print(f"\nload average at the end: {avg[0]:.2f} {avg[1]:.2f} {avg[2]:.2f}")


def table(rows: list[dict], concurrency: list[int]) -> None:
    """Per server and concurrency, then geode against each reference side by side."""
    by = {(r["server"], r["concurrency"]): r for r in rows}
    print(
        f"\n{'server':<13}{'conc':>5}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}"
        f"{'ITL p50':>9}{'ITL p99':>9}"
    )
    for r in rows:
        print(
            f"{r['server']:<13}{r['concurrency']:>5}{r['tokens_per_s']:>9.1f}"
            f"{r['ttft_p50_ms']:>10.0f}{r['ttft_p99_ms']:>10.0f}{r['itl_p50_ms'] or 0:>9.1f}"
            f"{r['itl_p99_ms'] or 0:>9.1f}"
        )
    print("\n| reference | concurrency | tok/s geode / reference | ratio | TTFT p50 ms geode / "
          "reference | ratio |\n| --- | --- | --- | --- | --- | --- |")  # fmt: skip
    for ref in ("transformers", "llama.cpp"):
        for c in concurrency:
            g, t = by.get(("geode", c)), by.get((ref, c))
            if not (g and t):
                continue
            tput = g["tokens_per_s"] / t["tokens_per_s"]
            ttft = g["ttft_p50_ms"] / t["ttft_p50_ms"]
            print(f"| {ref} | {c} | {g['tokens_per_s']:.0f} / {t['tokens_per_s']:.0f} | "
                  f"{tput:.2f}x | {g['ttft_p50_ms']:.0f} / {t['ttft_p50_ms']:.0f} | "
                  f"{ttft:.2f}x |")  # fmt: skip
            print(json.dumps({"bench": "serve", "reference": ref, "concurrency": c,
                              "throughput_ratio": round(tput, 2),
                              "ttft_p50_ratio": round(ttft, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
