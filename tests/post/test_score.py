"""SCoRe (geode.post.score, objective "score"): the per-attempt advantages with the shaping
bonus, the per-attempt KL weights and masks against a hand computation, a tiny end-to-end
comparison table on the SFT policy fixture, and clear errors for bad [score] values."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

import geode
from geode.config import get_preset
from geode.data.loader import Batch
from geode.recipe import RecipeError
from geode.train.objectives.score import (
    ScoreObjective,
    ScoreOptions,
    attempt_returns,
    kl_coefficients,
    score_advantages,
    token_advantages,
)
from geode.train.reference import Reference


def test_advantages_per_attempt_with_the_bonus():
    r1 = torch.tensor([1.0, 0.0, 0.0, 1.0])
    r2 = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # Stage II: attempt 2 earns r2 + alpha (r2 - r1); attempt 1 its own r1
    g1, g2 = attempt_returns(r1, r2, stage=2, alpha=10.0)
    assert g1.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert g2.tolist() == [1.0, 11.0, 0.0, -10.0]
    # RLOO in groups of 2: baseline = the other sample's return
    a1, a2 = score_advantages(r1, r2, 2, stage=2, alpha=10.0, estimator="rloo", scale="none")
    assert a1.tolist() == [1.0, -1.0, -1.0, 1.0]
    assert a2.tolist() == [-10.0, 10.0, 10.0, -10.0]
    # Stage I: attempt 2 on r2 alone, attempt 1 no reward term
    a1, a2 = score_advantages(r1, r2, 2, stage=1, alpha=10.0, estimator="rloo", scale="none")
    assert a1.tolist() == [0.0] * 4
    r2b = torch.tensor([1.0, 0.0, 0.0, 1.0])
    _, a2 = score_advantages(r1, r2b, 2, stage=1, alpha=10.0, estimator="grpo", scale="none")
    assert a2.tolist() == [0.5, -0.5, -0.5, 0.5]


def _tiny_batch() -> Batch:
    # two episodes: prompt (3 tokens), attempt 1, forced instruction tokens, attempt 2
    tokens = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 11, 12, 13], [2, 5, 6, 14, 15, 9, 10, 16, 17, 0]])
    turns = torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2, 2], [0, 0, 1, 1, 0, 0, 2, 2, 0]])
    loss_mask = turns > 0
    B, T1 = tokens.shape
    a1, a2 = torch.tensor([0.5, -1.0]), torch.tensor([2.0, -3.0])
    return Batch(
        tokens=tokens,
        positions=torch.arange(T1).expand(B, T1).clone(),
        segment_ids=torch.zeros(B, T1, dtype=torch.long),
        sources=torch.zeros(B, dtype=torch.long),
        windows=torch.zeros(B, dtype=torch.long),
        loss_mask=loss_mask,
        advantages=token_advantages(turns, a1, a2),
        turns=turns,
    )


@pytest.mark.parametrize("stage,loss_type", [(1, "grpo"), (2, "grpo"), (2, "dapo")])
def test_objective_against_a_hand_computation(stage, loss_type):
    from .conftest import TINY

    cfg = get_preset("nano-1m").replace(**TINY, vocab_size=32)
    policy = geode.build_model(cfg, seed=0).float()
    base = geode.build_model(cfg, seed=1).float()
    batch = _tiny_batch()
    o = ScoreOptions(stage=stage, beta1=0.01, beta2=0.1, kl="k3", loss_type=loss_type)
    obj = ScoreObjective.__new__(ScoreObjective)
    obj.options, obj.source = o, None
    obj.trainer = SimpleNamespace(_autocast=contextlib.nullcontext)
    obj.reference = Reference(base)
    total, n, metrics = obj.loss_sum(policy, batch)
    total.backward()
    grad = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    # by hand: -A_t log p_t (on-policy surrogate) + beta_t * k3_t on the attempts' tokens
    lp = torch.log_softmax(policy(batch.input_ids).float(), -1)
    lp = lp.gather(-1, batch.targets[..., None])[..., 0]  # (B, T)
    with torch.no_grad():
        rl = torch.log_softmax(base(batch.input_ids).float(), -1)
        rl = rl.gather(-1, batch.targets[..., None])[..., 0]
    t = batch.turns
    adv = torch.tensor([[0.5], [-1.0]]) * (t == 1) + torch.tensor([[2.0], [-3.0]]) * (t == 2)
    beta = (0.1 * (t == 1)) if stage == 1 else 0.01 * ((t == 1) | (t == 2))
    k3 = torch.exp(rl - lp) - (rl - lp) - 1
    m = (t > 0).float()
    # the surrogate at ratio w = 1: value -A, gradient -A dlog p
    per = (-adv * torch.exp(lp - lp.detach()) + beta * k3) * m
    if loss_type == "grpo":
        hand, hand_n = (per.sum(-1) / m.sum(-1)).sum(), 2.0
    else:
        hand, hand_n = per.sum(), float(m.sum())
    torch.testing.assert_close(total, hand, atol=1e-5, rtol=1e-5)
    assert n == hand_n
    hand.backward()
    for g, p in zip(grad, policy.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
    # the logged per-attempt KL: token means of k3 over each attempt
    for i in (1, 2):
        on = m * (t == i)
        assert abs(metrics[f"kl_attempt{i}"] - float((k3 * on).detach().sum())) < 1e-5
        assert metrics[f"tokens_attempt{i}"] == float(on.sum())


def test_kl_weights_per_stage():
    t = torch.tensor([[0, 1, 1, 0, 2, 2, 0]])
    torch.testing.assert_close(
        kl_coefficients(t, 1, 0.01, 0.1), torch.tensor([[0, 0.1, 0.1, 0, 0, 0, 0]])
    )
    c = kl_coefficients(t, 2, 0.01, 0.1)
    torch.testing.assert_close(c, torch.tensor([[0, 0.01, 0.01, 0, 0.01, 0.01, 0]]))


def _recipe(out, task_dir, policy, **score):
    from geode.post.recipe import load_post_recipe

    from .conftest import TASK, post_recipe

    d = post_recipe(
        out,
        model={"init": str(policy)},
        data={"seq_len": 128, "tokenizer": str(task_dir / "tokenizer.model")},
        batch={"global_batch_size": 4, "micro_batch_size": 4},
        optim={"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"},
        pairs=TASK,
        rl={"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 12, "estimator": "rloo",
            "scale": "none", "eval_prompts": 4, "eval_max_new_tokens": 12},
        score={"stage1_steps": 1, "stage2_steps": 1, **score},
    )  # fmt: skip
    del d["data"]["path"], d["eval"]
    return load_post_recipe(d)


def test_compare_writes_the_table_with_all_rows(tmp_path, task_dir, sft_policy):
    from geode.post.score import ROWS, compare

    rows = compare(_recipe(tmp_path / "r", task_dir, sft_policy), tmp_path / "cmp", seeds=(0,))
    assert list(rows) == list(ROWS)
    for name in ROWS:
        assert len(rows[name]) == 1 and rows[name][0]["n"] == 4
        m = rows[name][0]
        assert abs(m["delta"] - (m["accuracy@t2"] - m["accuracy@t1"])) < 1e-9
        assert abs(m["delta"] - (m["delta_i_to_c"] - m["delta_c_to_i"])) < 1e-9
    table = (tmp_path / "cmp" / "table.md").read_text()
    for name in ROWS:
        assert f"| {name} |" in table
    assert "SCoRe's Δ is" in table
    # SCoRe ran both stages from the base, with the base as Stage II's reference
    summary = json.loads((tmp_path / "cmp" / "seed0" / "SCoRe" / "summary.json").read_text())
    assert summary["stage1"]["steps"] == 1 and summary["stage2"]["steps"] == 1
    recs = [json.loads(x) for x in (tmp_path / "cmp" / "seed0" / "SCoRe" / "stage2" /
                                    "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    train = [r for r in recs if r.get("kind") == "train"]
    assert train and {"kl_attempt1", "kl_attempt2", "reward_attempt2"} <= set(train[0])
    no1 = json.loads((tmp_path / "cmp" / "seed0" / "SCoRe_wo_Stage_I" / "summary.json").read_text())
    assert "stage1" not in no1 and no1["stage2"]["steps"] == 2  # the same budget


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"alpha": -1.0}, "score.alpha"),
        ({"beta1": float("nan")}, "score.beta1"),
        ({"method": "dpo"}, "score.method"),
        ({"stage1_steps": -2}, "score.stage1_steps"),
        ({"stage1_steps": 0, "stage2_steps": 0}, "stage2_steps must be >= 1"),
        ({"instruction": "   "}, "score.instruction"),
        ({"loss_type": "bnpo"}, "score.loss_type"),
    ],
)
def test_bad_score_values_are_clear_errors(tmp_path, task_dir, bad, match):
    from geode.post.score import score

    r = _recipe(tmp_path / "r", task_dir, tmp_path / "policy", **bad)
    with pytest.raises(RecipeError, match=match):
        score(r, tmp_path / "r")
    assert not (tmp_path / "r").exists()  # nothing written


def test_table_says_whether_score_has_the_largest_delta():
    from geode.post.score import format_table

    def m(t1, t2, i2c, c2i):
        return {"accuracy@t1": t1, "accuracy@t2": t2, "delta": t2 - t1,
                "delta_i_to_c": i2c, "delta_c_to_i": c2i}  # fmt: skip

    rows = {
        "base": [m(0.2, 0.1, 0.0, 0.1)] * 2,
        "SCoRe": [m(0.2, 0.3, 0.1, 0.0), m(0.2, 0.4, 0.2, 0.0)],
    }
    table = format_table(rows)
    assert "| SCoRe | 0.200 ± 0.000 | 0.350 ± 0.050 | +0.150 ± 0.050 |" in table
    assert "SCoRe's Δ is the largest." in table
    rows["STaR"] = [m(0.1, 0.35, 0.25, 0.0)] * 2
    assert "SCoRe's Δ is not the largest." in format_table(rows)
