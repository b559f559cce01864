"""Thinking budgets in RL: a budget drawn per rollout group, and a reward term on thinking length.

The engine enforces a budget (`SamplingParams.thinking_budget`, geode.infer.thinking): after b
thinking tokens it forces <end_of_thinking> and the model goes on to its answer. Drawing b per
rollout group (`sample_budget`) trains one model on every budget of the recipe's list
(`[rl] thinking_budgets`), so it learns to answer well wherever its thinking is cut off; the
"thinking" reward kind adds a cost per thinking token so that it thinks no longer than it pays:

    [[rl.rewards]]
    kind = "thinking"
    weight = 1.0
    options = {per_token = 0.002, free = 16}   # -0.002 per thinking token beyond the first 16
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from geode.infer.thinking import count_thinking, thinking_ids

from .rewards import Sample, Term, register_reward


def sample_budget(rng: random.Random, budgets: Sequence[int | None]) -> int | None:
    """One thinking budget drawn uniformly from `budgets` (None: no budget); None when empty.

    Entries are integers >= 0 or None (ValueError naming the entry otherwise)."""
    for i, b in enumerate(budgets):
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 0):
            raise ValueError(f"thinking budgets[{i}] = {b!r}: expected an integer >= 0 or None")
    return rng.choice(list(budgets)) if budgets else None


@register_reward("thinking")
class ThinkingCost(Term):
    """A cost on thinking length: -per_token * max(0, n - free), n = the sample's thinking tokens
    (between <start_of_thinking> and <end_of_thinking> in sample.token_ids, else in the encoded
    completion, which then must keep the special tokens; meta["in_thinking"]: the prompt opened
    a section). Options: per_token (0.001),
    free (0 tokens). Needs the policy's tokenizer (the two tokens' ids)."""

    name = "thinking"

    def __init__(self, options: Mapping[str, Any], tokenizer: Any = None):
        super().__init__(options, tokenizer)
        self.per_token, self.free = self.opt("per_token", 0.001), self.opt("free", 0)
        if self.per_token < 0 or self.free < 0:
            raise ValueError(
                f"per_token = {self.per_token} and free = {self.free} must be >= 0 "
                "(a cost per thinking token beyond the first `free`)"
            )
        if tokenizer is None:
            raise ValueError("needs the policy's tokenizer (ids of the thinking tokens)")
        self.start_id, self.end_id = thinking_ids(tokenizer)

    def thinking_tokens(self, sample: Sample) -> int:
        """The sample's thinking tokens (its token ids, else its encoded completion)."""
        ids = sample.token_ids or self.tokenizer.encode(sample.completion)
        inside = bool(sample.meta.get("in_thinking", False))
        return count_thinking(ids, self.start_id, self.end_id, inside)

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        return [0.0 - self.per_token * max(0, self.thinking_tokens(s) - self.free) for s in samples]
