"""Training-state checkpoints (exact resume) and in-memory snapshots of the local state.

A checkpoint is a directory `OUT/checkpoints/step-00000120/`:

    .metadata, __<rank>_0.distcp   model + optimizer state, `torch.distributed.checkpoint`
                                   (each rank writes its own shards; resharding on load)
    rng-rank<r>.safetensors        that rank's RNG states (torch CPU/CUDA, numpy, python),
                                   in the `snapshot_bytes` encoding (no pickle)
    trainer.json                   step, loader position, schedule, goodput counters, recipe
    MANIFEST.json                  size and SHA-256 of every file above; written last

It is written under a temporary name (`.step-00000120.tmp`) and renamed into place only when
MANIFEST.json is on disk, so a kill during the write never leaves a directory that looks
complete. On resume the newest checkpoint whose manifest and files verify is used; a
partial or corrupted one is skipped with a `CheckpointWarning` naming the bad file, and every
rejected one is kept in `CheckpointManager.rejected` so a resume that finds nothing usable can
name them all. The files are made writable by their owner only, and a checkpoint whose files
belong to another user or are writable by others is refused (the `.metadata` file of
`torch.distributed.checkpoint` is a pickle).

In-memory snapshots (SDC rollback, replicas) and RNG states are serialised by
`snapshot_bytes`: tensors in safetensors, everything else as JSON in its metadata, never a
pickle, so reading one cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fileio import fsync_dir, sha256_file, swap_dir_into_place
from .distributed import DistInfo, barrier, broadcast_object

MANIFEST = "MANIFEST.json"
TRAINER_FILE = "trainer.json"
FORMAT = "geode-train-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (partial or corrupted); the message names the bad file."""


