"""Heuristic quality filters: length, symbol ratio and repetition.

The rules and their suggested thresholds are those of the MassiveText quality and
repetition filters of Gopher (Rae et al., 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", App. A.1.1-A.1.2, Table A1), which RefinedWeb (Penedo et al.,
2023, "The RefinedWeb Dataset for Falcon LLM", App. G.1) reuses:

  words                  50 <= words <= 100,000
  mean word length       3 <= mean <= 10 characters
  symbol-to-word ratio   (#'s + '...'s) / words < 0.1
  alphabetic words       >= 80% of words contain a letter
  duplicate lines        <= 30% of lines, <= 20% of characters in duplicated lines
  duplicate paragraphs   <= 30% of paragraphs, <= 20% of characters in them
  top n-gram share       most frequent 2/3/4-gram covers <= 20/18/16% of word characters
  duplicate n-grams      words covered by repeated 5..10-grams hold <= 15/14/13/12/11/10%

Every threshold is off (None) unless set, because prose rules misfire on code and on the
synthetic tasks: a recipe turns on the ones that fit each source. `max_symbol_ratio` is a
simpler character-level rule: the share of characters that are neither letters, digits nor
whitespace.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Gopher Table A1, for recipes that want the published values.
GOPHER_TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUPLICATE_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


@dataclass
class FilterConfig:
    """Thresholds of the quality filters; None (the default) turns a rule off."""

    min_chars: int | None = None
    max_chars: int | None = None
    min_words: int | None = None  # Gopher: 50
    max_words: int | None = None  # Gopher: 100,000
    min_mean_word_length: float | None = None  # Gopher: 3
    max_mean_word_length: float | None = None  # Gopher: 10
    max_symbol_ratio: float | None = None  # non-alphanumeric, non-space chars / chars
    max_hash_ellipsis_ratio: float | None = None  # Gopher: 0.1 ('#' and '...' per word)
    min_alpha_word_fraction: float | None = None  # Gopher: 0.8
    max_duplicate_line_fraction: float | None = None  # Gopher: 0.30
    max_duplicate_line_char_fraction: float | None = None  # Gopher: 0.20
    max_duplicate_paragraph_fraction: float | None = None  # Gopher: 0.30
    max_duplicate_paragraph_char_fraction: float | None = None  # Gopher: 0.20
    max_top_ngram_fraction: dict[int, float] = field(default_factory=dict)  # GOPHER_TOP_NGRAM
    max_duplicate_ngram_fraction: dict[int, float] = field(default_factory=dict)

    @classmethod
    def gopher(cls) -> FilterConfig:
        """All rules at Gopher's published thresholds (for natural-language prose)."""
        return cls(
            min_words=50,
            max_words=100_000,
            min_mean_word_length=3,
            max_mean_word_length=10,
            max_hash_ellipsis_ratio=0.1,
            min_alpha_word_fraction=0.8,
            max_duplicate_line_fraction=0.30,
            max_duplicate_line_char_fraction=0.20,
            max_duplicate_paragraph_fraction=0.30,
            max_duplicate_paragraph_char_fraction=0.20,
            max_top_ngram_fraction=dict(GOPHER_TOP_NGRAM),
            max_duplicate_ngram_fraction=dict(GOPHER_DUPLICATE_NGRAM),
        )


def _duplicate_fractions(parts: list[str]) -> tuple[float, float]:
    """(share of parts that repeat an earlier one, share of characters in those repeats)."""
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_parts = dup_chars = 0
    for p in parts:
        if p in seen:
            dup_parts += 1
            dup_chars += len(p)
        else:
            seen.add(p)
    total_chars = sum(len(p) for p in parts) or 1
    return dup_parts / len(parts), dup_chars / total_chars


def top_ngram_fraction(words: list[str], n: int) -> float:
    """Share of word characters taken by all occurrences of the most frequent n-gram."""
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(len(w) for w in words)
    return count * sum(len(w) for w in gram) / total


