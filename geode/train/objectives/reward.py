"""Reward-model training as an objective: the Bradley-Terry loss on pair batches.

The trained model is a `geode.post.reward.RewardModel` (decoder + scalar head on the last
token). Rows 2k / 2k+1 are the chosen / rejected sequences of pair k. Per micro-batch:

    L = sum_pairs [-log sigmoid(r+ - r- - margin) + center_coef (r+ + r-)^2]
    normalizer = pairs;   accuracy = #(r+ > r-)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...data.loader import Batch
from .base import Metrics, Objective, register
from .preference import check_pairs, per_pair_report


@dataclass
class RewardOptions:
    """`[objective.options]` of kind "reward"."""

    margin: float = 0.0  # constant margin in the Bradley-Terry loss (Llama 2, eq. 2)
    center_coef: float = 0.0  # reward centering coefficient (TRL's center_rewards_coefficient)
    dropout: float = 0.0  # dropout on the head's input (WARM's diversity by dropout)


@register("reward")
class Reward(Objective):
    """Bradley-Terry loss of a reward model."""

    Options = RewardOptions

    def __init__(self, trainer: Any, options: RewardOptions | None = None):
        super().__init__(trainer, options or RewardOptions())

    @classmethod
    def prepare_model(cls, trainer: Any, model: nn.Module) -> nn.Module:
        """The trained model: the decoder with a scalar head (seeded by model.seed)."""
        from ...post.reward import RewardModel

        if isinstance(model, RewardModel):
            return model
        opts = trainer.recipe.objective.options
        gen = torch.Generator().manual_seed(trainer.recipe.model.seed)
        return RewardModel(model, dropout=float(opts.get("dropout", 0.0)), generator=gen)

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, float, Metrics]:
        """Summed per-pair Bradley-Terry losses; normalizer: pairs."""
        from ...post.losses import reward_loss

        n = check_pairs(batch, "objective reward")
        o = self.options
        with self.autocast():
            scores = model(batch.tokens)  # (2P,) float32, read at each row's last token
        rc, rr = scores[0::2], scores[1::2]  # (P,)
        losses = reward_loss(rc, rr, margin=o.margin or None, center_coef=o.center_coef)
        with torch.no_grad():
            metrics: Metrics = {
                "loss": float(losses.sum()),
                "accuracy": float((rc > rr).sum()),
                "margin": float((rc - rr).sum()),
                "pairs": float(n),
            }
        return losses.sum(), float(n), metrics

    def report(self, sums: dict[str, float], normalizer: float, training: bool) -> dict[str, float]:
        """Per-pair means of the metric sums."""
        return per_pair_report(sums, normalizer, training)

    def save_model(self, model: nn.Module, path: Path, files: dict[str, str]) -> None:
        """Export as transformers' Gemma3TextForSequenceClassification (geode.post.reward)."""
        from ...post.reward import save_reward_model

        save_reward_model(model, path, files=files)
