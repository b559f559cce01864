"""`geode quickstart` (issue #20): a tiny budget end to end (every artifact exists and loads),
--resume skipping finished stages, and a failing stage named with a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from geode import quickstart as qs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """One quickstart at a tiny budget (every stage, seconds each)."""
    out = tmp_path_factory.mktemp("quickstart") / "run"
    done = qs.run(out, budget_minutes=0.2, progress=False)
    return out, done


def test_tiny_budget_end_to_end_artifacts(tiny_run):
    import torch
    from PIL import Image

    from geode import load_model
    from geode.tokenizer import load_tokenizer

    out, done = tiny_run
    assert list(done) == list(qs.STAGES)
    for stage in qs.STAGES:
        rec = json.loads((out / stage / "done.json").read_text())
        assert rec["stage"] == stage and rec["seconds"] >= 0
    report = (out / "REPORT.md").read_text()
    for stage in qs.STAGES:
        assert f"| {stage} |" in report, stage
    assert "geode chat" in report and "geode serve" in report
    # the claims are checked on the run's own numbers, yes or NO each
    for claim in ("distilled student below", "SFT model", "RL raises", "SCoRe"):
        line = next(x for x in report.splitlines() if x.startswith("- ") and claim in x)
        assert "**yes" in line or "**NO" in line
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["accuracy_by_stage.png", "distill_vs_scratch.png", "self_correction.png",
                    "training_curves.png"]  # fmt: skip
    for name in pngs:
        with Image.open(out / "plots" / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100
    # the final model (HF layout) loads and is the last stage's weights
    model = load_model(out / "final")
    tok = load_tokenizer(out / "final" / "tokenizer.model")
    assert model.config.vocab_size == len(tok) == done["tokenizer"]["vocab_size"]
    last = load_model(done["score"]["model"])
    for (k, a), (_, b) in zip(model.state_dict().items(), last.state_dict().items()):
        assert torch.equal(a, b), k
    # distillation's comparison and the metrics the report's table is built from
    d = done["distill"]
    assert d["hidden_size"] < done["pretrain"]["hidden_size"]  # the student is the smaller
    assert d["student_heldout_loss"] > 0 and d["control_heldout_loss"] > 0
    assert (out / "distill" / "student" / "model" / "config.json").exists()
    assert (out / "distill" / "control" / "model" / "config.json").exists()
    for stage in ("sft", "dpo", "rl", "score"):
        assert 0.0 <= done[stage]["accuracy"] <= 1.0 and done[stage]["heldout_ppl"] > 1.0
    assert done["data"]["heldout_docs"] > 0 and done["data"]["task_docs"] > 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["tiny"] and plan["budget_minutes"] == 0.2


def test_resume_skips_done_stages(tiny_run, monkeypatch):
    out, done = tiny_run
    stamps = {s: (out / s / "done.json").stat().st_mtime_ns for s in qs.STAGES}

    def boom(ctx):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(qs, "STAGE_FUNCS", dict.fromkeys(qs.STAGES, boom))
    lines: list[str] = []
    again = qs.run(out, resume=True, progress=False, log=lines.append)
    assert again == done
    assert sum("done already" in x for x in lines) == len(qs.STAGES)
    assert stamps == {s: (out / s / "done.json").stat().st_mtime_ns for s in qs.STAGES}
    with pytest.raises(qs.QuickstartError, match="--resume"):  # no silent overwrite
        qs.run(out, progress=False, log=lines.append)


def test_failing_stage_is_named_and_resume_continues(tmp_path, monkeypatch, capsys):
    from geode.cli import main

    calls: list[str] = []

    def fake(name, fail=False):
        def stage(ctx):
            calls.append(name)
            if fail:
                raise ValueError("tokenizer.model: vocab too small")
            return {"steps": 1}

        return stage

    funcs = {s: fake(s) for s in qs.STAGES}
    monkeypatch.setattr(qs, "STAGE_FUNCS", {**funcs, "tokenizer": fake("tokenizer", True)})
    out = tmp_path / "q"
    rc = main(["quickstart", "--out", str(out), "--budget-minutes", "0.2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "stage 'tokenizer' failed" in err and "vocab too small" in err and "--resume" in err
    assert calls == ["data", "tokenizer"]
    assert (out / "data" / "done.json").exists() and not (out / "tokenizer" / "done.json").exists()
    monkeypatch.setattr(qs, "STAGE_FUNCS", funcs)
    calls.clear()
    assert main(["quickstart", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert calls == list(qs.STAGES[1:])  # data was not rerun
    assert "geode chat" in capsys.readouterr().out


def test_plan_budget_and_base(tmp_path):
    with pytest.raises(qs.QuickstartError, match="budget"):
        qs.make_plan(0)
    assert sum(qs.FRACTIONS.values()) == pytest.approx(1.0)
    assert set(qs.FRACTIONS) == set(qs.STAGES) == set(qs.STAGE_FUNCS)
    big, tiny = qs.make_plan(10), qs.make_plan(0.2)
    assert not big.tiny and tiny.tiny
    assert big.max_shape > tiny.max_shape and big.min_steps > tiny.min_steps == 0
    assert big.seconds("pretrain") == pytest.approx(qs.FRACTIONS["pretrain"] * 600)
    with pytest.raises(qs.QuickstartError, match="not a checkpoint directory"):
        qs.run(tmp_path / "b", budget_minutes=1, base=str(tmp_path / "missing"), progress=False)
