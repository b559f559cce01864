"""Post-training: preference, reward and policy losses, reward models, WARM, DPO/OAIF, judges."""

from __future__ import annotations

from .losses import preference_loss, reward_loss
from .policy import policy_loss

__all__ = ["policy_loss", "preference_loss", "reward_loss"]
