"""Runners: the one entry that runs tokens of several cache rows through the model.

    logits = runner.run(rows, ids, positions, cache=None, select=None)

rows (B,) cache rows, ascending; ids, positions (B, T) long, positions -1 = padding (a row's
real tokens first, at increasing contiguous positions continuing what the row holds); select
(B, K) long column indices -> logits (B, K, V) float32 of only those positions (a prompt chunk
needs its last position only: the 262k-column head is never applied to every prompt token);
without select (B, T, V). cache: the HybridCache to run into (None: the runner's `cache`
attribute, which an Engine keeps bound to its own cache).

`TorchRunner`: the model's own forward (`model.hidden` + `model.logits`) over a `HybridCache`,
one forward per run of consecutive rows; single-token steps replay CUDA graphs when enabled.
`NativeStepRunner`: geode.infer.native's C runner (weight packing belongs to it), the torch
runner where the model or cache is not supported. `ragged` runners take rows of any lengths in
one padding-free call; for the others the engine groups rows of similar length
(`group_by_length`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from . import kernels
from .cache import HybridCache
from .native import NativeDecoder, NativeRunner, Unsupported

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Runner(Protocol):
    """What the engine needs from a runner (see the module docstring)."""

    ragged: bool
    cache: HybridCache | None

    def run(
        self,
        rows: Sequence[int],
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: HybridCache | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ids (B, T) at positions (B, T) into cache rows; float32 logits (B, K|T, V)."""
        ...

    def refresh(self) -> None:
        """The model's tensors may have changed: re-check what was built from them."""
        ...


def _bound(runner: Runner, cache: HybridCache | None) -> HybridCache:
    """The cache a run goes into: the one passed, else the runner's bound `cache`."""
    cache = cache if cache is not None else runner.cache
    if cache is None:
        raise ValueError("no cache: pass cache= or bind one (runner.cache, an Engine does)")
    return cache


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """[(b0, b1)] maximal slices of batch indices whose rows are consecutive."""
    out, b0 = [], 0
    for b in range(1, len(rows) + 1):
        if b == len(rows) or rows[b] != rows[b - 1] + 1:
            out.append((b0, b))
            b0 = b
    return out


def group_by_length(lengths: Sequence[int], slack: float = 0.25) -> list[list[int]]:
    """Indices grouped so that padding to each group's longest wastes at most ~`slack` of it.

    Sorted longest first; a group takes the next index while its length is >= (1 - slack) x
    the group's longest. Rows of one group then run in one padded forward.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] >= (1 - slack) * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class TorchRunner:
    """The model's forward over the cache (see the module docstring).

    cuda_graphs: single-token steps over rows 0..B-1 of a static cache replay a graph captured
    per batch-size bucket. kernel_threads: run single-token steps with torch single-threaded
    and the kernels' pool on all threads (the optimized CPU modules, geode.infer.optimize).
    """

    ragged = False

    def __init__(
        self, model: torch.nn.Module, cuda_graphs: bool = False, kernel_threads: bool = False
    ):
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.kernel_threads = kernel_threads
        self._graphs: dict[int, Any] = {}
        self._graph_cache: HybridCache | None = None
        self.cache: HybridCache | None = None  # used when run() is given none

    def refresh(self) -> None:
        """Nothing is built from the weights (graphs read them in place)."""

    def run(
        self,
        rows: Sequence[int],
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: HybridCache | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See the module docstring."""
        cache = _bound(self, cache)
        rows = list(rows)
        B, T = ids.shape
        if T == 1 and self.cuda_graphs and cache.static and rows == list(range(B)):
            return self._graph_decode(ids, positions, cache)[:, None]  # (B, 1, V)
        outs = []
        for b0, b1 in _runs(rows):
            r0, n = rows[b0], b1 - b0
            view = cache if r0 == 0 else cache.rows(r0, r0 + n)
            sel = None if select is None else select[b0:b1]
            if T == 1 and self.kernel_threads:
                with kernels.decode_threads():  # torch ops 1 thread, kernels all threads
                    outs.append(self._forward(ids[b0:b1], positions[b0:b1], view, sel))
            else:
                outs.append(self._forward(ids[b0:b1], positions[b0:b1], view, sel))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _forward(
        self, ids: torch.Tensor, pos: torch.Tensor, cache: HybridCache, select: torch.Tensor | None
    ) -> torch.Tensor:
        """ids, pos (B, T) -> float32 logits (B, K, V) at `select` (or (B, T, V))."""
        h = self.model.hidden(ids, pos, cache)  # (B, T, hidden)
        if select is not None and not (select.shape[1] == h.shape[1] == 1):
            idx = select.to(h.device)[:, :, None].expand(-1, -1, h.shape[-1])  # (B, K, hidden)
            h = h.gather(1, idx)
        return self.model.logits(h).float()

    # ------------------------------------------------------------------ CUDA graphs
    def _graph_decode(
        self, ids: torch.Tensor, pos: torch.Tensor, cache: HybridCache
    ) -> torch.Tensor:
        """Decode through a CUDA graph captured per batch-size bucket (padding rows: pos -1)."""
        if cache is not self._graph_cache:
            self._graphs.clear()
            self._graph_cache = cache
        B = ids.shape[0]
        bucket = next((b for b in GRAPH_BUCKETS if b >= B), B)
        bucket = min(bucket, cache.batch) if cache.batch >= B else B
        g = self._graphs.get(bucket)
        if g is None:
            g = self._graphs[bucket] = self._capture(bucket, cache)
        graph, s_ids, s_pos, s_out = g
        s_ids.zero_()
        s_pos.fill_(-1)
        s_ids[:B] = ids
        s_pos[:B] = pos
        graph.replay()
        return s_out[:B].float()  # (B, V)

    def _capture(self, bucket: int, cache: HybridCache) -> tuple[Any, ...]:
        """Capture model.hidden + logits for `bucket` rows over the static cache."""
        device = cache.device
        s_ids = torch.zeros(bucket, 1, dtype=torch.long, device=device)
        s_pos = torch.full((bucket, 1), -1, dtype=torch.long, device=device)

        def run() -> torch.Tensor:
            h = self.model.hidden(s_ids, s_pos, cache)
            return self.model.logits(h[:, 0])

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (allocator, lazy init) off the capture
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s_out = run()
        return graph, s_ids, s_pos, s_out


