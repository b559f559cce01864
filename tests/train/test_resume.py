"""Exact resume: a SIGKILLed run continues bit for bit; bad checkpoints are skipped by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from geode.train import load_train_recipe, train
from geode.train.metrics import curve, read_metrics
from geode.train.state import CheckpointWarning
from tests.train.helpers import child_env, geode_cli, synthetic_dataset, tiny_recipe, write_recipe


def _recipe(data: Path) -> dict:
    return tiny_recipe(
        data,
        train={"max_steps": 10, "deterministic": True},
        checkpoint={"every": 4, "keep": 3, "export": False},
        eval={"every": 5},
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (in-process): (recipe path, its metrics records)."""
    root = tmp_path_factory.mktemp("resume")
    data = synthetic_dataset(root / "data")
    path = write_recipe(root / "r.toml", _recipe(data))
    train(load_train_recipe(path), out=root / "ref")
    return path, read_metrics(root / "ref" / "metrics.jsonl")


def _same_run(records: list[dict], reference: list[dict]) -> None:
    """Bitwise-equal train losses, grad norms and held-out losses at every step."""
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "eval_loss")):
        got, want = curve(records, kind, key), curve(reference, kind, key)
        assert got == want, (kind, key, got, want)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, resumed_at",
    [
        ("kind=kill,step=7", 4),  # killed at the start of step 7: resume from step 4
        ("kind=kill,step=8,at=checkpoint", 4),  # killed mid-write of checkpoint 8
    ],
)
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, reference, fault, resumed_at):
    recipe, ref = reference
    out = tmp_path / "run"
    killed = geode_cli(["train", str(recipe), "--out", str(out)], child_env(GEODE_FAULT=fault))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "SIGKILL" in killed.stdout
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    if "checkpoint" in fault:  # the half-written checkpoint never got its final name
        assert steps == [".step-00000008.tmp", "step-00000004"]
    summary = train(load_train_recipe(recipe), out=out, resume=True)
    records = read_metrics(out / "metrics.jsonl")
    resume = [r for r in records if r.get("event") == "resume"]
    assert resume and resume[0]["step"] == resumed_at
    _same_run(records, ref)
    assert summary["restarts"] == 1 and summary["steps"] == 10
    assert not list((out / "checkpoints").glob(".*.tmp"))  # stale partial write cleaned up


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "no-manifest"])
def test_bad_checkpoint_is_skipped_with_a_warning_naming_the_file(tmp_path, reference, damage):
    recipe, ref = reference
    out = tmp_path / "run"
    shutil.copytree(Path(recipe).parent / "ref", out)
    newest = out / "checkpoints" / "step-00000010"
    if damage == "corrupt":  # flip one byte in the middle of the tensor file
        bad = newest / "__0_0.distcp"
        raw = bytearray(bad.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        bad.write_bytes(bytes(raw))
        pattern = r"step-00000010/__0_0.distcp does not match its SHA-256"
    elif damage == "truncate":
        bad = newest / "trainer.json"
        bad.write_bytes(bad.read_bytes()[:20])
        pattern = r"step-00000010/trainer.json has 20 bytes"
    else:
        (newest / "MANIFEST.json").unlink()
        pattern = r"step-00000010/MANIFEST.json is missing \(partial checkpoint\)"
    with pytest.warns(CheckpointWarning, match=pattern):
        summary = train(load_train_recipe(recipe), out=out, resume=True)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "resume"] == [8]
    _same_run(records, ref)  # steps 9 and 10 redone from checkpoint 8, identically
    assert summary["steps"] == 10


def _corrupt_every_checkpoint(ckpts: Path) -> list[Path]:
    """Damage each checkpoint a different way; the damaged files, newest checkpoint first."""
    steps = sorted((p for p in ckpts.iterdir() if p.name.startswith("step-")), reverse=True)
    bad = []
    for i, step in enumerate(steps):
        if i % 2 == 0:  # flip one byte of the tensor shard
            f = step / "__0_0.distcp"
            raw = bytearray(f.read_bytes())
            raw[len(raw) // 2] ^= 0x40
            f.write_bytes(bytes(raw))
        else:  # truncate the trainer state
            f = step / "trainer.json"
            f.write_bytes(f.read_bytes()[:20])
        bad.append(f)
    return bad


def test_killed_run_with_every_checkpoint_corrupt_refuses_to_resume(tmp_path, reference):
    """A real run SIGKILLed at step 9 (checkpoints 4 and 8 on disk), both checkpoints damaged:
    `geode train --resume` exits non-zero naming both files; with --allow-fresh it trains from
    step 0, the abandoned run's checkpoints and metrics set aside, none of its records mixed in."""
    recipe, ref = reference
    out = tmp_path / "run"
    killed = geode_cli(
        ["train", str(recipe), "--out", str(out), "--no-progress"],
        child_env(GEODE_FAULT="kind=kill,step=9"),
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    bad = _corrupt_every_checkpoint(out / "checkpoints")
    assert [f.parent.name for f in bad] == ["step-00000008", "step-00000004"]
    old_metrics = (out / "metrics.jsonl").read_text()
    resumed = geode_cli(["train", str(recipe), "--out", str(out), "--resume"], child_env())
    assert resumed.returncode != 0
    err = resumed.stderr
    assert "cannot resume" in err and "--allow-fresh" in err, err[-3000:]
    assert f"{bad[0]} does not match its SHA-256" in err, err[-3000:]
    assert f"{bad[1]} has 20 bytes" in err, err[-3000:]
    assert (out / "metrics.jsonl").read_text() == old_metrics  # nothing touched
    assert "resumed at step" not in resumed.stdout and "step 0" not in resumed.stdout

    summary = train(load_train_recipe(recipe), out=out, resume=True, allow_fresh=True)
    assert summary["steps"] == 10 and summary["restarts"] == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))
    _same_run(records, ref)  # a clean run from step 0, bit for bit
    fresh = [r for r in records if r.get("event") == "fresh_start"]
    assert len(fresh) == 1 and fresh[0]["reason"] == "--allow-fresh"
    assert any(str(bad[0]) in x for x in fresh[0]["rejected"])
    aside = {p.name.split(".abandoned-")[0] for p in out.glob("*.abandoned-*")}
    assert aside == {"checkpoints", "metrics"}
    (old,) = out.glob("metrics.abandoned-*.jsonl")
    assert old.read_text() == old_metrics
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000004",
        "step-00000008",
        "step-00000010",
    ]  # only the new run's (the damaged ones no longer compete in pruning or resume)


def test_resume_with_nothing_to_resume(tmp_path, reference, monkeypatch):
    """A resume that finds nothing ever saved (a first start, a torchrun restart before the
    first checkpoint, a distillation's control run not begun yet) starts from step 0, says so,
    and sets the dead attempt's metrics aside."""
    recipe, _ = reference
    r = load_train_recipe(recipe, ["train.max_steps=2", "optim.warmup_steps=0"])
    out = tmp_path / "restarted"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9.0}\n')
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    train(r, out=out)
    records = read_metrics(out / "metrics.jsonl")
    assert 9.0 not in [x.get("loss") for x in records]
    assert [x["reason"] for x in records if x.get("event") == "fresh_start"] == [
        "no checkpoint or replica was saved yet"
    ]
    (aside,) = out.glob("metrics.abandoned-*.jsonl")
    assert "9.0" in aside.read_text()
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert train(r, out=tmp_path / "new", resume=True)["steps"] == 2
