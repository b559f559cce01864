"""Where a run's cgroup goes and what is written into it, on fake cgroup v2 trees.

This machine's memory and pids controllers are on cgroup v1 (the real v1 path runs in
test_sandbox_attacks.py); these tests drive the v2 walk and files through a directory tree
shaped like /sys/fs/cgroup, with the kernel's one refusal (enabling controllers for the
children of a cgroup that holds processes: EBUSY) played by a patched write.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from geode import sandbox
from geode.sandbox import Limits


def _node(d: Path, controllers: str, subtree: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup.controllers").write_text(controllers + "\n")
    (d / "cgroup.subtree_control").write_text(subtree + "\n")
    return d


@pytest.fixture
def fake_v2(tmp_path, monkeypatch):
    """root -> system.slice -> geode.service (this process: holds processes, so EBUSY)."""
    root = _node(tmp_path / "cg", "cpu memory pids io", "memory pids")
    _node(root / "system.slice", "memory pids", "memory pids")
    own = _node(root / "system.slice" / "geode.service", "memory pids", "")
    real_write = sandbox._write

    def write(path: str, value: str) -> None:
        if path == f"{own}/cgroup.subtree_control":
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_write(path, value)

    monkeypatch.setattr(sandbox, "_write", write)
    monkeypatch.setattr(sandbox, "_cgroup_mounts", lambda: [("/", str(root), "cgroup2", set())])
    monkeypatch.setattr(sandbox, "_own_cgroups", lambda: {"": "/system.slice/geode.service"})
    return root


def test_v2_run_cgroups_go_beside_a_busy_own_cgroup(fake_v2):
    version, parents, why = sandbox._find_cgroup_parents()
    assert (version, parents, why) == ("v2", [str(fake_v2 / "system.slice")], "")


def test_v2_controllers_are_enabled_where_the_kernel_allows(fake_v2, monkeypatch):
    """An own cgroup without processes of its own (e.g. a delegated one) gets +memory +pids."""
    own = fake_v2 / "user.slice"
    _node(own, "memory pids", "")
    monkeypatch.setattr(sandbox, "_own_cgroups", lambda: {"": "/user.slice"})
    version, parents, _why = sandbox._find_cgroup_parents()
    assert (version, parents) == ("v2", [str(own)])
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_v2_without_the_controllers_says_so(tmp_path, monkeypatch):
    """This machine's own unified hierarchy: hugetlb only (memory and pids are on v1)."""
    root = _node(tmp_path / "unified", "hugetlb", "")
    monkeypatch.setattr(sandbox, "_cgroup_mounts", lambda: [("/", str(root), "cgroup2", set())])
    monkeypatch.setattr(sandbox, "_own_cgroups", lambda: {"": "/"})
    version, _parents, why = sandbox._find_cgroup_parents()
    assert version is None and "lacks the memory/pids controllers (hugetlb)" in why


def test_v2_controllers_not_given_below_are_enabled_higher_up(tmp_path, monkeypatch):
    """A slice that does not pass memory/pids down: the run goes beside it, under the root."""
    root = _node(tmp_path / "cg", "memory pids", "")
    _node(root / "nomem.slice", "cpu", "")
    _node(root / "nomem.slice" / "app.service", "", "")
    monkeypatch.setattr(sandbox, "_cgroup_mounts", lambda: [("/", str(root), "cgroup2", set())])
    monkeypatch.setattr(sandbox, "_own_cgroups", lambda: {"": "/nomem.slice/app.service"})
    version, parents, _why = sandbox._find_cgroup_parents()
    assert (version, parents) == ("v2", [str(root)])
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_v2_limits_stats_and_removal(fake_v2):
    parent = fake_v2 / "system.slice"
    cg = sandbox._Cgroup("v2", [str(parent)], Limits(total_memory_bytes=123, total_processes=7))
    (d,) = (Path(x) for x in cg.dirs)
    assert d.parent == parent and d.name.startswith(f"geode-sandbox-{sandbox.os.getpid()}-")
    files = {f: (d / f).read_text() for f in ("memory.max", "pids.max", "memory.oom.group")}
    assert files == {"memory.max": "123", "pids.max": "7", "memory.oom.group": "1"}
    assert (d / "memory.swap.max").read_text() == "0"
    assert cg.procs_files() == [f"{d}/cgroup.procs"]
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    (d / "memory.peak").write_text("555\n")
    (d / "pids.events").write_text("max 0\n")
    assert cg.stats() == (("total_memory_bytes",), 555)
    for f in d.iterdir():  # the kernel's interface files vanish with the directory
        f.unlink()
    cg.destroy()
    assert not d.exists() and cg.dirs == []


def test_stale_run_cgroups_of_dead_processes_are_swept(fake_v2):
    parent = fake_v2 / "system.slice"
    stale = parent / "geode-sandbox-999999999-abc"  # no such pid
    stale.mkdir()
    live = parent / f"geode-sandbox-{sandbox.os.getpid()}-abc"
    live.mkdir()
    cg = sandbox._Cgroup("v2", [str(parent)], Limits())
    assert not stale.exists() and live.exists()
    for f in Path(cg.dirs[0]).iterdir():
        f.unlink()
    cg.destroy()
