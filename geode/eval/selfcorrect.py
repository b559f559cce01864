"""Self-correction metrics of SCoRe (Kumar et al. 2024, arXiv:2409.12917, sec. 3).

Two attempts per problem: the first answer, then (after the model's answer and a correction
instruction in the conversation) the second. Over N problems:
  Accuracy@t1 = fraction correct at the first attempt,
  Accuracy@t2 = fraction correct at the second attempt,
  Δ(t1, t2) = Accuracy@t2 - Accuracy@t1 (net improvement),
  Δ_i→c(t1, t2) = fraction of problems incorrect at t1 and correct at t2,
  Δ_c→i(t1, t2) = fraction of problems correct at t1 and incorrect at t2.
So Δ(t1, t2) = Δ_i→c - Δ_c→i.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .backends import Prompt


def second_turn(prompt: Prompt, first_output: str, instruction: str) -> list[dict[str, Any]]:
    """The conversation for the second attempt: prompt, first answer, correction instruction."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [
        *messages,
        {"role": "assistant", "content": first_output},
        {"role": "user", "content": instruction},
    ]


def self_correction_metrics(pairs: Sequence[tuple[bool, bool]]) -> dict[str, float]:
    """SCoRe's metrics from (correct at t1, correct at t2) per problem."""
    n = len(pairs)
    if n == 0:
        nan = float("nan")
        return {
            k: nan for k in ("accuracy@t1", "accuracy@t2", "delta", "delta_i_to_c", "delta_c_to_i")
        } | {"n": 0}
    t1 = sum(a for a, _ in pairs) / n
    t2 = sum(b for _, b in pairs) / n
    i2c = sum((not a) and b for a, b in pairs) / n
    c2i = sum(a and (not b) for a, b in pairs) / n
    return {
        "accuracy@t1": t1,
        "accuracy@t2": t2,
        "delta": t2 - t1,
        "delta_i_to_c": i2c,
        "delta_c_to_i": c2i,
        "n": n,
    }
