"""Merging (WARP): SLERP against the rotation closed form, endpoints, the iterative M = 3 merge,
EMA and LITI against their formulas, dtypes, and errors naming the tensor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from geode.post.merge import ema_update, lerp, liti, slerp, slerp_merge


def _basis(n: int = 6) -> torch.Tensor:
    """An orthonormal basis of R^n in a random orientation (rows)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0)))
    return q.T


def _state(init: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w": (init + delta).view(2, 3), "step": torch.tensor([3])}


def test_slerp_equals_the_rotation_of_task_vectors():
    """Task vectors of norm 2 at angle theta: SLERP rotates from one to the other at constant norm."""
    e = _basis()
    init = torch.randn(6, generator=torch.Generator().manual_seed(1))
    theta = math.pi / 3
    d1, d2 = 2 * e[0], 2 * (math.cos(theta) * e[0] + math.sin(theta) * e[1])
    a, b, i = _state(init, d1), _state(init, d2), _state(init, torch.zeros(6))
    for lam in (0.0, 0.25, 0.5, 0.8, 1.0):
        got = slerp(i, a, b, lam)
        want = init + 2 * (math.cos(lam * theta) * e[0] + math.sin(lam * theta) * e[1])
        torch.testing.assert_close(got["w"].view(-1), want, atol=1e-5, rtol=0)
        assert torch.equal(got["step"], torch.tensor([3]))
    torch.testing.assert_close(slerp(i, a, b, 0.0)["w"], a["w"], atol=1e-6, rtol=0)
    torch.testing.assert_close(slerp(i, a, b, 1.0)["w"], b["w"], atol=1e-6, rtol=0)
    mid = slerp(i, a, b, 0.5)["w"].view(-1) - init
    assert mid.norm().item() == pytest.approx(2.0, abs=1e-5)  # LERP would shrink it to 2 cos(30°)


def test_slerp_of_parallel_or_zero_task_vectors_is_linear():
    e = _basis()
    init = torch.zeros(6)
    i = _state(init, init)
    a, b = _state(init, e[0]), _state(init, 3 * e[0])
    torch.testing.assert_close(slerp(i, a, b, 0.5)["w"].view(-1), 2 * e[0])
    torch.testing.assert_close(slerp(i, i, b, 0.25)["w"].view(-1), 0.75 * e[0])


def test_iterative_merge_of_three():
    """M = 3 orthogonal unit task vectors: slerp(slerp(d1, d2, 1/2), d3, 1/3)."""
    e = _basis()
    init = torch.randn(6, generator=torch.Generator().manual_seed(2))
    i = _state(init, torch.zeros(6))
    models = [_state(init, e[k]) for k in range(3)]
    got = slerp_merge(i, models)["w"].view(-1) - init
    half = (e[0] + e[1]) / math.sqrt(2)  # step 2: 45° between two orthogonal unit vectors
    want = math.cos(math.pi / 6) * half + math.sin(math.pi / 6) * e[2]  # step 3: 1/3 of 90°
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(slerp_merge(i, models[:1])["w"], models[0]["w"])
    with pytest.raises(ValueError, match="no models"):
        slerp_merge(i, [])


def test_liti_and_lerp_against_formulas():
    g = torch.Generator().manual_seed(3)
    init = {"w": torch.randn(4, 5, generator=g), "n": torch.arange(3)}
    merged = {"w": torch.randn(4, 5, generator=g), "n": torch.arange(3)}
    for eta in (0.0, 0.3, 1.0):
        out = liti(init, merged, eta)
        torch.testing.assert_close(out["w"], (1 - eta) * init["w"] + eta * merged["w"])
        assert torch.equal(out["n"], init["n"])
    torch.testing.assert_close(lerp(init, merged, 0.7)["w"], 0.3 * init["w"] + 0.7 * merged["w"])


def test_bfloat16_keeps_dtype_with_float32_math():
    a = {"w": torch.full((3,), 1.0, dtype=torch.bfloat16)}
    b = {"w": torch.full((3,), 1.0 + 2**-6, dtype=torch.bfloat16)}
    out = lerp(a, b, 0.5)["w"]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.full((3,), 1.0 + 2**-7))


def test_ema_update_against_formula():
    torch.manual_seed(0)
    ema, model = nn.Linear(4, 3), nn.Linear(4, 3)
    ema.register_buffer("count", torch.tensor(5))
    model.register_buffer("count", torch.tensor(5))
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    weight, ptr = ema.weight, ema.weight.data_ptr()
    ema_update(ema, model, 0.01)
    for k, v in ema.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.99 * before[k] + 0.01 * model.state_dict()[k])
    assert ema.weight is weight and ema.weight.data_ptr() == ptr  # updated in place
    ema_update(ema, model, 1.0)
    torch.testing.assert_close(ema.weight, model.weight)
    model.count.fill_(6)
    with pytest.raises(ValueError, match="'count' differs"):
        ema_update(ema, model, 0.5)
    with pytest.raises(ValueError, match="mu must be in"):
        ema_update(ema, model, 1.5)


def test_mismatches_name_the_tensor():
    a = {"x": torch.zeros(2), "y": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"lacks tensors \['y'\]"):
        lerp(a, {"x": torch.zeros(2)}, 0.5)
    with pytest.raises(ValueError, match=r"tensor 'y' has shape \(4,\)"):
        slerp(a, a, {"x": torch.zeros(2), "y": torch.zeros(4)}, 0.5)
    with pytest.raises(ValueError, match="non-float tensor 'n' differs"):
        liti({"n": torch.tensor([1])}, {"n": torch.tensor([2])}, 0.5)
