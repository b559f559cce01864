"""The policy-gradient loss of RL post-training, on per-token tensors (batch, completion_len).

With the importance ratio w = pi(y_t | .) / pi_old(y_t | .) of the current policy against the
policy that sampled the rollouts and advantages A, each completion token contributes

    l_t = -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A) + beta KL_t

(PPO's clipped surrogate, Schulman et al. 2017, arXiv:1707.06347, eq. 7; GRPO, Shao et al.
2024, arXiv:2402.03300, eq. 3; the decoupled eps_low / eps_high "clip-higher" of DAPO, Yu et
al. 2025, arXiv:2503.14476, eq. 10). `importance="sequence"` replaces w by GSPO's
length-normalised sequence ratio exp(mean_t log w_t) (Zheng et al. 2025, arXiv:2507.18071,
eq. 7). KL_t estimates KL(pi || pi_ref) from samples of pi with r = pi_ref / pi (Schulman 2020,
"Approximating KL divergence"): k1 = -log r, k3 = (r - 1) - log r.

The token terms are aggregated as TRL's GRPOTrainer names it (`loss_type`):
  grpo     mean over each sequence's tokens, then over sequences (GRPO eq. 3)
  bnpo     sum over the batch's tokens / its active tokens
  dr_grpo  sum / (batch * completion_len) (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783)
  dapo     sum / active tokens of the batch passed in (DAPO eq. 8; a trainer all-reduces the
           count over micro-batches and processes: use `policy_terms` and its own normalizer)

`group_advantages` turns rewards of groups of samples of one prompt into advantages:
GRPO's group-normalised reward, RLOO's leave-one-out baseline (Ahmadian et al. 2024,
arXiv:2402.14740, eq. 5) or REINFORCE with the batch-mean baseline.
"""

from __future__ import annotations

