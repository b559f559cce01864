"""Per-row cache state: ring slack in the memory formula, `rollback` (re-running after a rollback
equals never having run the rejected tokens, across the ring's wrap, torch forward and native
step), `max_rollback`, `fork` (equals independent prefills) and their errors."""

from __future__ import annotations

import pytest
import torch

import geode
from geode.infer import kernels
from geode.infer.cache import HybridCache, kv_cache_bytes
from geode.infer.native import NativeDecoder

W = 5  # the tiny model's sliding window (conftest.TINY)


def _ids(T: int, seed: int) -> torch.Tensor:
    """(1, T) random token ids."""
    return torch.randint(3, 300, (1, T), generator=torch.Generator().manual_seed(seed))


def _run(model, ids: torch.Tensor, start: int, cache: HybridCache, how="chunk") -> torch.Tensor:
    """Feed ids (1, T) at positions start.. to a one-row cache; logits (T, V) float32.

    how: "chunk" (one torch forward), "steps" (one torch forward per token), a NativeDecoder
    (its `step`, one token per call) or ("run", NativeDecoder) (its multi-token `run`)."""
    T = ids.shape[1]
    if how == "chunk":
        return model(ids, torch.arange(start, start + T)[None], cache)[0].float()
    if how == "steps":
        return torch.cat([_run(model, ids[:, t : t + 1], start + t, cache) for t in range(T)])
    if isinstance(how, tuple):
        return how[1].run([0] * T, ids[0].tolist(), list(range(start, start + T)), cache, range(T))
    return torch.cat([how.step([int(ids[0, t])], [start + t], cache) for t in range(T)])


def _native(model) -> NativeDecoder:
    """The model's native decode plan (the kernels must be available here)."""
    assert kernels.available(), kernels.load_error()
    native = NativeDecoder.build(model)
    assert native is not None, NativeDecoder.why_not(model)
    return native


@pytest.mark.parametrize("preset", ["nano-60m", "gemma3-1b"])
@pytest.mark.parametrize("n,slack", [(1, 0), (511, 3), (512, 1), (513, 1), (520, 8), (700, 4)])
def test_memory_formula_with_slack(preset, n, slack):
    """bytes(n) = 2 H_kv D b (L_g n + L_l min(n, W + slack)); a one-row cache allocates it."""
    cfg = geode.get_preset(preset)
    per = 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    m = min(n, cfg.sliding_window + slack)
    expected = per * (cfg.num_global_layers * n + cfg.num_local_layers * m)
    assert kv_cache_bytes(cfg, n, torch.bfloat16, slack=slack) == expected
    assert kv_cache_bytes(cfg, n, torch.bfloat16, ring_buffer=False, slack=slack) == per * (
        cfg.num_hidden_layers * n
    )
    if preset == "nano-60m":
        cache = HybridCache(cfg, 1, n, torch.bfloat16, device="meta", slack=slack)
        assert cache.ring == m and cache.nbytes == expected
    with pytest.raises(ValueError, match="slack"):
        kv_cache_bytes(cfg, n, slack=-1)


@pytest.mark.parametrize("path", ["torch", "native"])
@pytest.mark.parametrize(
    "prompt,slack,k,drafts_how",
    [
        (2, 0, 2, "chunk"),  # ring (5) not yet wrapped: any rollback works
        (14, 3, 3, "chunk"),  # wrapped (ring 8): roll back the full slack
        (14, 3, 1, "steps"),
        (23, 4, 4, "path"),  # drafts run by the same path, wrapped several times
        (23, 2, 2, "run"),  # drafts as one chunk through the native multi-token run
    ],
)
def test_rollback_then_rerun_equals_cold_run(model, path, prompt, slack, k, drafts_how):
    """Prefill, run k+1 draft tokens (one chunk, as a verifier does, or one by one), roll back
    k, then run the real continuation: logits equal a cold forward that never saw the drafts."""
    how = _native(model) if path == "native" else "steps"
    ids = _ids(prompt + 12, 1)
    drafts = _ids(k + 1, 2)
    drafts[0, 0] = ids[0, prompt]  # the first draft token is accepted, the k after it rejected
    with torch.no_grad():
        cold = model(ids)[0]  # (T, V)
        for then in (how, "chunk"):  # the continuation token by token, or as one chunk
            cache = HybridCache(model.config, 1, prompt + 12, slack=slack)
            _run(model, ids[:, :prompt], 0, cache)  # prefill
            by = {"path": how, "run": ("run", _native(model))}.get(drafts_how, drafts_how)
            _run(model, drafts, prompt, cache, by)
            assert cache.length(0) == prompt + k + 1
            cache.rollback(0, k)
            assert cache.length(0) == prompt + 1
            got = _run(model, ids[:, prompt + 1 :], prompt + 1, cache, then)
            assert (got - cold[prompt + 1 :]).abs().max().item() <= 1e-4, then


