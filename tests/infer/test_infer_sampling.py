"""Sampling on a fixed logit vector: kept sets exactly, frequencies statistically, penalties."""

from __future__ import annotations

import math

import pytest
import torch

from geode.infer.sampling import (
    SamplingParams,
    apply_penalties,
    filter_logits,
    sample_from_logits,
)

# probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 (sum 1)
PROBS = torch.tensor([0.25, 0.06, 0.4, 0.04, 0.15, 0.1])
LOGITS = PROBS.log()


def _kept(**kw) -> set[int]:
    args = {k: torch.tensor([v]) for k, v in kw.items()}
    z = filter_logits(LOGITS[None].clone(), **args)[0]
    return set(torch.nonzero(torch.isfinite(z)).flatten().tolist())


def test_kept_sets():
    assert _kept(top_k=torch.tensor(2)) == {2, 0}
    assert _kept(top_k=torch.tensor(0)) == set(range(6))
    assert _kept(top_k=torch.tensor(100)) == set(range(6))
    # nucleus: 0.4 < 0.5 so the second token is needed; 0.65 >= 0.5 stops
    assert _kept(top_p=torch.tensor(0.5)) == {2, 0}
    assert _kept(top_p=torch.tensor(0.39)) == {2}
    assert _kept(top_p=torch.tensor(0.01)) == {2}  # the top token is always kept
    assert _kept(top_p=torch.tensor(0.81)) == {2, 0, 4, 5}
    assert _kept(top_p=torch.tensor(1.0)) == set(range(6))
    # min-p: p >= 0.3 * 0.4 = 0.12
    assert _kept(min_p=torch.tensor(0.3)) == {2, 0, 4}
    assert _kept(min_p=torch.tensor(1.0)) == {2}
    assert _kept(top_k=torch.tensor(3), top_p=torch.tensor(0.7)) == {2, 0}


def _frequencies(n: int, **kw) -> torch.Tensor:
    """Empirical distribution of n draws, batched as n rows with their own uniforms."""
    args = {k: torch.full((n,), v) for k, v in kw.items()}
    z = filter_logits(LOGITS.expand(n, 6).clone(), **args)
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.bincount(sample_from_logits(z, u), minlength=6).float() / n


@pytest.mark.parametrize(
    "kw,keep",
    [
        ({}, [0, 1, 2, 3, 4, 5]),
        ({"top_k": 3}, [2, 0, 4]),
        ({"top_p": 0.85}, [2, 0, 4, 5]),
        ({"min_p": 0.3}, [2, 0, 4]),
    ],
)
def test_sampled_frequencies_match_renormalised_distribution(kw, keep):
    n = 40_000
    freq = _frequencies(n, **kw)
    expected = torch.zeros(6)
    expected[keep] = PROBS[keep] / PROBS[keep].sum()
    # every token within 5 standard errors; dropped tokens never drawn
    se = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * se + 1e-9).all(), (freq, expected)
    chi2 = (((freq - expected) ** 2 / expected.clamp(min=1e-12))[keep]).sum().item() * n
    assert chi2 < 30  # chi-square with <= 5 dof: p ~ 1e-5


def test_temperature_scales_logits():
    n = 40_000
    z = filter_logits((LOGITS / 0.5).expand(n, 6).clone())
    u = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    freq = torch.bincount(sample_from_logits(z, u), minlength=6).float() / n
    expected = (LOGITS / 0.5).softmax(-1)
    assert (freq - expected).abs().max() < 0.01


def test_same_uniform_same_draw_whatever_the_batch():
    u = torch.tensor([0.3, 0.77], dtype=torch.float64)
    other = torch.randn(3, 6)
    a = sample_from_logits(LOGITS[None], u[:1])
    b = sample_from_logits(
        torch.cat([other[:1], LOGITS[None], other[1:]]),
        torch.tensor([0.9, 0.3, 0.1, 0.5], dtype=torch.float64),
    )
    assert a[0] == b[1]


def test_penalties():
    z = torch.tensor([2.0, -1.0, 0.5, 3.0])
    counts = torch.tensor([2.0, 1.0, 0.0, 0.0])
    seen = torch.tensor([True, True, False, True])  # token 3 only in the prompt
    out = apply_penalties(z.clone(), counts, seen, 2.0, 0.0, 0.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 1.5]
    out = apply_penalties(z.clone(), counts, seen, 1.0, 0.5, 0.25)
    assert out.tolist() == [2.0 - 0.5 - 0.5, -1.0 - 0.5 - 0.25, 0.5, 3.0]


def test_params_validation_messages_name_the_field():
    for kw, field in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                      ({"top_k": -2}, "top_k"), ({"min_p": -0.1}, "min_p"),
                      ({"min_new_tokens": 9, "max_new_tokens": 3}, "min_new_tokens"),
                      ({"temperature": math.nan}, "temperature"), ({"seed": 1.5}, "seed")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw).validate()
