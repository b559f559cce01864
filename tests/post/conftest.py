"""Fixtures of the post-training tests: a tokenizer trained on the generated task's chat text,
and a tiny SFT policy (trained once per session with the trainer's next-token objective on
assistant tokens), with generated preference pairs on disk."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

TASK = {"min_steps": 1, "max_steps": 1, "max_value": 20}  # short problems: tiny models learn them
TINY = {
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


def post_recipe(out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict for the tiny model; `sections` update its tables."""
    recipe: dict[str, Any] = {
        "name": "tiny-post",
        "out": str(out),
        "data": {"path": "", "seq_len": 128},
        "batch": {"global_batch_size": 16, "micro_batch_size": 16},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"max_steps": 10, "progress": False, "threads": 1},
        "eval": {"batches": 2},
        "checkpoint": {"export": True},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(name), dict):
            recipe[name] = {**recipe[name], **values}
        else:
            recipe[name] = values
    return recipe


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """tokenizer.model + train/heldout pairs of the generated task."""
    from geode.chat import render
    from geode.post.prefdata import make_pairs, sft_examples, write_jsonl
    from geode.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("task")
    texts = [
        render(e["messages"], add_generation_prompt=False)
        for e in sft_examples(400, seed=5, **TASK)
    ]
    train_tokenizer(texts=texts, vocab_size=400, out=root, num_threads=1)
    write_jsonl(make_pairs(400, seed=0, **TASK), root / "train.jsonl")
    write_jsonl(make_pairs(48, seed=0, split="heldout", **TASK), root / "heldout.jsonl")
    return root


@pytest.fixture(scope="session")
def sft_policy(task_dir, tmp_path_factory) -> Path:
    """A tiny policy fine-tuned on correct answers, half of them rambling (OUT/model)."""
    from geode.post.pairs import prompt_text, response_text, sequences_batch
    from geode.post.prefdata import sft_examples
    from geode.tokenizer import load_tokenizer
    from geode.train.batches import TrainData
    from geode.train.loop import Trainer
    from geode.train.recipe import load_train_recipe

    tok = load_tokenizer(task_dir / "tokenizer.model")
    rows = []
    for e in sft_examples(600, seed=0, rambling_fraction=0.5, **TASK):
        p, r = e["messages"][:1], e["messages"][1:]
        rows.append((tok.encode(prompt_text(p)), tok.encode(response_text(p, r))))

    def batches():
        rng = random.Random(0)
        while True:
            yield sequences_batch(rng.sample(rows, 16), tok.pad_id)

    out = tmp_path_factory.mktemp("sft")
    recipe = load_train_recipe(
        post_recipe(
            out,
            model={"preset": "nano-1m", "overrides": {**TINY, "vocab_size": len(tok)}},
            data={"path": str(task_dir / "train.jsonl"), "seq_len": 128},
            train={"max_steps": 120, "progress": False, "threads": 1},
            optim={"lr": 1e-2, "warmup_steps": 10, "weight_decay": 0.0},
        )
    )
    data = TrainData(
        batches=batches, vocab_size=len(tok), tokenizer=str(task_dir / "tokenizer.model")
    )
    Trainer(recipe, out, data=data).fit()
    return out / "model"


# The RLVR test's base policy, built the quickstart's way with geode.quickstart's own stage
# functions: the task family's text as pretraining data (one stdlib file), a short pretrain of
# the smallest quickstart shape (32-dim, 2 layers), SFT on the chat problems. Sizes from
# measured runs (docs/post-training.md, "The RLVR test"): held-out greedy ~0.25 after 600 SFT
# steps (it starts to generalise at ~450; 400 steps without weight decay stayed below 0.1).
RL_BASE = {"vocab_size": 2048, "tasks_train": 1700, "heldout": 190, "shape": 0,
           "pretrain_steps": 50, "sft_steps": 600, "weight_decay": 0.1}  # fmt: skip


@pytest.fixture(scope="session")
def rl_base_policy(tmp_path_factory) -> Path:
    """OUT/sft/model: a nano policy that reads the task family's problems (quickstart stages)."""
    from geode import quickstart as qs
    from geode.post.recipe import load_post_recipe
    from geode.train.run import train
    from geode.train.sft import sft

    c = RL_BASE
    plan = qs.Plan(1.0, vocab_size=c["vocab_size"], stdlib_bytes=1, tasks_train=c["tasks_train"],
                   tasks_heldout=c["heldout"], eval_prompts=c["heldout"])  # fmt: skip
    ctx = qs.Context(tmp_path_factory.mktemp("rlbase"), plan, progress=False)
    for stage in ("data", "tokenizer"):
        ctx.dir(stage).mkdir(parents=True)
        ctx.done[stage] = qs.STAGE_FUNCS[stage](ctx)
    qs._pack(ctx, ctx.dir("pretrain") / "data")
    shape, steps = qs._shape(*qs.SHAPES[c["shape"]]), c["pretrain_steps"]
    pre = qs._lm_recipe(ctx, "base", shape, steps, ctx.dir("pretrain") / "base", 3e-3)
    pre.update(train={**pre["train"], "threads": 1}, eval={"every": 0, "batches": 1})
    base = train(qs._load_train(pre), ctx.dir("pretrain") / "base", progress=False)["model"]
    steps, data = c["sft_steps"], ctx.dir("data") / "sft" / "train.jsonl"
    recipe = qs._post(ctx, "sft", base, steps, 1e-2, objective={"kind": "sft"},
                      data={"path": str(data), "seq_len": 256}, train={"threads": 1},
                      eval={"every": 0, "batches": 1},
                      optim={"schedule": "cosine", "warmup_steps": steps // 10,
                             "weight_decay": c["weight_decay"]})  # fmt: skip
    return Path(sft(load_post_recipe(recipe), ctx.dir("sft"), progress=False)["model"])
