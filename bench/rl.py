"""RL step time: geode's `rl` loop vs TRL's GRPOTrainer, same model, prompts, reward, batch, run.

Both sides train one random Gemma 3 (nano-20m's shape with 10 layers and a 1024-piece
tokenizer trained on the task family's chat text: ~16M parameters; saved once in the HF layout
under ~/.cache/geode-bench/rl-*) on the same prompts (problems of the synthetic task family,
chat-rendered, tokenized by geode's tokenizer for both sides) with the same reward (the task
verifier: 1 if the completion's `#### N` answer is right) and the same shape of step:
`--prompts` prompts x `--group` samples x `--tokens` new tokens at temperature 1, GRPO
advantages (group mean and std), the `dapo` loss, beta = 0, one update per batch of rollouts,
AdamW. The step is split into generation / scoring (the reward) / update (forward, backward,
optimizer); rollout tokens/s = sampled tokens / generation seconds.

TRL runs in the configurations below (vLLM is impossible here: no GPU), each a separate
trainer for --warmup + --reps steps; its fastest median step is the reference. bf16 autocast
is fast only on a CPU with native bf16 matmuls (avx512_bf16 / AMX): a 1024^2 matmul probe
decides, as in bench/post.py (`--all-configs` runs both precisions on both sides anyway).

  trl:bf16+gc   TRL's defaults: bf16 autocast + gradient checkpointing
  trl:bf16      bf16 autocast, no checkpointing
  trl:fp32+gc   float32 + gradient checkpointing
  trl:fp32      float32, no checkpointing

The sides are interleaved step by step (a TRL callback runs a geode step after each TRL
step) so machine load hits both alike. Output: one JSON line per configuration (median
seconds of each part), then a markdown table with the ratios TRL / geode.

    python bench/rl.py                     # 16 prompts x 8 samples x 64 tokens, 2 threads
    python bench/rl.py --smoke             # a tiny model and batch, one step each (the test)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import geode  # noqa: E402
from geode.data import tasks as synth  # noqa: E402
from geode.post.oaif import Prompt, task_prompts  # noqa: E402
from geode.post.pairs import prompt_text  # noqa: E402

TRL_CONFIGS = {  # name: (bf16 autocast, gradient checkpointing)
    "trl:bf16+gc": (True, True),
    "trl:bf16": (True, False),
    "trl:fp32+gc": (False, True),
    "trl:fp32": (False, False),
}
TASK = {"min_steps": 2, "max_steps": 3, "max_value": 50}  # the prompts' difficulty
MODEL = {"num_hidden_layers": 10}  # nano-20m's width, 10 layers: ~16M parameters
SMOKE_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
               "query_pre_attn_scalar": 32, "sliding_window": 64,
               "layer_types": ["sliding_attention", "full_attention"]}  # fmt: skip
PARTS = ("generation", "scoring", "update")


def model_dir(args) -> Path:
    """The benchmark's random model + tokenizer in the HF layout, built once per machine."""
    overrides = {**(SMOKE_MODEL if args.smoke else MODEL)}
    key = json.dumps([args.preset, overrides, args.vocab, TASK], sort_keys=True)
    root = Path(args.cache).expanduser()
    out = root / f"rl-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (out / "config.json").exists() and (out / "tokenizer.model").exists():
        return out
    from geode.chat import render
    from geode.post.prefdata import sft_examples
    from geode.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
    texts = [render(e["messages"], add_generation_prompt=False)
             for e in sft_examples(2000, seed=7, **TASK)]  # fmt: skip
    tok = train_tokenizer(texts=texts, vocab_size=args.vocab, out=tmp / "tok", num_threads=1)
    cfg = geode.get_preset(args.preset).replace(**overrides, vocab_size=len(tok))
    geode.save_model(geode.build_model(cfg, seed=0), tmp / "model")  # replaces its dir
    shutil.move(tmp / "tok" / "tokenizer.model", tmp / "model" / "tokenizer.model")
    tmp = tmp / "model"
    if not out.exists():
        os.replace(tmp, out)
    shutil.rmtree(tmp.parent, ignore_errors=True)
    return out


def bench_prompts(args, steps: int) -> list[Prompt]:
    """`steps` x `prompts` task problems (chat messages + answer), one distinct set per step."""
    return task_prompts(steps * args.prompts, seed=11, **TASK)


