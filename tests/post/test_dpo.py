"""Offline DPO / IPO / SLiC through the trainer, the on-disk reference cache, and the errors
for a reference that does not share the policy's tokenizer."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

import geode
from geode.post.dpo import dpo
from geode.post.recipe import load_post_recipe
from geode.train.reference import IncompatibleReference
from tests.post.conftest import post_recipe


def _recipe(out, task_dir, sft_policy, **sections):
    base = dict(
        model={"init": str(sft_policy)},
        data={"path": str(task_dir / "train.jsonl"), "eval_path": str(task_dir / "heldout.jsonl")},
        objective={"kind": "dpo", "options": {"beta": 0.1}},
        train={"max_steps": 6, "progress": False, "threads": 1},
        optim={"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"},
    )
    return load_post_recipe(post_recipe(out, **{**base, **sections}))


@pytest.mark.parametrize(("loss", "steps"), [("dpo", 6), ("ipo", 2)])
def test_offline_preference_training_learns_the_pairs(tmp_path, task_dir, sft_policy, loss, steps):
    r = _recipe(tmp_path / loss, task_dir, sft_policy,
                objective={"kind": "dpo", "options": {"beta": 0.1, "loss": loss}},
                train={"max_steps": steps, "progress": False, "threads": 1})  # fmt: skip
    summary = dpo(r, r.out, False, False)
    recs = [json.loads(x) for x in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in recs if x["kind"] == "eval"]
    if loss == "dpo":  # held-out pairs ranked by the implicit reward (0 at the start: h = 0)
        assert evals[-1]["eval_reward_accuracy"] > 0.7
    else:  # IPO through the same objective: its loss starts at (0 - 1/(2 beta))^2 = 25
        first = [x for x in recs if x["kind"] == "train"][0]
        assert abs(first["loss"] - 25.0) < 1e-3
    cache = json.loads((tmp_path / loss / "reference" / "reference_logprobs.json").read_text())
    # every training and held-out sequence scored once by the reference, before training
    assert len(cache["logprobs"]) == 2 * (400 + 48)
    assert set(summary["policy_vs_start"]) >= {"win_rate", "accuracy", "baseline_accuracy"}
    assert (tmp_path / loss / "model" / "tokenizer.model").is_file()


def test_reference_with_another_tokenizer_is_refused(tmp_path, task_dir, sft_policy):
    other = tmp_path / "other"
    model = geode.load_model(sft_policy)
    cfg = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + 8)
    geode.save_model(geode.build_model(cfg, seed=1), other)
    r = _recipe(tmp_path / "a", task_dir, sft_policy,
                objective={"kind": "dpo", "options": {"reference": str(other)}})  # fmt: skip
    with pytest.raises(IncompatibleReference, match="vocab_size"):
        dpo(r, r.out, False, False)
    # same shapes, different tokenizer.model: refused too
    same = tmp_path / "same"
    shutil.copytree(sft_policy, same)
    (same / "tokenizer.model").write_bytes((task_dir / "tokenizer.model").read_bytes()[::-1])
    r = _recipe(tmp_path / "b", task_dir, sft_policy,
                objective={"kind": "dpo", "options": {"reference": str(same)}})  # fmt: skip
    with pytest.raises(IncompatibleReference, match="tokenizer"):
        dpo(r, r.out, False, False)


def test_bad_pairs_file_is_a_clear_error(tmp_path, task_dir, sft_policy):
    from geode.post.prefdata import PairError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q?", "chosen": "A"}\n')
    r = _recipe(tmp_path / "c", task_dir, sft_policy, data={"path": str(bad)})
    with pytest.raises(PairError, match=r"bad.jsonl:1: missing field\(s\) 'rejected'"):
        dpo(r, r.out, False, False)


def test_recipes_load_and_cli_reports_bad_pairs(tmp_path, capsys):
    from pathlib import Path

    from geode.cli import main

    root = Path(__file__).resolve().parents[2] / "recipes" / "post"
    kinds = {f: load_post_recipe(root / f"{f}-nano.toml") for f in ("reward", "dpo", "oaif")}
    assert kinds["reward"].objective.kind == "reward" and kinds["oaif"].online is not None
    assert main(["dpo", "--make-data", str(tmp_path / "p"), "--n", "10", "--noise", "0.2"]) == 0
    lines = (tmp_path / "p" / "train.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["flipped"] for x in lines) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "A", "rejected": "B"}\n')
    code = main(["dpo", str(root / "dpo-nano.toml"), "--set", f"data.path={bad}",
                 "--set", "data.eval_path=", "--set", "pairs.generate=0"])  # fmt: skip
    assert code == 2
    assert "bad.jsonl:1: missing field(s) 'prompt'" in capsys.readouterr().err
