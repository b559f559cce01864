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


# ------------------------------------------------------------------ --base PATH
@pytest.fixture(scope="module")
def base_run(tiny_run, tmp_path_factory) -> tuple[Path, Path, dict]:
    """The tiny run's final model (HF layout with its tokenizer) post-trained again as --base,
    with LoRA forced (lora_above=0), at a tiny budget."""
    base = tiny_run[0] / "final"
    out = tmp_path_factory.mktemp("quickstart-base") / "run"
    done = qs.run(out, budget_minutes=0.05, base=str(base), progress=False, lora_above=0)
    return out, base, done


def test_base_skips_pretraining_and_compares_before_after(base_run):
    from geode import load_model
    from geode.post.reward import load_reward_model

    out, base, done = base_run
    assert list(done) == [s for s in qs.STAGES if s not in ("pretrain", "distill")]
    assert not (out / "pretrain").exists() and not (out / "distill").exists()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["base"] == str(base) and plan["lora"] and plan["lora_above"] == 0
    tok = out / "tokenizer" / "tokenizer.model"
    assert tok.read_bytes() == (base / "tokenizer.model").read_bytes()  # the base's own
    # every stage's model loads; the reward model (WARM average) with its head
    for stage in ("sft", "dpo", "rl", "score", "report"):
        assert load_model(done[stage]["model"]).config.vocab_size == done["tokenizer"]["vocab_size"]
    load_reward_model(done["reward"]["model"])
    # the report compares the base model before and after, from the run's own numbers
    report = (out / "REPORT.md").read_text()
    assert "| pretrain |" in report and "skipped (--base)" in report
    table = report.split("## The base model before and after")[1].split("##")[0]
    s = done["sft"]
    assert (
        f"| base `{base}` (before) | {s['base_accuracy']:.3f} | {s['base_answered']:.3f} |" in table
    )
    for stage in ("sft", "dpo", "rl", "score"):
        assert f"| after {stage} | {done[stage]['accuracy']:.3f} |" in table
    line = next(x for x in report.splitlines() if "raises the base model's held-out" in x)
    assert f"{s['base_accuracy']:.3f} -> {done['score']['accuracy']:.3f}" in line
    assert s["base_heldout_ppl"] > 1.0 and ("**yes" in line or "**NO" in line)


def test_base_lora_export_is_merged_and_loads_in_transformers(base_run):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import Gemma3ForCausalLM

    from geode import load_model

    out, base, done = base_run
    final = out / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())  # plain weights: the adapters are merged in
    ids = torch.tensor([[2, 5, 17, 40, 3, 99, 7, 250, 11, 64]])  # (1, 10)

    def hf(path):
        return Gemma3ForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                 dtype=torch.float32).eval()  # fmt: skip

    with torch.no_grad():
        ours = load_model(final).eval()(ids)
        torch.testing.assert_close(hf(final)(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
        assert (ours - load_model(base).eval()(ids)).abs().max() > 1e-4  # trained
        # SFT's merged export = peft's base + adapter (its saved layout) in transformers
        sft = load_model(done["sft"]["model"]).eval()(ids)
        peft = PeftModel.from_pretrained(hf(base), out / "sft" / "adapter").eval()
        torch.testing.assert_close(peft(input_ids=ids).logits, sft, rtol=1e-4, atol=1e-4)


def test_base_plan_lora_switch(tiny_run):
    base = str(tiny_run[0] / "final")
    full, lora = qs.make_plan(10, base), qs.make_plan(10, base, lora_above=0)
    assert not full.lora and full.post_rows == qs.BATCH and full.eval_prompts == 100
    assert lora.lora and lora.post_rows < full.post_rows and lora.eval_prompts < 100
    assert lora.stages() == [s for s in qs.STAGES if s not in ("pretrain", "distill")]
    # the skipped stages' budget goes to the others
    assert sum(lora.seconds(s) for s in lora.stages()) == pytest.approx(600)
    assert lora.seconds("sft") > qs.make_plan(10).seconds("sft")
    ctx = qs.Context(Path("/nonexistent"), full, False)
    assert "lora" not in qs._post(ctx, "sft", base, 4, 1e-2)
    ctx.plan = lora
    recipe = qs._post(ctx, "sft", base, 4, 1e-2)
    assert recipe["lora"] == {"r": 16, "alpha": 32.0} and recipe["optim"]["lr"] == qs.LORA_LR["sft"]
    assert recipe["batch"]["global_batch_size"] == lora.post_rows


def test_relative_out_and_base_resume_from_another_cwd(tiny_run, tmp_path, monkeypatch):
    """--out and --base given relative to one directory, resumed from another: the records'
    paths are absolute, so a later stage finds an earlier stage's model."""
    import shutil

    from geode.cli import main

    (tmp_path / "a").mkdir()
    shutil.copytree(tiny_run[0] / "final", tmp_path / "a" / "base")
    seen: list[Path] = []

    def first(ctx):
        (ctx.dir("data") / "m").mkdir()
        return {"model": str(ctx.dir("data") / "m")}

    def later(name, fail=False):
        def stage(ctx):
            seen.append(Path(ctx.model("data")))
            assert Path(ctx.model("data")).is_dir() and Path(ctx.plan.base).is_dir()
            if fail:
                raise RuntimeError("interrupted")
            return {"model": ctx.model("data")}

        return stage

    funcs = {s: later(s) for s in qs.STAGES} | {"data": first}
    monkeypatch.setattr(qs, "STAGE_FUNCS", {**funcs, "sft": later("sft", True)})
    monkeypatch.chdir(tmp_path / "a")
    args = ["quickstart", "--out", "q", "--budget-minutes", "0.2", "--no-progress"]
    assert main([*args, "--base", "base"]) == 1
    monkeypatch.setattr(qs, "STAGE_FUNCS", funcs)
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--out", "a/q", "--resume", "--no-progress"]) == 0
    assert seen and all(p == tmp_path / "a" / "q" / "data" / "m" for p in seen)
    assert all((tmp_path / "a" / "q" / s / "done.json").exists() for s in qs.STAGES[4:])
    lines: list[str] = []  # resuming a finished run from a third directory runs nothing
    monkeypatch.chdir(tmp_path / "a" / "q")
    qs.run(".", resume=True, progress=False, log=lines.append)
    assert sum("done already" in x for x in lines) == len(qs.STAGES) - 2
