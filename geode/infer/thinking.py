"""Thinking budgets: at most b tokens of thinking, then the engine closes the section.

A sequence is in a thinking section when its prompt ends inside one (`geode.chat.render(...,
think=True)` ends the prompt with <start_of_thinking>) or after it emits <start_of_thinking>; the
section ends at <end_of_thinking>. Its thinking tokens are those strictly between the two markers,
counted over the whole output (all sections together). `ThinkingBudget` is the per-sequence policy
of `SamplingParams.thinking_budget = b`: once b thinking tokens are out and the section is still
open, it asks the engine to force <end_of_thinking> (a forced token, sampled mask 0, the mechanism
of `Engine.append`) and sampling continues to the answer. A section opened after the budget is
spent is closed at once (b = 0: no thinking). The forced close counts as one of the request's
`max_new_tokens`, so the context a request can need stays what admission checked.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..tokenizer import END_OF_THINKING, START_OF_THINKING
from .sampling import RequestError


def thinking_ids(tokenizer: Any, budget: int | None = None) -> tuple[int, int]:
    """(<start_of_thinking>, <end_of_thinking>) ids of a tokenizer; RequestError naming the
    thinking_budget field when there is no tokenizer or it lacks either token."""
    ids = getattr(tokenizer, "special_ids", None) or {}
    start, end = ids.get(START_OF_THINKING), ids.get(END_OF_THINKING)
    if start is None or end is None:
        raise RequestError(
            f"thinking_budget={budget!r} is invalid: "
            + (
                "the engine has no tokenizer"
                if tokenizer is None
                else f"the tokenizer has no {START_OF_THINKING} / {END_OF_THINKING} token"
            )
        )
    return int(start), int(end)


def ends_in_thinking(ids: Sequence[int], start_id: int, end_id: int) -> bool:
    """Whether a token stream ends inside a thinking section (its last marker is a start)."""
    for t in reversed(ids):
        if t == end_id:
            return False
        if t == start_id:
            return True
    return False


def count_thinking(ids: Sequence[int], start_id: int, end_id: int, inside: bool = False) -> int:
    """Thinking tokens of an output (the policy's count, no budget); `inside`: the prompt
    opened a section."""
    policy = ThinkingBudget(math.inf, start_id, end_id, inside=inside)  # type: ignore[arg-type]
    for t in ids:
        policy.observe(t)
    return policy.used


@dataclass
class ThinkingBudget:
    """One sequence's thinking budget (see the module docstring).

    `observe(t)` is called with every output token (sampled or forced) in order and returns the
    tokens the engine must force next ([<end_of_thinking>] or []).
    """

    budget: int
    start_id: int
    end_id: int
    inside: bool = False  # the stream is inside a thinking section
    used: int = 0  # thinking tokens in the output so far (all sections)
    closing: bool = False  # a forced <end_of_thinking> is queued, not emitted yet

    @classmethod
    def for_prompt(cls, budget: int, tokenizer: Any, prompt: Sequence[int]) -> ThinkingBudget:
        """The policy of a new sequence: inside a section when the prompt ends inside one."""
        start, end = thinking_ids(tokenizer, budget)
        return cls(budget, start, end, inside=ends_in_thinking(prompt, start, end))

    def due(self) -> list[int]:
        """The close to force now: [<end_of_thinking>] when a section is open and the budget
        is spent (once per section), else []."""
        if self.inside and not self.closing and self.used >= self.budget:
            self.closing = True
            return [self.end_id]
        return []

    def observe(self, token: int) -> list[int]:
        """Record one output token; returns the tokens to force after it."""
        if token == self.end_id:
            self.inside = self.closing = False
        elif self.inside:
            self.used += 1
        elif token == self.start_id:
            self.inside = True
        return self.due()

    def copy(self) -> ThinkingBudget:
        """An independent copy (a forked sequence)."""
        return copy.copy(self)
