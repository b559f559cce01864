"""Fault tolerance after the Gemini report (arXiv:2312.11805, §3 "Training infrastructure").

Three mechanisms, made real at the scale of one host with a few processes:

1. Elastic restart. `torchrun --max-restarts N` restarts every worker when one dies; the
   workers resume from the newest state they can all get: the newest verified checkpoint on
   disk, or, faster, an in-memory replica. Every `fault.replica_every` steps each rank
   serialises its own state (`state.local_snapshot` + loader, RNG and counters), keeps it in
   host memory (a tmpfs such as /dev/shm survives the worker processes) and sends a copy to
   its ring neighbour rank+1, which keeps it too. A restarted rank whose own copy is gone
   (a replaced host) receives it from the neighbour ("recover from an intact replica").
   Replicas live in a private directory: created by `mkdtemp` (mode 0700, a random name,
   recorded in OUT/.replicas.json so a restarted worker finds it) and checked on every use
   (a real directory, owned by this user, no access for others); their content is
   safetensors + JSON (`state.snapshot_bytes`), so another local user can neither read the
   state nor plant a file that runs code when read.
2. Silent data corruption (SDC). Data-parallel replicas must hold bitwise-equal parameters
   and, after the all-reduce, bitwise-equal gradients. Every `fault.sdc_every` steps the
   ranks compare exact integer checksums of both. On a mismatch every rank rolls back to the
   last verified in-memory snapshot and deterministically replays the steps since; each rank
   compares the checksum of its parameters at the start of every replayed step with the one
   it recorded the first time. The rank that differs first is the faulty one: it is named,
   and training continues from the replayed (clean) state.
3. Goodput: useful step time / wall time since the first start, across restarts; time of
   steps lost to a crash or replayed after an SDC does not count as useful.

Fault injection for tests, in the environment variable GEODE_FAULT, ';'-separated items:
    kind=kill,step=5,rank=1[,at=step|checkpoint][,drop_replica=1]
    kind=bitflip,step=3,rank=1[,target=param|grad][,bit=22]
Faults fire only on a first attempt (TORCHELASTIC_RESTART_COUNT 0 or unset) and only once.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_write_bytes
from .distributed import (
    DistInfo,
    all_gather_object,
    all_gather_tensor,
    broadcast_object,
    exchange_ring,
    recv_bytes,
    send_bytes,
)
from .state import snapshot_bytes, snapshot_from_bytes

ENV = "GEODE_FAULT"


class SDCError(RuntimeError):
    """Replicas still disagree after a rollback and replay: a persistent hardware fault."""


class SDCWarning(UserWarning):
    """Silent data corruption was detected and repaired by rollback and replay."""


# ------------------------------------------------------------------------------ injection
@dataclass
class Fault:
    """One planned fault."""

    kind: str  # "kill" or "bitflip"
    step: int  # 1-based optimizer step during which it fires
    rank: int = 0
    at: str = "step"  # kill: "step" (start of the step) or "checkpoint" (mid-write)
    target: str = "param"  # bitflip: "param" (after the update) or "grad" (after all-reduce)
    bit: int = 22  # bit of the float32 word flipped (22: the top mantissa bit)
    drop_replica: bool = False  # kill: also delete this rank's own in-memory replica
    fired: bool = False


def parse_faults(text: str) -> list[Fault]:
    """Parse GEODE_FAULT (see the module docstring)."""
    faults = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        kv = dict(part.split("=", 1) for part in item.split(",") if "=" in part)
        try:
            f = Fault(
                kind=kv["kind"],
                step=int(kv["step"]),
                rank=int(kv.get("rank", 0)),
                at=kv.get("at", "step"),
                target=kv.get("target", "param"),
                bit=int(kv.get("bit", 22)),
                drop_replica=kv.get("drop_replica", "0") in ("1", "true"),
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"{ENV}: cannot parse {item!r} ({e})") from None
        if f.kind not in ("kill", "bitflip"):
            raise ValueError(f"{ENV}: kind {f.kind!r} is unknown; use kill or bitflip")
        faults.append(f)
    return faults


class FaultInjector:
    """Fires the faults of GEODE_FAULT planned for this rank (test hook)."""

    def __init__(self, info: DistInfo, text: str | None = None):
        self.info = info
        text = os.environ.get(ENV, "") if text is None else text
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0")
        faults = parse_faults(text) if first_attempt else []
        self.faults = [f for f in faults if f.rank == info.rank]
        self.replicas: ReplicaStore | None = None

    def _take(self, kind: str, step: int, **match: str) -> Fault | None:
        for f in self.faults:
            if f.kind == kind and f.step == step and not f.fired:
                if all(getattr(f, k) == v for k, v in match.items()):
                    f.fired = True
                    return f
        return None

    def maybe_kill(self, step: int, at: str = "step") -> None:
        """SIGKILL this process if a kill is planned here (no cleanup, like a lost host)."""
        f = self._take("kill", step, at=at)
        if f is None:
            return
        if f.drop_replica and self.replicas is not None:
            self.replicas.drop_own()
        print(f"[geode fault] rank {self.info.rank}: SIGKILL at step {step} ({at})", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    @torch.no_grad()
    def maybe_bitflip(self, step: int, model: nn.Module, target: str) -> None:
        """Flip one bit of the first parameter (or its gradient) if planned for this step."""
        f = self._take("bitflip", step, target=target)
        if f is None:
            return
        p = next(model.parameters())
        t = p.grad if target == "grad" else p.data
        t = t.to_local() if hasattr(t, "to_local") else t
        flat = t.view(-1)
        if flat.dtype == torch.float32:
            word = flat[:1].view(torch.int32)
            word ^= 1 << f.bit
        else:  # bfloat16 / float16: flip within the 16-bit word
            word = flat[:1].view(torch.int16)
            word ^= 1 << min(f.bit, 14)
        print(
            f"[geode fault] rank {self.info.rank}: flipped bit {f.bit} of {target} at step {step}",
            flush=True,
        )


# ------------------------------------------------------------------------------ SDC
def checksum(tensors: list[torch.Tensor]) -> int:
    """Exact checksum of the bit patterns: sum of the 32/16-bit words weighted by position
    modulo 2^61 - 1 (any single bit flip changes it)."""
    total = 0
    mod = (1 << 61) - 1
    for i, t in enumerate(tensors):
        t = t.detach()
        t = t.to_local() if hasattr(t, "to_local") else t
        t = t.contiguous().view(-1)
        if t.dtype == torch.float32:
            words = t.view(torch.int32)
        elif t.element_size() == 2:
            words = t.view(torch.int16)
        else:
            words = t.to(torch.float64).view(torch.int64)
        s = int(words.to(torch.int64).sum().item())
        total = (total + (i + 1) * (s % mod)) % mod
    return total


def param_checksum(model: nn.Module) -> int:
    """Checksum of every parameter this rank holds."""
    return checksum([p for p in model.parameters()])


def grad_checksum(model: nn.Module) -> int:
    """Checksum of every gradient this rank holds (zeros where a gradient is None)."""
    return checksum([p.grad for p in model.parameters() if p.grad is not None])


def compare_replicas(values: list[int], info: DistInfo) -> list[list[int]]:
    """Gather (param, grad) checksums of every rank: rows of [param, grad] per rank."""
    t = torch.tensor(values, dtype=torch.int64)
    return all_gather_tensor(t, info).tolist()


def disagreeing(rows: list[list[int]]) -> bool:
    """True if any rank's checksums differ from another's."""
    return any(r != rows[0] for r in rows[1:])


def name_faulty(first_mismatch: int | None, info: DistInfo) -> tuple[list[int], int | None]:
    """(ranks whose replay diverged first, that step) from every rank's first mismatch."""
    firsts = all_gather_object(first_mismatch, info)
    steps = [s for s in firsts if s is not None]
    if not steps:
        return [], None
    earliest = min(steps)
    return [r for r, s in enumerate(firsts) if s == earliest], earliest


