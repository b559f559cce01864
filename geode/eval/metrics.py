"""Metrics: pass@k, exact match, BLEU/chrF (sacrebleu), WER (jiwer), confidence intervals."""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for n samples with c correct.

    The numerically stable product form of Chen et al. 2021 (Codex paper, fig. 3):
    1 - prod_{i=n-c+1}^{n} (1 - k / i).
    """
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} exceeds the number of samples n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given (n, c) per problem."""
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts])) if counts else float("nan")


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)


def normalize_text(s: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str | None, reference: str, normalize: bool = True) -> bool:
    """Prediction equals the reference (after `normalize_text` when `normalize`)."""
    if prediction is None:
        return False
    if normalize:
        return normalize_text(prediction) == normalize_text(reference)
    return prediction.strip() == reference.strip()


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams), 0-100."""
    import sacrebleu

    refs = _ref_streams(references, len(hypotheses))
    return float(sacrebleu.corpus_bleu(list(hypotheses), refs).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100."""
    import sacrebleu

    refs = _ref_streams(references, len(hypotheses))
    return float(sacrebleu.corpus_chrf(list(hypotheses), refs).score)


def _ref_streams(references, n: int) -> list[list[str]]:
    """sacrebleu's layout: one list per reference set, each as long as the hypotheses."""
    if len(references) != n:
        raise ValueError(f"{len(references)} references for {n} hypotheses")
    if all(isinstance(r, str) for r in references):
        return [list(references)]
    width = len(references[0])
    if any(len(r) != width for r in references):
        raise ValueError("every hypothesis needs the same number of references")
    return [[r[j] for r in references] for j in range(width)]


def wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate (jiwer): (substitutions + deletions + insertions) / words."""
    import jiwer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    return float(jiwer.wer(list(references), list(hypotheses)))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927)."""
    if n == 0:
        return (float("nan"), float("nan"))
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    if not len(values):
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    x = np.asarray(values, dtype=float)
    idx = np.array([[rng.randrange(len(x)) for _ in range(len(x))] for _ in range(resamples)])
    means = np.sort(x[idx].mean(axis=1))
    lo = means[int((1 - confidence) / 2 * (resamples - 1))]
    hi = means[int((1 + confidence) / 2 * (resamples - 1))]
    return (float(lo), float(hi))


def mean_with_ci(values: Sequence[float | bool], confidence: float = 0.95) -> dict[str, float]:
    """{'mean', 'ci_low', 'ci_high', 'n'}: Wilson for 0/1 values, bootstrap otherwise."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    mean = sum(vals) / n
    if all(v in (0.0, 1.0) for v in vals):
        lo, hi = wilson_interval(int(sum(vals)), n, confidence)
    else:
        lo, hi = bootstrap_interval(vals, confidence)
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": n}
