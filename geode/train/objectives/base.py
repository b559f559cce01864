"""The trainer's objective seam: `Objective.loss_sum(model, batch) -> (sum, normalizer, metrics)`.

One optimizer step (see loop.py) runs every micro-batch of the global batch through
`loss_sum`, back-propagates the *sum*, then divides the gradient by the normalizer summed over
all micro-batches and ranks:

    grad = d/dθ [ sum_{ranks, micro-batches} loss_sum ] / sum_{ranks, micro-batches} normalizer

so the update is the global mean (per token, per pair, per sequence: the objective decides)
whatever the world size and accumulation. Metrics are sums too; the loop all-reduces them
and `report` turns them into the logged values.

An objective is registered by `kind` (`@register("ntp")`) and selected by a recipe's
`[objective] kind = ...`; `build_objective(trainer)` makes it from the trainer (its recipe,
device, autocast and raw model). Frozen models (teacher, DPO reference, RL anchor) are
`geode.train.reference.Reference`s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ...data.loader import Batch
from ...recipe import RecipeError, load_recipe

if TYPE_CHECKING:  # pragma: no cover
    from ..loop import Trainer

Metrics = dict[str, torch.Tensor | float]

OBJECTIVES: dict[str, type[Objective]] = {}


def register(kind: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make an Objective selectable as `[objective] kind = KIND`."""

    def deco(cls: type[Objective]) -> type[Objective]:
        if kind in OBJECTIVES and OBJECTIVES[kind] is not cls:
            raise ValueError(f"objective kind {kind!r} is already registered")
        cls.kind = kind
        OBJECTIVES[kind] = cls
        return cls

    return deco


class Objective:
    """A training objective: a loss sum over a batch, its normalizer and named metric sums."""

    kind: ClassVar[str] = ""
    Options: ClassVar[type | None] = None  # dataclass of `[objective.options]`, or None

    def __init__(self, trainer: Trainer, options: Any = None):
        self.trainer = trainer
        self.options = options

    @classmethod
    def from_trainer(cls, trainer: Trainer) -> Objective:
        """Build from the trainer's recipe (`[objective.options]` loaded into `Options`)."""
        return cls(trainer, parse_options(cls, trainer.recipe.objective.options))

    @classmethod
    def preflight(cls, trainer: Trainer) -> int:
        """Checks before any model is built; returns the parameters of frozen models it will load."""
        return 0

    @classmethod
    def prepare_model(cls, trainer: Trainer, model: nn.Module) -> nn.Module:
        """The model to train, from the built or loaded decoder (a reward model adds a head)."""
        return model

    def save_model(self, model: nn.Module, path: Path, files: dict[str, str]) -> None:
        """Export the trained model to `path` (the HF layout of its kind)."""
        from ...checkpoint import save_model

        save_model(model, path, files=files)

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, float, Metrics]:
        """(loss sum carrying gradient, normalizer, named metric sums) of one micro-batch."""
        raise NotImplementedError

    def report(self, sums: dict[str, float], normalizer: float, training: bool) -> dict[str, float]:
        """Logged values from metric sums over the whole global (or eval) batch.

        Training records must hold "loss"; eval records are named "eval_*". The default
        divides every sum by the normalizer.
        """
        n = max(normalizer, 1.0)
        prefix = "" if training else "eval_"
        return {f"{prefix}{k}": v / n for k, v in sums.items()}

    def autocast(self):
        """The trainer's autocast context for forward passes (bfloat16 when configured)."""
        return self.trainer._autocast()


def parse_options(cls: type[Objective], options: dict[str, Any]) -> Any:
    """`[objective.options]` as the objective's Options dataclass (unknown keys are errors)."""
    if cls.Options is None:
        if options:
            raise RecipeError(
                f"objective.options: objective {cls.kind!r} takes no options, got "
                f"{', '.join(sorted(options))}"
            )
        return None
    assert is_dataclass(cls.Options)
    try:
        return load_recipe(cls.Options, dict(options))
    except RecipeError as e:
        raise RecipeError(f"objective.options ({cls.kind}): {e}") from None


def objective_kind(recipe: Any) -> str:
    """The recipe's objective kind: `[objective] kind`, else 'distill' with [distill], else 'ntp'."""
    kind = recipe.objective.kind
    if not kind:
        kind = "distill" if recipe.distill is not None else "ntp"
    return kind


def objective_class(kind: str) -> type[Objective]:
    """The registered class of `kind` (importing the built-in objectives first)."""
    from . import _load_builtins

    _load_builtins()
    if kind not in OBJECTIVES:
        raise RecipeError(
            f"objective.kind = {kind!r} is unknown; registered: {', '.join(sorted(OBJECTIVES))}"
        )
    return OBJECTIVES[kind]


def build_objective(trainer: Trainer) -> Objective:
    """The objective a trainer's recipe selects."""
    return objective_class(objective_kind(trainer.recipe)).from_trainer(trainer)


# ------------------------------------------------------------------ shared tensor helpers
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: logits (B, T, V), targets (B, T) -> (B, T) float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)


def sequence_logprobs(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed log-prob of each row's trained targets: sum_t mask * log p(y_t) -> (B,) float32."""
    lp = token_logprobs(logits, batch.targets)  # (B, T)
    return (lp * batch.loss_mask).sum(-1)  # (B,)
