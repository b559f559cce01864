"""Measurements shared by `geode bench decode` and bench/decode.py: machine bandwidth, bytes a
decode step must read (the roofline), and timed engine runs."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from ..config import SLIDING
from .engine import Engine, Request


def copy_bandwidth(megabytes: int = 256, reps: int = 7) -> float:
    """Copy bandwidth of this machine in bytes/s, STREAM convention: (read + written bytes) / s.

    Median of `reps` copies of a `megabytes` float32 buffer (larger than any cache here) with
    torch's threads.
    """
    n = megabytes * 2**20 // 4
    a = torch.ones(n)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t)
    return 2 * n * 4 / statistics.median(times)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter/buffer in use except the embedding
    table, of which one row per token is read (the tied head counts it in full as the head)."""
    from .quant import QuantLinear

    total = 0
    head = getattr(model, "head_override", None)
    quant_head = isinstance(head, QuantLinear)
    for name, p in model.named_parameters():
        if name == "embed_tokens.weight":
            if quant_head or model.lm_head is not None:
                continue  # lookup only: one row per token
        elif name == "lm_head.weight" and quant_head:
            continue
        total += p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
    return total


def cache_bytes_read(model: nn.Module, context: int, dtype: torch.dtype, batch: int = 1) -> int:
    """KV-cache bytes a decode step at `context` tokens reads (local layers: the window)."""
    cfg = model.config
    b = torch.empty((), dtype=dtype).element_size()
    per_pos = 2 * cfg.num_key_value_heads * cfg.head_dim * b
    slots = sum(
        min(context, cfg.sliding_window) if t == SLIDING else context for t in cfg.layer_types
    )
    return batch * per_pos * slots


def measure_decode(
    engine: Engine,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    reps: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Greedy generation of `batch` random prompts: median prefill time and decode rate.

    Decode rate = batch * (new_tokens - 1) / (total time - time until every first token), so
    prefill is excluded; one untimed warm-up run first.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]

    def run(n: int) -> tuple[float, float]:
        reqs = [Request(p, temperature=0, max_new_tokens=n, ignore_eos=True) for p in prompts]
        t0 = time.perf_counter()
        for r in reqs:
            engine.add_request(r)
        t_first = None
        while engine.has_unfinished():
            engine.step()
            if t_first is None and not engine.waiting:
                t_first = time.perf_counter()
        return t_first - t0, time.perf_counter() - t0

    run(min(4, new_tokens))
    prefill, decode = [], []
    for _ in range(reps):
        tf, total = run(new_tokens)
        prefill.append(tf)
        decode.append((total - tf) / max(1, new_tokens - 1))
    step = statistics.median(decode)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_s": statistics.median(prefill),
        "step_ms": step * 1e3,
        "tokens_per_s": batch / step if step > 0 else float("inf"),
        "reps": reps,
    }
