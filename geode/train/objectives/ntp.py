"""Next-token prediction: masked cross-entropy (+ PaLM z-loss) per trained target token.

The normalizer is the number of trained targets (`batch.loss_mask`), so the update is the
global per-token mean. The same objective trains SFT rows: their `loss_mask` keeps only the
assistant tokens (geode.train.sft), kind "sft".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...data.loader import Batch
from ..loss import next_token_loss_sum
from ..sft import SFTOptions
from .base import Metrics, Objective, parse_options, register


@register("ntp")
class NextToken(Objective):
    """sum over trained targets of -log p(y_t) + z_loss * log Z_t^2 (loss.py)."""

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, float, Metrics]:
        """Forward `batch`; (ce + z summed over loss_mask, trained targets, {ce, z, tokens})."""
        mask = batch.loss_mask
        with self.autocast():
            logits = model(**batch.model_inputs())  # (M, T, V)
        total, ce, z = next_token_loss_sum(
            logits, batch.targets, mask, self.trainer.recipe.train.z_loss,
            self.trainer._loss_terms,
        )  # fmt: skip
        n = float(mask.sum())
        return total, n, {"ce": ce, "z": z, "tokens": n}

    def report(self, sums: dict[str, float], normalizer: float, training: bool) -> dict[str, float]:
        """{"loss": CE per token (+ "z_loss" when on)}; eval: {"eval_loss"}."""
        n = max(sums["tokens"], 1.0)
        if not training:
            return {"eval_loss": sums["ce"] / n}
        out = {"loss": sums["ce"] / n}
        if self.trainer.recipe.train.z_loss:
            out["z_loss"] = sums["z"] / n
        return out


@register("sft")
class SupervisedFineTuning(NextToken):
    """Next-token loss on the targets SFT batches mark (assistant tokens, optionally tool calls).

    Only the trained positions go through the LM head and the cross-entropy (`rows=`): with
    prompts and padding masked out that skips a large part of the (B, T, V) logits.
    """

    Options = SFTOptions

    @classmethod
    def prepare_model(cls, trainer: Any, model: nn.Module) -> nn.Module:
        """A VLM's vision tower frozen unless `train_vision` (its projector always trains)."""
        tower = getattr(model, "vision_tower", None)
        if (
            tower is not None
            and not parse_options(cls, trainer.recipe.objective.options).train_vision
        ):
            tower.requires_grad_(False)
        return model

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, float, Metrics]:
        """Forward `batch`; (ce + z over the trained targets, their count, {ce, z, tokens})."""
        mask = batch.loss_mask
        with self.autocast():
            logits = model(**batch.model_inputs(), rows=mask)  # (N, V), N = trained targets
        targets = batch.targets[mask]  # (N,)
        ones = torch.ones_like(targets, dtype=torch.bool)
        total, ce, z = next_token_loss_sum(
            logits[None], targets[None], ones[None], self.trainer.recipe.train.z_loss,
            self.trainer._loss_terms,
        )  # fmt: skip
        n = float(targets.numel())
        return total, n, {"ce": ce, "z": z, "tokens": n}