from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_ESTIMATORS = ("k1", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")
ESTIMATORS = ("grpo", "rloo", "reinforce")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # added to the reward std before dividing (TRL's value)


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, kl: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate (B, L) from sampled tokens' log-probs: k1 or k3."""
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimate: kl must be one of {KL_ESTIMATORS}, got {kl!r}")
    if logps.shape != ref_logps.shape:
        raise ValueError(
            f"kl_estimate: logps has shape {tuple(logps.shape)}, ref_logps {tuple(ref_logps.shape)}"
        )
    log_r = ref_logps - logps  # log pi_ref / pi, (B, L)
    if kl == "k1":
        return -log_r
    return torch.exp(log_r) - log_r - 1


def policy_terms(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: LossType = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl: str = "k3",
    importance: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked per-token loss terms (B, L) before aggregation, and metric sums.

    The metric sums (detached) are over "units": active tokens (importance "token") or
    sequences (importance "sequence", whose ratio is one per sequence): "units",
    "clip_low", "clip_high", "clip_region", "ratio" (sum of w), "ratio_min", "ratio_max";
    with a reference also "kl" (sum over active tokens) and "tokens" always.
    """
    _check(logps, old_logps, advantages, mask, loss_type, epsilon, epsilon_high, ref_logps, beta)
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"policy_loss: kl must be one of {KL_ESTIMATORS}, got {kl!r}")
    if importance not in IMPORTANCE_LEVELS:
        raise ValueError(
            f"policy_loss: importance must be one of {IMPORTANCE_LEVELS}, got {importance!r}"
        )
    mask = mask.to(logps.dtype)  # (B, L)
    adv = advantages.to(logps.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv  # (B, 1) or (B, L)
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high

    log_ratio = logps - old_logps  # (B, L)
    if importance == "token":
        log_w = log_ratio  # (B, L)
    else:  # GSPO: exp of the mean token log-ratio, one per sequence
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    w = torch.exp(log_w)
    w_clipped = torch.clamp(w, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(w * adv, w_clipped * adv)  # (B, L) or (B, 1)
    metrics: dict[str, torch.Tensor] = {"tokens": mask.sum().detach()}
    if ref_logps is not None:
        kl_t = kl_estimate(logps, ref_logps, kl)  # (B, L)
        if beta:
            per_token = per_token + beta * kl_t
        metrics["kl"] = (kl_t * mask).sum().detach()
    terms = per_token * mask  # (B, L)

    with torch.no_grad():
        low = ((w < 1 - eps_low) & (adv < 0)).to(logps.dtype)
        high = ((w > 1 + eps_high) & (adv > 0)).to(logps.dtype)
        region = torch.maximum(low, high)
        if low.shape[1] == 1:  # one value per sequence
            units = torch.ones_like(low)
        else:
            units = mask.expand_as(low)
        ww = w.expand_as(units)
        active = units > 0
        metrics.update(
            units=units.sum(),
            clip_low=(low * units).sum(),
            clip_high=(high * units).sum(),
            clip_region=(region * units).sum(),
            ratio=(ww * units).sum(),
            ratio_min=ww[active].min() if active.any() else ww.new_tensor(float("nan")),
            ratio_max=ww[active].max() if active.any() else ww.new_tensor(float("nan")),
        )
    return terms, metrics


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: LossType = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl: str = "k3",
    importance: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy-gradient loss (scalar) aggregated by `loss_type`, and metrics.

    logps / old_logps / ref_logps / mask: (B, L) over completion tokens; advantages (B,) or
    (B, L). Metrics (detached): "clip_ratio/low_mean", "clip_ratio/high_mean",
    "clip_ratio/region_mean", "ratio/mean", "ratio/min", "ratio/max", and "kl" (mean per
    active token) when `ref_logps` is given.
    """
    terms, sums = policy_terms(
        logps,
        old_logps,
        advantages,
        mask,
        loss_type=loss_type,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        ref_logps=ref_logps,
        beta=beta,
        kl=kl,
        importance=importance,
    )
    m = mask.to(logps.dtype)  # (B, L)
    if loss_type == "grpo":
        loss = (terms.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = terms.sum() / (terms.shape[0] * terms.shape[1])
    else:  # bnpo, dapo: per active token of this batch
        loss = terms.sum() / m.sum().clamp(min=1.0)
    units = sums["units"].clamp(min=1.0)
    metrics = {
        "clip_ratio/low_mean": sums["clip_low"] / units,
        "clip_ratio/high_mean": sums["clip_high"] / units,
        "clip_ratio/region_mean": sums["clip_region"] / units,
        "ratio/mean": sums["ratio"] / units,
        "ratio/min": sums["ratio_min"],
        "ratio/max": sums["ratio_max"],
    }
    if "kl" in sums:
        metrics["kl"] = sums["kl"] / sums["tokens"].clamp(min=1.0)
    return loss, metrics


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    estimator: str = "grpo",
    scale: str = "group",
) -> torch.Tensor:
    """Advantages (N,) from rewards (N,) laid out group-major (N = groups * group_size).

    estimator: "grpo" r - mean(group); "rloo" r - mean(other samples of the group);
    "reinforce" r - mean(batch). scale: divide by the group's ("group") or the batch's
    ("batch") unbiased reward std + 1e-4, or not ("none"), as TRL's `scale_rewards`.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"group_advantages: estimator must be one of {ESTIMATORS}, got {estimator!r}"
        )
    if scale not in SCALES:
        raise ValueError(f"group_advantages: scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(
            f"group_advantages: rewards must be (N,), got shape {tuple(rewards.shape)}"
        )
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"group_advantages: {rewards.numel()} rewards do not split into groups of {group_size}"
        )
    if estimator == "rloo" and group_size < 2:
        raise ValueError("group_advantages: rloo needs group_size >= 2 (a leave-one-out baseline)")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"group_advantages: rewards must be finite, got {rewards.tolist()}")
    r = rewards.double()
    grouped = r.view(-1, group_size)  # (G, K)
    if estimator == "grpo":
        baseline = grouped.mean(1, keepdim=True).expand_as(grouped).reshape(-1)
    elif estimator == "rloo":
        baseline = ((grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)).reshape(-1)
    else:
        baseline = r.mean().expand_as(r)
    adv = r - baseline  # (N,)
    if scale == "group":
        std = _std(grouped, 1).repeat_interleave(group_size)  # (N,)
        adv = adv / (std + STD_EPS)
    elif scale == "batch":
        adv = adv / (_std(r, 0) + STD_EPS)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def _std(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Unbiased std along `dim`, 0 where there is a single value."""
    if x.shape[dim] < 2:
        return torch.zeros_like(x.select(dim, 0))
    return x.std(dim)


def _check(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    epsilon: float,
    epsilon_high: float | None,
    ref_logps: torch.Tensor | None,
    beta: float,
) -> None:
    """Raise a ValueError naming the argument when shapes or options are wrong."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"policy_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logps.dim() != 2:
        raise ValueError(
            f"policy_loss: logps must be (batch, completion_len), got shape {tuple(logps.shape)}"
        )
    named = {"old_logps": old_logps, "mask": mask}
    if ref_logps is not None:
        named["ref_logps"] = ref_logps
    for name, t in named.items():
        if t.shape != logps.shape:
            raise ValueError(
                f"policy_loss: {name} has shape {tuple(t.shape)}, logps {tuple(logps.shape)}"
            )
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(
            f"policy_loss: advantages must be (batch,) or (batch, completion_len) = "
            f"{tuple(logps.shape)}, got {tuple(advantages.shape)}"
        )
    if not epsilon >= 0 or (epsilon_high is not None and not epsilon_high >= 0):
        raise ValueError(
            f"policy_loss: epsilon / epsilon_high must be >= 0, got {epsilon} / {epsilon_high}"
        )
    if not beta >= 0:
        raise ValueError(f"policy_loss: beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logps (the reference's log-probs)")
