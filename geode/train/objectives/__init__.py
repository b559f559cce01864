"""Training objectives behind one seam (base.py): next-token, SFT, distillation, and more.

    from geode.train.objectives import Objective, register, build_objective

Built-in kinds are registered on first use (`objective_class`); a new objective is a class
with `loss_sum(model, batch) -> (sum, normalizer, metrics)` decorated with `@register(kind)`,
selected by a recipe's `[objective] kind = ...`. See docs/post-training.md ("The seam").
"""

from __future__ import annotations

import importlib

from .base import (
    OBJECTIVES,
    Objective,
    build_objective,
    objective_class,
    objective_kind,
    register,
    sequence_logprobs,
    token_logprobs,
)

# Modules that register built-in objectives (H7's preference/reward objectives add theirs here).
BUILTIN_MODULES: list[str] = [
    "geode.train.objectives.ntp",
    "geode.train.objectives.distill",
    "geode.train.objectives.preference",
    "geode.train.objectives.reward",
    "geode.train.objectives.policy",
    "geode.train.objectives.score",
    "geode.train.objectives.cfg",
]


def _load_builtins() -> None:
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


__all__ = [
    "OBJECTIVES",
    "Objective",
    "build_objective",
    "objective_class",
    "objective_kind",
    "register",
    "sequence_logprobs",
    "token_logprobs",
]