# ------------------------------------------------------------------------------ replicas
REPLICA_POINTER = ".replicas.json"  # in OUT: where this run's private replica directory is


class ReplicaDirError(RuntimeError):
    """The replica directory is not private to this user (or cannot be made so)."""


def _host_memory() -> Path:
    """Where replica directories are made by default: /dev/shm (a tmpfs) when present."""
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def default_replica_dir(out: Path) -> Path:
    """The private replica directory recorded for the run at `out` (it may be gone), or
    where a new one would be created when none is recorded."""
    try:
        return Path(json.loads((Path(out) / REPLICA_POINTER).read_text())["dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return _host_memory() / "geode-replica-<random>"


def check_private_dir(path: Path) -> str | None:
    """None if `path` is a real directory owned by this user with no group/other access,
    else what is wrong."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return f"{path} does not exist"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory (a symlink or a file)"
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):o}; a replica directory must be 700"
    return None


def private_replica_dir(out: Path, base: str | Path | None, info: DistInfo) -> Path:
    """This run's private replica directory (collective): the one recorded in
    OUT/.replicas.json if it is still private to this user, else a fresh `mkdtemp` under `base`
    (default /dev/shm) recorded there. A rank on another host creates the same name (mode
    0700) if it is missing there; a directory that exists but is not private is refused."""
    out = Path(out)
    base = Path(base) if base else _host_memory()
    path = None
    if info.is_main:
        recorded = default_replica_dir(out)
        if (out / REPLICA_POINTER).is_file() and check_private_dir(recorded) is None:
            path = recorded
        else:
            base.mkdir(parents=True, exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix="geode-replica-", dir=base))
            out.mkdir(parents=True, exist_ok=True)
            record = json.dumps({"dir": str(path), "uid": os.getuid()}).encode()
            atomic_write_bytes(out / REPLICA_POINTER, record)
            (out / REPLICA_POINTER).chmod(0o600)
        path = str(path)
    path = Path(broadcast_object(path, info))
    if not path.exists():  # another host: its own copy of the directory, same name
        try:
            path.mkdir(mode=0o700, parents=False)
        except FileExistsError:  # a sibling rank on this host made it first
            pass
    problem = check_private_dir(path)
    if problem:
        raise ReplicaDirError(f"in-memory replicas: {problem}; refusing to use it")
    return path


class ReplicaStore:
    """Each rank's state and its ring predecessor's, in host memory, for fast restarts."""

    def __init__(self, root: Path, info: DistInfo, run_id: str):
        self.root, self.info, self.run_id = Path(root), info, run_id
        problem = check_private_dir(self.root)
        if problem:
            raise ReplicaDirError(f"in-memory replicas: {problem}; use `private_replica_dir`")
        self.rejected: list[str] = []  # invalid replica files `restore` met
        r, w = info.rank, info.world_size
        self.own = self.root / f"rank{r}.own"
        self.held = self.root / f"rank{r}.holds-rank{(r - 1) % w}"

    def save(self, step: int, payload: dict[str, Any]) -> None:
        """Store this rank's payload and the ring predecessor's (collective)."""
        data = snapshot_bytes(payload)
        peer = exchange_ring(data, self.info)
        self._write(self.own, step, self.info.rank, data)
        self._write(self.held, step, (self.info.rank - 1) % self.info.world_size, peer)

    def _write(self, path: Path, step: int, owner: int, data: bytes) -> None:
        header = {
            "run": self.run_id,
            "world": self.info.world_size,
            "owner": owner,
            "step": step,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        atomic_write_bytes(path, json.dumps(header).encode() + b"\n" + data)

    def _read(self, path: Path, owner: int) -> tuple[int, bytes] | None:
        """(step, payload) if `path` holds a valid replica of `owner` for this run."""
        try:
            with open(path, "rb") as f:
                header = json.loads(f.readline())
                data = f.read()
        except (OSError, ValueError):
            return None
        ok = (
            header.get("run") == self.run_id
            and header.get("world") == self.info.world_size
            and header.get("owner") == owner
            and len(data) == header.get("bytes")
            and hashlib.sha256(data).hexdigest() == header.get("sha256")
        )
        if not ok:
            if path.exists():
                self.rejected.append(f"{path}: invalid in-memory replica (other run or corrupt)")
                warnings.warn(f"ignoring invalid in-memory replica {path}", stacklevel=2)
            return None
        return int(header["step"]), data

    def drop_own(self) -> None:
        """Delete this rank's own copy (test hook: the host's memory is lost)."""
        self.own.unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove this rank's files (an abandoned run's state; the directory stays)."""
        for p in (self.own, self.held):
            p.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove this rank's files and, once empty, the directory (end of a successful run)."""
        self.discard()
        try:
            self.root.rmdir()
        except OSError:
            pass

    def restore(self) -> tuple[int, dict[str, Any], str] | None:
        """(step, payload, where) from the newest replica step every rank can obtain, or None.

        Collective. A rank uses its own copy if it has that step, else receives the copy its
        ring successor holds.
        """
        r, w = self.info.rank, self.info.world_size
        self.rejected = []
        own = self._read(self.own, r)
        held = self._read(self.held, (r - 1) % w)
        self.rejected = [x for rank in all_gather_object(self.rejected, self.info) for x in rank]
        table = all_gather_object(
            (own[0] if own else None, held[0] if held else None), self.info
        )  # per rank: (own step, step of the predecessor's copy it holds)
        candidates = None
        for rank in range(w):
            have = {table[rank][0], table[(rank + 1) % w][1]} - {None}
            candidates = have if candidates is None else candidates & have
        if not candidates:
            return None
        step = max(candidates)
        need = [table[rank][0] != step for rank in range(w)]  # must receive from successor
        payload = own[1] if own and not need[r] else None
        where = "its own copy" if payload is not None else ""
        for rank in range(w):
            if not need[rank]:
                continue
            holder = (rank + 1) % w
            if self.info.rank == holder:
                send_bytes(held[1], rank)
            if self.info.rank == rank:
                payload = recv_bytes(holder)
                where = f"the copy held by rank {holder}"
        wheres = all_gather_object(where, self.info)
        where = "; ".join(f"rank {i}: {x}" for i, x in enumerate(wheres))
        return step, snapshot_from_bytes(payload, f"the replica of rank {r}"), where


# ------------------------------------------------------------------------------ goodput
@dataclass
class Goodput:
    """Useful step time over wall time since the run first started (across restarts)."""

    first_start: float  # epoch seconds of the first attempt
    useful_s: float = 0.0  # time of training steps whose results survive
    restarts: int = 0  # resumptions after a crash or kill
    replayed_steps: int = 0  # steps redone after an SDC rollback

    def state(self) -> dict[str, Any]:
        """Plain data for checkpoints."""
        return dict(vars(self))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Goodput:
        """Inverse of `state`."""
        return cls(**state)

    def report(self, now: float) -> dict[str, Any]:
        """goodput = useful / wall, with its parts."""
        wall = max(1e-9, now - self.first_start)
        return {
            "goodput": self.useful_s / wall,
            "useful_s": self.useful_s,
            "wall_s": wall,
            "restarts": self.restarts,
            "replayed_steps": self.replayed_steps,
        }
