"""Diversity-rewarded CFG distillation on the topic task (geode.post.cfgdistill), end to end.

    python bench/cfgdistill.py --out runs/bench-cfg            # a few CPU minutes

1. A teacher: a tokenizer and a tiny model trained on the topic task's conversations ("Write a
   word problem about {items}." -> a generated problem's question; 30% of the instructions
   dropped to the unconditional "Write a word problem.", CFG's condition dropout).
2. `geode.post.cfgdistill.cfg_distill`: the quality model (distillation of the guided teacher,
   β = 0) and the diversity model (+ β x the diversity reward), and their interpolation front.
3. Tables: quality (topic adherence, which does not depend on the student) and diversity
   (1 - mean pairwise cosine of the teacher's mean-pooled hidden states, 4 samples per prompt)
   of the teacher with and without CFG and of the students without CFG (one forward per
   token); the front; one JSON line per measurement. OUT/cfg/front.png is the plot.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = {  # a tiny Gemma 3 (about 0.2M parameters besides the embedding)
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,
    "sliding_window": 64,
    "layer_types": ["sliding_attention", "full_attention"],
    "max_position_embeddings": 512,
}
TASK = {"min_steps": 1, "max_steps": 2, "max_value": 20}


def make_teacher(root: Path, steps: int, seed: int = 0) -> Path:
    """Tokenizer + teacher trained on the topic conversations; returns the model dir."""
    from geode.chat import render
    from geode.post.cfgdistill import topic_examples
    from geode.post.pairs import prompt_text, response_text, sequences_batch
    from geode.post.prefdata import write_jsonl
    from geode.tokenizer import load_tokenizer, train_tokenizer
    from geode.train.batches import TrainData
    from geode.train.loop import Trainer
    from geode.train.recipe import load_train_recipe

    model_dir = root / "teacher" / "model"
    if (model_dir / "config.json").exists():
        return model_dir
    examples = topic_examples(3000, seed=seed, **TASK)
    texts = [render(e["messages"], add_generation_prompt=False) for e in examples]
    train_tokenizer(texts=texts, vocab_size=512, out=root / "tok", num_threads=2)
    write_jsonl(examples, root / "teacher.jsonl")
    tok = load_tokenizer(root / "tok" / "tokenizer.model")
    rows = []
    for e in examples:
        p, r = e["messages"][:1], e["messages"][1:]
        rows.append((tok.encode(prompt_text(p)), tok.encode(response_text(p, r))))

    def batches():
        rng = random.Random(seed)
        while True:
            yield sequences_batch(rng.sample(rows, 32), tok.pad_id)

    recipe = load_train_recipe(
        {
            "name": "cfg-teacher",
            "out": str(root / "teacher"),
            "model": {"preset": "nano-1m", "overrides": {**MODEL, "vocab_size": len(tok)}},
            "data": {"path": str(root / "teacher.jsonl"), "seq_len": 128},
            "batch": {"global_batch_size": 32, "micro_batch_size": 32},
            "optim": {"lr": 1e-2, "warmup_steps": 10, "weight_decay": 0.0},
            "train": {"max_steps": steps, "progress": False, "threads": 2},
            "eval": {"batches": 1},
            "checkpoint": {"export": True},
        }
    )
    data = TrainData(
        batches=batches, vocab_size=len(tok), tokenizer=str(root / "tok" / "tokenizer.model")
    )
    Trainer(recipe, root / "teacher", data=data).fit()
    return model_dir


def cfg_recipe(root: Path, teacher: Path, args: argparse.Namespace) -> dict:
    """The bench's recipe (recipes/post/cfg-nano.toml's keys, smaller batch)."""
    return {
        "name": "cfg-bench",
        "out": str(root / "cfg"),
        "model": {"init": str(teacher)},
        "data": {
            "path": str(root / "cfg" / "prompts.jsonl"),
            "eval_path": str(root / "cfg" / "eval.jsonl"),
            "seq_len": 128,
            "seed": args.seed,
        },
        "objective": {"kind": "cfg_distill"},
        "batch": {"global_batch_size": 32, "micro_batch_size": 32},
        "optim": {"lr": args.lr, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"max_steps": args.steps, "progress": False, "threads": 2},
        "eval": {"batches": 1},
        "checkpoint": {"export": True},
        "cfg": {
            "guidance_scale": args.gamma,
            "diversity_weight": args.beta,
            "group_size": 4,
            "max_new_tokens": 48,
            "temperature": args.temperature,
            "eval_prompts": args.eval_prompts,
            "eval_samples": 4,
            "etas": [0.0, 0.25, 0.5, 0.75, 1.0],
        },
    }


def main() -> None:
    """Teacher, distillation runs, front; tables on stdout."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-cfg")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--gamma", type=float, default=3.0)
    ap.add_argument("--beta", type=float, default=20.0)
    ap.add_argument("--temperature", type=float, default=1.5, help="rollouts and measurement")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-prompts", type=int, default=56)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-only", action="store_true", help="measure the teacher at several γ")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from geode.post.cfgdistill import cfg_distill
    from geode.post.recipe import load_post_recipe

    root = Path(args.out)
    t0 = time.perf_counter()
    teacher = make_teacher(root, args.teacher_steps, args.seed)
    print(f"teacher: {teacher} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.teacher_only:
        teacher_sweep(root, teacher, args)
        return
    summary = cfg_distill(load_post_recipe(cfg_recipe(root, teacher, args)), progress=False)
    report(summary, args)


def teacher_sweep(root: Path, teacher: Path, args: argparse.Namespace) -> None:
    """Quality/diversity of the teacher at γ in {1, 1.5, 2, 3, 5}."""
    from geode.checkpoint import load_model
    from geode.post import cfgdistill as C
    from geode.tokenizer import load_tokenizer

    tok = load_tokenizer(root / "tok" / "tokenizer.model")
    model = load_model(teacher).eval()
    prompts = C.topic_prompts(args.eval_prompts or len(C.TOPICS), 1)
    unc = C.unconditional_ids(tok, C.UNCONDITIONAL)
    for g in (1.0, 1.5, 2.0, 3.0, 5.0):
        m = C.measure(model, tok, prompts, model, samples=4, max_new_tokens=48, temperature=args.temperature,
                      quality=C.quality_fn("topic"), guidance=(g, unc) if g != 1 else None)  # fmt: skip
        print(json.dumps({"gamma": g, **m}), flush=True)


def report(summary: dict, args: argparse.Namespace) -> None:
    """The acceptance tables (markdown) and one JSON line per measurement."""
    rows = [
        (f"teacher + CFG γ={summary['guidance_scale']:g}", summary["teacher_guided"]),
        ("teacher, no CFG", summary["teacher_unguided"]),
        ("quality model (β=0), no CFG", summary["quality"]),
    ]
    if "diversity" in summary:
        rows.append((f"diversity model (β={args.beta:g}), no CFG", summary["diversity"]))
    print("\n| model | forwards/token | quality (adherence) | diversity |")
    print("| --- | --- | --- | --- |")
    for name, m in rows:
        print(f"| {name} | {m['forwards_per_token']} | {m['quality']:.3f} | {m['diversity']:.4f} |")
        print(json.dumps({"model": name, **m}))
    if "front" in summary:
        print("\n| t (0 = quality, 1 = diversity model) | quality | diversity |")
        print("| --- | --- | --- |")
        for r in summary["front"]:
            print(f"| {r['t']:g} | {r['quality']:.3f} | {r['diversity']:.4f} |")
            print(json.dumps({"front_t": r["t"], **r}))


if __name__ == "__main__":
    main()
