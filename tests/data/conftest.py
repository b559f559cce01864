"""Fixtures for the data pipeline: a byte-level stand-in tokenizer, a real SentencePiece
model trained once per session, small prepared datasets, and the shared reference data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from geode.data.prepare import DataRecipe, PackConfig, prepare
from geode.data.sources import SourceConfig
from geode.data.tasks import generate
from tests.data.helpers import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"


@pytest.fixture
def byte_tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory) -> Path:
    """Path of a small real SentencePiece model trained on tasks + a little stdlib code."""
    from geode.data.sources import stdlib_files
    from geode.tokenizer import train_tokenizer

    texts = [p.document() for p in generate(300, seed=0)]
    texts += [f.read_text(encoding="utf-8") for f in stdlib_files()[:20]]
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(texts=texts, vocab_size=600, out=out)
    return out


@pytest.fixture
def gsm8k_test() -> Path:
    path = SHARED / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K test set not found at {path} (shared reference data absent)")
    return path


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: prepare {source name: [documents]} with the byte tokenizer; returns the dir."""

    def make(docs: dict[str, list[str]], shard_tokens: int = 1 << 20, **recipe_kw) -> Path:
        sources = []
        for name, texts in docs.items():
            path = tmp_path / f"{name}.jsonl"
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
            sources.append(SourceConfig(name=name, kind="jsonl", paths=[str(path)]))
        recipe_kw.setdefault("pack", PackConfig(shard_tokens=shard_tokens))
        recipe = DataRecipe(sources=sources, **recipe_kw)
        out = tmp_path / f"prepared-{len(list(tmp_path.glob('prepared-*')))}"
        recipe.dedup.exact = False
        prepare(recipe, out=out, tokenizer=ByteTokenizer(), progress=False)
        return out

    return make
