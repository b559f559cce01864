"""Shared helpers of the trainer tests: tiny prepared datasets and recipes, subprocess runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from geode.data.pack import FORMAT, MANIFEST, VERSION, StreamWriter, write_json_atomic

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BYTE_OFFSET = 3  # ids 0, 1, 2 are pad, eos, bos; byte b is id b + 3
BYTE_VOCAB = 256 + BYTE_OFFSET


def write_dataset(root: Path, streams: dict[str, list[list[int]]], vocab_size: int) -> Path:
    """A prepared dataset (pack.py format) with one stream per entry; returns its directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, docs in streams.items():
        w = StreamWriter(root, name, "uint16", shard_tokens=1 << 20)
        w.add(docs)
        entries[name] = w.close()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "uint16",
        "vocab_size": vocab_size,
        "bos_id": 2,
        "eos_id": 1,
        "pad_id": 0,
        "streams": entries,
    }
    write_json_atomic(root / MANIFEST, manifest)
    return root


def byte_docs(text: str, sep: str = "\n\n") -> list[list[int]]:
    """Paragraphs of `text` as byte-level documents: bos, bytes + 3, eos."""
    docs = []
    for para in text.split(sep):
        if para.strip():
            docs.append([2, *(b + BYTE_OFFSET for b in para.encode("utf-8")), 1])
    return docs


def synthetic_dataset(root: Path, vocab: int = 64, docs: int = 400, seed: int = 0) -> Path:
    """Learnable toy data: documents counting upward modulo `vocab` from a random start,
    plus a held-out stream drawn the same way."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> list[list[int]]:
        out = []
        for _ in range(n):
            start, length = int(rng.integers(3, vocab)), int(rng.integers(8, 40))
            out.append([2, *((start + i) % (vocab - 3) + 3 for i in range(length)), 1])
        return out

    return write_dataset(root, {"train": make(docs), "heldout": make(docs // 4)}, vocab)


def shakespeare_dataset(root: Path) -> Path:
    """tinyshakespeare at byte level: first 90% of paragraphs train, last 10% held out."""
    docs = byte_docs(SHAKESPEARE.read_text(encoding="utf-8"))
    cut = int(len(docs) * 0.9)
    return write_dataset(root, {"train": docs[:cut], "heldout": docs[cut:]}, BYTE_VOCAB)


def tiny_recipe(data: Path, /, **sections: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict for a ~100K-parameter model on `data`; `sections` update its tables."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "model": {
            "preset": "nano-1m",
            "overrides": {
                "vocab_size": 64,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 32,
                "query_pre_attn_scalar": 32,
                "sliding_window": 16,
                "layer_types": ["sliding_attention", "full_attention"],
            },
        },
        "data": {"path": str(data), "seq_len": 32, "eval_source": "heldout"},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.1},
        "train": {"max_steps": 8, "progress": False, "threads": 1},
        "eval": {"batches": 2},
        "checkpoint": {"export": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(name), dict):
            recipe[name].update(values)
        else:
            recipe[name] = values
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    """Write a recipe dict as TOML."""
    from geode.recipe import recipe_to_toml

    path.write_text(recipe_to_toml(recipe))
    return path


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child geode process: one thread, the repo importable."""
    env = dict(os.environ)
    env.pop("GEODE_FAULT", None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", **extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group (workers too)."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout}s: {cmd}\n{out[-3000:]}\n{err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def geode_cli(args: list[str], env: dict[str, str], timeout: float = 240):
    """`python -m geode ARGS` in a child process."""
    return run([sys.executable, "-m", "geode", *args], env, timeout)


def torchrun(nproc: int, args: list[str], env: dict[str, str], timeout: float = 240, extra=()):
    """`torchrun --standalone --nproc-per-node N [extra] -m geode ARGS` in a child process."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", *extra, "-m", "geode", *args,
    ]  # fmt: skip
    return run(cmd, env, timeout)
