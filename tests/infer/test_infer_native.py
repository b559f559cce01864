"""The native decode step (one C call per step) against the model's torch forward: logits for
batch 1 and batches at different positions (the rows path and the register-blocked GEMM path),
ring-buffer wraparound, GQA ratios, soft-capping, tied and untied heads, bfloat16, int8 and
int4; and the engine's use of it (and its fallback)."""

from __future__ import annotations

import copy

import pytest
import torch

import geode
from geode.infer import Engine, HybridCache, Request, kernels
from geode.infer.native import NativeDecoder
from geode.infer.quant import quantize
from tests.reference import randomize_

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"{kernels.load_error()}")

# Window 5 and 7 layers (layer 5 global); head_dim 24 and hidden 64 leave vector tails.
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=5,
            query_pre_attn_scalar=20, max_position_embeddings=256)  # fmt: skip


def _model(dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A tiny random model with random (1 + w) norm weights too."""
    model = geode.build_model(geode.ModelConfig(**{**TINY, **overrides}), seed=0)
    return randomize_(model).to(dtype).eval()


def _decode_both(model, plens: list[int], steps: int, ring: bool = True, ref=None, pack=True):
    """Prefill rows of different lengths (torch), then decode `steps` tokens per row through the
    torch forward and through the native step on twin caches. Returns per-step logits pairs
    (torch, native); with `ref` (a float32 twin of the model) also its logits. pack: let the
    native step pack the weights at 6+ rows (NativeDecoder.step)."""
    cfg, B = model.config, len(plens)
    cap = max(plens) + steps + 1
    native = NativeDecoder.build(model)
    assert native is not None, NativeDecoder.why_not(model)
    caches = [HybridCache(cfg, B, cap, model.dtype, ring_buffer=ring) for _ in range(2)]
    ref_cache = HybridCache(cfg, B, cap, ring_buffer=ring) if ref is not None else None
    ids = torch.randint(3, cfg.vocab_size, (B, cap), generator=torch.Generator().manual_seed(1))
    out = []
    with torch.inference_mode():
        for b, n in enumerate(plens):
            prompt, p = ids[b : b + 1, :n], torch.arange(n)[None]
            for c in caches:
                model.hidden(prompt, p, c.rows(b, b + 1))
            if ref is not None:
                ref.hidden(prompt, p, ref_cache.rows(b, b + 1))
        pos = list(plens)
        for _ in range(steps):
            tok = [int(ids[b, pos[b]]) for b in range(B)]
            t, p = torch.tensor(tok)[:, None], torch.tensor(pos)[:, None]
            torch_logits = model.logits(model.hidden(t, p, caches[0])[:, 0]).float()
            row = [torch_logits, native.step(tok, pos, caches[1], pack=pack)]
            if ref is not None:
                row.append(ref.logits(ref.hidden(t, p, ref_cache)[:, 0]).float())
            out.append(row)
            pos = [q + 1 for q in pos]
    assert (native.packed is not None) == (pack and B >= kernels.GEMM_MIN_ROWS)
    return out, caches


def _max_err(pairs) -> float:
    return max((a - b).abs().max().item() for a, b, *_ in pairs)


# Prompts shorter and longer than the window (5), 12 decode steps: every local ring wraps.
# Batch 1 and 3 take the per-row gemv kernels, batch 8 the register-blocked GEMM path (weights
# packed for it, or read in place).
@pytest.mark.parametrize(
    "plens,pack",
    [([4], True), ([3, 8, 1], True), ([1, 2, 3, 4, 5, 6, 7, 9], True),
     ([1, 2, 3, 4, 5, 6, 7, 9], False)],
)  # fmt: skip
def test_native_logits_equal_torch_float32(plens, pack):
    pairs, caches = _decode_both(_model(), plens, 12, pack=pack)
    assert _max_err(pairs) <= 1e-4
    # the native step keeps the cache's keys, values and slot tables exactly as torch does
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values,
                    strict=True):  # fmt: skip
        assert (a - b).abs().max() <= 1e-5
    assert torch.equal(caches[0].global_pos, caches[1].global_pos)
    assert torch.equal(caches[0].local_pos, caches[1].local_pos)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=1),  # GQA 4:1
        dict(num_key_value_heads=4),  # no grouping
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16),
        dict(attn_logit_softcapping=2.0, final_logit_softcapping=1.5),  # caps that bite
        dict(tie_word_embeddings=False),
        dict(hidden_activation="gelu", rope_scaling_factor=8.0, rope_theta=50.0),
    ],
)
def test_native_logits_equal_torch_configs(overrides):
    pairs, _ = _decode_both(_model(**overrides), [3, 8, 1, 6, 2, 5, 7], 10)
    assert _max_err(pairs) <= 1e-4


def test_native_without_ring_buffer():
    """ring_buffer=False: local layers keep every slot and the window is applied by position."""
    pairs, _ = _decode_both(_model(), [3, 9], 10, ring=False)
    assert _max_err(pairs) <= 1e-4


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("plens", [[3, 8, 1], [1, 2, 3, 4, 5, 6, 7, 9]])
def test_native_logits_equal_torch_quantized(mode, group, plens):
    """Same quantized weights, same float32 activations: equal up to summation order."""
    model = quantize(_model(intermediate_size=128, head_dim=32), mode, group or 64)  # widths % 64
    pairs, _ = _decode_both(model, plens, 10)
    assert _max_err(pairs) <= 1e-4


@pytest.mark.parametrize("plens", [[6], [3, 8, 1, 6, 2, 5, 7]])
def test_native_bfloat16_at_least_as_accurate_as_torch_bf16(plens):
    """bfloat16 weights and cache: the torch path rounds every activation to bfloat16 (8-bit
    mantissa), the native step keeps them float32 and rounds only the stored keys/values. Against
    float32 arithmetic on the same bf16-rounded weights, the native step's error is at most the
    torch bf16 path's own (a few percent of the logit scale here) and smaller on average."""
    model = _model(torch.bfloat16)
    ref = copy.deepcopy(model).float()
    rows, _ = _decode_both(model, plens, 10, ref=ref)
    native_err = [(n - r).abs().max().item() for _, n, r in rows]
    torch_err = [(t - r).abs().max().item() for t, _, r in rows]
    scale = max(r.abs().max().item() for *_, r in rows)
    assert max(native_err) <= max(torch_err) <= 0.1 * scale
    assert sum(native_err) <= sum(torch_err)


def test_engine_uses_native_step_and_matches_fallback():
    model = _model()
    reqs = [Request([5, 6, 7][: n % 3 + 1] + [9] * n, temperature=0, max_new_tokens=m,
                    ignore_eos=True) for n, m in [(3, 9), (11, 4), (6, 13), (1, 7), (15, 2)]]  # fmt: skip
    eng = Engine(model, max_batch=3)
    native = eng.generate(reqs)
    assert eng._native is not None  # the native path ran
    fallback = Engine(model, max_batch=3, native=False).generate(reqs)
    assert eng.native and not Engine(model, native=False).native
    assert [r.token_ids for r in native] == [r.token_ids for r in fallback]
    # logprobs come from the native logits: equal to the fallback's
    lp = dict(temperature=0, max_new_tokens=6, ignore_eos=True, logprobs=2)
    a = Engine(model).generate(Request([2, 40, 41], **lp))[0]
    b = Engine(model, native=False).generate(Request([2, 40, 41], **lp))[0]
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_engine_packs_weights_at_batches_of_six_only_when_asked():
    """pack_weights: the first native step of 6+ sequences packs the float projections and head
    (their bytes once more, tiles of 6 rows padded); fewer sequences, or pack_weights=False,
    never do. Packed or not, greedy tokens are the same."""
    model = _model()
    reqs = [Request([5, 6 + n, 7], temperature=0, max_new_tokens=5, ignore_eos=True)
            for n in range(7)]  # fmt: skip
    small = Engine(model, max_batch=5)
    small.generate(reqs)
    assert small._native is not None and small._native.packed is None
    packed, rows = Engine(model), Engine(model, pack_weights=False)
    a, b = packed.generate(reqs), rows.generate(reqs)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert rows._native.packed is None and packed._native.packed
    cfg = model.config
    h, D, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = [((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D, h),
              (h, cfg.num_attention_heads * D), (2 * inter, h), (h, inter)]  # fmt: skip
    per_layer = sum(-(-n // 6) * 6 * k for n, k in shapes)  # whole tiles of 6 rows
    expect = 4 * (cfg.num_hidden_layers * per_layer + -(-cfg.vocab_size // 6) * 6 * h)
    assert packed._native.pack() == expect  # idempotent: the bytes it already holds


@pytest.mark.parametrize("update", ["fused_adamw", "no_grad_mul", "load_state_dict"])
def test_packed_weights_follow_in_place_updates(update):
    """After the weights change in place (an optimizer step, which torch's fused AdamW does
    without bumping version counters, or writes under no_grad), the next batched step packs
    again: tokens equal an engine that reads the weights in place."""
    model = _model()
    reqs = [Request([5, 6 + n, 7], temperature=0, max_new_tokens=6, ignore_eos=True)
            for n in range(7)]  # fmt: skip
    eng = Engine(model)
    eng.generate(reqs)
    first = eng._native.packed[0]
    g = torch.Generator().manual_seed(3)
    if update == "fused_adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    else:
        with torch.no_grad():
            if update == "no_grad_mul":
                model.layers[2].mlp.up_proj.weight.mul_(-3.0)
            else:
                sd = {k: v + 0.1 * torch.randn(v.shape, generator=g)
                      for k, v in model.state_dict().items()}  # fmt: skip
                model.load_state_dict(sd)
    got = [r.token_ids for r in eng.generate(reqs)]
    assert eng._native.packed[0] is not first  # packed again
    assert got == [r.token_ids for r in Engine(model, pack_weights=False).generate(reqs)]


def test_bfloat16_weights_pack_and_follow_updates():
    """bfloat16 weights pack at 6+ sequences (their int16 kernel views are made under the
    engine's inference mode, yet must keep the weights' version counters) and are packed
    again after an in-place write: tokens equal an engine that reads them in place."""
    model = _model().to(torch.bfloat16)
    reqs = [Request([5, 6 + n, 7], temperature=0, max_new_tokens=5, ignore_eos=True)
            for n in range(7)]  # fmt: skip
    eng = Engine(model)
    got = [r.token_ids for r in eng.generate(reqs)]
    assert eng._native.packed
    assert got == [r.token_ids for r in Engine(model, pack_weights=False).generate(reqs)]
    first = eng._native.packed[0]
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight.mul_(-3.0)
    got = [r.token_ids for r in eng.generate(reqs)]
    assert eng._native.packed[0] is not first  # packed again
    assert got == [r.token_ids for r in Engine(model, pack_weights=False).generate(reqs)]


def test_packing_skipped_when_memory_is_short(monkeypatch):
    """Packing needing more than half of the available memory is skipped with a warning that
    says how much; the engine then reads the weights in place (same tokens)."""
    from geode.infer import native as N

    model = _model()
    reqs = [Request([5, 6 + n], temperature=0, max_new_tokens=4, ignore_eos=True)
            for n in range(6)]  # fmt: skip
    monkeypatch.setattr(N, "_available_memory", lambda: 100_000)
    eng = Engine(model)
    with pytest.warns(UserWarning, match=r"needs \d+ MiB, more than half of the 0 MiB"):
        got = [r.token_ids for r in eng.generate(reqs)]
    assert eng._native.packed is None and "in place" in eng._native.pack_refused
    assert got == [r.token_ids for r in Engine(model, pack_weights=False).generate(reqs)]


def test_engine_falls_back_for_unsupported_models_and_rebuilds_after_changes():
    biased = _model(attention_bias=True)
    assert "bias" in NativeDecoder.why_not(biased)
    eng = Engine(biased)
    r = eng.generate(Request([5, 6, 7], temperature=0, max_new_tokens=5, ignore_eos=True))[0]
    assert eng._native is None and len(r.token_ids) == 5
    # weights replaced after the engine was built: the next admission rebuilds the plan
    model = _model()
    eng = Engine(model)
    req = Request([5, 6, 7], temperature=0, max_new_tokens=6, ignore_eos=True)
    eng.generate(req)
    first = eng._native
    quantize(model, "int8")
    got = eng.generate(req)[0].token_ids
    assert eng._native is not first and eng._native.model.layer[0].qkv.kind == 2
    assert got == Engine(model, native=False).generate(req)[0].token_ids


@pytest.mark.parametrize("V", [1, 7, 8, 300, 4099])
def test_kernel_argmax_equals_torch_ties_nan_inf(V):
    """Greedy sampling's argmax: first index on ties, the first NaN if any, -inf rows."""
    g = torch.Generator().manual_seed(V)
    z = torch.randint(0, 3, (6, V), generator=g).float()  # many ties
    z[1] = torch.randn(V, generator=g)
    z[2, V // 2] = float("nan")
    z[3] = float("-inf")
    z[4, -1] = float("nan")
    assert torch.equal(kernels.argmax(z), z.argmax(-1))
    assert torch.equal(kernels.argmax(z[::2]), z[::2].argmax(-1))  # row stride
