"""Pairwise losses of post-training, on per-pair tensors, each returning per-pair losses.

`preference_loss` works on summed sequence log-probabilities of the chosen (y+) and rejected
(y-) responses under the policy pi and the frozen reference pi_ref, with the implicit reward
margin h = log[pi(y+) pi_ref(y-) / (pi_ref(y+) pi(y-))]:

  dpo   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        (DPO, Rafailov et al. 2023, arXiv:2305.18290, eq. 7; eps > 0 is the conservative
        DPO of Mitchell 2023, labels flipped with probability eps)
  ipo   (h - 1 / (2 beta))^2          (IPO, Azar et al. 2023, arXiv:2310.12036, eq. 17)
  slic  max(0, 1 - beta h)            (SLiC-HF, Zhao et al. 2023, arXiv:2305.10425, eq. 2,
        calibration term with delta = 1 on the log-ratio, TRL's "hinge")

TRL's IPO divides each log-ratio by the completion length first; pass length-averaged
log-probs to get that form.

`reward_loss` is the Bradley-Terry loss of a scalar reward model,
  -log sigmoid(r+ - r- - margin) + center_coef (r+ + r-)^2
(InstructGPT, Ouyang et al. 2022, eq. 1; the margin of Llama 2, Touvron et al. 2023, eq. 2;
centering of Eisenstein et al. 2023, TRL's `center_rewards_coefficient`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PreferenceKind = Literal["dpo", "ipo", "slic"]
KINDS = ("dpo", "ipo", "slic")


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    kind: PreferenceKind = "dpo",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO / IPO / SLiC losses (B,) from summed sequence log-probs, each (B,)."""
    _same_shape(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    if kind not in KINDS:
        raise ValueError(f"preference_loss: kind must be one of {KINDS}, got {kind!r}")
    if not beta > 0:
        raise ValueError(f"preference_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"preference_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}"
        )
    if label_smoothing and kind != "dpo":
        raise ValueError(
            f"preference_loss: label_smoothing applies to kind='dpo' only, not {kind!r}"
        )
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    if kind == "dpo":
        loss = -F.logsigmoid(beta * h)
        if label_smoothing:
            loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * h)
        return loss
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return torch.relu(1 - beta * h)


def reward_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley-Terry losses (B,) from scalar rewards (B,), optional margin and centering."""
    _same_shape(r_chosen=r_chosen, r_rejected=r_rejected)
    if center_coef < 0:
        raise ValueError(f"reward_loss: center_coef must be >= 0, got {center_coef}")
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        if isinstance(margin, torch.Tensor) and margin.dim() and margin.shape != diff.shape:
            raise ValueError(
                f"reward_loss: margin has shape {tuple(margin.shape)}, rewards {tuple(diff.shape)}"
            )
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss


def _same_shape(**tensors: torch.Tensor) -> None:
    """Raise naming the tensors when they are not 1-D tensors of one shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected 1-D per-pair tensors of one shape, got {shapes}")
