"""geode: build, train, post-train, serve and evaluate a family of Gemma-style models."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> defining module. Imported on first use so `geode --help` does not load torch.
_EXPORTS = {
    "CheckpointError": "geode.checkpoint",
    "load_model": "geode.checkpoint",
    "read_config": "geode.checkpoint",
    "save_model": "geode.checkpoint",
    "ConfigError": "geode.config",
    "ModelConfig": "geode.config",
    "get_preset": "geode.config",
    "Transformer": "geode.model",
    "build_model": "geode.model",
    "load_tokenizer": "geode.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Lazy exports (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'geode' has no attribute {name!r}")


def __dir__() -> list[str]:
    """Module attributes including the lazy exports."""
    return sorted(set(globals()) | set(_EXPORTS))
