"""Losses of the trainer: masked next-token cross-entropy and PaLM's z-loss.

Every function returns a *sum* over the unmasked tokens; the loop divides by the number of
unmasked tokens of the whole global batch (all micro-batches, all ranks), so the loss and
its gradient are the global token mean whatever the accumulation and world size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def next_token_loss_sum(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    z_loss: float = 0.0,
    terms: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, z) summed over tokens where `mask` is True; ce and z come detached.

    logits (B, T, V), targets (B, T) int64, mask (B, T) bool. `terms` replaces
    `loss_terms` (the trainer passes its torch.compile'd version).
    """
    ce_sum, z_sum = (terms or loss_terms)(logits, targets, mask, z_loss)
    return ce_sum + z_sum, ce_sum.detach(), z_sum.detach()


def loss_terms(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, z_loss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, z) summed over tokens where `mask` is True, both carrying gradient.

    logits (B, T, V), targets (B, T) int64, mask (B, T) bool.
    ce = -log softmax(z)[y] = logsumexp(z) - z_y                                  (per token)
    z  = z_loss * logsumexp(z)^2   (PaLM, Chowdhery et al. 2022, arXiv:2204.02311, §5: keeps the
         softmax normaliser log Z near 0 for stability; coefficient 1e-4 there)
    Computed in float32 whatever the logits dtype.
    """
    V = logits.shape[-1]
    flat = logits.reshape(-1, V).float()  # (N, V)
    m = mask.reshape(-1)  # (N,)
    ce = F.cross_entropy(flat, targets.reshape(-1), reduction="none")  # (N,)
    ce_sum = (ce * m).sum()
    if z_loss > 0:
        lse = torch.logsumexp(flat, dim=-1)  # (N,)
        z_sum = z_loss * (lse.square() * m).sum()
    else:
        z_sum = torch.zeros((), device=flat.device)
    return ce_sum, z_sum
