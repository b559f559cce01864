"""The trainer: pretraining and Gemma-3-style distillation on one process or many (torchrun).

    from geode.train import load_train_recipe, train, train_distilled
    summary = train(load_train_recipe("recipes/train/nano.toml"), out="runs/nano")
    result = train_distilled("recipes/train/distill.toml", out="runs/distill")

Modules: recipe (TrainRecipe), optim (AdamW groups, schedules), loss (CE, z-loss),
distributed (torchrun, DDP, FSDP2), state (checkpoints, snapshots), fault (elastic restart,
SDC, goodput), distill (Gemma 3 distillation), memory (preflight), metrics (JSONL, PNG),
loop (Trainer), run (train / distill entry points). See docs/training.md.
"""

from __future__ import annotations

from .recipe import TrainRecipe, load_train_recipe
from .run import distill as train_distilled
from .run import train

# `geode.train.distill` is the distillation module; its entry point is `train_distilled`.
__all__ = ["TrainRecipe", "load_train_recipe", "train", "train_distilled"]
