"""In-memory replicas: a private directory (0700, random name, owner checked), safetensors +
JSON content (a planted pickle is never unpickled), exact round trip of the local state."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from geode.train.distributed import DistInfo
from geode.train.fault import (
    REPLICA_POINTER,
    ReplicaDirError,
    ReplicaStore,
    check_private_dir,
    private_replica_dir,
)
from geode.train.state import local_snapshot, restore_snapshot, snapshot_bytes

ONE = DistInfo()


def test_replica_dir_is_private_unpredictable_and_found_again(tmp_path):
    base = tmp_path / "shm"
    a = private_replica_dir(tmp_path / "run-a", base, ONE)
    b = private_replica_dir(tmp_path / "run-b", base, ONE)
    assert a != b and a.parent == b.parent == base  # random names, not derived from OUT
    assert a.name.startswith("geode-replica-") and len(a.name) > len("geode-replica-") + 6
    assert stat.S_IMODE(a.stat().st_mode) == 0o700 and a.stat().st_uid == os.getuid()
    pointer = tmp_path / "run-a" / REPLICA_POINTER
    assert stat.S_IMODE(pointer.stat().st_mode) == 0o600
    assert private_replica_dir(tmp_path / "run-a", base, ONE) == a  # a restart finds it
    # the recorded directory opened to others (or replaced): a fresh private one is made
    a.chmod(0o755)
    assert "mode 755" in check_private_dir(a)
    c = private_replica_dir(tmp_path / "run-a", base, ONE)
    assert c != a and check_private_dir(c) is None
    with pytest.raises(ReplicaDirError, match="mode 755"):
        ReplicaStore(a, ONE, run_id="x")
    link = tmp_path / "link"
    link.symlink_to(c)
    assert "not a directory" in check_private_dir(link)
    os.chown(a, 12345, 12345) if os.getuid() == 0 else None
    if os.getuid() == 0:
        assert "belongs to uid 12345" in check_private_dir(a)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_replica_round_trip_is_exact(tmp_path):
    model, opt = _model_and_optimizer()
    store = ReplicaStore(private_replica_dir(tmp_path / "run", tmp_path, ONE), ONE, "run")
    snap = local_snapshot(model, opt)
    store.save(3, {"snap": snap, "trainer": {"step": 3, "betas": (0.9, 0.95)}})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    step, payload, where = store.restore()
    assert step == 3 and where == "rank 0: its own copy"
    assert payload["trainer"] == {"step": 3, "betas": (0.9, 0.95)}
    restore_snapshot(model, opt, payload["snap"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    st = next(iter(opt.state.values()))
    ref = next(iter(snap["optim"].values()))
    assert torch.equal(st["exp_avg"], ref["exp_avg"]) and torch.equal(st["step"], ref["step"])


class _Plant:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_is_refused_not_run(tmp_path):
    """A replica file with a valid header around a pickle (what torch.save wrote before, and
    what an attacker would plant): reading it raises, the pickle's code never runs."""
    root = private_replica_dir(tmp_path / "run", tmp_path, ONE)
    store = ReplicaStore(root, ONE, "run")
    marker = tmp_path / "pwned"
    data = pickle.dumps({"snap": _Plant(marker)})
    header = {"run": "run", "world": 1, "owner": 0, "step": 9, "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    store.own.write_bytes(json.dumps(header).encode() + b"\n" + data)
    with pytest.raises(ValueError, match="is not a geode snapshot"):
        store.restore()
    assert not marker.exists()
    with pytest.raises(TypeError, match="cannot store a _Plant"):
        snapshot_bytes({"x": _Plant(marker)})
