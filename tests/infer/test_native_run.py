"""The native multi-token run (geode_run: flattened tokens of several cache rows in one C call)
against the torch path (model.hidden over a HybridCache, one row at a time): prefill chunks
longer than the local ring, ragged rows, decode tokens of some rows next to prefill chunks of
others, float32 / bfloat16 / int8 / int4 weights, a ring with slack; and NativeRunner's padded
(B, T) entry with `select`."""

from __future__ import annotations

import copy

import pytest
import torch

import geode
from geode.infer import HybridCache, kernels, native
from geode.infer.native import NativeDecoder, NativeRunner
from geode.infer.quant import quantize
from tests.reference import randomize_

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"{kernels.load_error()}")

# Window 5 (ring 5, or 5 + slack), 7 layers (layer 5 global); head_dim 32 and hidden 64.
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=5,
            query_pre_attn_scalar=20, max_position_embeddings=256)  # fmt: skip

# Per call: cache row -> tokens it feeds. Chunks of 9, 12 and 13 tokens are longer than the
# ring; single tokens are decode steps of rows whose neighbours prefill; the 3-token call takes
# the per-row kernels, the others the GEMM.
SCHEDULE = [
    {0: 9, 1: 1, 2: 4},
    {2: 13, 0: 1, 1: 7},
    {0: 1, 1: 1, 2: 1},
    {1: 2, 0: 12},
    {0: 1, 1: 1, 2: 6},
]


