"""Optimizer groups and learning-rate schedules, against torch's own schedulers."""

from __future__ import annotations

import math

import pytest
import torch

import geode
from geode.train.optim import build_optimizer, lr_at, param_groups
from geode.train.recipe import OptimSection


def test_no_weight_decay_on_norms_and_embeddings():
    model = geode.build_model(geode.get_preset("nano-1m"), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" not in names[id(p)] and "embed" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"embed_tokens.weight", "norm.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
def test_adamw_kernels_agree(impl):
    """fused / foreach / for-loop AdamW give the same update as torch's reference AdamW."""
    torch.manual_seed(0)
    model = geode.build_model(geode.get_preset("nano-1m").replace(num_hidden_layers=1), seed=0)
    ref = geode.build_model(geode.get_preset("nano-1m").replace(num_hidden_layers=1), seed=0)
    cfg = OptimSection(lr=1e-2, weight_decay=0.1, impl=impl)
    opt = build_optimizer(model, cfg)
    ref_opt = torch.optim.AdamW(
        param_groups(ref, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False
    )
    ids = torch.randint(0, 2048, (2, 16))
    for m, o in ((model, opt), (ref, ref_opt)):
        for _ in range(2):
            m(ids).float().logsumexp(-1).mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_warmup_then_cosine_matches_torch_cosine_annealing():
    cfg = OptimSection(lr=1.0, min_lr_ratio=0.1, schedule="cosine", warmup_steps=4)
    max_steps = 24
    assert [lr_at(s, cfg, max_steps) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    span = max_steps - 4 - 1
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=span, eta_min=0.1)
    for s in range(4, max_steps):
        assert lr_at(s, cfg, max_steps) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()
    assert lr_at(max_steps - 1, cfg, max_steps) == pytest.approx(0.1)


def test_wsd_is_stable_then_decays_linearly():
    cfg = OptimSection(
        lr=2.0, min_lr_ratio=0.0, schedule="wsd", warmup_steps=2, decay_fraction=0.25
    )
    lrs = [lr_at(s, cfg, 22) for s in range(22)]
    assert lrs[:2] == [1.0, 2.0]
    assert lrs[2:17] == [2.0] * 15  # stable until the last 25% of the 20 post-warmup steps
    decay = lrs[17:]
    assert decay == pytest.approx([2.0 * (1 - k / 5) for k in range(1, 6)])
    assert lrs[-1] == 0.0


def test_constant_schedule():
    cfg = OptimSection(lr=0.5, schedule="constant")
    assert {lr_at(s, cfg, 10) for s in range(10)} == {0.5}
    assert math.isclose(lr_at(0, OptimSection(lr=0.5, warmup_steps=5), 10), 0.1)
