"""SCoRe's two-stage self-correction objective (Kumar et al. 2024, arXiv:2409.12917, sec. 5).

An episode is problem x1 -> attempt y1 -> the correction instruction (x2 = x1, y1, instruction)
-> attempt y2, with verifier rewards r1 = r̂(y1, y*), r2 = r̂(y2, y*). Rows of a batch hold a
whole episode; `batch.turns` (B, T) says which targets belong to attempt 1 (1) or 2 (2), and
`batch.advantages` (B, T) carries each attempt's advantage on its tokens (`token_advantages`).

Stage I (eq. 3): max E[ r̂(y2, y*) - β2 KL(π(·|x1) || π_ref(·|x1)) ] — attempt 2 is trained on
its reward while a strong KL (β2) holds attempt 1 at the base model (attempt 1 gets no reward
term: the constraint's intent is that the first attempt stays the base model's).

Stage II (eq. 4 with the shaping of sec. 5.2): max E[ Σ_i r̂_i - β1 Σ_i KL(π(·|x_i) || π_ref(·|x_i)) ]
where attempt 2's reward carries the bonus b = α (r̂(y2) - r̂(y1)) (α = 10 in the paper), so
flipping a wrong answer to a right one is worth much more than repeating a right one and
breaking a right one costs as much. Each attempt is credited with its own reward.

Per token t of attempt i, with w_t the importance ratio to the sampling policy (1 on-policy):

    l_t = -min(w_t A_i, clip(w_t) A_i) + β(stage, i) KL_t,   β(1, 1) = β2, β(1, 2) = 0,
                                                             β(2, i) = β1

through `geode.post.policy.policy_terms` (the policy-gradient term) and `kl_estimate` (k1/k3).
The reference π_ref is the base model (`objective.options.reference`, else `model.init`):
Stage II keeps the base as its reference although it starts from Stage I's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...data.loader import Batch
from ...recipe import RecipeError
from ..reference import Reference
from .base import Metrics, Objective, register, token_logprobs

STAGES = (1, 2)
LOSS_TYPES = ("grpo", "dapo")  # per-sequence token mean | per active token of the global batch


@dataclass
class ScoreOptions:
    """`[objective.options]` of kind "score" (geode.post.score sets them per stage)."""

    stage: int = 2  # 1: Stage I (eq. 3), 2: Stage II (eq. 4)
    beta1: float = 0.01  # KL weight on both attempts in Stage II
    beta2: float = 0.1  # KL weight on attempt 1 in Stage I
    kl: str = "k3"  # KL estimator: "k1" | "k3"
    loss_type: str = "grpo"  # "grpo": mean per sequence, then over sequences; "dapo": per token
    epsilon: float = 0.2  # clip range of the importance ratio (inactive on-policy)
    reference: str = ""  # the base model (π_ref); empty: model.init


def check_options(o: ScoreOptions, where: str = "objective.options") -> None:
    """Raise a RecipeError naming the field of a bad value."""
    if o.stage not in STAGES:
        raise RecipeError(f"{where}.stage = {o.stage!r}: use 1 (Stage I) or 2 (Stage II)")
    for name in ("beta1", "beta2"):
        v = getattr(o, name)
        if not (isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf")):
            raise RecipeError(f"{where}.{name} = {v!r}: must be a finite number >= 0")
    if o.kl not in ("k1", "k3"):
        raise RecipeError(f"{where}.kl = {o.kl!r}: use 'k1' or 'k3'")
    if o.loss_type not in LOSS_TYPES:
        raise RecipeError(f"{where}.loss_type = {o.loss_type!r}: use one of {LOSS_TYPES}")


def attempt_returns(
    r1: torch.Tensor, r2: torch.Tensor, *, stage: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards credited to attempts 1 and 2 (N,) each: Stage I (0, r2); Stage II
    (r1, r2 + α (r2 - r1)) — the shaping bonus of sec. 5.2 on attempt 2."""
    if stage == 1:
        return torch.zeros_like(r1), r2.clone()
    return r1.clone(), r2 + alpha * (r2 - r1)


