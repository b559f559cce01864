"""Prefix caching: restoring a cached prefix then prefilling the rest gives the logits of a cold
prefill (prompts longer than the window, into rings of another size), matches are block aligned
and leave a token to run, blocks gone from the ring are not stored, the byte bound holds and
eviction takes least-recently-used leaves first."""

from __future__ import annotations

import pytest
import torch

import geode
from geode.infer import Engine, Request
from geode.infer.cache import HybridCache
from geode.infer.prefix import PrefixCache
from tests.reference import randomize_

# The conftest model's shape (window 5) with random (1 + w) norm weights; the engine test widens
# the window so that prefill chunks of 64 stay inside the ring.
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=5,
            query_pre_attn_scalar=20)  # fmt: skip


def _ids(T: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prefill(model, tokens, cache, row, start=0, chunk=4, prefix=None) -> torch.Tensor:
    """Prefill tokens[start:] into `row` in chunks (inserting into `prefix` after each, as the
    engine does); logits (len - start, V) of those positions."""
    out, view = [], cache.rows(row, row + 1)
    for s in range(start, len(tokens), chunk):
        e = min(len(tokens), s + chunk)
        ids, pos = torch.tensor([tokens[s:e]]), torch.arange(s, e)[None]  # (1, T)
        out.append(model(ids, pos, view)[0])
        if prefix is not None:
            prefix.insert(tokens, cache, row, s, e)
    return torch.cat(out)


@pytest.mark.parametrize(
    "slack_from,ring_to",
    [(0, dict(slack=0)), (2, dict(slack=3)), (1, dict(ring_buffer=False))],
)
def test_restore_then_prefill_equals_cold_prefill(model, slack_from, ring_to):
    shared = _ids(26, 0)  # 6 complete blocks of 4, the window is 5
    a, b = shared + _ids(9, 1), shared + _ids(11, 2)
    prefix = PrefixCache(max_bytes=10**7, block=4)
    with torch.no_grad():
        cold = model(torch.tensor([b]))[0]  # (len(b), V)
        src = HybridCache(model.config, 1, 40, slack=slack_from)
        _prefill(model, a, src, 0, prefix=prefix)
        assert prefix.stats["blocks"] == len(a) // 4  # every block was stored, chunk by chunk
        n, handle = prefix.match(b)
        assert n == 24 and prefix.stats["hits"] == 1 and prefix.stats["hit_tokens"] == 24
        dst = HybridCache(model.config, 3, 40, **ring_to)
        dst.reset_rows()
        assert prefix.restore(handle, dst, 1) == 24 and dst.length(1) == 24
        got = _prefill(model, b, dst, 1, start=24)
        assert (got - cold[24:]).abs().max().item() <= 1e-5
        # the restored row is the row a cold prefill of [0, 24) leaves, tables and K/V
        ref = HybridCache(model.config, 1, 40, **ring_to)
        _prefill(model, b[:24], ref, 0)
        again = HybridCache(model.config, 1, 40, **ring_to)
        prefix.restore(handle, again, 0)
    assert torch.equal(again.global_pos, ref.global_pos)
    assert torch.equal(again.local_pos, ref.local_pos)
    for x, y in zip(again.keys + again.values, ref.keys + ref.values, strict=True):
        used = slice(None) if x.shape[2] == again.ring else slice(0, 24)
        assert (x[..., used, :] - y[..., used, :]).abs().max().item() <= 1e-5


def test_match_is_block_aligned_and_leaves_a_token_to_run(model):
    tokens = _ids(12, 3)
    prefix = PrefixCache(max_bytes=10**7, block=4)
    with torch.no_grad():
        cache = HybridCache(model.config, 1, 12, ring_buffer=False)
        _prefill(model, tokens, cache, 0, chunk=12, prefix=prefix)
    assert prefix.stats["blocks"] == 3
    assert prefix.match(tokens)[0] == 8  # 12 tokens: the last block must run for logits
    assert prefix.match(tokens + [5])[0] == 12
    assert prefix.match(tokens[:9])[0] == 8 and prefix.match(tokens[:8])[0] == 4
    assert prefix.match(tokens[:4])[0] == 0 and prefix.match([])[0] == 0
    assert prefix.match([tokens[0] + 1] + tokens[1:])[0] == 0  # the chain: block 0 differs
    s = prefix.stats
    assert (s["hits"], s["misses"], s["hit_tokens"]) == (4, 3, 32)


def test_insert_stores_only_blocks_the_row_still_holds(model):
    """One 20-token chunk through a ring of 5: block 0 has left the ring, so nothing chains."""
    tokens = _ids(20, 4)
    with torch.no_grad():
        ring = HybridCache(model.config, 1, 20)
        model(torch.tensor([tokens]), torch.arange(20)[None], ring)
        flat = HybridCache(model.config, 1, 20, ring_buffer=False)
        model(torch.tensor([tokens]), torch.arange(20)[None], flat)
    prefix = PrefixCache(max_bytes=10**7, block=4)
    assert prefix.insert(tokens, ring, 0, 0, 20) == 0
    assert prefix.insert(tokens, flat, 0, 0, 18) == 4  # complete blocks inside [0, 18)
    assert prefix.insert(tokens, flat, 0, 18, 20) == 1 and prefix.stats["blocks"] == 5
    assert prefix.insert(tokens, flat, 0, 0, 20) == 0  # all cached already


def test_byte_bound_and_lru_eviction_of_leaves(model):
    prompts = {name: _ids(8, seed) for seed, name in enumerate("ABCD", start=10)}
    with torch.no_grad():
        cache = HybridCache(model.config, 4, 8, ring_buffer=False)
        for row, p in enumerate(prompts.values()):
            model(torch.tensor([p]), torch.arange(8)[None], cache.rows(row, row + 1))
    one = PrefixCache(max_bytes=10**7, block=4)
    one.insert(prompts["A"], cache, 0, 0, 4)
    block_bytes = one.stats["bytes"]
    assert block_bytes == 2 * 7 * 2 * 4 * 24 * 4  # K and V, 7 layers, 2 heads, 4 tokens, D 24

    prefix = PrefixCache(max_bytes=3 * block_bytes + 100, block=4)
    rows = {name: i for i, name in enumerate(prompts)}

    def insert(name: str) -> int:
        stored = prefix.insert(prompts[name], cache, rows[name], 0, 8)
        s = prefix.stats
        assert s["bytes"] == s["blocks"] * block_bytes <= prefix.max_bytes
        return stored

    def cached(name: str) -> int:
        return prefix.match(prompts[name] + [7])[0]

    assert insert("A") == 2
    assert insert("B") == 2  # evicts A's leaf (a2), the least recently used leaf
    assert prefix.stats["evictions"] == 1
    assert cached("A") == 4  # touches a1
    assert insert("C") == 2  # evicts b2, then b1 (older than the touched a1)
    assert (cached("A"), cached("B"), cached("C")) == (4, 0, 8)
    assert prefix.stats["evictions"] == 3
    # leaves only: D needs 2 blocks; a1 goes, then c2 (a plain LRU would take c1, older, and
    # orphan c2)
    assert cached("C") == 8  # C now more recent than A
    assert insert("D") == 2
    assert (cached("A"), cached("C"), cached("D")) == (0, 4, 8)

    tiny = PrefixCache(max_bytes=block_bytes, block=4)  # room for one block: no second in chain
    assert tiny.insert(prompts["A"], cache, 0, 0, 8) == 1
    assert PrefixCache(max_bytes=block_bytes - 1, block=4).insert(prompts["A"], cache, 0, 0, 8) == 0
    tiny.clear()
    assert tiny.stats == dict(hits=0, misses=0, hit_tokens=0, evictions=0, bytes=0, blocks=0)


def test_errors_name_the_bad_value(model):
    tokens = _ids(9, 5)
    with torch.no_grad():
        cache = HybridCache(model.config, 1, 9, ring_buffer=False)
        model(torch.tensor([tokens[:6]]), torch.arange(6)[None], cache)
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="block must be >= 1 token, got 0"):
        PrefixCache(100, block=0)
    prefix = PrefixCache(10**6, block=2)
    with pytest.raises(ValueError, match="up to 8 but cache row 0 holds 6"):
        prefix.insert(tokens, cache, 0, 0, 8)
    with pytest.raises(ValueError, match=r"\[4, 10\) is outside the 9 tokens"):
        prefix.insert(tokens, cache, 0, 4, 10)
    assert prefix.insert(tokens, cache, 0, 0, 6) == 3
    n, handle = prefix.match(tokens)
    assert n == 6
    with pytest.raises(ValueError, match="capacity of 4"):
        prefix.restore(handle, HybridCache(model.config, 1, 4), 0)
    with pytest.raises(ValueError, match="bfloat16"):
        prefix.restore(handle, HybridCache(model.config, 1, 9, torch.bfloat16), 0)
    with pytest.raises(ValueError, match="row 1 is outside"):
        prefix.restore(handle, cache, 1)
    other = geode.ModelConfig(**{**TINY, "head_dim": 16, "max_position_embeddings": 64})
    with pytest.raises(ValueError, match=r"\(2, 7, 2, n, 16\)"):
        prefix.restore(handle, HybridCache(other, 1, 9), 0)
    n, empty = prefix.match(tokens[:2])
    assert n == 0 and prefix.restore(empty, cache, 0) == 0 and cache.length(0) == 0


