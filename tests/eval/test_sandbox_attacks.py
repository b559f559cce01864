"""Attacks on a whole run: each ends killed or refused, and the host gets back what it had.

Small limits keep each attack to a few seconds. After every run the host must show no cgroup,
SysV segment or queue, /dev/shm file, temp dir or process left by it, and its memory
(charged to this process's cgroup, where a run's leftovers would land), free disk and free
inodes must not have dropped by the amount the attack tried to take.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import time
import uuid

import pytest

from geode import sandbox
from geode.sandbox import Limits, run_code
from tests.eval.test_sandbox import host_disk_dir, tagged_processes, under_sandbox_tmpfs

try:
    sandbox.available_isolation()
except sandbox.SandboxError as e:  # pragma: no cover - machines without namespaces
    pytest.skip(f"no sandbox here: {e}", allow_module_level=True)

CGROUP, WHERE = sandbox.cgroup_support()
pytestmark = pytest.mark.skipif(
    CGROUP is None and os.geteuid() != 0,
    reason=f"no cgroup for an unprivileged user here ({WHERE}); test_sandbox_user.py covers it",
)

MiB = 1 << 20
SMALL = Limits(
    timeout=4,
    cpu_seconds=4,
    total_memory_bytes=192 * MiB,
    total_processes=16,
    work_dir_bytes=24 * MiB,
    work_dir_files=500,
)
ISOLATIONS = ["unshare", "bwrap"]


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _memory_charged() -> int:
    """Memory charged to this process's own cgroup (runs' leftovers are re-parented to it);
    on a host without one, used = MemTotal - MemAvailable (noisy: other users count too)."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _id, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                own[c] = path
    candidates = []
    if "memory" in own:
        candidates.append(f"/sys/fs/cgroup/memory{own['memory']}/memory.usage_in_bytes")
    if "" in own:
        candidates += [f"/sys/fs/cgroup{own['']}/memory.current"]
    for c in candidates:
        try:
            with open(c) as f:
                return int(f.read())
        except (OSError, ValueError):
            continue
    return _meminfo("MemTotal") - _meminfo("MemAvailable")


def _sysv_keys(kind: str) -> set[int]:
    with open(f"/proc/sysvipc/{kind}") as f:
        return {int(line.split()[0]) for line in f.readlines()[1:] if line.strip()}


def _own_cgroups() -> set[str]:
    parents = WHERE.split() if CGROUP else []
    mine = f"geode-sandbox-{os.getpid()}-"
    return {os.path.join(p, n) for p in parents for n in os.listdir(p) if n.startswith(mine)}


