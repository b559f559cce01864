"""Policy-loss parity with TRL: GRPOTrainer._compute_loss (TRL's own code, on a stub trainer whose
log-prob function returns the given tensors) against geode.post.policy_loss for every loss type,
both importance levels and beta > 0; advantages and KL estimators against their definitions."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from geode.post import policy_loss
from geode.post.policy import group_advantages, kl_estimate, policy_terms

B, L = 6, 7  # sequences, completion length (TRL's max_completion_length)


class _Accel:
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(logps, old, adv, mask, *, loss_type, eps, eps_high, ref, beta, importance):
    """TRL's GRPOTrainer._compute_loss on a stub `self` whose policy log-probs are `logps`."""
    me = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accel(),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps,
        epsilon_high=eps if eps_high is None else eps_high,
        use_vllm=False,
        max_completion_length=L,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, L, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(me, None, inputs)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}


def _inputs(seed: int, token_adv: bool):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3  # (B, L)
    old = logps + 0.3 * torch.randn(
        B, L, generator=g, dtype=torch.float64
    )  # ratios beyond 1 +- eps
    ref = logps + 0.5 * torch.randn(B, L, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 6, 3, 5])
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()  # (B, L), right padding
    shape = (B, L) if token_adv else (B,)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    return logps, old, ref, mask, adv


CASES = [
    (lt, imp, beta, eps_high, token_adv)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo")
    for imp in ("token", "sequence")
    for beta, eps_high, token_adv in ((0.0, None, False), (0.04, 0.28, False), (0.1, None, True))
]


@pytest.mark.parametrize("loss_type,importance,beta,eps_high,token_adv", CASES)
def test_policy_loss_equals_trl(loss_type, importance, beta, eps_high, token_adv):
    logps, old, ref, mask, adv = _inputs(len(loss_type) + 3 * (importance == "token"), token_adv)
    mine = logps.clone().requires_grad_(True)
    theirs = logps.clone().requires_grad_(True)
    kw = dict(ref=ref, beta=beta, eps=0.2, eps_high=eps_high, importance=importance)
    t_loss, t_metrics = _trl_loss(theirs, old, adv, mask, loss_type=loss_type, **kw)
    loss, metrics = policy_loss(
        mine,
        old,
        adv,
        mask,
        loss_type=loss_type,
        epsilon=0.2,
        epsilon_high=eps_high,
        ref_logps=ref if beta else None,
        beta=beta,
        importance=importance,
    )
    assert abs(loss.item() - t_loss.item()) < 1e-6
    assert loss.item() != 0.0
    t_loss.backward()
    loss.backward()
    torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=0)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[name].item() == pytest.approx(t_metrics[name], abs=1e-6), name
    if beta:
        assert metrics["kl"].item() == pytest.approx(t_metrics["kl"], abs=1e-6)


def test_clipping_is_exercised_and_ratio_stats():
    """The parity cases clip on both sides; ratio stats follow the masked ratios."""
    logps, old, _, mask, adv = _inputs(0, True)
    _, m = policy_loss(logps, old, adv, mask, loss_type="grpo")
    assert 0 < m["clip_ratio/low_mean"] < 1 and 0 < m["clip_ratio/high_mean"] < 1
    w = torch.exp(logps - old)[mask.bool()]
    assert m["ratio/mean"].item() == pytest.approx(w.mean().item())
    assert m["ratio/min"].item() == pytest.approx(w.min().item())
    assert m["ratio/max"].item() == pytest.approx(w.max().item())


def test_policy_terms_sum_to_the_dapo_loss():
    """policy_terms' masked terms and token count give the dapo / bnpo loss (the trainer's seam)."""
    logps, old, ref, mask, adv = _inputs(1, False)
    terms, sums = policy_terms(logps, old, adv, mask, loss_type="dapo", ref_logps=ref, beta=0.1)
    loss, _ = policy_loss(logps, old, adv, mask, loss_type="dapo", ref_logps=ref, beta=0.1)
    assert terms.shape == (B, L) and bool((terms[mask == 0] == 0).all())
    assert sums["tokens"].item() == mask.sum().item()
    assert (terms.sum() / sums["tokens"]).item() == pytest.approx(loss.item(), abs=1e-12)


def test_on_policy_gradient_is_reinforce():
    """With old = logps (w = 1, no clipping) the gradient is -A / n_tokens per token (grpo)."""
    logps, _, _, mask, adv = _inputs(2, False)
    x = logps.clone().requires_grad_(True)
    loss, _ = policy_loss(x, logps, adv, mask, loss_type="grpo")
    loss.backward()
    expected = -adv[:, None] * mask / mask.sum(-1, keepdim=True) / B
    torch.testing.assert_close(x.grad, expected.to(x.dtype))


def test_kl_estimators_against_formulas():
    logps, _, ref, _, _ = _inputs(3, False)
    for i in range(B):
        for j in range(L):
            p, q = logps[i, j].item(), ref[i, j].item()
            r = math.exp(q - p)  # pi_ref / pi
            assert kl_estimate(logps, ref, "k1")[i, j].item() == pytest.approx(-math.log(r))
            assert kl_estimate(logps, ref, "k3")[i, j].item() == pytest.approx(r - 1 - math.log(r))
    # both are unbiased estimates of KL(p || q) under samples of p: compare on a categorical
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        est = (p * kl_estimate(p.log()[None], q.log()[None], kind)[0]).sum()
        assert est.item() == pytest.approx(exact.item(), abs=1e-12)
    assert bool((kl_estimate(logps, ref, "k3") >= 0).all())


def _grouped(rewards, k):
    return rewards.view(-1, k)


def test_group_advantages_against_definitions():
    g = torch.Generator().manual_seed(0)
    k = 4
    r = torch.randint(0, 3, (12,), generator=g).float()
    r[:4] = 1.0  # a group with equal rewards: advantage 0
    grp = _grouped(r, k)
    mean = grp.mean(1).repeat_interleave(k)
    # GRPO as TRL's GRPOTrainer computes it (its nanstd: unbiased; + 1e-4)
    std_g = nanstd(grp, dim=1).repeat_interleave(k)
    std_b = nanstd(r)
    for scale, want in (
        ("group", (r - mean) / (std_g + 1e-4)),
        ("batch", (r - mean) / (std_b + 1e-4)),
        ("none", r - mean),
    ):
        got = group_advantages(r, k, estimator="grpo", scale=scale)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert bool((group_advantages(r, k)[:4] == 0).all())
    # RLOO: r_i - mean of the other k - 1 samples of the group
    loo = torch.tensor(
        [r[i] - (grp[i // k].sum() - r[i]) / (k - 1) for i in range(len(r))], dtype=torch.float32
    )
    torch.testing.assert_close(group_advantages(r, k, estimator="rloo", scale="none"), loo)
    # REINFORCE with the batch-mean baseline
    torch.testing.assert_close(
        group_advantages(r, k, estimator="reinforce", scale="none"), r - r.mean()
    )
    torch.testing.assert_close(
        group_advantages(r, k, estimator="reinforce", scale="batch"),
        (r - r.mean()) / (r.std() + 1e-4),
    )


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(loss_type="ppo"), "loss_type must be one of"),
        (dict(importance="tok"), "importance must be one of"),
        (dict(kl="k2"), "kl must be one of"),
        (dict(beta=0.1), "beta > 0 needs ref_logps"),
        (dict(beta=-1.0), "beta must be >= 0"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(old=torch.zeros(B, L + 1)), "old_logps has shape"),
        (dict(mask=torch.ones(B + 1, L)), "mask has shape"),
        (dict(adv=torch.zeros(B + 1)), "advantages must be"),
        (dict(ref_logps=torch.zeros(B, 2)), "ref_logps has shape"),
        (dict(logps=torch.zeros(B)), "logps must be"),
    ],
)
def test_bad_input_is_a_clear_error(change, match):
    logps, old, _, mask, adv = _inputs(4, False)
    args = {"logps": logps, "old": old, "adv": adv, "mask": mask}
    args.update({k: change.pop(k) for k in list(change) if k in args})
    with pytest.raises(ValueError, match=match):
        policy_loss(args["logps"], args["old"], args["adv"], args["mask"], **change)


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="estimator must be one of"):
        group_advantages(torch.zeros(8), 4, estimator="ppo")
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.zeros(8), 4, scale="global")
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        group_advantages(torch.zeros(8), 1, estimator="rloo")
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)
