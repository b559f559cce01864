"""OAIF on the generated task: the policy's own samples, judged each step, raise its win rate
against the starting (SFT) policy; the same budget of offline DPO runs beside it."""

from __future__ import annotations

import json

from geode.post.dpo import dpo
from geode.post.recipe import load_post_recipe
from tests.post.conftest import post_recipe

STEPS, PROMPTS = 8, 8  # 8 steps x 8 prompts x 2 samples; offline: 8 steps x 8 pairs
# From real runs of this test (tiny SFT policy, verifier judge, 48 held-out prompts): after 8
# steps OAIF wins 0.77 against the start (shorter, equally wrong answers win), offline DPO with
# the same budget 0.68; after 12 steps 0.69 / 0.47; docs/post-training.md has a 20-step run.
WIN_RATE_BOUND = 0.6


def _run(tmp_path, task_dir, sft_policy, online: bool) -> dict:
    sections = dict(
        model={"init": str(sft_policy)},
        data={"path": str(task_dir / "train.jsonl"), "eval_path": str(task_dir / "heldout.jsonl")},
        batch={"global_batch_size": 2 * PROMPTS, "micro_batch_size": 2 * PROMPTS},
        objective={"kind": "dpo", "options": {"beta": 0.1}},
        train={"max_steps": STEPS, "progress": False, "threads": 1},
        optim={"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"},
        checkpoint={"export": False},
    )
    if online:
        sections["online"] = {"judge": "verifier", "max_new_tokens": 64, "eval_max_new_tokens": 64}
    out = tmp_path / ("oaif" if online else "offline")
    recipe = load_post_recipe(post_recipe(out, **sections))
    summary = dpo(recipe, recipe.out, False, False)
    summary["records"] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary


def test_oaif_raises_win_rate_over_the_sft_policy(tmp_path, task_dir, sft_policy):
    oaif = _run(tmp_path, task_dir, sft_policy, online=True)
    offline = _run(tmp_path, task_dir, sft_policy, online=False)
    won = oaif["policy_vs_start"]
    print("OAIF", won, "offline DPO", offline["policy_vs_start"])
    assert won["win_rate"] >= WIN_RATE_BOUND
    assert won["length"] < won["baseline_length"]  # the judge prefers concise answers
    assert 0.0 <= offline["policy_vs_start"]["win_rate"] <= 1.0
    steps = [r for r in oaif["records"] if r["kind"] == "train"]
    assert len(steps) == STEPS
    for r in steps:  # the step split and the judge's bookkeeping are logged every step
        assert r["sample_s"] > 0 and r["update_s"] > 0 and r["judge_s"] >= 0
        assert r["judge_agreement"] == 1.0  # the verifier judging: agrees with itself
        assert r["pairs"] >= 1 and (r["pairs"] + r["skipped"]) % PROMPTS == 0
        assert r["response_tokens"] > 0 and 0.0 <= r["sample_accuracy"] <= 1.0
    assert oaif["judge"]["judged"] >= STEPS
