"""GSM8K (Cobbe et al. 2021): grade-school math word problems, k-shot chain of thought.

Prompt (lm-evaluation-harness `gsm8k`, default 8 shots here, drawn once with a fixed seed
from the train split and shared by every question):

    Question: <train question>
    Answer: <train solution ending in "#### N">

    ... (k shots)

    Question: <test question>
    Answer:

Extraction: the number on the last `#### N` line (the reference's `ANS_RE` in
openai/grade-school-math, via `geode.data.tasks.parse_answer`); if the model wrote none, the
last number in the output (lm-eval's "flexible-extract"). Metric: exact numeric match.
Data: `--data` is the test JSONL (`question`, `answer` fields) or a directory holding
`test.jsonl` (and `train.jsonl`, needed for shots > 0).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from geode.data.tasks import parse_answer

from .base import Task, TaskError, read_jsonl

_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")
DATA_HELP = (
    "gsm8k needs --data PATH: the GSM8K test.jsonl (with train.jsonl beside it for shots), e.g. "
    "from https://github.com/openai/grade-school-math/tree/master/grade_school_math/data"
)


def _number(raw: str) -> int | float | None:
    raw = raw.replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(raw)
    except ValueError:
        return None
    return int(v) if v.is_integer() else v


def extract_answer(text: str) -> int | float | None:
    """`#### N` if present (strict), else the last number in the text (flexible)."""
    strict = parse_answer(text)
    if strict is not None:
        return strict
    nums = _NUMBER.findall(text)
    return _number(nums[-1]) if nums else None


def gold_answer(solution: str, where: str = "gsm8k") -> int | float:
    """The reference answer of a GSM8K solution (its `#### N` line)."""
    value = parse_answer(solution)
    if value is None:
        raise TaskError(
            f"{where}: field 'answer' has no '#### N' line, so it is not a GSM8K solution: "
            f"{solution[-80:]!r}"
        )
    return value


_FIELDS = ("question", "answer")
_TYPES = {"question": str, "answer": str}


class GSM8K(Task):
    """k-shot chain-of-thought GSM8K with exact numeric match."""

    name = "gsm8k"
    default_shots = 8
    default_max_tokens = 256
    stop = ("Question:", "</s>", "<|im_end|>", "\n\n\n")

    def _paths(self) -> tuple[Path, Path]:
        if not self.config.data:
            raise TaskError(DATA_HELP)
        p = Path(self.config.data)
        test = p / "test.jsonl" if p.is_dir() else p
        return test, test.with_name("train.jsonl")

    def load(self) -> list[dict[str, Any]]:
        """Test questions with their gold numbers; the few-shot block from the train split."""
        test, train = self._paths()
        rows = read_jsonl(test, _FIELDS, self.name, _TYPES)
        docs = [
            {
                "id": str(i),
                "question": r["question"],
                "solution": r["answer"],
                "gold": gold_answer(r["answer"], f"gsm8k: {test}:{i + 1}"),
            }
            for i, r in enumerate(rows)
        ]
        self.shot_blocks = []
        if self.shots:
            if not train.is_file():
                raise TaskError(f"gsm8k: {self.shots} shots need {train} (or pass --shots 0)")
            pool = read_jsonl(train, _FIELDS, self.name, _TYPES)
            if len(pool) < self.shots:
                raise TaskError(f"gsm8k: {self.shots} shots, but {train} has {len(pool)} rows")
            shots = random.Random(1234).sample(pool, self.shots)
            self.shot_blocks = [
                f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots
            ]
        return docs

    def prompt(self, doc: dict[str, Any], shots: int | None = None) -> str:
        """The few-shot block, then the question."""
        return f"{self.fewshot(shots)}Question: {doc['question']}\nAnswer:"

    def score(self, doc: dict[str, Any], output: str) -> dict[str, Any]:
        """Extracted number and exact match against the gold number."""
        got = extract_answer(output)
        return {
            "extracted": got,
            "gold": doc["gold"],
            "correct": got is not None and got == doc["gold"],
        }