class Clock:
    """Seconds per named part, accumulated within the current step."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] += time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        """The parts so far, reset."""
        out, self.parts = dict(self.parts), defaultdict(float)
        return out


def trl_run(args, init: Path, prompts: list[Prompt], name: str, steps: int, out: Path,
            between: Callable[[], None]) -> list[dict]:  # fmt: skip
    """TRL GRPOTrainer for `steps` steps; per step: seconds of each part and sampled tokens."""
    from datasets import Dataset
    from transformers import Gemma3ForCausalLM, GemmaTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    gtok = geode.load_tokenizer(init / "tokenizer.model")
    texts = [prompt_text(p.messages) for p in prompts]
    ids = {t: gtok.encode(t) for t in texts}  # geode's ids for both sides
    eos = [gtok.eos_id, gtok.special_ids["<end_of_turn>"]]
    bf16, gc = TRL_CONFIGS[name]
    clock, steps_out, sampled = Clock(), [], [0]

    class Timed(GRPOTrainer):
        def _tokenize_prompts(self, prompts):
            return [ids[p] for p in prompts], None, {}

        def _generate_single_turn(self, *a, **k):
            with clock("generation"):
                completion_ids, logprobs = super()._generate_single_turn(*a, **k)
            sampled[0] += sum(map(len, completion_ids))
            return completion_ids, logprobs

        def _calculate_rewards(self, *a, **k):
            with clock("scoring"):
                return super()._calculate_rewards(*a, **k)

        def _get_per_token_logps_and_entropies(self, *a, **k):
            name = "forward" if torch.is_grad_enabled() else "forward_nograd"
            with clock(name):
                return super()._get_per_token_logps_and_entropies(*a, **k)

    def reward(prompts, completions, answer, **_):
        return [float(synth.verify(a, c)) for a, c in zip(answer, completions, strict=True)]

    model = Gemma3ForCausalLM.from_pretrained(init, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.eos_token_id = eos
    tok = GemmaTokenizer.from_pretrained(init)
    conf = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group, gradient_accumulation_steps=1, steps_per_generation=1,
        max_completion_length=args.tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
        loss_type="dapo", scale_rewards="group", num_iterations=1, bf16=bf16,
        gradient_checkpointing=gc, use_cpu=True, learning_rate=1e-6, weight_decay=0.0,
        max_grad_norm=1.0, lr_scheduler_type="constant", max_steps=steps, logging_steps=10**6,
        save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=0,
        shuffle_dataset=False,
    )  # fmt: skip

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.take()
            sampled[0] = 0
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            total = time.perf_counter() - self.t
            parts = clock.take()
            parts["update"] = total - parts.get("generation", 0.0) - parts.get("scoring", 0.0)
            steps_out.append({"step_s": total, "sampled_tokens": sampled[0], **parts})
            print(json.dumps({"bench": "rl-step-raw", "impl": name, **steps_out[-1]}), flush=True)
            between()

    data = Dataset.from_dict({"prompt": texts, "answer": [p.answer for p in prompts]})
    trainer = Timed(model=model, reward_funcs=reward, args=conf, train_dataset=data,
                    processing_class=tok, callbacks=[Timer()])  # fmt: skip
    backward = trainer.accelerator.backward

    def timed_backward(*a, **k):
        with clock("backward"):
            return backward(*a, **k)

    trainer.accelerator.backward = timed_backward
    trainer.train()
    return steps_out


def geode_step(args, init: Path, prompts: list[Prompt], out: Path, precision: str,
               micro: int) -> Callable[[], dict]:  # fmt: skip
    """One `geode rl` optimizer step per call (the recipe's Rollouts source + the rl objective,
    built as geode.post.rl.train_policy builds them); returns the step's parts."""
    from geode.fileio import atomic_write_bytes
    from geode.post.recipe import load_post_recipe
    from geode.post.rl import policy_trainer

    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": p.messages, "answer": p.answer}) for p in prompts]
    atomic_write_bytes(out / "prompts.jsonl", ("\n".join(lines) + "\n").encode())
    rows = args.prompts * args.group
    recipe = load_post_recipe({
        "name": "bench-rl", "out": str(out / "run"), "model": {"init": str(init)},
        "data": {"path": "", "seq_len": 192},
        "batch": {"global_batch_size": rows, "micro_batch_size": micro},
        "optim": {"lr": 1e-6, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0,
                  "schedule": "constant"},
        "train": {"max_steps": 10**6, "progress": False, "threads": args.threads,
                  "precision": precision},
        "checkpoint": {"export": False},
        "objective": {"kind": "rl", "options": {"loss_type": "dapo", "beta": 0.0}},
        "rl": {"prompts": str(out / "prompts.jsonl"), "group_size": args.group,
               "prompts_per_step": args.prompts, "max_new_tokens": args.tokens,
               "temperature": 1.0, "rewards": [{"kind": "synth"}], "eval_prompts": 0},
    })  # fmt: skip
    trainer = policy_trainer(recipe, out / "run")[0]

    def step() -> dict:
        rec = trainer.train_step()
        sampled = rec["rollout_tokens_per_s"] * rec["generation_s"]
        return {"step_s": rec["step_s"], "sampled_tokens": round(sampled),
                **{k: rec[f"{k}_s"] for k in PARTS}}  # fmt: skip

    return step