class NativeStepRunner:
    """The native C runner (geode.infer.native.NativeRunner: every row's tokens, decode and
    prefill mixed, in one padding-free call), `torch` where it cannot run.

    The plan (`decoder`, a NativeDecoder) is built from the model's tensors and rebuilt after
    `refresh()` when they changed; None while the model is unsupported (torch path then).
    pack_weights: pack the float projections for the GEMM (NativeDecoder.pack) at the first
    call with 6+ rows or PACK_MIN_TOKENS tokens (a prompt that long amortises the copy).
    """

    PACK_MIN_TOKENS = 64

    def __init__(
        self, model: torch.nn.Module, torch_runner: TorchRunner, pack_weights: bool = True
    ):
        self.model = model
        self.torch = torch_runner
        self.pack_weights = pack_weights
        self.native: NativeRunner | None = NativeRunner.build(model)
        self._check = False
        self.cache: HybridCache | None = None  # used when run() is given none

    @property
    def ragged(self) -> bool:
        """Padding-free calls while the native plan runs (the torch fallback pads)."""
        return self.native is not None

    @property
    def decoder(self) -> NativeDecoder | None:
        """The native plan in use (None: the torch path)."""
        return None if self.native is None else self.native.decoder

    def refresh(self) -> None:
        """Re-validate the plan against the model before its next use."""
        self._check = True

    def _plan(self, cache: HybridCache) -> NativeRunner | None:
        if self._check:
            self._check = False
            if self.native is None or not self.native.decoder.current(self.model):
                self.native = NativeRunner.build(self.model)
        if self.native is not None and self.native.decoder.cache is not cache:
            try:
                self.native.decoder.bind(cache)
            except Unsupported:  # e.g. a static (CUDA-graph) cache
                return None
        return self.native

    def run(
        self,
        rows: Sequence[int],
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: HybridCache | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See the module docstring."""
        cache = _bound(self, cache)
        plan = self._plan(cache)
        if plan is None:
            return self.torch.run(rows, ids, positions, cache, select)
        B = ids.shape[0]
        pack = self.pack_weights and (
            B >= kernels.GEMM_MIN_ROWS or int((positions >= 0).sum()) >= self.PACK_MIN_TOKENS
        )
        # torch single-threaded while the kernels' pool runs: torch's OpenMP workers spin
        # after each parallel region and would take the cores the pool needs
        with kernels.decode_threads():
            return plan.run(rows, ids, positions, cache, select, pack=pack)
