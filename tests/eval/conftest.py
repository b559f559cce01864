"""Fixtures for the evaluation tests: shared benchmark files and a tiny random checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test."""
    p = SHARED.joinpath(*parts)
    if not p.is_file():
        pytest.skip(f"{p} not present")
    return p


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A 2-layer random nano model with a 400-piece tokenizer trained on synthetic tasks."""
    import geode
    from geode.data.tasks import generate
    from geode.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tiny-ckpt")
    texts = [p.document() for p in generate(300, seed=1)]
    tok = train_tokenizer(texts=texts, vocab_size=400, out=path, num_threads=1)
    cfg = dataclasses.replace(
        geode.get_preset("nano-1m"),
        vocab_size=len(tok),
        max_position_embeddings=2048,
        num_hidden_layers=2,
        layer_types=None,
    )
    model = geode.build_model(cfg, seed=0)
    geode.save_model(model, path, files={"tokenizer.model": path / "tokenizer.model"})
    return path