def summarize(impl: str, steps: list[dict], warmup: int) -> dict:
    """Median seconds of each part over the steps after warm-up, and rollout tokens/s."""
    kept = steps[warmup:] or steps
    keys = sorted({k for s in kept for k in s if k != "sampled_tokens"})
    row: dict[str, Any] = {"bench": "rl-step", "impl": impl, "steps": len(kept)}
    for k in keys:
        row[f"{k}_s" if not k.endswith("_s") else k] = statistics.median(
            s.get(k, 0.0) for s in kept
        )
    row["step_s_all"] = [round(s["step_s"], 3) for s in kept]
    tokens = statistics.median(s["sampled_tokens"] for s in kept)
    row["sampled_tokens"] = tokens
    row["rollout_tokens_per_s"] = tokens / row["generation_s"] if row.get("generation_s") else 0.0
    return row


def matmul_probe(threads: int) -> dict:
    """bench/post.py's bf16-vs-fp32 matmul probe."""
    from post import matmul_probe as probe

    return probe(threads)


def table(rows: list[dict], load: tuple[float, float, float]) -> str:
    """Both sides' parts, rollout tokens/s, and the ratios of TRL's best over geode's best."""
    lines = [
        "| impl | step s | generation s | scoring s | update s | rollout tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    runs = [r for r in rows if r.get("bench") == "rl-step"]
    for r in runs:
        lines.append(
            f"| {r['impl']} | {r['step_s']:.2f} | {r.get('generation_s', 0):.2f} | "
            f"{r.get('scoring_s', 0):.3f} | {r.get('update_s', 0):.2f} | "
            f"{r['rollout_tokens_per_s']:,.0f} |"
        )
    trl = [r for r in runs if r["impl"].startswith("trl")]
    ours = [r for r in runs if r["impl"].startswith("geode")]
    if trl and ours:
        t, g = min(trl, key=lambda r: r["step_s"]), min(ours, key=lambda r: r["step_s"])
        tr = max(trl, key=lambda r: r["rollout_tokens_per_s"])
        gr = max(ours, key=lambda r: r["rollout_tokens_per_s"])
        lines.append(
            f"| **{g['impl']} vs {t['impl']}** | **{t['step_s'] / g['step_s']:.2f}x** | "
            f"{t['generation_s'] / g['generation_s']:.2f}x | | "
            f"{t['update_s'] / g['update_s']:.2f}x | "
            f"**{gr['rollout_tokens_per_s'] / tr['rollout_tokens_per_s']:.2f}x** |"
        )
    lines.append(f"\nload average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return "\n".join(lines)


def main() -> None:
    """Run both sides interleaved; JSON lines, then the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano-20m")
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer pieces (= model vocab)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--micro", type=int, default=0, help="geode micro-batch rows (0: one)")
    p.add_argument("--trl", nargs="*", help=f"TRL configurations (default: {list(TRL_CONFIGS)})")
    p.add_argument("--geode-only", action="store_true", help="no TRL rows")
    p.add_argument("--all-configs", action="store_true", help="bf16 rows even where bf16 is slow")
    p.add_argument("--cache", default="~/.cache/geode-bench")
    p.add_argument("--smoke", action="store_true", help="tiny model and batch, 1 step each")
    args = p.parse_args()
    if args.smoke:
        args.prompts, args.group, args.tokens, args.warmup, args.reps = 2, 2, 8, 0, 1
        args.vocab = 512
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    probe = matmul_probe(args.threads)
    print(json.dumps(probe), flush=True)
    bf16_ok = args.all_configs or probe["bfloat16_gflops"] >= probe["float32_gflops"]
    init = model_dir(args)
    steps = args.warmup + args.reps
    prompts = bench_prompts(args, steps)
    tmp = Path(tempfile.mkdtemp(prefix="geode-bench-rl-"))
    precisions = ("float32", "bfloat16") if bf16_ok else ("float32",)
    micro = args.micro or args.prompts * args.group
    impls = {f"geode:{pr}": geode_step(args, init, prompts, tmp / f"geode-{pr}", pr, micro)
             for pr in precisions}  # fmt: skip
    gsteps: dict[str, list[dict]] = {k: [] for k in impls}

    def geode_round() -> None:
        for name, fn in impls.items():
            gsteps[name].append(fn())
            print(
                json.dumps({"bench": "rl-step-raw", "impl": name, **gsteps[name][-1]}), flush=True
            )

    rows: list[dict] = [probe]
    configs = [] if args.geode_only else [
        c for c in (args.trl or TRL_CONFIGS) if bf16_ok or not TRL_CONFIGS[c][0]
    ]  # fmt: skip
    for name in configs:
        steps_out = trl_run(args, init, prompts, name, steps, tmp / name, geode_round)
        row = summarize(name, steps_out, args.warmup)
        print(json.dumps(row), flush=True)
        rows.append(row)
    while min(map(len, gsteps.values())) < steps:
        geode_round()
    for name, st in gsteps.items():
        row = summarize(name, st, args.warmup)
        print(json.dumps(row), flush=True)
        rows.append(row)
    shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(rows, load))


if __name__ == "__main__":
    main()
