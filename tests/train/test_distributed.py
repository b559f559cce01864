"""torchrun with 2 gloo processes: DDP and FSDP2 match 1 process; SDC caught; elastic restart.

Each test launches real `torchrun --standalone --nproc-per-node 2 -m geode train` jobs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import geode
from geode.train import load_train_recipe, train
from geode.train.fault import default_replica_dir
from geode.train.metrics import curve, read_metrics
from tests.train.helpers import child_env, synthetic_dataset, tiny_recipe, torchrun, write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The 1-process reference run: (root, recipe path, metrics records)."""
    root = tmp_path_factory.mktemp("dist")
    data = synthetic_dataset(root / "data")
    recipe = tiny_recipe(
        data,
        train={"max_steps": 8, "deterministic": True},
        eval={"every": 4},
        checkpoint={"export": True, "every": 4},
    )  # global batch 8: 1 process x 2 micro-batches of 4, or 2 processes x 1 of 4
    path = write_recipe(root / "r.toml", recipe)
    train(load_train_recipe(path), out=root / "one")
    return root, path, read_metrics(root / "one" / "metrics.jsonl")


def _close(records: list[dict], ref: list[dict], rtol: float) -> None:
    for kind, key in (("train", "loss"), ("eval", "eval_loss")):
        got, want = curve(records, kind, key), curve(ref, kind, key)
        assert list(got) == list(want), (kind, list(got), list(want))
        np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=rtol)


def _check(proc) -> None:
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_ddp_matches_single_process_and_sdc_bitflip_is_caught(single):
    """DDP with a bit flipped in rank 1's parameters after step 5: the check at step 6 sees the
    replicas disagree, replay from step 4 names rank 1, and after the rollback the loss curve
    is the 1-process curve."""
    root, recipe, ref = single
    out = root / "ddp"
    env = child_env(GEODE_FAULT="kind=bitflip,step=5,rank=1,target=param")
    args = ["train", str(recipe), "--out", str(out), "--set", "fault.sdc_every=2"]
    _check(torchrun(2, args, env))
    records = read_metrics(out / "metrics.jsonl")
    _close(records, ref, rtol=1e-5)
    sdc = [r for r in records if r.get("event") == "sdc"]
    assert len(sdc) == 1, sdc
    assert sdc[0]["faulty_ranks"] == [1] and sdc[0]["detected_at"] == 6
    assert sdc[0]["rolled_back_to"] == 4 and sdc[0]["first_divergent_step"] == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["replayed_steps"] == 2 and summary["world_size"] == 2


def test_fsdp2_matches_single_process_and_exports_full_model(single):
    root, recipe, ref = single
    out = root / "fsdp"
    args = ["train", str(recipe), "--out", str(out), "--set", "train.parallel=fsdp"]
    _check(torchrun(2, args, child_env()))
    _close(read_metrics(out / "metrics.jsonl"), ref, rtol=1e-5)
    assert json.loads((out / "summary.json").read_text())["parallel"] == "fsdp"
    a, b = geode.load_model(root / "one" / "model"), geode.load_model(out / "model")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    # sharded checkpoints resume in a single process (resharded by torch.distributed.checkpoint)
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000008").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]


def test_elastic_restart_resumes_from_peer_replica(single):
    """Rank 1 is SIGKILLed at step 7 and its host memory lost; torchrun restarts both ranks,
    which resume from the step-6 in-memory replica (rank 1's copy comes from rank 0), newer
    than the step-4 checkpoint; the loss curve is unchanged."""
    root, recipe, ref = single
    out = root / "elastic"
    env = child_env(GEODE_FAULT="kind=kill,step=7,rank=1,drop_replica=1")
    args = ["train", str(recipe), "--out", str(out), "--set", "fault.replica_every=2"]
    _check(torchrun(2, args, env, extra=["--max-restarts=1"]))
    records = read_metrics(out / "metrics.jsonl")
    resume = [r for r in records if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 6, resume
    assert "rank 1: the copy held by rank 0" in resume[0]["source"]
    assert "rank 0: its own copy" in resume[0]["source"]
    _close(records, ref, rtol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == 1 and 0 < summary["goodput"] < 1
    assert not default_replica_dir(out).exists()  # replicas are removed after a clean finish
