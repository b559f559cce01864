"""The sandbox stops hostile code: loops, fork bombs, memory hogs, network, writes outside."""

from __future__ import annotations

import os
import shutil
import signal
import uuid

import pytest

from geode import sandbox
from geode.sandbox import Limits, run_code

try:
    sandbox.available_isolation()
except sandbox.SandboxError as e:  # pragma: no cover - machines without namespaces
    pytest.skip(f"no sandbox here: {e}", allow_module_level=True)


def tagged_processes(tag: str) -> list[str]:
    """Pids of the processes whose command line holds `tag`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if tag.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def under_sandbox_tmpfs(path: str | os.PathLike) -> bool:
    """True when `path` lies under a directory the sandbox replaces with its own tmpfs (/tmp,
    ...): inside a run the host's file there is invisible, so a write finds no directory."""
    real = os.path.realpath(path)
    return any(
        real == d or real.startswith(d + "/") for d in map(os.path.realpath, sandbox._TMPFS_DIRS)
    )


def host_disk_dir(request: pytest.FixtureRequest) -> str:
    """A directory on the host disk that the sandbox shows read-only (not under its tmpfs
    places), traversable by other users: pytest's cache dir, else /var/lib/geode-tests when
    the checkout itself lies under /tmp (a CI clone may)."""
    d = str(request.config.cache.mkdir("geode-sandbox"))
    if under_sandbox_tmpfs(d):
        d = "/var/lib/geode-tests/sandbox"
        os.makedirs(d, mode=0o755, exist_ok=True)
    return d


def test_runs_code_and_captures_output():
    r = run_code("import sys\nprint(sum(range(10)))\nprint('err', file=sys.stderr)")
    assert r.ok and r.stdout == "45\n" and r.stderr == "err\n"
    assert r.exit_code == 0 and not r.timed_out and r.killed_by_signal is None


def test_exit_code_and_stdin():
    r = run_code("import sys\nsys.exit(len(sys.stdin.read()))", stdin="abc")
    assert r.exit_code == 3 and not r.ok


def test_infinite_loop_is_killed_at_the_wall_timeout():
    r = run_code("while True: pass", limits=Limits(timeout=1.5, cpu_seconds=30))
    assert r.timed_out and r.killed_by_signal == signal.SIGKILL and r.duration < 5


def test_cpu_limit():
    r = run_code("while True: pass", limits=Limits(timeout=10, cpu_seconds=1))
    assert not r.ok and r.killed_by_signal in (signal.SIGXCPU, signal.SIGKILL)
    assert r.duration < 6


def test_fork_bomb_is_contained_and_cleaned_up():
    code = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    r = run_code(code, limits=Limits(timeout=2, max_processes=16))
    assert not r.ok and r.timed_out


def test_escaped_session_is_killed_with_the_namespace():
    tag = uuid.uuid4().hex
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    time.sleep(300)  # {tag}\n"
        "time.sleep(300)\n"
    )
    r = run_code(code, limits=Limits(timeout=1))
    assert r.timed_out
    leftovers = tagged_processes(tag)
    assert not leftovers  # the code lives in main.py, so also check nothing runs main.py
    assert r.duration < 5


def test_memory_hog_fails():
    r = run_code("x = bytearray(8 << 30)", limits=Limits(memory_bytes=512 << 20))
    assert r.exit_code != 0 and "MemoryError" in r.stderr


def test_network_is_unreachable():
    code = "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)\n"
    r = run_code(code)
    assert r.exit_code != 0 and ("unreachable" in r.stderr or "Errno" in r.stderr)


def test_writes_outside_the_work_dir_fail_or_vanish(tmp_path):
    target = tmp_path / "pwned"
    os.chmod(tmp_path, 0o777)
    tmp_target = f"/tmp/geode-sandbox-test-{uuid.uuid4().hex}"
    code = (
        "import os\n"
        f"for p in [{str(target)!r}, {tmp_target!r}, os.path.expanduser('~/x'), 'here.txt']:\n"
        "    try:\n"
        "        open(p, 'w').write('x')\n"
        "    except OSError:\n"
        "        pass\n"
        "os.system('touch /pwned_by_os_system 2>/dev/null')\n"
    )
    r = sandbox.run(
        [sandbox.default_python(), "-I", "main.py"], files={"main.py": code}, collect=["here.txt"]
    )
    assert r.ok, r.stderr
    assert r.files == {"here.txt": b"x"}  # the work dir is writable
    assert not os.path.exists(tmp_target)  # /tmp inside is a private tmpfs
    assert not os.path.exists("/pwned_by_os_system")
    if os.geteuid() == 0:
        assert not target.exists()  # root-owned elsewhere: nobody cannot write there either


def test_output_is_capped():
    r = run_code("print('x' * 1_000_000)", limits=Limits(max_output_bytes=1000))
    assert r.ok and len(r.stdout) == 1000 and r.stdout_truncated


def test_file_size_limit():
    r = run_code("open('big', 'wb').write(b'0' * (4 << 20))", limits=Limits(max_file_bytes=1 << 20))
    assert not r.ok


def test_file_names_cannot_escape():
    with pytest.raises(ValueError, match="escapes"):
        sandbox.run(["/bin/true"], files={"../x": "y"})


@pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap not installed")
def test_bubblewrap_isolation():
    ok = run_code("print(6 * 7)", isolation="bwrap")
    assert ok.ok and ok.stdout == "42\n", ok.stderr
    net = run_code(
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)\n", isolation="bwrap"
    )
    assert net.exit_code != 0
    loop = run_code("while True: pass", limits=Limits(timeout=1), isolation="bwrap")
    assert loop.timed_out
    fork = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    assert run_code(fork, limits=Limits(timeout=1.5), isolation="bwrap").timed_out