@pytest.mark.parametrize("native", [True, False])
def test_engine_reuses_a_shared_1000_token_prefix(native):
    """Issue #13 acceptance: a second request sharing a 1,000-token prefix runs only its new
    tokens (+ less than one block of rounding) and returns the tokens of a cold run; the prefix
    cache stays within its bytes."""
    cfg = geode.ModelConfig(**{**TINY, "sliding_window": 64, "max_position_embeddings": 1100})
    model = randomize_(geode.build_model(cfg, seed=0)).eval()
    shared = _ids(1000, 20)
    first, second = shared + _ids(20, 21), shared + _ids(37, 22)
    greedy = dict(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    kw = dict(prefill_chunk=64, native=native)
    cold = Engine(model, **kw)
    want = cold.generate([Request(second, add_bos=False, **greedy)])[0].token_ids
    cold_run = cold.stats["positions_run"]

    warm = Engine(model, prefix_cache_bytes=10**8, **kw)
    warm.generate([Request(first, add_bos=False, **greedy)])
    before = warm.stats["positions_run"]
    got = warm.generate([Request(second, add_bos=False, **greedy)])[0].token_ids
    run = warm.stats["positions_run"] - before
    decode = cold_run - len(second)  # positions a cold run spends after its prompt
    assert got == want
    assert warm.prefix.stats["hit_tokens"] == 992  # 62 blocks of 16 of the 1,000 shared
    assert run == cold_run - 992 <= (len(second) - 1000) + 15 + decode

    one_block = 2 * 7 * 2 * 16 * 24 * 4  # K and V, 7 layers, 2 kv heads, 16 tokens, D 24
    small = Engine(model, prefix_cache_bytes=10 * one_block + 1, **kw)
    small.generate([Request(p, add_bos=False, **greedy) for p in (first, second, _ids(300, 23))])
    assert small.prefix.stats["bytes"] == 10 * one_block == small.prefix.stats["blocks"] * one_block
