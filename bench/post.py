"""Post-training throughput: geode's trainer vs TRL's trainers, same model, same batch, same run.

SFT (full and LoRA r=16 on q/k/v/o/gate/up/down): geode's `Trainer.train_step()` on SFT rows
(explicit assistant loss mask, the `sft` objective) against TRL's `SFTTrainer.train()` on
transformers' `Gemma3ForCausalLM` loaded from the same random checkpoint, the same rows
(input_ids + labels, -100 off the answer), AdamW, clip 1.0, no weight decay. TRL runs in each of its
configurations below and the fastest is the reference. bf16 autocast is the fast path only
on a CPU with native bf16 matmuls (avx512_bf16 / AMX): the benchmark first times a 1024^2
matmul in float32 and bfloat16 (printed as a JSON line) and runs the bf16 configurations of
both sides only where bf16 is at least as fast (`--all-configs` runs them anyway):

  trl:bf16+gc   TRL's defaults: bf16 autocast + gradient checkpointing
  trl:bf16      bf16 autocast, no checkpointing
  trl:fp32      float32

The sides are interleaved step by step: a TRL callback runs one step of every geode
configuration after each TRL step, so machine load hits all alike. Each row is the median step
time after --warmup steps; the table gives tokens/s (batch * seq targets per step), the ratio
of geode's best over TRL's best, and the paired ratio (median over steps of TRL's step time
over geode's adjacent one).

Adding a benchmark: write `bench_<name>(args) -> list[dict]` (rows with "bench", "impl",
"tokens_per_s", "step_s_all") and register it in BENCHES; `python bench/post.py --only NAME`.

    python bench/post.py                          # SFT full + LoRA, nano-20m, batch 8 x 256
    python bench/post.py --only sft-lora --reps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import geode  # noqa: E402
from geode.train.batches import TrainData  # noqa: E402
from geode.train.loop import Trainer  # noqa: E402
from geode.train.recipe import load_train_recipe  # noqa: E402
from geode.train.sft import PackedRows  # noqa: E402

LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}  # fmt: skip
TRL_CONFIGS = {"trl:bf16+gc": (True, True), "trl:bf16": (True, False), "trl:fp32": (False, False)}


def sft_rows(args, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`batch` rows of seq+1 random tokens, each a prompt (first 30-50%) and a trained answer."""
    rng = np.random.default_rng(seed)
    B, T1 = args.batch, args.seq + 1
    tokens = rng.integers(3, vocab, (B, T1)).astype(np.int64)
    prompt = rng.integers(int(0.3 * T1), int(0.5 * T1), B)
    trained = np.arange(T1)[None, :] >= prompt[:, None]  # (B, T+1)
    return {
        "tokens": tokens,
        "positions": np.broadcast_to(np.arange(T1), (B, T1)).copy(),
        "segment_ids": np.zeros((B, T1), np.int64),
        "trained": trained,
    }


def geode_trainer(args, init: Path, rows, out: Path, precision: str, lora: bool,
                  compile: bool = False) -> Callable[[], object]:  # fmt: skip
    """geode's SFT step on `rows` (the sft objective, explicit loss mask)."""
    recipe = {
        "name": "bench-sft",
        "model": {"init": str(init)},
        "data": {"path": "bench-rows", "seq_len": args.seq},
        "objective": {"kind": "sft"},
        "batch": {"global_batch_size": args.batch},
        "optim": {"lr": 1e-5, "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.0},
        "train": {"max_steps": 10**6, "progress": False, "threads": args.threads,
                  "precision": precision, "compile": compile},
        "checkpoint": {"export": False},
    }  # fmt: skip
    if lora:
        recipe["lora"] = LORA
    data = TrainData(batches=PackedRows(rows, args.batch), vocab_size=0)
    return Trainer(load_train_recipe(recipe), out=out, data=data).train_step


def trl_run(args, init: Path, rows, bf16: bool, gc: bool, lora: bool, steps: int, out: Path,
            between: Callable[[], None]) -> list[float]:  # fmt: skip
    """TRL SFTTrainer for `steps` steps on the same rows; step times; `between` after each."""
    from datasets import Dataset
    from transformers import Gemma3ForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    B = args.batch
    ids = rows["tokens"].tolist()
    labels = np.where(rows["trained"], rows["tokens"], -100).tolist()  # -100: no loss
    ds = Dataset.from_dict({"input_ids": ids * steps, "labels": labels * steps})
    model = Gemma3ForCausalLM.from_pretrained(init, attn_implementation="sdpa",
                                              dtype=torch.float32)  # fmt: skip
    conf = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=B, max_steps=steps, bf16=bf16,
        gradient_checkpointing=gc, use_cpu=True, learning_rate=1e-5, weight_decay=0.0,
        max_grad_norm=1.0, lr_scheduler_type="constant", logging_steps=10**6,
        save_strategy="no", report_to=[], dataloader_num_workers=0, max_length=None,
        packing=False, completion_only_loss=True, remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, disable_tqdm=True, seed=0,
    )  # fmt: skip
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
            between()

    trainer = SFTTrainer(model=model, args=conf, train_dataset=ds, peft_config=peft_config,
                         callbacks=[Timer()])  # fmt: skip
    trainer.train()
    return times


