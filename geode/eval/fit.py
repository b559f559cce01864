"""Prompts that fit the model's context: fewer few-shot examples, else a skipped sample.

A generation request fits when its prompt tokens + max_tokens <= the context (the rule of the
engine, `geode serve` and vLLM); a log-likelihood request when its longest context +
continuation + 1 token does (one prefill). When a task's prompt does not fit, its few-shot
examples are dropped from the end, one at a time, until it does, and the sample records
`fit`: the shots used, of how many, the token counts. When even the zero-shot prompt does not
fit, nothing is sent: the sample records `skipped` (the reason) and is left out of the
metrics, which count it. Both backends count tokens as they send them
(`Backend.prompt_tokens`), so a task gives the same records through either; a backend that
does not know its context (an endpoint without `max_model_len`) sends prompts unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def fit_shots(
    shots: int,
    prompt_tokens: Callable[[int], int],
    reserve: int,
    context: int | None,
    what: str = "prompt",
) -> tuple[int, dict[str, Any]]:
    """(shots to use, fields for the sample record) for a prompt whose length with k shots is
    `prompt_tokens(k)` and that needs `reserve` more tokens (max_tokens to generate).

    The record fields are {} when all `shots` fit, {"fit": {...}} when fewer do, and
    {"fit": {...}, "skipped": reason} when none do (then the shots returned are 0)."""
    if context is None:
        return shots, {}
    n = 0
    for k in range(shots, -1, -1):
        n = prompt_tokens(k)
        if n + reserve <= context:
            if k == shots:
                return k, {}
            return k, {"fit": _fit(k, shots, n, reserve, context)}
    with_shots = f" with 0 of {shots} shots" if shots else ""
    reason = (
        f"{what} of {n} tokens{with_shots} + {reserve} for the output exceeds the model's context "
        f"of {context} tokens"
    )
    return 0, {"fit": _fit(0, shots, n, reserve, context), "skipped": reason}


def _fit(k: int, shots: int, n: int, reserve: int, context: int) -> dict[str, int]:
    return {
        "shots": k,
        "requested_shots": shots,
        "prompt_tokens": n,
        "max_tokens": reserve,
        "context": context,
    }
