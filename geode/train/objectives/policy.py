"""Policy-gradient RL as an objective (kind "rl"): the clipped surrogate of geode.post.policy.

Rows are rollout episodes (geode.post.rollout.Rollouts): prompt + episode tokens, `loss_mask`
on the model's sampled tokens, `advantages` (B,) or (B, T), and `old_logps` (B, T) of the
rollout policy when one rollout batch feeds several updates (else the ratio is 1 on the first
update: old = logps detached, as TRL does). Per micro-batch the token terms l_t (policy_terms,
PPO/GRPO eq. 3 with optional KL to a frozen reference) are summed with a normalizer such that
the seam's global division (sum of loss sums / sum of normalizers over micro-batches and
ranks, base.py) gives TRL's aggregations:

    grpo     sum_b (sum_t l_bt / |y_b|)            normalizer B      -> mean over sequences
    bnpo     sum_bt l_bt / (active tokens of mb)   normalizer 1      -> mean over micro-batches
    dr_grpo  sum_bt l_bt / L_max                   normalizer B      -> sum / (B_global * L_max)
    dapo     sum_bt l_bt                           normalizer tokens -> sum / global active tokens

(bnpo is TRL's per-batch token mean, averaged over accumulation steps and processes; dapo
divides by the token count all-reduced over micro-batches and ranks.) Log-probs are of the
temperature-scaled logits (TRL's `logits / temperature`), only at trained positions.

The KL anchor (beta > 0 only; beta = 0 loads nothing): anchor "init" is a frozen `Reference`
(options.reference, else model.init, else a snapshot of the starting policy); anchor "ema" is
WARP's EMA copy theta_ema <- (1 - mu) theta_ema + mu theta (Rame et al. 2024,
arXiv:2406.16768, eq. 3) updated after every optimizer step with mu = ema_rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...data.loader import Batch
from ...recipe import RecipeError
from ..reference import Reference
from .base import Metrics, Objective, register, token_logprobs

ANCHORS = ("init", "ema")
_SUMS = ("clip_low", "clip_high", "clip_region", "ratio", "units", "kl", "tokens")


@dataclass
class PolicyOptions:
    """`[objective.options]` of kind "rl" (geode.post.policy.policy_loss's knobs + the anchor)."""

    loss_type: str = "grpo"  # "grpo" | "bnpo" | "dr_grpo" | "dapo"
    epsilon: float = 0.2  # clip range below 1 (and above, unless epsilon_high)
    epsilon_high: float | None = None  # DAPO's clip-higher upper range
    beta: float = 0.0  # KL coefficient; 0: no reference is loaded
    kl: str = "k3"  # KL estimator "k1" | "k3"
    importance: str = "token"  # "token" (PPO/GRPO) | "sequence" (GSPO)
    anchor: str = "init"  # KL anchor: "init" (frozen) | "ema" (WARP)
    ema_rate: float = 0.01  # WARP's mu
    reference: str = ""  # anchor checkpoint; empty: model.init, else the starting policy
    max_completion_length: int = 0  # dr_grpo's L; 0: the rollout source's (else batch width)


@register("rl")
class PolicyGradient(Objective):
    """GRPO / DAPO / Dr. GRPO / GSPO / RLOO / REINFORCE updates on rollout batches."""

    Options = PolicyOptions

    def __init__(self, trainer: Any, options: PolicyOptions | None = None):
        super().__init__(trainer, options or PolicyOptions())
        from ...post.policy import IMPORTANCE_LEVELS, KL_ESTIMATORS, LOSS_TYPES

        o = self.options
        for name, value, allowed in (
            ("loss_type", o.loss_type, LOSS_TYPES),
            ("kl", o.kl, KL_ESTIMATORS),
            ("importance", o.importance, IMPORTANCE_LEVELS),
            ("anchor", o.anchor, ANCHORS),
        ):
            if value not in allowed:
                raise RecipeError(f"objective.options.{name} = {value!r}: use one of {allowed}")
        if not o.beta >= 0:
            raise RecipeError(f"objective.options.beta = {o.beta}: must be >= 0")
        if not o.epsilon >= 0 or (o.epsilon_high is not None and not o.epsilon_high >= 0):
            raise RecipeError("objective.options.epsilon / epsilon_high: must be >= 0")
        if not 0.0 <= o.ema_rate <= 1.0:
            raise RecipeError(f"objective.options.ema_rate = {o.ema_rate}: must be in [0, 1]")
        if o.anchor == "ema" and o.beta == 0:
            raise RecipeError("objective.options.anchor = 'ema' needs beta > 0 (a KL anchor)")
        self.source: Any = None  # the Rollouts feeding this run (geode.post.rollout)
        self.temperature = 1.0  # sampling temperature of the rollouts (set by geode.post.rl)
        self.reference: Reference | None = None
        self._anchor_step = trainer.step  # the optimizer step the EMA anchor has seen
        if o.beta > 0:
            self.reference = self._load_reference(trainer)

    def _load_reference(self, trainer: Any) -> Reference:
        """The frozen anchor: a checkpoint, or a copy of the policy as it starts (ema: always)."""
        o = self.options
        path = o.reference or (trainer.recipe.model.init if o.anchor == "init" else "")
        kw = {"autocast_dtype": trainer.autocast_dtype}
        if not path:
            return Reference.snapshot(trainer.raw_model, name=f"{o.anchor} anchor", **kw)
        where = "objective.options.reference" if o.reference else "model.init"
        return Reference.for_trainer(trainer, path, where)

    def set_reference(self, reference: Reference | None) -> None:
        """Use `reference` as the KL anchor (WARP / SCoRe hand in their own)."""
        self.reference = reference

    @classmethod
    def preflight(cls, trainer: Any) -> int:
        """The anchor's parameter count when beta > 0 (it is held beside the policy)."""
        from ...checkpoint import read_config
        from ..loop import _count_params
        from ..reference import check_compatible

        opts = trainer.recipe.objective.options
        if not float(opts.get("beta", 0.0)) > 0:
            return 0
        path = opts.get("reference") or trainer.recipe.model.init
        if not path or opts.get("anchor") == "ema" and not opts.get("reference"):
            return _count_params(trainer.config)
        cfg = read_config(path)
        check_compatible(cfg, trainer.config, f"reference = {str(path)!r}")
        return _count_params(cfg)

    # ------------------------------------------------------------------ the anchor
    def update_anchor(self) -> None:
        """EMA anchor: fold in the policy once per optimizer step taken since the last call."""
        if self.options.anchor != "ema" or self.reference is None:
            return
        if self.trainer.step != self._anchor_step:
            from ...post.merge import ema_update

            ema_update(self.reference.model, self.trainer.raw_model, self.options.ema_rate)
            self._anchor_step = self.trainer.step

    # ------------------------------------------------------------------ the loss
    def token_logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """log pi(y_t) (B, T) float32 of the tempered logits at trained positions (0 elsewhere)."""
        mask = batch.loss_mask
        with self.autocast():
            logits = model(**batch.model_inputs(), rows=mask)  # (N, V), N = trained targets
        flat = token_logprobs(logits.float()[None] / self.temperature, batch.targets[mask][None])
        out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)  # (B, T)
        return out.masked_scatter(mask, flat[0])

    @torch.no_grad()
    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """log pi_ref(y_t) (B, T) float32 of the anchor's tempered logits."""
        logits = self.reference.logits(batch).float() / self.temperature  # (B, T, V)
        return token_logprobs(logits, batch.targets.to(logits.device))  # (B, T)

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, float, Metrics]:
        """Summed token terms with the loss type's per-micro-batch normalizer (module doc)."""
        from ...post.policy import policy_terms

        if batch.advantages is None:
            raise ValueError("objective rl: the batch has no `advantages` (rollout batches only)")
        o = self.options
        self.update_anchor()
        mask = batch.loss_mask  # (B, T)
        logps = self.token_logps(model, batch)  # (B, T)
        old = batch.old_logps if batch.old_logps is not None else logps.detach()
        ref = None
        if self.reference is not None and o.beta > 0:
            ref = self.reference_logps(batch).to(logps.device)
            ref = torch.where(mask, ref, torch.zeros_like(ref))  # (B, T)
        terms, sums = policy_terms(
            logps, old.to(logps.dtype), batch.advantages.to(logps.dtype), mask,
            loss_type=o.loss_type, epsilon=o.epsilon, epsilon_high=o.epsilon_high,
            ref_logps=ref, beta=o.beta, kl=o.kl, importance=o.importance,
        )  # fmt: skip  # (B, T)
        m = mask.to(terms.dtype)
        rows = float(len(batch))
        if o.loss_type == "grpo":
            total, n = (terms.sum(-1) / m.sum(-1).clamp(min=1.0)).sum(), rows
        elif o.loss_type == "bnpo":
            total, n = terms.sum() / m.sum().clamp(min=1.0), 1.0
        elif o.loss_type == "dr_grpo":
            total, n = terms.sum() / self.completion_length(batch), rows
        else:  # dapo
            total, n = terms.sum(), float(m.sum())
        metrics: Metrics = {k: float(sums[k]) for k in _SUMS if k in sums}
        metrics["loss"] = float(total.detach())
        metrics["rows"] = rows
        return total, n, metrics

    def completion_length(self, batch: Batch) -> float:
        """dr_grpo's L: the option, else the rollout source's, else the batch's trained span."""
        L = self.options.max_completion_length or getattr(self.source, "max_completion_length", 0)
        if L:
            return float(L)
        cols = batch.loss_mask.any(0).nonzero()
        return float(int(cols[-1]) - int(cols[0]) + 1) if len(cols) else 1.0

    def report(self, sums: dict[str, float], normalizer: float, training: bool) -> dict[str, float]:
        """loss; kl per token; clip fractions and mean ratio per unit; rollout statistics."""
        out = {"loss": sums.get("loss", 0.0) / max(normalizer, 1e-12)}
        units = max(sums.get("units", 0.0), 1.0)
        for k in ("clip_low", "clip_high", "clip_region"):
            if k in sums:
                out[f"{k}_fraction"] = sums[k] / units
        if "ratio" in sums:
            out["ratio_mean"] = sums["ratio"] / units
        if "kl" in sums:
            out["kl"] = sums["kl"] / max(sums.get("tokens", 0.0), 1.0)
        out["trained_tokens"] = sums.get("tokens", 0.0)
        if not training:
            return {f"eval_{k}": v for k, v in out.items()}
        if self.source is not None:
            out.update(getattr(self.source, "last", {}))
            t_ready = getattr(self.source, "t_ready", None)
            if t_ready is not None:
                out["update_s"] = time.perf_counter() - t_ready
        return out