def _model(dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A tiny random model with random (1 + w) norm weights too."""
    model = geode.build_model(geode.ModelConfig(**{**TINY, **overrides}), seed=0)
    return randomize_(model).to(dtype).eval()


def _run_both(model, schedule=SCHEDULE, slack: int = 0, ref=None):
    """Feed the schedule through NativeDecoder.run (one call per step, every token's logits)
    and through the torch path on a twin cache; with `ref` (a float32 twin) also its logits.
    Returns [(torch, native[, ref]) logits per step] and the two caches."""
    cfg = model.config
    cap = 64
    caches = [HybridCache(cfg, 3, cap, model.dtype, slack=slack) for _ in range(2)]
    ref_cache = HybridCache(cfg, 3, cap, slack=slack) if ref is not None else None
    dec = NativeDecoder.build(model)
    assert dec is not None, NativeDecoder.why_not(model)
    ids = torch.randint(3, cfg.vocab_size, (3, cap), generator=torch.Generator().manual_seed(1))
    length = [0, 0, 0]
    out = []
    with torch.inference_mode(), kernels.decode_threads():  # torch 1 thread, kernels all
        for step in schedule:
            rows, toks, pos, per_row = [], [], [], []
            for r, n in step.items():
                p = list(range(length[r], length[r] + n))
                rows += [r] * n
                toks += ids[r, p].tolist()
                pos += p
                per_row.append((r, p))
            got = dec.run(rows, toks, pos, caches[1], list(range(len(toks))))
            want, want_ref = [], []
            for r, p in per_row:
                x, q = ids[r : r + 1, p], torch.tensor(p)[None]
                want.append(model.logits(model.hidden(x, q, caches[0].rows(r, r + 1))[0]).float())
                if ref is not None:
                    h = ref.hidden(x, q, ref_cache.rows(r, r + 1))
                    want_ref.append(ref.logits(h[0]).float())
                length[r] += len(p)
            row = [torch.cat(want), got]
            if ref is not None:
                row.append(torch.cat(want_ref))
            out.append(row)
    return out, caches


def _assert_caches_equal(a: HybridCache, b: HybridCache, tol: float) -> None:
    """Same keys/values in every valid slot and the same slot-position tables."""
    assert torch.equal(a.global_pos, b.global_pos)
    assert torch.equal(a.local_pos, b.local_pos)
    for i, local in enumerate(a.is_local):
        valid = (a.local_pos if local else a.global_pos) >= 0  # (rows, slots)
        for x, y in ((a.keys[i], b.keys[i]), (a.values[i], b.values[i])):
            diff = (x.float() - y.float()).abs().amax(dim=(1, 3))  # (rows, slots)
            assert diff[valid].max() <= tol


@pytest.mark.parametrize(
    "slack,overrides",
    [(0, {}), (3, {}),
     (2, dict(num_key_value_heads=1, head_dim=24, attn_logit_softcapping=2.0))],
)  # fmt: skip
def test_run_equals_torch_float32(slack, overrides):
    """Ragged rows, chunks longer than the ring (R = 5 + slack), decode mixed with prefill; GQA
    4:1 with a head_dim that leaves vector tails and an attention soft-cap that bites."""
    pairs, caches = _run_both(_model(**overrides), slack=slack)
    assert max((a - b).abs().max().item() for a, b in pairs) <= 1e-4
    assert caches[1].ring == 5 + slack
    _assert_caches_equal(*caches, 1e-4)


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 64)])
def test_run_equals_torch_quantized(mode, group):
    """Same quantized weights, float32 activations: equal up to summation order."""
    model = quantize(_model(), mode, group or 64)
    pairs, caches = _run_both(model, slack=1)
    assert max((a - b).abs().max().item() for a, b in pairs) <= 1e-4
    _assert_caches_equal(*caches, 1e-4)


def test_run_bfloat16_at_least_as_accurate_as_torch_bf16():
    """bfloat16 weights and cache: the torch path rounds every activation to bfloat16, the C run
    keeps them float32 and rounds only the stored keys/values. Against float32 arithmetic on the
    same weights, its error is at most the torch bf16 path's and within 10% of the logit scale."""
    model = _model(torch.bfloat16)
    rows, caches = _run_both(model, ref=copy.deepcopy(model).float())
    native_err = max((n - r).abs().max().item() for _, n, r in rows)
    torch_err = max((t - r).abs().max().item() for t, _, r in rows)
    scale = max(r.abs().max().item() for *_, r in rows)
    assert native_err <= torch_err <= 0.1 * scale
    assert torch.equal(caches[0].global_pos, caches[1].global_pos)


def test_run_splits_long_calls(monkeypatch):
    """More tokens than one C call takes: split calls continue the rows through the cache."""
    monkeypatch.setattr(native, "RUN_MAX_TOKENS", 4)
    pairs, caches = _run_both(_model(), schedule=SCHEDULE[:2])
    assert max((a - b).abs().max().item() for a, b in pairs) <= 1e-4
    _assert_caches_equal(*caches, 1e-4)


def test_runner_padded_batch_and_select():
    """NativeRunner.run: (B, T) ids with padding (-1 positions), rows in any order, logits of
    every column or of the selected ones (padding columns: zeros)."""
    model = _model()
    cfg = model.config
    runner = NativeRunner.build(model)
    assert runner is not None
    ids = torch.randint(3, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, -1, -1, -1, -1, -1]])
    with torch.inference_mode(), kernels.decode_threads():
        c1, c2 = HybridCache(cfg, 4, 32), HybridCache(cfg, 4, 32)
        got = runner.run([3, 1], ids, positions, c1)  # (2, 8, V)
        sel = runner.run([2, 0], ids, positions, c2, select=torch.tensor([[7, 2], [2, 5]]))
        ref3 = model.logits(model.hidden(ids[:1], positions[:1], HybridCache(cfg, 1, 32)))
        ref1 = model.logits(model.hidden(ids[1:, :3], positions[1:, :3], HybridCache(cfg, 1, 32)))
    assert got.shape == (2, 8, cfg.vocab_size) and sel.shape == (2, 2, cfg.vocab_size)
    assert (got[0] - ref3[0]).abs().max() <= 1e-4
    assert (got[1, :3] - ref1[0]).abs().max() <= 1e-4
    assert torch.equal(got[1, 3:], torch.zeros(5, cfg.vocab_size))
    assert (sel[0, 0] - ref3[0, 7]).abs().max() <= 1e-4
    assert (sel[0, 1] - ref3[0, 2]).abs().max() <= 1e-4
    assert (sel[1, 0] - ref1[0, 2]).abs().max() <= 1e-4
    assert torch.equal(sel[1, 1], torch.zeros(cfg.vocab_size))
    assert c1.row_length(3) == 8 and c1.row_length(1) == 3 and c1.row_length(0) == 0


def test_run_bad_input_leaves_cache_unchanged():
    """Positions that skip, a row split in two runs of the list, ids outside the vocabulary:
    a ValueError naming the problem; the cache keeps what it held."""
    model = _model()
    dec = NativeDecoder.build(model)
    cache = HybridCache(model.config, 2, 16)
    with torch.inference_mode():
        dec.run([0, 0, 1], [5, 6, 7], [0, 1, 0], cache, [2])
        before = [t.clone() for t in (cache.global_pos, cache.local_pos, *cache.keys)]
        for rows, ids, pos in (
            ([0, 0], [5, 6], [2, 4]),  # skips position 3
            ([0, 1, 0], [5, 6, 7], [2, 1, 3]),  # row 0 in two runs
            ([1], [300], [1]),  # id outside the vocabulary
            ([2], [5], [0]),  # no such row
        ):
            with pytest.raises(ValueError, match="native run failed"):
                dec.run(rows, ids, pos, cache, [0])
    after = (cache.global_pos, cache.local_pos, *cache.keys)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(ValueError, match="want indices"):
        dec.run([0], [5], [2], cache, [1])
