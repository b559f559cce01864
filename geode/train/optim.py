"""AdamW with parameter groups, and learning-rate schedules (warmup + cosine, WSD, constant).

Weight decay is decoupled (AdamW, Loshchilov & Hutter, arXiv:1711.05101) and applied to the
weight matrices only: norm scales and the embedding (tied to the output head here) are not
decayed, as in GPT-3/nanoGPT-style training and most open recipes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .recipe import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and undecayed norms / embeddings / biases."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or "embed" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def choose_impl(model: nn.Module, requested: str) -> str:
    """'fused' where torch has a fused AdamW for these parameters, else 'foreach'."""
    if requested != "auto":
        return requested
    params = list(model.parameters())
    if any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params):
        return "foreach"  # FSDP2 shards: the foreach kernel is the tested path for DTensors
    devices = {p.device.type for p in params}
    return "fused" if devices <= {"cpu", "cuda"} else "foreach"


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; the learning rate is set each step by the schedule."""
    impl = choose_impl(model, cfg.impl)
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        **kwargs,
    )


def lr_at(step: int, cfg: OptimSection, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `max_steps`.

    warmup: lr * (step + 1) / warmup for step < warmup.
    cosine: lr_min + (lr - lr_min) * (1 + cos(pi * t)) / 2, t = (step - warmup) / (max - warmup)
            (Loshchilov & Hutter, SGDR, arXiv:1608.03983).
    wsd:    lr until the last `decay_fraction` of the steps, then linear to lr_min
            (warmup-stable-decay, Hu et al., MiniCPM, arXiv:2404.06395).
    """
    lr, warmup = cfg.lr, cfg.warmup_steps
    lr_min = lr * cfg.min_lr_ratio
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "cosine":
        span = max_steps - warmup - 1  # the last step lands on lr_min
        t = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
        return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * (max_steps - warmup)))
        start = max_steps - decay_steps
        if step < start:
            return lr
        t = min(1.0, (step - start + 1) / decay_steps)
        return lr + (lr_min - lr) * t
    raise ValueError(f"optim.schedule {cfg.schedule!r} is unknown; use cosine, wsd or constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
