"""Post-training: preference and reward losses, reward models, WARM, DPO/OAIF, judges."""

from __future__ import annotations

from .losses import preference_loss, reward_loss

__all__ = ["preference_loss", "reward_loss"]
