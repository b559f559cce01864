"""Deduplication: exact (a hash of the text) and near-duplicate (MinHash + LSH).

Both are streaming and keep the first occurrence: `check(id, text)` returns the id of an
earlier document this one duplicates (and forgets this one), or None (and remembers it).

Near-duplicates follow Broder (1997, "On the resemblance and containment of documents"):
a document is the set of its word 5-grams ("shingles") after lower-casing; two documents
are near-duplicates when the Jaccard similarity of their sets is >= `threshold`. MinHash
signatures estimate the similarity and locality-sensitive hashing over bands of the
signature finds candidates without comparing all pairs; both come from `datasketch`
(MinHash, MinHashLSH). Candidates are confirmed by their estimated Jaccard similarity, so
LSH's false positives do not drop documents.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import numpy as np

_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the n-gram hashes


@dataclass
class DedupConfig:
    """Which deduplication to run, with the near-duplicate parameters."""

    exact: bool = True  # drop documents whose text (whitespace-stripped) was seen before
    near: bool = False  # drop documents whose shingle sets overlap an earlier one's
    threshold: float = 0.8  # Jaccard similarity at which two documents are near-duplicates
    num_perm: int = 128  # MinHash permutations (signature length)
    shingle: int = 5  # words per shingle
    seed: int = 1  # MinHash permutation seed


class ExactDedup:
    """Exact duplicates by SHA-1 of the stripped text (20 bytes kept per unique document)."""

    def __init__(self) -> None:
        self._seen: dict[bytes, str] = {}

    def check(self, doc_id: str, text: str) -> str | None:
        """Id of an earlier identical document, or None (then `doc_id` is remembered)."""
        key = hashlib.sha1(text.strip().encode("utf-8")).digest()
        earlier = self._seen.get(key)
        if earlier is None:
            self._seen[key] = doc_id
        return earlier


def ngram_hashes(values: np.ndarray, n: int, starts: np.ndarray | None = None) -> np.ndarray:
    """64-bit polynomial hashes (k,) of the n-grams of `values` (L,) uint64 starting at `starts`
    (default: every start); h = sum_j (v[s+j] + 1) * M^(n-1-j) mod 2^64."""
    if starts is None:
        starts = np.arange(max(0, len(values) - n + 1))
    h = np.zeros(len(starts), np.uint64)  # (k,)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _MULT + values[starts + j] + np.uint64(1)
    return h


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Distinct 32-bit hashes (k,) of the lower-cased word n-grams ("shingles") of `text`.

    Each word is hashed once (CRC-32: deterministic across runs, unlike `hash(str)`) and a
    shingle's word hashes are combined by `ngram_hashes` in numpy; hashing every shingle's
    bytes with SHA-1 in Python (datasketch's default) took 2-3x longer on the stdlib corpus.
    """
    words = text.lower().split()
    wh = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), np.uint64, len(words))
    h = ngram_hashes(wh, min(n, len(words)))  # a text shorter than n words is one shingle
    if not len(h):  # empty text
        h = np.zeros(1, np.uint64)
    return np.unique((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


class NearDedup:
    """Near-duplicates by MinHash signatures indexed in a datasketch MinHashLSH."""

    def __init__(
        self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, seed: int = 1
    ) -> None:
        from datasketch import MinHash, MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-dedup threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.shingle = shingle
        # permutations shared by all signatures; inputs are already 32-bit shingle hashes
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: dict[str, np.ndarray] = {}  # id -> (num_perm,) hash values

    def signature(self, text: str):
        """The MinHash of `text`'s shingle set."""
        from datasketch import MinHash

        t = self._template
        m = MinHash(
            num_perm=len(t.hashvalues),
            seed=t.seed,
            hashfunc=int,
            permutations=t.permutations,
            scheme=t.scheme,
        )
        m.update_batch(shingle_hashes(text, self.shingle).tolist())
        return m

    def check(self, doc_id: str, text: str) -> str | None:
        """Id of an earlier near-duplicate, or None (then `doc_id` is indexed)."""
        m = self.signature(text)
        for other in sorted(self._lsh.query(m)):
            estimate = float(np.mean(self._signatures[other] == m.hashvalues))  # ~Jaccard
            if estimate >= self.threshold:
                return other
        if doc_id in self._signatures:
            raise ValueError(f"near-dedup: document id {doc_id!r} seen twice")
        self._lsh.insert(doc_id, m)
        self._signatures[doc_id] = m.hashvalues.copy()
        return None
