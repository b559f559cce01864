"""geode: build, train, post-train, serve and evaluate a family of Gemma-style models."""

from __future__ import annotations

from typing import Any

from .checkpoint import CheckpointError, load_model, read_config, save_model
from .config import ConfigError, ModelConfig, get_preset
from .model import Transformer, build_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "Transformer",
    "build_model",
    "get_preset",
    "load_model",
    "load_tokenizer",
    "read_config",
    "save_model",
]


def __getattr__(name: str) -> Any:
    """Lazy exports of subsystems that are heavier to import."""
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'geode' has no attribute {name!r}")