class ResumeError(RuntimeError):
    """No usable checkpoint, or one that does not fit this run."""


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint after `step` optimizer steps."""
    return f"step-{step:08d}"


# ------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Every RNG the training step may draw from."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ disk
@dataclass
class Found:
    """A verified checkpoint."""

    step: int
    path: Path
    trainer: dict[str, Any]


class CheckpointManager:
    """Save, find, verify and load training checkpoints under `root`; keeps the newest `keep`."""

    def __init__(self, root: Path, info: DistInfo, keep: int = 2, verify: bool = True):
        self.root, self.info, self.keep, self.verify = Path(root), info, keep, verify
        # test hook: called between the state files and the manifest (fault injection)
        self.before_manifest: Callable[[int], None] | None = None
        self.rejected: list[str] = []  # what `latest` found wrong, one line per checkpoint

    # ---------------------------------------------------------------- save
    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict
    ) -> Path:
        """Write the checkpoint of `step` atomically (collective: every rank calls it)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.root / step_dir_name(step)
        tmp = self.root / f".{step_dir_name(step)}.tmp"
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier(self.info)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(
                {"model": model_sd, "optim": optim_sd},
                checkpoint_id=str(tmp),
                no_dist=not self.info.distributed,
            )
        (tmp / rng_file(self.info.rank)).write_bytes(snapshot_bytes(rng_state()))
        barrier(self.info)
        if self.info.is_main:
            body = {"format": FORMAT, "version": VERSION, "step": step, **trainer}
            _write_json(tmp / TRAINER_FILE, body)
            if self.before_manifest is not None:
                self.before_manifest(step)
            for f in (tmp, *tmp.iterdir()):  # writable by the owner only (see `check`)
                f.chmod(stat.S_IMODE(f.stat().st_mode) & ~0o022)
            files = {
                f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                for f in sorted(tmp.iterdir())
                if f.is_file()
            }
            manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
            fsync_dir(tmp, files=True)
            _write_json(tmp / MANIFEST, manifest)
            # a re-run of the same step (e.g. after a rollback) replaces the old directory
            swap_dir_into_place(tmp, final)
            self._prune(step)
        barrier(self.info)
        return final

    def _prune(self, newest: int) -> None:
        """Delete all but the newest `keep` checkpoints and stale temporary directories."""
        steps = sorted(s for s, _ in self._listing())
        for s in steps[: max(0, len(steps) - self.keep)]:
            if s != newest:
                shutil.rmtree(self.root / step_dir_name(s), ignore_errors=True)
        for p in self.root.glob(".step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)

    def _listing(self) -> list[tuple[int, Path]]:
        """(step, dir) of every complete-looking checkpoint directory, newest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out, reverse=True)

    # ---------------------------------------------------------------- find
    def partial(self) -> list[Path]:
        """Temporary directories of checkpoint writes that never finished (killed mid-write)."""
        return sorted(self.root.glob(".step-*.tmp")) if self.root.is_dir() else []

    def check(self, path: Path) -> str | None:
        """None if the checkpoint at `path` verifies, else what is wrong (naming the file)."""
        mpath = path / MANIFEST
        unsafe = _not_private(path)
        if unsafe:
            return unsafe
        if not mpath.is_file():
            return f"{mpath} is missing (partial checkpoint)"
        try:
            manifest = json.loads(mpath.read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"{mpath} is unreadable ({e})"
        if manifest.get("format") != FORMAT:
            return f"{mpath} has format {manifest.get('format')!r}, expected {FORMAT!r}"
        if TRAINER_FILE not in files or ".metadata" not in files:
            return f"{mpath} does not list {TRAINER_FILE} and .metadata"
        for name, entry in files.items():
            f = path / name
            if not f.is_file():
                return f"{f} is missing"
            unsafe = _not_private(f)
            if unsafe:
                return unsafe
            size = f.stat().st_size
            if size != entry["bytes"]:
                return f"{f} has {size} bytes, {MANIFEST} says {entry['bytes']} (truncated?)"
            if self.verify and sha256_file(f) != entry["sha256"]:
                return f"{f} does not match its SHA-256 in {MANIFEST} (corrupted)"
        return None

    def latest(self) -> Found | None:
        """The newest verified checkpoint (rank 0 checks, every rank gets the answer); the
        checkpoints skipped on the way are listed in `self.rejected`."""
        found, rejected = None, []
        if self.info.is_main:
            for step, path in self._listing():
                problem = self.check(path)
                if problem is None:
                    try:
                        trainer = json.loads((path / TRAINER_FILE).read_text())
                    except ValueError as e:  # verified, so only a bug or a race gets here
                        problem = f"{path / TRAINER_FILE} is not valid JSON ({e})"
                    else:
                        found = (step, str(path), trainer)
                        break
                rejected.append(f"{path}: {problem}")
                warnings.warn(
                    f"skipping checkpoint {path.name}: {problem}; trying the previous one",
                    CheckpointWarning,
                    stacklevel=2,
                )
        found, self.rejected = broadcast_object((found, rejected), self.info)
        if found is None:
            return None
        return Found(found[0], Path(found[1]), found[2])

    # ---------------------------------------------------------------- load
    def load(self, found: Found, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load model and optimizer state (resharded to this world) and this rank's RNG."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(found.path), no_dist=not self.info.distributed)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        rng = found.path / rng_file(self.info.rank)
        if rng.is_file():
            set_rng_state(snapshot_from_bytes(rng.read_bytes(), str(rng)))
        else:
            warnings.warn(
                f"{rng} is missing (checkpoint written by fewer ranks, or by a geode that "
                "pickled RNG states); RNG not restored",
                CheckpointWarning,
                stacklevel=2,
            )


def rng_file(rank: int) -> str:
    """File name of a rank's RNG states inside a checkpoint."""
    return f"rng-rank{rank}.safetensors"


def _not_private(path: Path) -> str | None:
    """Why `path` could have been written by another user (None if it cannot)."""
    st = path.lstat()
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}); refusing it"
    if stat.S_IMODE(st.st_mode) & 0o022:
        return (
            f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); refusing "
            f"it (run `chmod go-w` on it if you trust its content)"
        )
    return None


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------ memory
def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (the local shard of an FSDP2 DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """CPU copies of this rank's parameters and optimizer state (no collectives).

    Works for plain, DDP and FSDP2 models alike: each rank copies exactly the tensors it
    holds, so restoring needs the same world size and sharding (true across a torchrun
    restart, and within a run).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    snap_params = {names[id(p)]: _local(p.detach()).to("cpu", copy=True) for p in params}
    snap_optim = {}
    for p in params:
        st = optimizer.state.get(p)
        if st:
            snap_optim[names[id(p)]] = {
                k: (
                    v.clone()  # the step counter stays where the optimizer keeps it
                    if k == "step" and torch.is_tensor(v)
                    else _local(v).to("cpu", copy=True)
                    if torch.is_tensor(v)
                    else v
                )
                for k, v in st.items()
            }
    return {"params": snap_params, "optim": snap_optim}


@torch.no_grad()
def restore_snapshot(
    model: nn.Module, optimizer: torch.optim.Optimizer, snap: dict[str, Any]
) -> None:
    """Copy a `local_snapshot` back into the live parameters and optimizer state, in place."""
    by_name = dict(model.named_parameters())
    for name, saved in snap["params"].items():
        _local(by_name[name].data).copy_(saved)
    optimizer.state.clear()
    for name, st in snap["optim"].items():
        p = by_name[name]
        live = {}
        for k, v in st.items():
            if torch.is_tensor(v) and k == "step":
                live[k] = v.clone()
            elif torch.is_tensor(v):
                live[k] = _rewrap(p, v.to(_local(p.data).device))
            else:
                live[k] = v
        optimizer.state[p] = live


def _rewrap(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like `p` (a DTensor for FSDP2 parameters) holding `local`."""
    if hasattr(p, "to_local"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local.clone(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
        )
    return local.clone()


_TREE = "geode.tree"  # safetensors metadata key holding the JSON of the non-tensor structure


def snapshot_bytes(obj: Any) -> bytes:
    """Serialise a snapshot (tensors, numpy arrays, tuples, dicts with str keys, lists, JSON
    scalars) to safetensors bytes: tensors as tensors, the structure as JSON in the metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def enc(x: Any) -> Any:
        if torch.is_tensor(x):
            key = str(len(tensors))
            t = x.detach().to("cpu")
            if t.numel() and (t.data_ptr() in seen or not t.is_contiguous()):
                t = t.clone(memory_format=torch.contiguous_format)
            if t.numel():
                seen.add(t.data_ptr())
            tensors[key] = t
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            key = str(len(tensors))
            raw = np.ascontiguousarray(x)
            tensors[key] = torch.frombuffer(
                bytearray(raw.tobytes()) or bytearray(1), dtype=torch.uint8
            )
            return {"__ndarray__": key, "dtype": raw.dtype.str, "shape": list(raw.shape)}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            bad = [k for k in x if not isinstance(k, str) or k.startswith("__")]
            if bad:
                raise TypeError(f"snapshot_bytes: dict key {bad[0]!r} is not a plain string")
            return {k: enc(v) for k, v in x.items()}
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"snapshot_bytes: cannot store a {type(x).__name__}")

    tree = json.dumps(enc(obj))
    return save(tensors, metadata={_TREE: tree})


def snapshot_from_bytes(data: bytes, where: str = "snapshot") -> Any:
    """Inverse of `snapshot_bytes` (no code runs while reading); ValueError naming `where`."""
    from safetensors.torch import load

    try:
        n = int.from_bytes(data[:8], "little")
        tree = json.loads(json.loads(data[8 : 8 + n])["__metadata__"][_TREE])
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - any malformed input is the same error
        raise ValueError(f"{where} is not a geode snapshot ({type(e).__name__}: {e})") from None

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__ndarray__" in x:
            raw = tensors[x["__ndarray__"]].numpy().tobytes()
            dtype, shape = np.dtype(x["dtype"]), x["shape"]
            return (
                np.frombuffer(raw[: dtype.itemsize * int(np.prod(shape))], dtype)
                .reshape(shape)
                .copy()
            )
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        return {k: dec(v) for k, v in x.items()}

    try:
        return dec(tree)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where} has an inconsistent structure ({e})") from None


def now() -> float:
    """Wall-clock seconds (epoch), for goodput across restarts."""
    return time.time()
