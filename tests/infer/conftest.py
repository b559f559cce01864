"""Fixtures for the inference engine tests: a tiny random transformers Gemma 3 and its geode twin."""

from __future__ import annotations

import pytest
import torch

import geode
from tests.reference import hf_causal_lm

# Window 5, 7 layers (layer 5 global): short prompts, long prompts and outputs all cross it.
TINY = dict(sliding_window=5, max_position_embeddings=128)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers reference, geode model) with identical random weights, norms included."""
    ref = hf_causal_lm(11, **TINY)
    path = tmp_path_factory.mktemp("tiny")
    ref.save_pretrained(path)
    return ref, geode.load_model(path)


@pytest.fixture(scope="module")
def model(pair):
    """The geode model of `pair` (float32)."""
    return pair[1]


class FakeTokenizer:
    """A tokenizer whose pieces are fixed strings (enough for text, streaming and stop strings)."""

    def __init__(self, pieces: list[str], eos_id: int = 1, bos_id: int = 2):
        self.pieces = pieces
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.special_ids = {"<eos>": eos_id, "<bos>": bos_id}

    def encode(self, text: str) -> list[int]:
        """Greedy longest-match over the pieces."""
        ids, i = [], 0
        order = sorted(range(len(self.pieces)), key=lambda j: -len(self.pieces[j]))
        while i < len(text):
            j = next(j for j in order if self.pieces[j] and text.startswith(self.pieces[j], i))
            ids.append(j)
            i += len(self.pieces[j])
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        skip = {self.eos_id, self.bos_id} if skip_special else set()
        return "".join(self.pieces[i] for i in ids if i not in skip)


def forced(sequence: list[int]):
    """A logits processor that makes the model emit `sequence` (then keeps the last id)."""

    def proc(out: list[int], logits: torch.Tensor) -> torch.Tensor:
        t = sequence[min(len(out), len(sequence) - 1)]
        mask = torch.full_like(logits, float("-inf"))
        mask[t] = 0.0
        return logits + mask

    return proc
