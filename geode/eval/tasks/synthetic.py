"""The project's synthetic verifiable arithmetic tasks (`geode.data.tasks`), held-out split.

Prompt: the question, a blank line (the pretraining document layout `question\\n\\nsolution`),
optionally preceded by k worked train-split problems. The model should work the problem and
end with `#### N`; `geode.data.tasks.verify` checks the answer exactly.
Options (`TaskConfig.options`): min_steps, max_steps, max_value (defaults of geode.data.tasks).
"""

from __future__ import annotations

from typing import Any

from geode.data import tasks as synth

from .base import Task


class SyntheticTasks(Task):
    """Held-out synthetic arithmetic problems with an exact verifier."""

    name = "tasks"
    default_shots = 0
    default_max_tokens = 192
    stop = ("\n\n",)
    generates_limit = True

    def _kw(self) -> dict[str, Any]:
        o = self.config.options
        return {k: o[k] for k in ("min_steps", "max_steps", "max_value") if k in o}

    def load(self) -> list[dict[str, Any]]:
        """The first `limit` (default 200) held-out problems of the seed."""
        n = self.config.limit or 200
        problems = synth.generate(n, seed=self.config.seed, split="heldout", **self._kw())
        self.shot_blocks = []
        if self.shots:
            shots = synth.generate(self.shots, seed=self.config.seed, split="train", **self._kw())
            self.shot_blocks = [p.document() + "\n\n" for p in shots]
        return [
            {"id": p.uid, "question": p.question, "answer": p.answer, "problem": p}
            for p in problems
        ]

    def prompt(self, doc: dict[str, Any], shots: int | None = None) -> str:
        """Few-shot documents, then the question and a blank line."""
        return f"{self.fewshot(shots)}{doc['question']}\n\n"

    def score(self, doc: dict[str, Any], output: str) -> dict[str, Any]:
        """`geode.data.tasks.verify` on the output."""
        return {
            "extracted": synth.parse_answer(output),
            "gold": doc["answer"],
            "correct": synth.verify(doc["problem"], output),
        }