class Host:
    """What the host has before an attack, compared after it."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.charged = _memory_charged()
        disk = os.statvfs(tempfile.gettempdir())
        self.disk_free, self.inodes_free = disk.f_bavail * disk.f_frsize, disk.f_favail
        self.shm, self.msg = _sysv_keys("shm"), _sysv_keys("msg")
        self.tmp = set(os.listdir(tempfile.gettempdir()))

    def check_unchanged(self, keys: tuple[int, ...] = ()) -> None:
        """Nothing of the run is left and no resource it tried to take is gone."""
        assert not _own_cgroups(), "a run cgroup was left behind"
        assert not tagged_processes(self.tag), "a process of the run survived it"
        for k in keys:
            assert k not in _sysv_keys("shm") and k not in _sysv_keys("msg"), "SysV IPC left"
        assert not [n for n in os.listdir("/dev/shm") if self.tag in n], "/dev/shm file left"
        new_tmp = set(os.listdir(tempfile.gettempdir())) - self.tmp
        assert not [n for n in new_tmp if n.startswith("geode-sandbox")], "temp dir left"
        deadline = time.monotonic() + 5  # a dead IPC namespace is freed by a kernel worker
        while _memory_charged() - self.charged >= 64 * MiB and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _memory_charged() - self.charged < 64 * MiB, "memory not given back"
        disk = os.statvfs(tempfile.gettempdir())  # other users share the disk: wide margins
        assert self.disk_free - disk.f_bavail * disk.f_frsize < 512 * MiB, "disk space taken"
        assert self.inodes_free - disk.f_favail < 20_000, "inodes taken on the host disk"


def _attack(code: str, isolation: str, limits: Limits = SMALL, keys: tuple[int, ...] = ()):
    tag = uuid.uuid4().hex
    host = Host(tag)
    r = run_code(f"# {tag}\nTAG = {tag!r}\n" + code, limits=limits, isolation=isolation)
    host.check_unchanged(keys)
    if os.geteuid() == 0:
        assert r.cgroup == CGROUP, "root must get the whole-run cgroup here"
    return r


@pytest.fixture(params=ISOLATIONS)
def isolation(request) -> str:
    """Each attack against both isolation tools (bwrap where installed: see the report)."""
    if request.param == "bwrap" and not sandbox.shutil.which("bwrap"):
        pytest.fail("bubblewrap is not installed: `apt-get install bubblewrap`")
    return request.param


def test_many_processes_each_below_the_per_process_cap(isolation):
    """8 processes x 64 MiB, each far below RLIMIT_AS (1 GiB): the 192 MiB run total holds."""
    code = (
        "import os, sys, time\n"
        "kids = []\n"
        "for _ in range(8):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        x = bytearray(64 << 20)\n"
        "        for i in range(0, len(x), 4096):\n"
        "            x[i] = 1\n"
        "        time.sleep(2)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "bad = sum(os.waitpid(p, 0)[1] != 0 for p in kids)\n"
        "sys.exit(bad)\n"
    )
    r = _attack(code, isolation)
    assert SMALL.memory_bytes >= 1 << 30  # the per-process cap alone would allow 8 GiB
    assert not r.ok
    assert "total_memory_bytes" in r.limits_hit
    assert r.memory_peak_bytes is not None and r.memory_peak_bytes <= SMALL.total_memory_bytes


def test_tmpfs_filling_is_refused_at_the_work_dir_size(isolation):
    """1 MiB files into every writable place: all of them together stop at work_dir_bytes."""
    code = (
        "import errno, os, sys\n"
        "dirs = ['.', '/tmp', '/var/tmp', '/dev/shm', '/run/lock']\n"
        "total, full, i = 0, set(), 0\n"
        "while len(full) < len(dirs) and total < (1 << 30):\n"
        "    d = dirs[i % len(dirs)]\n"
        "    i += 1\n"
        "    if d in full:\n"
        "        continue\n"
        "    try:\n"
        "        with open(f'{d}/{TAG}-{i}', 'wb') as f:\n"
        "            f.write(b'x' * (1 << 20))\n"
        "        total += 1 << 20\n"
        "    except OSError as e:\n"
        "        if e.errno != errno.ENOSPC:\n"
        "            raise\n"
        "        full.add(d)\n"
        "print(total)\n"
        "sys.exit(3 if full else 0)\n"
    )
    r = _attack(code, isolation)
    assert r.exit_code == 3, r.stderr  # refused: every place answered ENOSPC
    written = int(r.stdout)
    if isolation == "unshare":  # one tmpfs holds all five places
        assert written <= SMALL.work_dir_bytes
    else:  # bwrap mounts a tmpfs of work_dir_bytes on each of /tmp, /var/tmp, /dev/shm, /run/lock
        assert written <= 4 * SMALL.work_dir_bytes
    assert r.memory_peak_bytes is None or r.memory_peak_bytes <= SMALL.total_memory_bytes


def test_tmpfs_beyond_memory_is_killed(isolation):
    """A work dir larger than the memory limit: filling it ends in the run's OOM kill."""
    limits = Limits(
        timeout=6, total_memory_bytes=96 * MiB, work_dir_bytes=512 * MiB, work_dir_files=500
    )
    code = (
        "for i in range(400):\n"
        "    with open(f'/dev/shm/{TAG}-{i}', 'wb') as f:\n"
        "        f.write(b'x' * (1 << 20))\n"
        "print('wrote 400 MiB')\n"
    )
    r = _attack(code, isolation, limits)
    assert not r.ok and "wrote" not in r.stdout
    assert r.killed_by_signal == signal.SIGKILL
    assert "total_memory_bytes" in r.limits_hit


def test_sysv_shared_memory_does_not_outlive_the_run(isolation):
    """A SysV segment and a message queue left behind on purpose vanish with the IPC namespace;
    touching a segment larger than the run's memory kills the run."""
    key = random.randrange(1 << 20, 1 << 30)
    code = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.shmat.restype = ctypes.c_void_p\n"
        f"KEY = {key}\n"
        "assert libc.msgget(KEY + 1, 0o1666) >= 0\n"  # IPC_CREAT | 0666
        "big = 256 << 20\n"
        "shm = libc.shmget(KEY, ctypes.c_size_t(big), 0o1666)\n"
        "assert shm >= 0, ctypes.get_errno()\n"
        "addr = libc.shmat(shm, None, 0)\n"
        "print('attached', flush=True)\n"
        "ctypes.memset(addr, 1, big)  # never IPC_RMID: it would outlive a host-IPC run\n"
        "print('filled', flush=True)\n"
    )
    r = _attack(code, isolation, keys=(key, key + 1))
    assert "attached" in r.stdout and "filled" not in r.stdout, r.stderr
    assert not r.ok and "total_memory_bytes" in r.limits_hit


