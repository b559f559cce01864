"""Decontamination: drop training documents that share a long n-gram with an evaluation set.

Following GPT-3 (Brown et al., 2020, App. C) and PaLM (Chowdhery et al., 2022, Sec. 8), a
training document is contaminated when it shares any word 13-gram with an evaluation item,
after normalisation: lower-case, and every run of characters other than letters and digits
is a word break (so "Janet’s" and "Janet's" both read "janet s"). Evaluation items shorter
than n words but with at least `min_words` words are matched as a whole; shorter ones are
skipped and counted (matching "yes" everywhere would drop everything).

Matching is exact but vectorised: words map to ids of the evaluation vocabulary (a word
outside it cannot be in a shared n-gram), every window of n known words gets a 64-bit
polynomial hash in numpy, and hash hits are confirmed by comparing the words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .dedup import ngram_hashes
from .sources import SourceConfig

_WORD = re.compile(r"[^\W_]+")


@dataclass
class DecontamConfig:
    """Evaluation sets to remove from training data, and the n-gram length."""

    ngram: int = 13
    min_words: int = 8  # eval items with fewer words than this are not matched
    eval_sets: list[SourceConfig] = field(default_factory=list)


@dataclass(frozen=True)
class Match:
    """Why a document was dropped: the evaluation item and the shared n-gram."""

    eval_id: str
    ngram: str


def normalize_words(text: str) -> list[str]:
    """Lower-cased runs of letters/digits: the words n-grams are made of."""
    return _WORD.findall(text.lower())


def _window_hashes(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, starts) of the length-n windows of ids (L,) that contain no unknown word (-1)."""
    L = len(ids)
    if L < n:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    unknown = np.concatenate([[0], np.cumsum(ids < 0)])  # (L+1,) prefix counts
    ok = (unknown[n:] - unknown[:-n]) == 0  # (L-n+1,) windows of known words only
    starts = np.nonzero(ok)[0]
    return ngram_hashes(ids.astype(np.uint64), n, starts), starts


class Decontaminator:
    """Index evaluation texts; `check(text)` finds a shared n-gram with any of them."""

    def __init__(self, ngram: int = 13, min_words: int = 8):
        if ngram < 1:
            raise ValueError(f"decontam ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        self.min_words = min(min_words, ngram)
        self.vocab: dict[str, int] = {}
        self._index: dict[
            int, dict[int, list[tuple[str, tuple[str, ...]]]]
        ] = {}  # n -> hash -> items
        self._keys: dict[int, np.ndarray] = {}  # n -> sorted hashes, rebuilt after `add`
        self.items = 0
        self.skipped: list[str] = []  # ids of items too short to match

    def add(self, item_id: str, text: str) -> None:
        """Index one evaluation item."""
        words = normalize_words(text)
        if len(words) < self.min_words:
            self.skipped.append(item_id)
            return
        n = min(self.ngram, len(words))
        ids = np.array([self.vocab.setdefault(w, len(self.vocab)) for w in words], np.int64)
        hashes, starts = _window_hashes(ids, n)
        table = self._index.setdefault(n, {})
        for h, s in zip(hashes.tolist(), starts.tolist()):
            table.setdefault(h, []).append((item_id, tuple(words[s : s + n])))
        self._keys.clear()
        self.items += 1

    def add_all(self, items: Iterable[tuple[str, str]]) -> None:
        """Index (id, text) pairs."""
        for item_id, text in items:
            self.add(item_id, text)

    def check(self, text: str) -> Match | None:
        """The first evaluation item sharing an n-gram with `text`, or None."""
        if not self._index:
            return None
        words = normalize_words(text)
        ids = np.fromiter((self.vocab.get(w, -1) for w in words), np.int64, len(words))
        for n, table in sorted(self._index.items(), reverse=True):
            hashes, starts = _window_hashes(ids, n)
            if not len(hashes):
                continue
            keys = self._keys.get(n)
            if keys is None:
                keys = self._keys[n] = np.sort(np.fromiter(table.keys(), np.uint64, len(table)))
            pos = np.searchsorted(keys, hashes).clip(max=len(keys) - 1)
            hits = np.nonzero(keys[pos] == hashes)[0]
            for i in hits.tolist():
                s = int(starts[i])
                gram = tuple(words[s : s + n])
                for item_id, item_gram in table[int(hashes[i])]:
                    if item_gram == gram:
                        return Match(item_id, " ".join(gram))
        return None
