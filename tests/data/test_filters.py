"""Quality filters (Gopher rules) and exact / near-duplicate removal."""

from __future__ import annotations

import random

import pytest

from geode.data.dedup import ExactDedup, NearDedup, shingle_hashes
from geode.data.filters import (
    FilterConfig,
    QualityFilter,
    duplicate_ngram_fraction,
    top_ngram_fraction,
)

WORDS = (
    "river mountain quiet village morning harvest lantern journey market window garden "
    "teacher bridge thunder silver orchard meadow letter pocket winter summer kitchen "
    "painter station harbor candle forest ribbon shadow blanket whistle"
).split()


def prose(seed: int, n: int = 120) -> str:
    """Varied English-like text with stop words, in sentences and lines."""
    rng = random.Random(seed)
    stop = ["the", "and", "to", "of", "with", "that"]
    words = [rng.choice(WORDS) if i % 3 else rng.choice(stop) for i in range(n)]
    lines = [" ".join(words[i : i + 12]) + "." for i in range(0, n, 12)]
    return "\n".join(lines)


def check(text: str, **cfg) -> str | None:
    return QualityFilter(FilterConfig(**cfg)).check(text)


def test_all_off_by_default() -> None:
    q = QualityFilter(FilterConfig())
    assert not q.active and q.check("") is None and q.check("#" * 100) is None
    assert QualityFilter(FilterConfig(max_chars=5)).active


def test_length_and_symbol_rules() -> None:
    assert check("short", min_chars=10) == "min_chars"
    assert check("x" * 11, max_chars=10) == "max_chars"
    assert check("a b c", min_words=4) == "min_words"
    assert check("a b c d", min_words=4) is None
    assert check("@@##$$%% ok", max_symbol_ratio=0.3) == "max_symbol_ratio"
    assert check("plain words only", max_symbol_ratio=0.3) is None
    assert check("# # # words here", max_hash_ellipsis_ratio=0.1) == "max_hash_ellipsis_ratio"
    assert check("12 34 56 word", min_alpha_word_fraction=0.8) == "min_alpha_word_fraction"
    assert check("a bb cc", min_mean_word_length=3) == "min_mean_word_length"


def test_repetition_rules() -> None:
    repeated_lines = "\n".join(["same line here"] * 5 + ["other one", "third one"])
    assert check(repeated_lines, max_duplicate_line_fraction=0.3) == "max_duplicate_line_fraction"
    assert check(prose(0), max_duplicate_line_fraction=0.3) is None
    paras = "\n\n".join(["para one text"] * 3 + ["para two"])
    assert check(paras, max_duplicate_paragraph_fraction=0.3) == "max_duplicate_paragraph_fraction"
    spam = "buy now " * 30 + prose(1, 30)
    assert check(spam, max_top_ngram_fraction={2: 0.2}) == "max_top_2gram_fraction"
    assert check(spam, max_duplicate_ngram_fraction={5: 0.15}) == "max_duplicate_5gram_fraction"


def test_ngram_fractions() -> None:
    words = "a b a b c".split()
    assert top_ngram_fraction(words, 2) == pytest.approx(4 / 5)  # "a b" twice: 4 of 5 chars
    assert duplicate_ngram_fraction(words, 2) == pytest.approx(4 / 5)
    assert duplicate_ngram_fraction("a b c d e".split(), 2) == 0.0
    assert top_ngram_fraction(["x"], 2) == 0.0


def test_gopher_preset() -> None:
    q = QualityFilter(FilterConfig.gopher())
    assert q.check(prose(3, 200)) is None
    assert q.check("too short to keep") == "min_words"
    assert q.check(" ".join(["lorem ipsum dolor sit amet"] * 40)) is not None


def test_exact_dedup() -> None:
    d = ExactDedup()
    assert d.check("a", "hello world") is None
    assert d.check("b", "  hello world\n") == "a"
    assert d.check("c", "hello world!") is None


def test_near_dedup() -> None:
    base = prose(5, 300)
    words = base.split()
    edited = " ".join(words[:150] + ["CHANGED"] + words[151:])
    d = NearDedup(threshold=0.8)
    assert d.check("orig", base) is None
    assert d.check("edit", edited) == "orig"  # one word changed: ~0.97 Jaccard
    assert d.check("other", prose(6, 300)) is None  # same vocabulary, different text
    assert d.check("tiny", "a b") is None and d.check("tiny2", "A  b") == "tiny"
    half = " ".join(words[:150] + prose(7, 150).split())
    assert NearDedup(threshold=0.8).check("x", base) is None
    d2 = NearDedup(threshold=0.8)
    d2.check("orig", base)
    assert d2.check("half", half) is None  # ~1/3 Jaccard: kept
    assert len(shingle_hashes("a b c d e f", 5)) == 2
    assert len(shingle_hashes("a b c d e f g a b c d e", 5)) == 7  # distinct shingles only
    assert len(shingle_hashes("x", 5)) == 1 and len(shingle_hashes("", 5)) == 1