def test_many_small_files_are_refused(isolation):
    """Empty files until the tmpfs inode count says no (ENOSPC), in the work dir and /tmp."""
    code = (
        "import errno, itertools, sys\n"
        "n = 0\n"
        "for d in ('.', '/tmp'):\n"
        "    try:\n"
        "        for i in itertools.count():  # no bound of its own: a limit must stop it\n"
        "            open(f'{d}/{TAG}-{i}', 'w').close()\n"
        "            n += 1\n"
        "    except OSError as e:\n"
        "        assert e.errno == errno.ENOSPC, e\n"
        "print(n)\n"
        "sys.exit(3)\n"
    )
    r = _attack(code, isolation)
    if isolation == "unshare":
        assert r.exit_code == 3, r.stderr
        assert int(r.stdout) < SMALL.work_dir_files  # one inode budget for every writable place
    else:  # bwrap cannot set nr_inodes: the files' kernel memory counts in the run's memory
        assert not r.ok and (r.timed_out or "total_memory_bytes" in r.limits_hit), r.stderr
    assert r.memory_peak_bytes is not None and r.memory_peak_bytes <= SMALL.total_memory_bytes


def test_fork_bomb_stops_at_the_run_process_limit(isolation):
    """RLIMIT_NPROC set far away: the cgroup's pids.max is what stops the bomb."""
    code = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    limits = Limits(timeout=2, max_processes=10_000, total_processes=16)
    r = _attack(code, isolation, limits)
    assert r.timed_out and not r.ok
    assert "total_processes" in r.limits_hit


@pytest.mark.parametrize("where", ["world_writable", "repo", "home"])
def test_writes_to_host_files_are_refused(isolation, where, request):
    """The rest of the file system is read-only even where permissions would allow a write."""
    # on the host disk, outside the sandbox's own /tmp: .pytest_cache/d/ (ignored by git)
    open_dir = tempfile.mkdtemp(dir=host_disk_dir(request))
    os.chmod(open_dir, 0o777)  # world-writable: only a read-only mount stops `nobody` here
    target = {
        "world_writable": open_dir,
        "repo": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "home": os.path.expanduser("~"),
    }[where]
    path = os.path.join(target, f"geode-pwned-{uuid.uuid4().hex}")
    code = (
        "import errno, sys\n"
        "try:\n"
        f"    open({path!r}, 'w').write('x')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
        "    sys.exit(3)\n"
    )
    try:
        r = _attack(code, isolation)
        assert not os.path.exists(path)
        assert r.exit_code == 3, r.stderr
        allowed = {"EROFS"} if where != "home" or os.geteuid() != 0 else {"EROFS", "EACCES"}
        if under_sandbox_tmpfs(target):  # e.g. a checkout under /tmp: hidden by the run's tmpfs
            allowed = {"ENOENT"}
        assert r.stdout.strip() in allowed
    finally:
        os.rmdir(open_dir)


def test_require_cgroup_and_the_reason_where_there_is_none(monkeypatch):
    """No cgroup: a SandboxWarning names why (once), require_cgroup=True refuses the run."""
    monkeypatch.setattr(sandbox, "_CG_FOUND", [(None, [], "test: no cgroup controllers")])
    monkeypatch.setattr(sandbox, "_WARNED", [])
    with pytest.raises(sandbox.SandboxError, match="test: no cgroup controllers"):
        run_code("print(1)", limits=Limits(require_cgroup=True))
    with pytest.warns(sandbox.SandboxWarning, match="test: no cgroup controllers"):
        r = run_code("print(1)")
    assert r.ok and r.cgroup is None and r.limits_hit == () and r.memory_peak_bytes is None


def test_input_files_over_the_work_dir_are_refused():
    with pytest.raises(ValueError, match="work_dir_bytes"):
        sandbox.run(["/bin/true"], files={"a": b"x" * (40 * MiB)}, limits=SMALL)
    with pytest.raises(ValueError, match="work_dir_files"):
        sandbox.run(["/bin/true"], files={f"f{i}": "" for i in range(500)}, limits=SMALL)


def test_collect_is_bounded_and_does_not_follow_links(isolation):
    """Collected: regular files only (a symlink to a host file is not followed), capped."""
    code = (
        "import os\n"
        "open('small', 'w').write('ok')\n"
        "os.symlink('/etc/hostname', 'link')\n"
        "os.mkdir('dir')\n"
    )
    r = sandbox.run(
        [sandbox.default_python(), "-I", "main.py"],
        files={"main.py": code},
        collect=["small", "link", "dir", "missing", "main.py"],
        isolation=isolation,
    )
    assert r.ok, r.stderr
    assert r.files == {"small": b"ok", "main.py": code.encode()}
