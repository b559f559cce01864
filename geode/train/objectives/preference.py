"""Offline preference optimisation as an objective: DPO, IPO, SLiC on pair batches.

Rows 2k / 2k+1 of a batch are the chosen / rejected responses of pair k (`Batch.pair`,
built by geode.post.pairs); `loss_mask` marks the response targets. Per micro-batch:

    log pi(y|x) = sum_t mask_t log p(y_t)          (policy, with gradient; reference, cached)
    L = sum_pairs preference_loss(...)             (geode.post.losses: DPO / IPO / SLiC)
    normalizer = pairs

The reference pi_ref is a frozen `Reference` (the policy's `model.init` unless
`reference` names another checkpoint, which must share the tokenizer); its log-probs are
computed once per sequence and cached on disk under OUT/reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...data.loader import Batch
from ...recipe import RecipeError
from ..reference import Reference
from .base import Metrics, Objective, register, sequence_logprobs


@dataclass
class PreferenceOptions:
    """`[objective.options]` of kind "dpo"."""

    beta: float = 0.1  # strength of the KL anchor to the reference
    loss: str = "dpo"  # "dpo" | "ipo" | "slic"
    label_smoothing: float = 0.0  # conservative DPO: labels flipped with this probability
    reference: str = ""  # reference checkpoint; empty: model.init
    cache: bool = True  # cache reference log-probs on disk (OUT/reference)


def check_pairs(batch: Batch, where: str) -> int:
    """Number of pairs; raises unless rows 2k and 2k+1 belong to one pair."""
    if batch.pair is None:
        raise ValueError(f"{where}: the batch has no `pair` field (preference batches only)")
    if len(batch) % 2 or not bool((batch.pair[0::2] == batch.pair[1::2]).all()):
        raise ValueError(
            f"{where}: rows must come in (chosen, rejected) pairs; use an even "
            "batch.micro_batch_size so that micro-batches never split a pair"
        )
    return len(batch) // 2


@register("dpo")
class Preference(Objective):
    """DPO / IPO / SLiC against a frozen reference."""

    Options = PreferenceOptions

    def __init__(self, trainer: Any, options: PreferenceOptions | None = None):
        super().__init__(trainer, options or PreferenceOptions())
        o = self.options
        from ...post.losses import KINDS

        if o.loss not in KINDS:
            raise RecipeError(f"objective.options.loss = {o.loss!r}: use one of {KINDS}")
        if not o.beta > 0:
            raise RecipeError(f"objective.options.beta = {o.beta}: must be > 0")
        path = o.reference or trainer.recipe.model.init
        if not path:
            raise RecipeError(
                "objective.kind = 'dpo' needs a reference: set model.init (the SFT model) or "
                "objective.options.reference"
            )
        self.online: Any = None  # OAIF: the OnlinePairs source feeding this run (geode.post.oaif)
        online = getattr(trainer.recipe, "online", None) is not None  # fresh samples: no cache
        self.reference = Reference.for_trainer(
            trainer,
            path,
            "objective.options.reference" if o.reference else "model.init",
            cache_dir=Path(trainer.out) / "reference" if o.cache and not online else None,
        )

    @classmethod
    def preflight(cls, trainer: Any) -> int:
        """The reference's parameter count (it is loaded beside the policy)."""
        from ...checkpoint import read_config
        from ..loop import _count_params
        from ..reference import check_compatible

        opts = trainer.recipe.objective.options
        path = opts.get("reference") or trainer.recipe.model.init
        if not path:
            return 0
        cfg = read_config(path)
        check_compatible(cfg, trainer.config, f"reference = {str(path)!r}")
        return _count_params(cfg)

    def pair_logprobs(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy, reference) summed response log-probs per row, each (2P,) float32."""
        with self.autocast():
            logits = model(**batch.model_inputs())  # (2P, T, V)
        logps = sequence_logprobs(logits, batch)  # (2P,)
        ref = self.reference.sequence_logprobs(batch).to(logps.device)  # (2P,)
        return logps, ref

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, float, Metrics]:
        """Summed per-pair losses; normalizer: pairs."""
        from ...post.losses import preference_loss

        n = check_pairs(batch, "objective dpo")
        o = self.options
        logps, ref = self.pair_logprobs(model, batch)
        losses = preference_loss(
            logps[0::2], logps[1::2], ref[0::2], ref[1::2],
            beta=o.beta, kind=o.loss, label_smoothing=o.label_smoothing,
        )  # fmt: skip  # (P,)
        with torch.no_grad():
            h = (logps[0::2] - ref[0::2]) - (logps[1::2] - ref[1::2])  # (P,) implicit margin
            metrics: Metrics = {
                "loss": float(losses.sum()),
                "reward_accuracy": float((h > 0).sum()),
                "reward_margin": float(o.beta * h.sum()),
                "logps_chosen": float(logps[0::2].sum()),
                "logps_rejected": float(logps[1::2].sum()),
                "pairs": float(n),
            }
        return losses.sum(), float(n), metrics

    def report(self, sums: dict[str, float], normalizer: float, training: bool) -> dict[str, float]:
        """Per-pair means of the metric sums; with an online source (OAIF) also its step
        statistics and the update time (the step after sampling and judging)."""
        out = per_pair_report(sums, normalizer, training)
        if training and self.online is not None:
            out.update(self.online.last)
            out["update_s"] = time.perf_counter() - self.online.t_ready
        return out


def per_pair_report(sums: dict[str, float], normalizer: float, training: bool) -> dict[str, float]:
    """Metric sums divided by the pairs they cover; eval keys prefixed "eval_"."""
    n = max(sums.get("pairs", normalizer), 1.0)
    prefix = "" if training else "eval_"
    return {f"{prefix}{k}": v / n for k, v in sums.items() if k != "pairs"}