def duplicate_ngram_fraction(words: list[str], n: int) -> float:
    """Share of word characters in words covered by some n-gram that occurs more than once."""
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = bytearray(len(words))  # 1 where a word lies inside a repeated n-gram
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = b"\x01" * n
    total = sum(len(w) for w in words)
    dup = sum(len(w) for w, c in zip(words, covered) if c)
    return dup / total if total else 0.0


class QualityFilter:
    """Applies a FilterConfig; `check(text)` names the first rule a document fails."""

    def __init__(self, config: FilterConfig):
        self.config = config
        c = config
        self._needs_words = any(
            v is not None
            for v in (
                c.min_words,
                c.max_words,
                c.min_mean_word_length,
                c.max_mean_word_length,
                c.max_hash_ellipsis_ratio,
                c.min_alpha_word_fraction,
            )
        ) or bool(c.max_top_ngram_fraction or c.max_duplicate_ngram_fraction)

    @property
    def active(self) -> bool:
        """Whether any rule is on."""
        c = self.config
        scalars = [v for k, v in vars(c).items() if not isinstance(v, dict)]
        return any(v is not None for v in scalars) or self._needs_words

    def check(self, text: str) -> str | None:
        """None if `text` passes every active rule, else the failing rule's name."""
        c = self.config
        n = len(text)
        if c.min_chars is not None and n < c.min_chars:
            return "min_chars"
        if c.max_chars is not None and n > c.max_chars:
            return "max_chars"
        if c.max_symbol_ratio is not None and n:
            symbols = sum(1 for ch in text if not (ch.isalnum() or ch.isspace()))
            if symbols / n > c.max_symbol_ratio:
                return "max_symbol_ratio"
        if self._needs_words:
            reason = self._check_words(text.split())
            if reason:
                return reason
        if (
            c.max_duplicate_line_fraction is not None
            or c.max_duplicate_line_char_fraction is not None
        ):
            lines = [ln.strip() for ln in text.split("\n")]
            frac, char_frac = _duplicate_fractions([ln for ln in lines if ln])
            if c.max_duplicate_line_fraction is not None and frac > c.max_duplicate_line_fraction:
                return "max_duplicate_line_fraction"
            lim = c.max_duplicate_line_char_fraction
            if lim is not None and char_frac > lim:
                return "max_duplicate_line_char_fraction"
        if (
            c.max_duplicate_paragraph_fraction is not None
            or c.max_duplicate_paragraph_char_fraction is not None
        ):
            paras = [p.strip() for p in text.split("\n\n")]
            frac, char_frac = _duplicate_fractions([p for p in paras if p])
            lim = c.max_duplicate_paragraph_fraction
            if lim is not None and frac > lim:
                return "max_duplicate_paragraph_fraction"
            lim = c.max_duplicate_paragraph_char_fraction
            if lim is not None and char_frac > lim:
                return "max_duplicate_paragraph_char_fraction"
        return None

    def _check_words(self, words: list[str]) -> str | None:
        c = self.config
        nw = len(words)
        if c.min_words is not None and nw < c.min_words:
            return "min_words"
        if c.max_words is not None and nw > c.max_words:
            return "max_words"
        if not nw:
            return None
        mean = sum(len(w) for w in words) / nw
        if c.min_mean_word_length is not None and mean < c.min_mean_word_length:
            return "min_mean_word_length"
        if c.max_mean_word_length is not None and mean > c.max_mean_word_length:
            return "max_mean_word_length"
        if c.max_hash_ellipsis_ratio is not None:
            marks = sum(w.count("#") + w.count("...") + w.count("\u2026") for w in words)
            if marks / nw > c.max_hash_ellipsis_ratio:
                return "max_hash_ellipsis_ratio"
        if c.min_alpha_word_fraction is not None:
            alpha = sum(1 for w in words if any(ch.isalpha() for ch in w))
            if alpha / nw < c.min_alpha_word_fraction:
                return "min_alpha_word_fraction"
        for n, lim in sorted(c.max_top_ngram_fraction.items()):
            if top_ngram_fraction(words, n) > lim:
                return f"max_top_{n}gram_fraction"
        for n, lim in sorted(c.max_duplicate_ngram_fraction.items()):
            if duplicate_ngram_fraction(words, n) > lim:
                return f"max_duplicate_{n}gram_fraction"
        return None
