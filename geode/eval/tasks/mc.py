"""Multiple choice by log-likelihood (MMLU / ARC / HellaSwag style).

Each option is scored as a continuation of the question:
context `Question: <question>\\nAnswer:`, continuation ` <choice>` (lm-evaluation-harness's
ARC/MMLU-cloze layout, target delimiter " "). With shots > 0, the first k rows (excluded from
scoring) are prepended with their correct answers.
Metrics (lm-evaluation-harness definitions): `acc` = the option with the highest total
log-likelihood is the answer; `acc_norm` = the same after dividing each log-likelihood by the
option's length in characters.
Data: JSONL with `question`, `choices` (list of strings) and `answer` (index, letter "A".., or
the text of the correct choice).
"""

from __future__ import annotations

from typing import Any

from ..metrics import mean_with_ci
from .base import Task, TaskError, read_jsonl


def answer_index(answer: Any, choices: list[str], where: str) -> int:
    """The correct option's index from an int, a letter or the option text."""
    if isinstance(answer, bool):
        raise TaskError(f"{where}: 'answer' must be an index, a letter or a choice, got {answer!r}")
    if isinstance(answer, int):
        idx = answer
    elif isinstance(answer, str) and answer in choices:
        idx = choices.index(answer)
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        idx = ord(answer.strip().upper()) - ord("A")
    elif isinstance(answer, str) and answer.strip().isdigit():
        idx = int(answer.strip())
    else:
        raise TaskError(f"{where}: 'answer' {answer!r} is not an index, a letter or a choice")
    if not 0 <= idx < len(choices):
        raise TaskError(f"{where}: 'answer' {answer!r} is out of range for {len(choices)} choices")
    return idx


class MultipleChoice(Task):
    """Log-likelihood multiple choice: acc and acc_norm."""

    name = "mc"
    kind = "loglikelihood"
    verifiable = False
    primary = "acc"

    def load(self) -> list[dict[str, Any]]:
        """Questions, choices and the answer index."""
        if not self.config.data:
            raise TaskError("mc needs --data PATH: a JSONL with question, choices, answer fields")
        rows = read_jsonl(
            self.config.data,
            ("question", "choices", "answer"),
            self.name,
            {"question": str, "choices": list, "answer": (int, str)},
        )
        docs = []
        for i, r in enumerate(rows):
            where = f"mc: {self.config.data}:{i + 1}"
            ch = r["choices"]
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
                raise TaskError(f"{where}: 'choices' must be a list of >= 2 strings, got {ch!r}")
            docs.append(
                {
                    "id": str(r.get("id", i)),
                    "question": r["question"],
                    "choices": ch,
                    "answer": answer_index(r["answer"], ch, where),
                }
            )
        k = self.shots
        if k >= len(docs):
            raise TaskError(f"mc: {k} shots leave no question in {self.config.data} ({len(docs)})")
        self.shot_blocks = [f"{self.context(d)} {d['choices'][d['answer']]}\n\n" for d in docs[:k]]
        return docs[k:]

    @staticmethod
    def context(doc: dict[str, Any]) -> str:
        """`Question: ...\\nAnswer:`."""
        return f"Question: {doc['question']}\nAnswer:"

    def prompt(self, doc: dict[str, Any], shots: int | None = None) -> str:
        """The scoring context (few-shot block included)."""
        return self.fewshot(shots) + self.context(doc)

    def loglikelihood_requests(
        self, doc: dict[str, Any], shots: int | None = None
    ) -> list[tuple[str, str]]:
        """One (context, " choice") pair per option."""
        return [(self.prompt(doc, shots), " " + c) for c in doc["choices"]]

    def score_loglikelihood(self, doc: dict, results: list[tuple[float, bool]]) -> dict:
        """acc and acc_norm verdicts."""
        lls = [ll for ll, _ in results]
        norm = [ll / max(1, len(c)) for ll, c in zip(lls, doc["choices"], strict=True)]
        pred = max(range(len(lls)), key=lls.__getitem__)
        pred_norm = max(range(len(norm)), key=norm.__getitem__)
        return {
            "extracted": pred,
            "gold": doc["answer"],
            "correct": pred == doc["answer"],
            "correct_norm": pred_norm == doc["answer"],
            "loglikelihoods": lls,
        }

    def aggregate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """acc and acc_norm with Wilson intervals."""
        a = mean_with_ci([s["correct"] for s in samples])
        b = mean_with_ci([s["correct_norm"] for s in samples])
        return {
            "acc": a["mean"],
            "acc_ci": [a["ci_low"], a["ci_high"]],
            "acc_norm": b["mean"],
            "acc_norm_ci": [b["ci_low"], b["ci_high"]],
            "n": a["n"],
        }
