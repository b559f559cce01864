"""Environments of RL episodes: the model talks, the environment answers and scores.

The interface (issue #19, item 3) is two methods:

    messages = env.reset()                        # the first message(s) (chat messages)
    next_messages, reward, done = env.step(text)  # after each model message

`geode.post.rollout.rollout` drives any `Env` on the engine: the model's turns are sampled,
the environment's messages are rendered in the chat format and appended as forced tokens
(engine.append), so a multi-turn episode reuses the KV of its earlier turns and its tokens
carry a mask of which ones the model sampled.

Each sample of a rollout group runs on its own shallow copy of the group's env (`spawn`):
environments keep per-episode state in attributes they reassign in `reset` / `step`.

`TaskEnv` is one turn on a verifiable problem; `SelfCorrectionEnv` is SCoRe's two-attempt
episode (Kumar et al. 2024, arXiv:2409.12917, sec. 3): problem -> attempt 1 -> the
correction instruction -> attempt 2, with both attempts' rewards kept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from geode.data import tasks as synth

Messages = list[dict[str, Any]]
Scorer = Callable[[str], float]  # the model's message -> reward

DEFAULT_INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the "
    "question. Please correct the error, if any, and rewrite the solution. Only output the "
    "final solution! At the end of the solution, give the final answer as #### N."
)  # SCoRe's correction instruction (arXiv:2409.12917, appendix), in the task's answer format


@runtime_checkable
class Env(Protocol):
    """An episode's environment: reset -> first messages; step(model message) -> next."""

    def reset(self) -> Messages: ...

    def step(self, message: str) -> tuple[Messages | None, float, bool]: ...


def spawn(env: Any) -> Any:
    """A fresh copy of `env` for one sample of a group (`env.spawn()` when it has one)."""
    make = getattr(env, "spawn", None)
    return make() if callable(make) else copy.copy(env)


def verifier(answer: Any) -> Scorer:
    """1.0 when the text's final `#### N` equals `answer` (the synthetic task's verifier)."""
    return lambda text: float(synth.verify(answer, text))


def as_messages(prompt: str | Messages) -> Messages:
    """A prompt given as text becomes one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class TaskEnv:
    """One turn: the problem's messages, one model answer, its reward, done.

    `score`: the model's text -> reward; None defers scoring to the caller (the Rollouts
    source scores a whole batch with `geode.post.rewards`; the step's reward is then 0.0).
    """

    max_turns = 1

    def __init__(
        self,
        prompt: str | Messages,
        answer: Any = None,
        score: Scorer | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.prompt = as_messages(prompt)
        self.answer = answer
        self.score = score
        self.meta = dict(meta or {})

    def reset(self) -> Messages:
        """The problem's messages."""
        return list(self.prompt)

    def step(self, message: str) -> tuple[Messages | None, float, bool]:
        """The answer's reward (0.0 when scoring is deferred); the episode ends."""
        return None, float(self.score(message)) if self.score is not None else 0.0, True


class SelfCorrectionEnv:
    """SCoRe's episode: attempt 1, the correction instruction, attempt 2 (rewards r1, r2)."""

    max_turns = 2

    def __init__(
        self,
        prompt: str | Messages,
        answer: Any = None,
        score: Scorer | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        meta: dict[str, Any] | None = None,
    ):
        if score is None and answer is None:
            raise ValueError("SelfCorrectionEnv needs a `score` callable or an `answer`")
        self.prompt = as_messages(prompt)
        self.answer = answer
        self.score = score if score is not None else verifier(answer)
        self.instruction = instruction
        self.meta = dict(meta or {})
        self.rewards: list[float] = []

    def reset(self) -> Messages:
        """The problem's messages (a new episode)."""
        self.rewards = []
        return list(self.prompt)

    def step(self, message: str) -> tuple[Messages | None, float, bool]:
        """Attempt 1 -> (the instruction, r1, not done); attempt 2 -> (None, r2, done)."""
        r = float(self.score(message))
        self.rewards = [*self.rewards, r]
        if len(self.rewards) == 1:
            return [{"role": "user", "content": self.instruction}], r, False
        return None, r, True
