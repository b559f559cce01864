"""SCoRe vs its baselines on the nano task (issue #19): the self-correction table.

Builds the tests' nano setting (a tokenizer trained on the generated task's chat text and a
tiny policy SFT'd on correct solutions, as tests/post/conftest.py does, with more steps and
no rambling so that the base answers some problems), then runs base, STaR, Pair-SFT, SCoRe
without Stage I and SCoRe on the same budget (optimizer steps and sampled episodes) for each
seed with geode.post.score.compare, and prints one JSON line per row and seed plus the
table (mean ± half the range over seeds).

    python bench/score.py --out /tmp/score-bench --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

TASK = {"min_steps": 1, "max_steps": 1, "max_value": 20}
TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
    "query_pre_attn_scalar": 32, "sliding_window": 64,
    "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 512,
}  # fmt: skip


def base_policy(
    root: Path, steps: int, task: dict[str, int] = TASK, n_examples: int = 1500
) -> Path:
    """tokenizer.model + a tiny SFT'd policy on the task family (root/sft/model)."""
    from geode.chat import render
    from geode.post.pairs import prompt_text, response_text, sequences_batch
    from geode.post.prefdata import sft_examples
    from geode.tokenizer import load_tokenizer, train_tokenizer
    from geode.train.batches import TrainData
    from geode.train.loop import Trainer
    from geode.train.recipe import load_train_recipe

    model = root / "sft" / "model"
    if model.is_dir():
        return model
    ex = sft_examples(400, seed=5, **task)
    texts = [render(e["messages"], add_generation_prompt=False) for e in ex]
    train_tokenizer(texts=texts, vocab_size=400, out=root, num_threads=1)
    tok = load_tokenizer(root / "tokenizer.model")
    rows = []
    for e in sft_examples(n_examples, seed=0, rambling_fraction=0.0, **task):
        p, r = e["messages"][:1], e["messages"][1:]
        rows.append((tok.encode(prompt_text(p)), tok.encode(response_text(p, r))))

    def batches():
        rng = random.Random(0)
        while True:
            yield sequences_batch(rng.sample(rows, 16), tok.pad_id)

    (root / "unused.jsonl").write_text("")
    recipe = load_train_recipe({
        "name": "score-bench-sft", "out": str(root / "sft"),
        "model": {"preset": "nano-1m", "overrides": {**TINY, "vocab_size": len(tok)}},
        "data": {"path": str(root / "unused.jsonl"), "seq_len": 128},
        "batch": {"global_batch_size": 16, "micro_batch_size": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 10, "weight_decay": 0.0},
        "train": {"max_steps": steps, "progress": False, "threads": 1},
        "checkpoint": {"export": True},
    })  # fmt: skip
    data = TrainData(batches=batches, vocab_size=len(tok), tokenizer=str(root / "tokenizer.model"))
    Trainer(recipe, root / "sft", data=data).fit()
    return model


def main() -> None:
    """Build the base policy, run the comparison, print the table."""
    from geode.post.recipe import load_post_recipe
    from geode.post.score import ROWS, compare, format_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/geode-score-bench")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--stage1", type=int, default=4)
    ap.add_argument("--stage2", type=int, default=8)
    ap.add_argument("--eval", type=int, default=64, help="held-out problems")
    ap.add_argument("--problems", type=int, default=300, help="generated training problems")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3, help="every method's learning rate")
    ap.add_argument("--max-value", type=int, default=TASK["max_value"], help="task difficulty")
    ap.add_argument("--examples", type=int, default=1500, help="SFT examples of the base")
    a = ap.parse_args()
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task = {**TASK, "max_value": a.max_value}
    policy = base_policy(root, a.sft_steps, task, a.examples)
    recipe = load_post_recipe({
        "name": "score-bench", "out": str(root / "runs"),
        "model": {"init": str(policy)},
        "data": {"seq_len": 256},
        "batch": {"global_batch_size": 32, "micro_batch_size": 16},
        "optim": {"lr": a.lr, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"max_steps": 1, "progress": False, "threads": a.threads},
        "pairs": task,
        "rl": {"group_size": 4, "max_new_tokens": 64, "estimator": "rloo", "scale": "none",
               "mask_truncated": True, "eval_prompts": a.eval, "generate": a.problems},
        "score": {"stage1_steps": a.stage1, "stage2_steps": a.stage2},
        "checkpoint": {"export": True},
    })  # fmt: skip
    rows = compare(recipe, root / "runs", seeds=a.seeds)
    for name in ROWS:
        for seed, m in zip(a.seeds, rows[name], strict=True):
            print(json.dumps({"bench": "score", "row": name, "seed": seed, **m}))
    print(format_table(rows))
    print(f"total {time.perf_counter() - t0:.0f} s; runs under {root / 'runs'}")


if __name__ == "__main__":
    main()
