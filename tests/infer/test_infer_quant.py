"""Weight-only quantization and the CPU decode kernels: numerics against dequantized / plain
references, perplexity change on a briefly trained model, and the optimized model's parity."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import geode
from geode.infer import Engine, Request, kernels
from geode.infer.optimize import optimize_for_decode, restore
from geode.infer.quant import (
    QuantLinear,
    dequantize_int4,
    quantize,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"{kernels.load_error()}")


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_quantized_matmul_equals_dequantized_reference(mode, group, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(72, 256, generator=g) * 0.05
    q = QuantLinear.from_weight(w, mode, group or 64, bias=torch.randn(72, generator=g))
    x = torch.randn(rows, 256, generator=g)
    with torch.no_grad():
        y = q(x)
    ref = x @ q.dequantized().t() + q.bias
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (q.dequantized() - w).abs().max() < (0.05 * 8 / (127 if mode == "int8" else 7.5))


@needs_kernels
@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 2, 7, 23, 64])
def test_quantized_kernels_in_one_call_equal_dequantized(mode, group, rows):
    """One gemv call over 1..64 rows, two weights sharing x (rows path and GEMM path)."""
    g = torch.Generator().manual_seed(rows)
    w1, w2 = torch.randn(70, 384, generator=g) * 0.05, torch.randn(13, 384, generator=g) * 0.05
    q1, q2 = (QuantLinear.from_weight(w, mode, group or 64) for w in (w1, w2))
    x = torch.randn(rows, 384, generator=g)
    y = kernels.gemv(x, kernels.GemvPlan([q1.kernel_spec(), q2.kernel_spec()]))
    ref = torch.cat([x @ q1.dequantized().t(), x @ q2.dequantized().t()], 1)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_int4_packing_round_trip_and_error_bound():
    w = torch.randn(16, 128) * 0.1
    packed, scale, mins = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 64)
    assert scale.dtype == torch.float16 and scale.shape == (16, 4)
    q = unpack_int4(packed)
    assert q.max() <= 15
    deq = dequantize_int4(packed, scale, mins, 32)
    # round to nearest: at most half a step per weight (plus float16 rounding of s and m)
    step = scale.float().repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-3).all()
    q8, s8 = quantize_int8(w)
    assert ((q8.float() * s8[:, None] - w).abs() <= s8[:, None] / 2 + 1e-7).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 16, 23, 64])  # rows path below 6, GEMM path above
@pytest.mark.parametrize("packed", [False, True])
def test_float_kernels_equal_torch(dtype, rows, packed):
    # odd sizes: scalar tails; 130 rows = 21 tiles of 6 + 4 padded rows, groups of 8 tiles
    # split across the two weights' boundary; 200 columns = slices of 128 + 72
    w = torch.randn(130, 200).to(dtype)
    w2 = torch.randn(47, 200).to(dtype)
    kind = "f32" if dtype == torch.float32 else "bf16"
    specs = [kernels.WeightSpec(kind, t if dtype == torch.float32 else t.view(torch.int16))
             for t in (w, w2, w)]  # fmt: skip
    x = torch.randn(rows, 200)
    y = kernels.gemv(x, kernels.GemvPlan(specs, packed=packed))
    ref = torch.cat([x @ t.float().t() for t in (w, w2, w)], dim=1)
    assert (y - ref).abs().max() < 1e-4


@needs_kernels
def test_pack_refuses_quantized_weights():
    q = quantize_int8(torch.randn(12, 64))
    with pytest.raises(ValueError, match="only float32 / bfloat16"):
        kernels.pack(kernels.WeightSpec("i8", q[0], q[1]))


def test_optimized_model_equals_plain(model):
    model = restore(copy.deepcopy(model))  # the plain classes, whatever other tests did
    fast = optimize_for_decode(copy.deepcopy(model))
    assert list(fast.state_dict()) == list(model.state_dict())
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (fast(ids) - model(ids)).abs().max() < 1e-5
        assert (fast(ids[:1, :3]) - model(ids[:1, :3])).abs().max() < 1e-5  # kernel-sized
    copy.deepcopy(fast)  # kernel caches are not copied
    out = fast(ids)  # autograd on: the plain forward, gradients flow
    out.sum().backward()
    assert fast.layers[0].mlp.gate_proj.weight.grad is not None
    assert type(restore(fast).layers[0].mlp).__name__ == "GatedMLP"


def _trained_tiny(steps: int = 50) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny model trained briefly on a noisy periodic sequence (confident, non-trivial)."""
    cfg = geode.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                            max_position_embeddings=128)  # fmt: skip
    model = geode.build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)

    def batch(n: int) -> torch.Tensor:
        start = torch.randint(0, 7, (n, 1), generator=g)
        seq = (start + torch.arange(48)) % 7 * 3 + 3  # period 7 over ids 3..21
        noise = torch.rand(seq.shape, generator=g) < 0.1
        return torch.where(noise, torch.randint(3, 64, seq.shape, generator=g), seq)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = batch(8)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), batch(32), loss.detach()


def _ppl(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(x[:, :-1]).float()
    return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()))


def test_perplexity_change_of_quantization_is_small():
    model, held, _ = _trained_tiny()
    base = _ppl(model, held)
    assert base < 10  # it learned something (uniform would be 64)
    p8 = _ppl(quantize(copy.deepcopy(model), "int8"), held)
    p4 = _ppl(quantize(copy.deepcopy(model), "int4", 32), held)
    assert abs(p8 / base - 1) < 0.01
    assert abs(p4 / base - 1) < 0.10


def test_quantized_model_generates(model):
    q = quantize(copy.deepcopy(model), "int8")
    r = Engine(q).generate(Request([5, 6, 7], temperature=0, max_new_tokens=6, ignore_eos=True))
    ref = Engine(copy.deepcopy(model)).generate(
        Request([5, 6, 7], temperature=0, max_new_tokens=6, ignore_eos=True)
    )
    assert len(r[0].token_ids) == 6
    assert r[0].token_ids[:2] == ref[0].token_ids[:2]  # int8 is close to float on the first steps


def test_bad_quantization_arguments(model):
    with pytest.raises(ValueError, match="group_size"):
        quantize(copy.deepcopy(model), "int4", 48)
    with pytest.raises(ValueError, match="mode"):
        quantize(copy.deepcopy(model), "int3")
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize(copy.deepcopy(model), "int4", 128)  # widths 64 and 96
