"""Shared fixtures: tiny random Gemma 3 checkpoints written by transformers (the reference)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reference import hf_causal_lm


@pytest.fixture
def hf_checkpoint(tmp_path: Path):
    """Factory: save a random HF Gemma3ForCausalLM and return (model, directory)."""

    def make(seed: int = 0, **overrides):
        model = hf_causal_lm(seed, **overrides)
        path = tmp_path / f"hf-{seed}-{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(path)
        return model, path

    return make
