"""Continuous batching: an asyncio loop that drives the engine one step at a time.

The engine's own scheduler (geode.infer.scheduler) is the one admission policy: which requests
run, how many prompt tokens a step prefills (chunked prefill next to the running streams).
This loop only bounds the queue, feeds the engine and streams: a request waits until the next
step hands it to the engine; requests beyond the running batch (submitted here or waiting in
the engine) count against `max_queue` (full -> `QueueFull`, answered 429 with Retry-After).
Each step's deltas go to per-request asyncio queues; finished sequences leave the batch at
once. `abort` (a client disconnected) removes a request before the engine sees it or from the
engine, which frees its cache row. When the last sequence has left, `engine.free_cache()` drops
the KV cache (grown to the peak batch of the burst), so an idle server holds no KV cache; the
prefix cache (`Engine(prefix_cache_bytes=...)`) keeps the blocks of recent prompts.

The engine is not thread-safe, so every engine call runs on one dedicated worker thread; the
event loop stays free to accept connections and stream while a step computes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from geode.infer import Delta, Request

_log = logging.getLogger("geode.serve")


class QueueFull(Exception):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: the request queue is full; retry in {retry_after}s")
        self.retry_after = retry_after


@dataclass
class Handle:
    """A submitted request: its deltas (or an exception) arrive on `queue`."""

    rid: str
    request: Request
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    done: bool = False


@dataclass
class Stats:
    """Counters exported by /metrics."""

    requests_admitted: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    requests_rejected: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    ttft_buckets: dict[float, int] = field(
        default_factory=lambda: dict.fromkeys((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), 0)
    )
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))


class Scheduler:
    """Admits, steps and streams requests over one `geode.infer.Engine` (see module doc)."""

    def __init__(self, engine: Any, max_queue: int = 256, free_cache_when_idle: bool | None = None):
        self.engine = engine
        if free_cache_when_idle is None:  # CUDA graphs are captured over the cache: keep it
            free_cache_when_idle = not getattr(engine, "cuda_graphs", False)
        self.free_cache_when_idle = free_cache_when_idle
        self.max_queue = max_queue
        self.waiting: collections.deque[Handle] = collections.deque()  # not in the engine yet
        self.running: dict[str, Handle] = {}  # in the engine (waiting there or running)
        self.stats = Stats()
        self._aborts: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geode-engine")
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ids = 0
        self._step_time = 0.05  # moving average of a step's duration, for Retry-After

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop, abort everything in flight and release the worker thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for h in [*self.waiting, *self.running.values()]:
            h.queue.put_nowait(RuntimeError("the server is shutting down"))
        self.waiting.clear()
        rids = list(self.running)
        self.running.clear()
        await asyncio.get_running_loop().run_in_executor(self._pool, self._abort_all, rids)
        self._pool.shutdown(wait=False)

    def _abort_all(self, rids: list[str]) -> None:
        with torch.inference_mode():
            for rid in rids:
                self.engine.abort(rid)

    # ------------------------------------------------------------------ requests
    @property
    def cache_bytes(self) -> int:
        """Bytes of keys and values the engine's KV cache holds now (0 when it has none)."""
        cache = getattr(self.engine, "cache", None)
        return cache.nbytes if cache is not None else 0

    def _engine_waiting(self) -> int:
        """Sequences the engine holds that have no row yet."""
        return len(self.engine.scheduler.waiting)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a row: here, or in the engine's queue."""
        return len(self.waiting) + self._engine_waiting()

    @property
    def num_running(self) -> int:
        """Requests in the engine's running batch."""
        return max(0, len(self.running) - self._engine_waiting())

    def prefix_stats(self) -> dict[str, int]:
        """The engine's prefix-cache counters: hits, hit_tokens, bytes (0 without one)."""
        st = getattr(self.engine, "stats", {})
        prefix = getattr(self.engine, "prefix", None)
        return {
            "hits": int(st.get("prefix_hits", 0)),
            "hit_tokens": int(st.get("prefix_hit_tokens", 0)),
            "bytes": int(prefix.stats["bytes"]) if prefix is not None else 0,
        }

    def retry_after(self) -> int:
        """Seconds a rejected client should wait (a rough estimate of the queue's drain time)."""
        per_request = self._step_time * 64  # a typical request: tens of decode steps
        batches = (self.queue_depth + 1) / max(1, self.engine.max_batch)
        return max(1, min(60, math.ceil(batches * per_request)))

    def submit(self, request: Request) -> Handle:
        """Queue a request; raises QueueFull when `max_queue` requests already wait."""
        if self.queue_depth >= self.max_queue:
            self.stats.requests_rejected += 1
            raise QueueFull(self.retry_after())
        self._ids += 1
        rid = f"srv-{self._ids}"
        request.request_id = rid
        h = Handle(rid, request)
        self.waiting.append(h)
        self._wake.set()
        return h

    def abort(self, handle: Handle) -> None:
        """Cancel a request (client gone): drop it from the queue or the engine."""
        if handle.done:
            return
        handle.done = True
        self.stats.requests_aborted += 1
        try:
            self.waiting.remove(handle)
            return
        except ValueError:
            pass
        if handle.rid in self.running:
            self._aborts.add(handle.rid)
            self._wake.set()

    # ------------------------------------------------------------------ the loop
    def _admit(self) -> list[Handle]:
        """Every submitted request goes to the engine (its scheduler decides when each runs)."""
        out = list(self.waiting)
        self.waiting.clear()
        for h in out:
            self.running[h.rid] = h
        return out

    def _step(self, admit: list[Handle], aborts: list[str]) -> tuple[list[Delta], list[Any]]:
        """On the engine thread: apply aborts, add requests, run one engine step."""
        # Inference mode for all of it: abort() edits the cache's inference tensors in place.
        with torch.inference_mode():
            return self._step_inner(admit, aborts)

    def _step_inner(self, admit: list[Handle], aborts: list[str]) -> tuple[list[Delta], list[Any]]:
        for rid in aborts:
            self.engine.abort(rid)
        errors: list[tuple[Handle, Exception]] = []
        for h in admit:
            try:
                self.engine.add_request(h.request)
            except Exception as e:  # this request's own failure; the others go on
                errors.append((h, e))
        deltas = self.engine.step() if self.engine.has_unfinished() else []
        return deltas, errors

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.waiting and not self.running and not self._aborts:
                if self.free_cache_when_idle and self.cache_bytes:
                    await loop.run_in_executor(self._pool, self._free_cache)
                    if self.waiting or self.running or self._aborts:
                        continue  # arrived meanwhile (their wake-up must not be cleared)
                self._wake.clear()
                await self._wake.wait()
                continue
            admit = self._admit()
            aborts = list(self._aborts)
            self._aborts.clear()
            for rid in aborts:
                self.running.pop(rid, None)
            t0 = time.perf_counter()
            try:
                deltas, errors = await loop.run_in_executor(self._pool, self._step, admit, aborts)
            except Exception as e:  # an engine failure fails its requests, never the server
                _log.exception("engine step failed; failing %d request(s)", len(self.running))
                for h in list(self.running.values()):
                    h.queue.put_nowait(RuntimeError(f"engine error: {e!r}"))
                    self.engine_abort_later(h.rid)
                self.running.clear()
                continue
            dt = time.perf_counter() - t0
            self._step_time = 0.9 * self._step_time + 0.1 * dt
            self.stats.steps += 1
            for h, e in errors:
                self.running.pop(h.rid, None)
                h.done = True
                h.queue.put_nowait(e)
            for h in admit:
                if h.rid in self.running:
                    self.stats.requests_admitted += 1
            self._dispatch(deltas)

    def _free_cache(self) -> None:
        """On the engine thread: drop the idle engine's KV cache (the next step reallocates)."""
        if not self.engine.has_unfinished():
            with torch.inference_mode():
                self.engine.free_cache()

    def engine_abort_later(self, rid: str) -> None:
        """Abort `rid` in the engine before the next step."""
        self._aborts.add(rid)

    def _dispatch(self, deltas: list[Delta]) -> None:
        now = time.perf_counter()
        st = self.stats
        for d in deltas:
            h = self.running.get(d.request_id)
            if h is None:  # aborted meanwhile
                continue
            n = len(d.token_ids)
            st.generation_tokens += n
            st.recent.append((now, n))
            if h.t_first is None:
                h.t_first = now
                ttft = now - h.t_submit
                st.ttft_sum += ttft
                st.ttft_count += 1
                for b in st.ttft_buckets:
                    if ttft <= b:
                        st.ttft_buckets[b] += 1
            if d.finished:
                self.running.pop(d.request_id, None)
                h.done = True
                st.requests_finished += 1
                if d.result is not None:
                    st.prompt_tokens += len(d.result.prompt_token_ids)
            h.queue.put_nowait(d)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds."""
        now = time.perf_counter()
        n = sum(k for t, k in self.stats.recent if now - t <= window)
        return n / window