def bench_sft(args, lora: bool) -> list[dict]:
    """geode SFT (fp32, bf16 autocast) vs TRL SFTTrainer (its configs), interleaved."""
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="geode-bench-post-"))
    cfg = geode.get_preset(args.preset)
    model = geode.build_model(cfg, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    geode.save_model(model, tmp / "init")
    rows = sft_rows(args, cfg.vocab_size)
    fast = ("bfloat16", "float32") if args.bf16_fast else ("float32",)
    geode_impls = {
        f"geode:{p}": geode_trainer(args, tmp / "init", rows, tmp / f"g-{p}", p, lora) for p in fast
    }
    if not args.no_compile:
        geode_impls[f"geode:{fast[0]}+compile"] = geode_trainer(
            args, tmp / "init", rows, tmp / "g-c", fast[0], lora, compile=True
        )
    for fn in geode_impls.values():  # warm-up (and compilation) outside the timed steps
        for _ in range(args.warmup):
            fn()
    gtimes: dict[str, list[float]] = {k: [] for k in geode_impls}
    pairs: dict[tuple[str, str], list[float]] = {}
    current: dict[str, float] = {}

    def geode_round() -> None:
        for name, fn in geode_impls.items():
            t = time.perf_counter()
            fn()
            current[name] = time.perf_counter() - t

    ttimes: dict[str, list[float]] = {}
    configs = [c for c in TRL_CONFIGS if (not args.trl or c in args.trl)
               and (args.bf16_fast or not TRL_CONFIGS[c][0])]  # fmt: skip
    for tname in configs:
        bf16, gc = TRL_CONFIGS[tname]
        seen: list[float] = []

        def between(tname=tname, seen=seen) -> None:
            geode_round()
            seen.append(0.0)
            if len(seen) > args.warmup:
                for g, dt in current.items():
                    gtimes[g].append(dt)
                    pairs.setdefault((tname, g), []).append(dt)

        steps = args.warmup + args.reps
        t = trl_run(args, tmp / "init", rows, bf16, gc, lora, steps, tmp / tname, between)
        ttimes[tname] = t[args.warmup :]
        for g in geode_impls:  # pair TRL's step i with geode's step i (adjacent in time)
            pairs[(tname, g)] = [a / b for a, b in zip(ttimes[tname], pairs[(tname, g)])]
    tok = args.batch * args.seq
    bench = "sft-lora" if lora else "sft-full"
    rows_out = []
    for name, ts in {**ttimes, **gtimes}.items():
        med = statistics.median(ts)
        rows_out.append({"bench": bench, "impl": name, "preset": args.preset, "params": n_params,
                         "batch": args.batch, "seq": args.seq, "threads": args.threads,
                         "step_s_median": med, "step_s_all": [round(x, 3) for x in ts],
                         "tokens_per_s": tok / med})  # fmt: skip
    best_t = max((r for r in rows_out if r["impl"].startswith("trl")),
                 key=lambda r: r["tokens_per_s"])  # fmt: skip
    best_g = max((r for r in rows_out if r["impl"].startswith("geode")),
                 key=lambda r: r["tokens_per_s"])  # fmt: skip
    rows_out.append({
        "bench": bench, "impl": "ratio", "geode": best_g["impl"], "trl": best_t["impl"],
        "ratio": best_g["tokens_per_s"] / best_t["tokens_per_s"],
        "paired_ratio": statistics.median(pairs[(best_t["impl"], best_g["impl"])]),
    })  # fmt: skip
    return rows_out


BENCHES: dict[str, Callable[[argparse.Namespace], list[dict]]] = {
    "sft-full": lambda a: bench_sft(a, lora=False),
    "sft-lora": lambda a: bench_sft(a, lora=True),
    "dpo": lambda a: __import__("post_dpo").bench_dpo(a),  # bench/post_dpo.py (vs DPOTrainer)
}


def matmul_probe(threads: int) -> dict:
    """GFLOP/s of a 1024 x 1024 matmul in float32 and bfloat16 on `threads` threads."""
    torch.set_num_threads(threads)
    out = {"bench": "probe", "impl": "matmul-1024", "threads": threads}
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(1024, 1024, dtype=dt)
        a @ a
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < 0.5:
            a @ a
            n += 1
        out[f"{str(dt).removeprefix('torch.')}_gflops"] = (
            n * 2 * 1024**3 / (time.perf_counter() - t) / 1e9
        )
    return out


def table(rows: list[dict]) -> str:
    """A markdown table of the rows (tok/s per implementation, then the ratio rows)."""
    lines = ["| bench | impl | step s (median) | tokens/s |", "| --- | --- | ---: | ---: |"]
    for r in rows:
        if r["bench"] == "probe":
            continue
        if r["impl"] == "ratio":
            lines.append(f"| {r['bench']} | **{r['geode']} / {r['trl']}** | | "
                         f"**{r['ratio']:.2f}x** (paired {r['paired_ratio']:.2f}x) |")  # fmt: skip
        else:
            lines.append(f"| {r['bench']} | {r['impl']} | {r['step_s_median']:.3f} | "
                         f"{r['tokens_per_s']:,.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    """Run the selected benchmarks; JSON lines, then a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=list(BENCHES), help="benchmarks to run")
    p.add_argument("--preset", default="nano-20m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--trl", nargs="*", help=f"TRL configurations (default all: {list(TRL_CONFIGS)})"
    )
    p.add_argument("--no-compile", action="store_true", help="no geode train.compile = true row")
    p.add_argument("--all-configs", action="store_true", help="bf16 rows even where bf16 is slow")
    args = p.parse_args()
    probe = matmul_probe(args.threads)
    print(json.dumps(probe), flush=True)
    args.bf16_fast = args.all_configs or probe["bfloat16_gflops"] >= probe["float32_gflops"]
    rows: list[dict] = [probe]
    for name in args.only or list(BENCHES):
        for r in BENCHES[name](args):
            print(json.dumps(r), flush=True)
            rows.append(r)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
