"""The OpenAI-compatible server: schemas (protocol), continuous batching (scheduler), app."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """Build the FastAPI app (see `geode.serve.app.create_app`)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
