"""Fixtures: a tiny random checkpoint with a trained tokenizer, and live servers on loopback."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import geode
from geode.config import get_preset
from geode.tokenizer import train_tokenizer
from tests.serve.helpers import LiveServer

WORDS = (
    "the quick brown fox jumps over lazy dog hello world json name arguments true false null "
    'add number value weather city paris { } [ ] : , " 0 1 2 3 4 5 6 7 8 9'
).split()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A nano-shaped random model (2 layers, context 1024) + a 420-piece tokenizer, HF layout."""
    root = tmp_path_factory.mktemp("serve")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(400)]
    texts.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .!?-_()/+*=<>@#%&'")
    tok = train_tokenizer(texts=texts, vocab_size=420, out=root / "tok")
    cfg = dataclasses.replace(
        get_preset("nano-1m"),
        vocab_size=tok.vocab_size,
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=1024,
        layer_types=None,
    )
    model = geode.build_model(cfg, seed=0)
    path = root / "model"
    geode.save_model(model, path, files={"tokenizer.model": root / "tok" / "tokenizer.model"})
    return path


@pytest.fixture(scope="session")
def server(checkpoint: Path) -> Iterator[LiveServer]:
    """The shared server: no API keys, batch 8."""
    from geode.serve.app import create_app

    live = LiveServer(create_app(checkpoint, max_batch=8, model_name="tiny")).start()
    yield live
    live.stop()


@pytest.fixture(scope="session")
def client(server: LiveServer) -> Any:
    """The official openai client pointed at the shared server."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
