"""Training throughput: geode's training step vs a plain transformers training loop.

Both sides train the same Gemma-3-shaped model (default: the nano-20m preset, ~22M
parameters) with AdamW, gradient clipping, the same batch shape, dtype and thread count,
in the same process, interleaved so that machine load affects both alike:

  geode         `Trainer.train_step()`: loader -> packed batch (positions, segment ids,
                document masking) -> forward -> masked CE (+ z-loss) -> backward -> clip ->
                AdamW (fused where torch has it) -> metrics
  transformers  `Gemma3ForCausalLM(input_ids, labels=...)` -> loss.backward() ->
                clip_grad_norm_ -> torch.optim.AdamW (torch's default kernel), the loop a
                user writes from the transformers docs
  geode+compile the same with `train.compile = true`: each decoder layer and the loss go
                through torch.compile (compiled before timing starts, during --warmup)
  transformers+fused  the same with `torch.optim.AdamW(fused=True)`, to separate the
                optimizer kernel from the rest

Each prints one JSON line (median step time over --reps steps after --warmup), then a
table with the ratio of medians and the paired ratio: the median over rounds of transformers'
step time over geode's in the same round (adjacent in time, so less exposed to this shared
host's minute-to-minute swings, which reach +-30% per step). On a GPU, add
MFU = 6 * N * tokens/s / peak FLOP/s (--peak-tflops).

    python bench/train.py                        # CPU, float32, 2 threads
    python bench/train.py --device cuda --dtype bfloat16 --preset gemma3-1b --batch 8 \
        --seq 2048 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import geode  # noqa: E402
from geode.data.pack import FORMAT, MANIFEST, VERSION, StreamWriter, write_json_atomic  # noqa: E402
from geode.train.loop import Trainer  # noqa: E402
from geode.train.recipe import load_train_recipe  # noqa: E402


def synthetic_data(root: Path, vocab: int, tokens: int, doc_len: int, seed: int = 0) -> Path:
    """A prepared dataset of random tokens in documents of `doc_len` tokens."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, vocab, doc_len).tolist() for _ in range(tokens // doc_len)]
    w = StreamWriter(root, "train", "uint16" if vocab <= 65536 else "uint32")
    w.add(docs)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "uint16" if vocab <= 65536 else "uint32",
        "vocab_size": vocab,
        "streams": {"train": w.close()},
    }
    write_json_atomic(root / MANIFEST, manifest)
    return root


def geode_step_fn(args, data: Path, out: Path, compile: bool = False):
    """A Trainer on the synthetic data; returns (step function, model)."""
    recipe = {
        "model": {"preset": args.preset, "dtype": "float32"},
        "data": {"path": str(data), "seq_len": args.seq},
        "batch": {"global_batch_size": args.batch},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.1},
        "train": {
            "max_steps": 10**6,
            "progress": False,
            "threads": args.threads,
            "device": args.device,
            "precision": "bfloat16" if args.dtype == "bfloat16" else "float32",
            "compile": compile,
        },
        "checkpoint": {"export": False},
    }
    trainer = Trainer(load_train_recipe(recipe), out=out)
    return trainer.train_step, trainer.raw_model


def hf_step_fn(args, fused: bool):
    """A plain transformers training step on the same shape; returns (step function, model)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = geode.get_preset(args.preset).to_hf()
    for key in ("architectures", "model_type", "rope_theta", "rope_local_base_freq"):
        cfg.pop(key, None)
    hf_cfg = Gemma3TextConfig(**cfg, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(hf_cfg).to(args.device).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused or None
    )
    g = torch.Generator().manual_seed(1)
    V = hf_cfg.vocab_size
    dev = torch.device(args.device)
    amp = args.dtype == "bfloat16"

    def step():
        ids = torch.randint(3, V, (args.batch, args.seq + 1), generator=g).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def timed(fn, device: str) -> float:
    """Seconds of one call (synchronising CUDA)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    """Run the benchmark and print JSON lines and a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano-20m")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=6, help="measured steps per implementation")
    p.add_argument(
        "--compile", choices=["both", "on", "off"], default="both",
        help="geode with torch.compile (train.compile = true), without, or both in the same run",
    )  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=0.0, help="for MFU (GPU)")
    p.add_argument("--no-fused-reference", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = geode.get_preset(args.preset)

    tmp = Path(tempfile.mkdtemp(prefix="geode-bench-train-"))
    tokens = max(200_000, args.batch * args.seq * (args.warmup + args.reps + 2) * 2)
    data = synthetic_data(tmp / "data", cfg.vocab_size, tokens, doc_len=4 * args.seq)
    impls = {}
    if args.compile in ("both", "off"):
        impls["geode"] = geode_step_fn(args, data, tmp / "run")
    if args.compile in ("both", "on"):
        impls["geode+compile"] = geode_step_fn(args, data, tmp / "run-compiled", compile=True)
    impls["transformers"] = hf_step_fn(args, fused=False)
    if not args.no_fused_reference:
        impls["transformers+fused"] = hf_step_fn(args, fused=True)
    n_params = sum(p.numel() for p in next(iter(impls.values()))[1].parameters())
    times: dict[str, list[float]] = {k: [] for k in impls}
    for i in range(args.warmup + args.reps):  # interleaved: load hits every side alike
        for name, (fn, _) in impls.items():
            dt = timed(fn, args.device)
            if i >= args.warmup:
                times[name].append(dt)

    tok_per_step = args.batch * args.seq
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {
            "bench": "train",
            "impl": name,
            "preset": args.preset,
            "params": n_params,
            "batch": args.batch,
            "seq": args.seq,
            "dtype": args.dtype,
            "device": args.device,
            "threads": args.threads,
            "step_s_median": med,
            "step_s_all": [round(t, 4) for t in ts],
            "tokens_per_s": tok_per_step / med,
        }
        if args.peak_tflops:
            row["mfu"] = 6 * n_params * row["tokens_per_s"] / (args.peak_tflops * 1e12)
        rows.append(row)
        print(json.dumps(row))
    ref = next(r for r in rows if r["impl"] == "transformers")
    paired = {}  # per round, transformers' step time over this one's (adjacent in time)
    for r in rows:
        if r["impl"].startswith("geode"):
            ratio = r["tokens_per_s"] / ref["tokens_per_s"]
            rounds = [a / b for a, b in zip(times["transformers"], times[r["impl"]], strict=True)]
            paired[r["impl"]] = statistics.median(rounds)
            print(json.dumps({"bench": "train", "impl": r["impl"], "ratio_over_transformers": ratio,
                              "paired_ratio_median": paired[r["impl"]]}))  # fmt: skip
    print(f"\n{args.preset} ({n_params / 1e6:.1f}M params), batch {args.batch} x {args.seq}, "
          f"{args.dtype}, {args.device}, {args.threads} threads")  # fmt: skip
    print(f"{'impl':<20} {'step (s)':>10} {'tokens/s':>10} {'vs transformers':>16} "
          f"{'paired':>7}")  # fmt: skip
    for r in rows:
        ratio = r["tokens_per_s"] / ref["tokens_per_s"]
        pr = f"{paired[r['impl']]:>6.2f}x" if r["impl"] in paired else ""
        print(f"{r['impl']:<20} {r['step_s_median']:>10.3f} {r['tokens_per_s']:>10.0f} "
              f"{ratio:>15.2f}x {pr}")  # fmt: skip


if __name__ == "__main__":
    main()
