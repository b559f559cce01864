"""Process groups and model wrapping with PyTorch's own engine: torchrun, DDP and FSDP2.

The trainer calls `init_distributed()` once: under `torchrun` (RANK / WORLD_SIZE set) it
joins the process group, with NCCL on GPUs and gloo on CPUs; otherwise it is a world of one
and every collective below is a no-op. `wrap_model` applies DDP (replicated weights,
all-reduced gradients) or FSDP2 (`fully_shard` on every decoder layer and on the root, so
parameters, gradients and optimizer state are sharded across ranks).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: not distributed

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes shared files and logs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank is initialised."""
        return self.backend is not None and self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun process group if there is one; choose the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world <= 1:
        return DistInfo(0, 1, 0, dev, None)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        # torchrun's store outlives a restart, so a restarted group would read the previous
        # attempt's peer addresses (gloo: "connectFullMesh failed ... Connection refused";
        # pytorch/pytorch#167288): key the group by the attempt number.
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"geode/attempt-{attempt}", store),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=dev if use_cuda else None,
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def shutdown(info: DistInfo) -> None:
    """Leave the process group (after a final barrier)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over ranks (returns `t`)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_tensor(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """(world, *t.shape): every rank's copy of `t`."""
    if not info.distributed:
        return t[None]
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t)
    return torch.stack(out)


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def send_bytes(data: bytes, dst: int) -> None:
    """Send a byte string to rank `dst` (size first, then the payload)."""
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0)
    dist.send(torch.tensor([len(data)], dtype=torch.int64), dst)
    if data:
        dist.send(payload.to(torch.uint8), dst)


def recv_bytes(src: int) -> bytes:
    """Receive a byte string sent by `send_bytes` from rank `src`."""
    n = torch.empty(1, dtype=torch.int64)
    dist.recv(n, src)
    if int(n) == 0:
        return b""
    buf = torch.empty(int(n), dtype=torch.uint8)
    dist.recv(buf, src)
    return buf.numpy().tobytes()


def exchange_ring(data: bytes, info: DistInfo) -> bytes:
    """Send `data` to rank+1 and return what rank-1 sent (a ring shift by one)."""
    if not info.distributed:
        return data
    nxt, prv = (info.rank + 1) % info.world_size, (info.rank - 1) % info.world_size
    sizes = all_gather_object(len(data), info)
    send = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0)
    recv = torch.empty(sizes[prv], dtype=torch.uint8)
    ops = [dist.P2POp(dist.isend, send.to(torch.uint8), nxt)]
    ops.append(dist.P2POp(dist.irecv, recv, prv))
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recv.numpy().tobytes()


def resolve_parallel(requested: str, info: DistInfo) -> str:
    """'none', 'ddp' or 'fsdp' for this world size ('auto': DDP when distributed)."""
    if requested == "auto":
        return "ddp" if info.distributed else "none"
    if requested in ("ddp", "fsdp") and not info.distributed:
        return "none"  # the same recipe runs single-process
    return requested


def wrap_model(model: nn.Module, info: DistInfo, parallel: str) -> nn.Module:
    """DDP(model), or FSDP2-sharded `model` (in place, per decoder layer), or `model`."""
    if parallel == "none":
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"train.parallel {parallel!r} is unknown; use auto, none, ddp or fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 shards in place, so it is itself)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def grad_sync(model: nn.Module, parallel: str, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter of a micro-batch that is not the last."""
    if parallel == "ddp" and not enabled:
        with model.no_sync():
            yield
        return
    if parallel == "fsdp":
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield
