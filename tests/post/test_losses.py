"""Loss parity with TRL: DPOTrainer's sigmoid / hinge / IPO (and its cDPO form with label
smoothing) and RewardTrainer's Bradley-Terry loss with margin and centering, computed by TRL's
own methods on the same random tensors."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import DPOTrainer, RewardTrainer

from geode.post import preference_loss, reward_loss

B, T = 6, 5  # pairs, completion positions given to TRL


class _Accel:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


class _LogProbModel(torch.nn.Module):
    """Stands in for the policy: returns the given per-token log-probs as TRL's fused head does."""

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        self.log_probs = log_probs  # (2B, T - 1): [chosen; rejected]

    def forward(self, **_):
        n, t = self.log_probs.shape
        return SimpleNamespace(
            log_probs=self.log_probs,
            entropy=torch.zeros(n, t),
            mean_logits=torch.zeros(n, t),
            is_top1=torch.zeros(n, t, dtype=torch.bool),
        )


def _trl_dpo(loss_type, beta, eps, pc, pr, rc, rr, lengths=None):
    """TRL's DPOTrainer._compute_loss on a batch whose summed log-probs are pc/pr (ref rc/rr).

    `lengths` (2B,): completion tokens per sequence (TRL's IPO divides by them); default 1.
    """
    n = pc.shape[0]
    lengths = torch.ones(2 * n, dtype=torch.long) if lengths is None else lengths
    mask = (torch.arange(T).expand(2 * n, T) >= T - lengths[:, None]).long()  # (2B, T)
    per_token = torch.zeros(2 * n, T - 1, dtype=torch.float64)
    per_token[:, -1] = torch.cat([pc, pr])  # the whole sum on the last completion token
    me = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accel(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * n, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, T, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    return DPOTrainer._compute_loss(me, _LogProbModel(per_token), inputs, return_outputs=False)


def _per_pair(fn, *tensors):
    """TRL's batch-mean loss evaluated one pair at a time: per-pair losses (B,)."""
    return torch.stack([fn(*(t[i : i + 1] for t in tensors)) for i in range(tensors[0].shape[0])])


def _logps(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize(
    ("kind", "trl_kind"), [("dpo", "sigmoid"), ("ipo", "ipo"), ("slic", "hinge")]
)
def test_preference_loss_equals_trl(kind, trl_kind, beta):
    pc, pr, rc, rr = _logps(int(beta * 10))
    ours = preference_loss(pc, pr, rc, rr, beta=beta, kind=kind)
    assert ours.shape == (B,)
    theirs = _per_pair(lambda *t: _trl_dpo(trl_kind, beta, 0.0, *t), pc, pr, rc, rr)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    batch = _trl_dpo(trl_kind, beta, 0.0, pc, pr, rc, rr)  # TRL's mean over the batch
    torch.testing.assert_close(ours.mean(), batch, atol=1e-6, rtol=0)
    assert theirs.std() > 0  # the inputs exercise different losses per pair


def test_ipo_length_normalised_equals_trl():
    """TRL's IPO averages over completion tokens: our loss on length-averaged log-probs."""
    pc, pr, rc, rr = _logps(7)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=torch.Generator().manual_seed(1))
    lc, lr = lengths[:B].double(), lengths[B:].double()
    ours = preference_loss(pc / lc, pr / lr, rc / lc, rr / lr, beta=0.3, kind="ipo")
    theirs = _trl_dpo("ipo", 0.3, 0.0, pc, pr, rc, rr, lengths=lengths)
    torch.testing.assert_close(ours.mean(), theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothed_dpo_equals_trl(eps):
    """cDPO: TRL 1.16's sigmoid no longer smooths; its `aot` loss is the smoothed sigmoid on
    sorted log-ratios, which for one pair is exactly -(1-eps) logsig(bh) - eps logsig(-bh)."""
    pc, pr, rc, rr = _logps(3)
    ours = preference_loss(pc, pr, rc, rr, beta=0.2, kind="dpo", label_smoothing=eps)
    theirs = _per_pair(lambda *t: _trl_dpo("aot", 0.2, eps, *t), pc, pr, rc, rr)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    plain = preference_loss(pc, pr, rc, rr, beta=0.2, kind="dpo")
    assert not torch.allclose(ours, plain)


class _RewardModel(torch.nn.Module):
    """Stands in for the reward model: returns the given scores as (2B, 1) logits."""

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores = scores

    def forward(self, **_):
        return SimpleNamespace(logits=self.scores[:, None])


def _trl_reward(center, rc, rr, margin=None):
    """TRL's RewardTrainer.compute_loss on chosen/rejected rewards (batch mean)."""
    me = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accel(),
        args=SimpleNamespace(center_rewards_coefficient=center),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(2 * rc.shape[0], 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(me, _RewardModel(torch.cat([rc, rr])), inputs)


@pytest.mark.parametrize("center", [None, 0.01, 0.5])
@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_equals_trl(center, with_margin):
    g = torch.Generator().manual_seed(11)
    rc, rr = (3 * torch.randn(B, generator=g, dtype=torch.float64) for _ in range(2))
    margin = torch.rand(B, generator=g, dtype=torch.float64) if with_margin else None
    ours = reward_loss(rc, rr, margin=margin, center_coef=center or 0.0)
    assert ours.shape == (B,)
    tensors = (rc, rr) if margin is None else (rc, rr, margin)
    theirs = _per_pair(lambda *t: _trl_reward(center, *t), *tensors)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.mean(), _trl_reward(center, rc, rr, margin), atol=1e-6, rtol=0)


def test_losses_have_gradients_and_reject_bad_input():
    pc = torch.randn(B, requires_grad=True)
    pr, rc, rr = torch.randn(3, B).unbind(0)
    preference_loss(pc, pr, rc, rr, beta=0.1).sum().backward()
    assert pc.grad is not None and pc.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="kind"):
        preference_loss(pc, pr, rc, rr, beta=0.1, kind="kto")
    with pytest.raises(ValueError, match="beta"):
        preference_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(pc, pr, rc, rr, beta=0.1, kind="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="ref_rejected"):
        preference_loss(pc, pr, rc, rr[:3], beta=0.1)
    with pytest.raises(ValueError, match="margin"):
        reward_loss(rc, rr, margin=torch.zeros(2))