def score_advantages(
    r1: torch.Tensor,
    r2: torch.Tensor,
    group_size: int,
    *,
    stage: int,
    alpha: float,
    estimator: str = "rloo",
    scale: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-attempt advantages (N,), (N,) of group-major episodes: each attempt's return
    (`attempt_returns`) minus a group baseline (`geode.post.policy.group_advantages`)."""
    from ...post.policy import group_advantages

    g1, g2 = attempt_returns(r1.float(), r2.float(), stage=stage, alpha=alpha)
    a2 = group_advantages(g2, group_size, estimator=estimator, scale=scale)
    if stage == 1:  # attempt 1 has no reward term in Stage I
        return torch.zeros_like(a2), a2
    return group_advantages(g1, group_size, estimator=estimator, scale=scale), a2


def token_advantages(turns: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """(B, T) advantages: a1[b] on attempt-1 targets, a2[b] on attempt-2 targets, 0 elsewhere."""
    a1, a2 = a1.float()[:, None], a2.float()[:, None]  # (B, 1)
    return torch.where(turns == 1, a1, torch.where(turns == 2, a2, torch.zeros_like(a1)))


def kl_coefficients(turns: torch.Tensor, stage: int, beta1: float, beta2: float) -> torch.Tensor:
    """(B, T) KL weight per target: Stage I β2 on attempt 1 (0 on attempt 2, eq. 3); Stage II
    β1 on both attempts (eq. 4); 0 outside the model's turns."""
    c = torch.zeros(turns.shape, dtype=torch.float32, device=turns.device)  # (B, T)
    if stage == 1:
        return c.masked_fill(turns == 1, beta2)
    return c.masked_fill((turns == 1) | (turns == 2), beta1)


@register("score")
class ScoreObjective(Objective):
    """SCoRe Stage I / II: per-attempt policy gradient + per-attempt KL to the base model."""

    Options = ScoreOptions

    def __init__(self, trainer: Any, options: ScoreOptions | None = None):
        super().__init__(trainer, options or ScoreOptions())
        check_options(self.options)
        path = self.options.reference or trainer.recipe.model.init
        if not path:
            raise RecipeError(
                "objective.kind = 'score' needs the base model as reference: set model.init "
                "or objective.options.reference"
            )
        self.reference = Reference.for_trainer(
            trainer,
            path,
            "objective.options.reference" if self.options.reference else "model.init",
        )
        self.source: Any = None  # the episode source (its step statistics join the report)

    @classmethod
    def preflight(cls, trainer: Any) -> int:
        """The reference's parameter count (it is loaded beside the policy)."""
        from ...checkpoint import read_config
        from ..loop import _count_params

        path = trainer.recipe.objective.options.get("reference") or trainer.recipe.model.init
        return _count_params(read_config(path)) if path else 0

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, float, Metrics]:
        """Summed per-token terms (grpo: per-sequence means); normalizer: rows or tokens."""
        from ...post.policy import kl_estimate, policy_terms

        if batch.turns is None or batch.advantages is None or batch.advantages.dim() != 2:
            raise ValueError(
                "objective score: the batch needs `turns` (B, T) and per-token `advantages` "
                "(B, T) (episodes from geode.post.score)"
            )
        o = self.options
        turns = batch.turns
        mask = batch.loss_mask & (turns > 0)  # (B, T) the model's sampled tokens
        with self.autocast():
            logits = model(**batch.model_inputs())  # (B, T, V)
        logps = token_logprobs(logits, batch.targets)  # (B, T)
        ref = token_logprobs(self.reference.logits(batch), batch.targets).to(logps.device)
        old = getattr(batch, "old_logps", None)
        old = logps.detach() if old is None else old.to(logps.device)  # on-policy: w = 1
        terms, sums = policy_terms(
            logps, old, batch.advantages, mask, loss_type=o.loss_type, epsilon=o.epsilon
        )  # (B, T) masked policy-gradient terms
        kl_t = kl_estimate(logps, ref, o.kl)  # (B, T)
        coef = kl_coefficients(turns, o.stage, o.beta1, o.beta2)  # (B, T)
        m = mask.to(logps.dtype)
        terms = terms + coef * kl_t * m
        tokens = m.sum(-1)  # (B,)
        if o.loss_type == "grpo":
            total = (terms.sum(-1) / tokens.clamp(min=1.0)).sum()
            n = float(len(batch))
        else:
            total = terms.sum()
            n = float(tokens.sum())
        with torch.no_grad():
            metrics: Metrics = {"loss": float(total), "sequences": float(len(batch))}
            for i in (1, 2):
                on = m * (turns == i)
                metrics[f"kl_attempt{i}"] = float((kl_t * on).sum())
                metrics[f"tokens_attempt{i}"] = float(on.sum())
            metrics["clip_region"] = float(sums["clip_region"])
            metrics["units"] = float(sums["units"])
        return total, n, metrics

    def report(self, sums: dict[str, float], normalizer: float, training: bool) -> dict[str, float]:
        """Loss per normalizer unit, per-attempt KL per token, attempt lengths, the clip
        fraction, and the episode source's statistics of the step (rewards, timings)."""
        rows = max(sums.get("sequences", 0.0), 1.0)
        out = {"loss": sums["loss"] / max(normalizer, 1.0)}
        for i in (1, 2):
            n = sums.get(f"tokens_attempt{i}", 0.0)
            out[f"kl_attempt{i}"] = sums.get(f"kl_attempt{i}", 0.0) / max(n, 1.0)
            out[f"tokens_attempt{i}"] = n / rows
        out["clip_fraction"] = sums.get("clip_region", 0.0) / max(sums.get("units", 0.0), 1.0)
        if training and self.source is not None:
            out.update(getattr(self.source, "last", {}))
        prefix = "" if training else "eval_"
        return {f"{prefix}{k}": v for k, v in out.items()}
