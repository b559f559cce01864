"""WARP: a tiny run (M = 2 policies, I = 1, two steps each) on the SFT policy writes its front;
the front's models load and are exactly LITI(init, SLERP(runs), eta); the runs used the EMA
anchor; a resumed WARP reads the finished runs back; bad [warp] sections are recipe errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import geode
from geode.post.merge import liti, slerp_merge
from geode.post.recipe import load_post_recipe
from geode.post.rewards import Term, register_reward
from geode.post.rl import rl
from geode.recipe import RecipeError
from tests.post.conftest import post_recipe

ETAS = [0.0, 0.5, 1.0]
REWARDS = [{"kind": "synth"}, {"kind": "test_digits", "weight": 1.0}]


@register_reward("test_digits")
class _Digits(Term):
    """The share of digits in a completion: a dense reward (the tiny policy's verified accuracy is
    ~0, so samples of a group differ in reward and two steps move the weights)."""

    name = "test_digits"

    def __call__(self, samples):
        return [sum(c.isdigit() for c in s.completion) / max(len(s.completion), 1) for s in samples]


def _recipe(out: Path, policy: Path, task_dir: Path, **warp):
    return load_post_recipe(
        post_recipe(
            out,
            model={"init": str(policy)},
            data={
                "path": str(task_dir / "train.jsonl"),
                "eval_path": str(task_dir / "heldout.jsonl"),
            },
            batch={"global_batch_size": 4, "micro_batch_size": 4},
            objective={"kind": "rl", "options": {"beta": 0.05}},
            train={"max_steps": 2, "progress": False, "threads": 1},
            optim={"lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"},
            rl={
                "group_size": 2,
                "max_new_tokens": 24,
                "eval_prompts": 4,
                "eval_max_new_tokens": 24,
                "rewards": REWARDS,
            },
            warp={
                "policies": 2,
                "iterations": 1,
                "ema_rate": 0.5,
                "eta": 0.5,
                "etas": ETAS,
                "eval_samples": 2,
                **warp,
            },  # fmt: skip
        )
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return geode.load_model(path).state_dict()


def test_tiny_warp_writes_a_front_of_loadable_merged_models(tmp_path, task_dir, sft_policy):
    out = tmp_path / "warp"
    report = rl(_recipe(out, sft_policy, task_dir), out, progress=False)
    saved = json.loads((out / "front.json").read_text())
    assert saved["comparison"] == report["comparison"]
    kinds = [p["kind"] for p in saved["points"]]
    assert kinds == ["init", "run", "run", "liti", "liti", "liti"]
    init, runs, fam = saved["points"][0], saved["points"][1:3], saved["points"][3:]
    assert init["kl"] == 0.0 and fam[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert [p["eta"] for p in fam] == ETAS and runs[0]["seed"] != runs[1]["seed"]
    for p in saved["points"]:
        assert 0.0 <= p["reward"] <= 2.0 and p["kl"] == p["kl"]
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the front's models load and are exactly LITI(init, SLERP(run_0, run_1), eta)
    start = _weights(sft_policy)
    members = [_weights(out / "iter-0" / f"run-{m}" / "model") for m in range(2)]
    assert any(not torch.equal(members[0][k], members[1][k]) for k in start)  # other seeds
    merged = slerp_merge(start, members)
    for p in fam:
        got = _weights(Path(p["model"]))
        want = liti(start, merged, p["eta"])
        for k in start:
            torch.testing.assert_close(got[k], want[k], msg=k)
    nxt, want = _weights(out / "iter-0" / "model"), liti(start, merged, 0.5)  # the next init
    for k in start:
        torch.testing.assert_close(nxt[k], want[k], msg=k)
    # each run had the EMA anchor: KL 0 at step 1 (anchor = policy), > 0 once the policy moved
    recs = [
        json.loads(x) for x in (out / "iter-0" / "run-0" / "metrics.jsonl").read_text().splitlines()
    ]
    kl = [r["kl"] for r in recs if r.get("kind") == "train"]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 0
    # resume: the finished runs are read back, not trained again; the same front
    again = rl(_recipe(out, sft_policy, task_dir), out, resume=True, progress=False)
    assert [p["reward"] for p in again["points"]] == [p["reward"] for p in saved["points"]]
    recs2 = (out / "iter-0" / "run-0" / "metrics.jsonl").read_text().splitlines()
    assert len(recs2) == len(recs)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(policies=0), "warp.policies = 0"),
        (dict(eta=1.5), "warp.eta = 1.5"),
        (dict(etas=[]), "warp.etas"),
        (dict(ema_rate=-0.1), "warp.ema_rate"),
    ],
)
def test_bad_warp_sections(tmp_path, task_dir, sft_policy, change, match):
    with pytest.raises(RecipeError, match=match):
        rl(_recipe(tmp_path, sft_policy, task_dir, **change), tmp_path, progress=False)