def test_rollback_repeatedly_across_the_wrap(model):
    """Speculative decoding's pattern: every step runs 3 tokens and keeps 1 or 2 of them (slack 2);
    the kept sequence's logits equal a cold forward at every step, through many ring wraps."""
    ids = _ids(40, 3)
    junk = _ids(40, 4)
    with torch.no_grad():
        cold = model(ids)[0]  # (40, V)
        cache = HybridCache(model.config, 1, 40, slack=2)
        assert cache.ring == W + 2
        _run(model, ids[:, :4], 0, cache)
        n, step = 4, 0
        while n + 3 <= 40:
            keep = 1 + step % 2
            chunk = torch.cat([ids[:, n : n + keep], junk[:, n + keep : n + 3]], 1)  # (1, 3)
            got = _run(model, chunk, n, cache)
            assert (got[:keep] - cold[n : n + keep]).abs().max().item() <= 1e-4, n
            assert cache.max_rollback(0) >= 3 - keep
            cache.rollback(0, 3 - keep)
            n, step = n + keep, step + 1
        assert cache.length(0) == n and n > 3 * cache.ring


def test_max_rollback_and_errors_leave_the_cache_unchanged(model):
    cfg = model.config
    ids = _ids(20, 5)
    with torch.no_grad():
        cache = HybridCache(cfg, 2, 20, slack=3)  # ring 8
        _run(model, ids[:, :6], 0, cache.rows(0, 1))
        assert cache.length(0) == 6 and cache.max_rollback(0) == 6  # not wrapped
        assert cache.length(1) == 0 and cache.max_rollback(1) == 0
        _run(model, ids[:, 6:17], 6, cache.rows(0, 1))
        assert cache.max_rollback(0) == 3  # wrapped: the slack
        flat = HybridCache(cfg, 1, 20, ring_buffer=False)
        _run(model, ids[:, :17], 0, flat)
        assert flat.max_rollback(0) == 17
        exact = HybridCache(cfg, 1, 20)  # slack 0: a wrapped ring allows no rollback
        _run(model, ids[:, :17], 0, exact)
        assert exact.max_rollback(0) == 0
    before = [t.clone() for t in (cache.global_pos, cache.local_pos, *cache.keys)]
    for k, match in [(4, "row 0 by k=4 exceeds its limit of 3"), (-1, "0..17"), (18, "0..17")]:
        with pytest.raises(ValueError, match=match):
            cache.rollback(0, k)
    with pytest.raises(ValueError, match="row 2 is outside"):
        cache.rollback(2, 1)
    with pytest.raises(ValueError, match="slack >= 1"):
        exact.rollback(0, 1)
    after = (cache.global_pos, cache.local_pos, *cache.keys)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    cache.rollback(0, 3)
    assert cache.length(0) == 14 and cache.max_rollback(0) == 0


@pytest.mark.parametrize("path", ["torch", "native"])
def test_fork_equals_independent_prefill(model, path):
    """Fork a prefilled row into 3 others, then decode different continuations in one batch:
    every row's logits equal a cold forward of its own sequence."""
    native = _native(model) if path == "native" else None
    P, steps = 9, 8  # the prompt wraps the ring
    prompt = _ids(P, 6)
    conts = torch.randint(3, 300, (4, steps), generator=torch.Generator().manual_seed(7))
    seqs = torch.cat([prompt.expand(4, P), conts], 1)  # (4, P + steps): sequence i in row i
    with torch.no_grad():
        cold = model(seqs)  # (4, P + steps, V)
        cache = HybridCache(model.config, 5, P + steps, slack=1)
        _run(model, prompt, 0, cache.rows(2, 3))
        assert cache.fork(2, 2, 3) == [3, 4] and cache.fork(2, 2, 0) == [0, 1]
        for t in range(steps):
            if native is None:
                ids = torch.cat([seqs[:, P + t], seqs[:1, P + t]])[:, None]  # (5, 1)
                pos = torch.tensor([[P + t]] * 4 + [[-1]])  # row 4 (a fork) idles as padding
                out = model.logits(model.hidden(ids, pos, cache)[:, 0]).float()  # (5, V)
            else:
                out = native.step(seqs[:, P + t].tolist(), [P + t] * 4, cache)  # rows 0..3
            assert (out[:4] - cold[:, P + t]).abs().max().item() <= 1e-4, t
    assert cache.length(4) == P  # the idle fork kept the prompt only


def test_fork_errors_name_the_rows(model):
    cache = HybridCache(model.config, 4, 8)
    before = cache.global_pos.clone()
    for args, match in [
        ((1, 2, 0), "rows 0..1 overlaps the source"),
        ((0, 2, 3), "rows 3..4: outside the cache's rows 0..3"),
        ((0, 1, -1), "outside"),
        ((4, 1, 0), "row 4 is outside"),
        ((0, -1, 1), "n >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            cache.fork(*args)
    assert torch.equal(cache.global_pos, before)
    assert cache.fork(0, 0, 1) == []
