"""The hybrid KV cache: decode logits equal a full recompute, padding is never attended to,
ring buffers wrap, and memory equals the formula."""

from __future__ import annotations

import pytest
import torch

import geode
from geode.infer.cache import HybridCache, kv_cache_bytes


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prefill,chunk", [(3, 3), (12, 4), (12, 12), (1, 1)])
@pytest.mark.parametrize("ring", [True, False])
def test_cached_decode_logits_equal_full_recompute(model, prefill, chunk, ring):
    """Chunked prefill then one token at a time, through the window many times (float32)."""
    T = 30
    ids = _ids(2, T)
    with torch.no_grad():
        full = model(ids)  # (2, T, V)
        cache = HybridCache(model.config, 2, T, ring_buffer=ring)
        pos = torch.arange(T).expand(2, T)
        outs = []
        for s in range(0, prefill, chunk):
            e = min(prefill, s + chunk)
            outs.append(model(ids[:, s:e], pos[:, s:e], cache))
        for t in range(prefill, T):
            outs.append(model(ids[:, t : t + 1], pos[:, t : t + 1], cache))
    got = torch.cat(outs, 1)
    assert (got - full).abs().max().item() <= 1e-4


def test_rows_at_different_positions_and_padding(model):
    """Row 0 is 7 tokens ahead of row 1; padded prefill (position -1) stores nothing."""
    a, b = _ids(1, 20, 1), _ids(1, 13, 2)
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        cache = HybridCache(model.config, 2, 20)
        pad = torch.zeros(1, 7, dtype=torch.long)
        # right-padded prefill of 10 + 3: row 1 has 3 real tokens then 7 pads
        ids = torch.cat([a[:, :10], torch.cat([b[:, :3], pad], 1)], 0)
        pos = torch.stack([torch.arange(10), torch.cat([torch.arange(3), -torch.ones(7).long()])])
        out = model(ids, pos, cache)
        assert (out[0] - full_a[0, :10]).abs().max() <= 1e-4
        assert (out[1, :3] - full_b[0, :3]).abs().max() <= 1e-4
        assert torch.isfinite(out).all()
        # then row 1 catches up alone (rows view) and both decode together at different positions
        row1 = cache.rows(1, 2)
        model(b[:, 3:6], torch.arange(3, 6)[None], row1)
        for step in range(7):
            ids = torch.tensor([[a[0, 10 + step]], [b[0, 6 + step]]])
            pos = torch.tensor([[10 + step], [6 + step]])
            out = model(ids, pos, cache)
            assert (out[0, 0] - full_a[0, 10 + step]).abs().max() <= 1e-4
            assert (out[1, 0] - full_b[0, 6 + step]).abs().max() <= 1e-4


def test_padding_row_in_decode_is_inert(model):
    ids = _ids(1, 9, 3)
    with torch.no_grad():
        full = model(ids)
        cache = HybridCache(model.config, 2, 9)
        model(ids[:, :8].expand(2, 8), torch.arange(8).expand(2, 8), cache)
        before = [k[1].clone() for k in cache.keys]
        out = model(torch.tensor([[ids[0, 8]], [0]]), torch.tensor([[8], [-1]]), cache)
    assert (out[0, 0] - full[0, 8]).abs().max() <= 1e-4
    assert all(torch.equal(k[1], b) for k, b in zip(cache.keys, before, strict=True))


def test_move_row_and_resize_keep_contents(model):
    ids = _ids(1, 12, 4)
    with torch.no_grad():
        full = model(ids)
        cache = HybridCache(model.config, 3, 4)  # capacity below the window: ring of 4
        model(ids[:, :3], torch.arange(3)[None], cache.rows(2, 3))
        cache.move_row(2, 0)
        cache.reset_rows(2)
        cache = cache.resized(4, 12, rows=1)  # ring grows from 4 to the window (5)
        out = [
            model(ids[:, t : t + 1], torch.tensor([[t]]), cache.rows(0, 1)) for t in range(3, 12)
        ]
    assert (torch.cat(out, 1)[0] - full[0, 3:]).abs().max() <= 1e-4


def test_static_cache_matches_dynamic(model):
    ids = _ids(2, 14, 5)
    with torch.no_grad():
        full = model(ids)
        cache = HybridCache(model.config, 2, 16, static=True)
        model(ids[:, :6], torch.arange(6).expand(2, 6), cache)
        outs = [model(ids[:, t : t + 1], torch.full((2, 1), t), cache) for t in range(6, 14)]
    assert (torch.cat(outs, 1) - full[:, 6:]).abs().max() <= 1e-4


def test_capacity_overflow_is_an_error(model):
    cache = HybridCache(model.config, 1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="capacity"):
        model(_ids(1, 5), torch.arange(5)[None], cache)


@pytest.mark.parametrize("preset", ["nano-60m", "gemma3-1b", "gemma3-4b"])
@pytest.mark.parametrize("n", [1, 100, 511, 512, 513, 5000])
def test_memory_equals_formula(preset, n):
    cfg = geode.get_preset(preset)
    W, Lg, Ll = cfg.sliding_window, cfg.num_global_layers, cfg.num_local_layers
    per = 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    expected = per * (Lg * n + Ll * min(n, W))
    assert kv_cache_bytes(cfg, n, torch.bfloat16) == expected
    assert kv_cache_bytes(cfg, n, "bfloat16", ring_buffer=False) == per * (Lg + Ll) * n
    if n <= 600 and preset == "nano-60m":  # allocate only small ones
        assert HybridCache(cfg, 1, n, torch.bfloat16).nbytes == expected
        assert HybridCache(cfg, 1, n, torch.bfloat16, ring_buffer=False).nbytes == per * 12 * n
