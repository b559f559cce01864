"""MATH-500 (Lightman et al. 2023, "Let's Verify Step by Step"): 500 MATH test problems.

Prompt (zero-shot): the problem, then "Please reason step by step, and put your final answer
within \\boxed{}." Extraction: the contents of the last `\\boxed{...}` (or `\\fbox{...}`),
braces matched, as `last_boxed_only_string` in Hendrycks et al.'s MATH code. Equivalence:
`math_verify.verify(gold, prediction)` with the gold first (the function is not symmetric),
each check in a worker process with a wall-clock timeout (math-verify's own timeout uses
SIGALRM, which works only in a main thread).
Data: `--data` is a JSONL with `problem` (or `question`) and `answer` (a final answer, or a
full solution whose last `\\boxed{}` is the answer) fields, e.g. HuggingFaceH4/MATH-500.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .base import Task, TaskError, first_field, read_jsonl

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DATA_HELP = (
    "math500 needs --data PATH: a MATH-500 JSONL with problem/answer fields, e.g. test.jsonl "
    "of https://huggingface.co/datasets/HuggingFaceH4/MATH-500"
)


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} / \\fbox{...} (or `\\boxed N`), or None."""
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if at < 0:
        return None
    rest = text[at:]
    if rest.startswith("\\boxed "):  # "\boxed 5" form
        return rest[len("\\boxed ") :].split("$")[0].strip()
    open_at = rest.find("{")
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[open_at + 1 : i]
    return None


# The verifier process: one JSON [gold, pred] per stdin line -> "1" / "0" per stdout line.
_WORKER = r"""
import json, sys
from math_verify import parse, verify
for line in sys.stdin:
    gold, pred = json.loads(line)
    try:
        ok = bool(verify(parse("\\boxed{" + gold + "}"), parse("\\boxed{" + pred + "}")))
    except Exception:
        ok = False
    sys.stdout.write("1\n" if ok else "0\n")
    sys.stdout.flush()
"""


class MathVerifier:
    """math-verify in a separate process; a check that exceeds `timeout` counts as wrong."""

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout
        self._proc: subprocess.Popen | None = None
        self._answers: queue.Queue[str] = queue.Queue()
        self._warm = False  # the first check also waits for the import of math-verify/sympy
        self.timeouts = 0

    def _start(self) -> None:
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise TaskError(
                "math500 needs the `math-verify` package: pip install math-verify"
            ) from None
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        answers: queue.Queue[str] = queue.Queue()
        self._answers = answers
        proc = self._proc

        def pump() -> None:
            for line in proc.stdout:
                answers.put(line.strip())

        threading.Thread(target=pump, daemon=True).start()

    def __call__(self, gold: str, pred: str | None) -> bool:
        """True iff `pred` is mathematically equivalent to `gold` (gold first)."""
        if pred is None:
            return False
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        self._proc.stdin.write(json.dumps([gold, pred]) + "\n")
        self._proc.stdin.flush()
        try:
            answer = self._answers.get(timeout=self.timeout + (0 if self._warm else 60))
        except queue.Empty:
            self.timeouts += 1
            self.close()
            return False
        self._warm = True
        return answer == "1"

    def close(self) -> None:
        """Stop the worker process."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
            self._warm = False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def gold_of(row: dict, where: str) -> str:
    """The gold answer of a row: `answer` as is, or the last \\boxed{} of a solution."""
    ans = first_field(row, ("answer", "solution"), where)
    if not isinstance(ans, str):
        ans = str(ans)
    if "\\boxed" in ans or "\\fbox" in ans:
        boxed = last_boxed(ans)
        if boxed is None:
            raise TaskError(f"{where}: unbalanced \\boxed{{}} in the answer field")
        return boxed
    return ans.strip()


class Math500(Task):
    """Zero-shot MATH-500 with math-verify equivalence."""

    name = "math500"
    default_max_tokens = 1024

    def __init__(self, config=None):
        super().__init__(config)
        self.verifier = MathVerifier(float(self.config.options.get("verify_timeout", 10.0)))

    def load(self) -> list[dict[str, Any]]:
        """Problems and their gold answers."""
        if not self.config.data:
            raise TaskError(DATA_HELP)
        types = {"problem": str, "question": str, "answer": (str, int, float), "solution": str}
        rows = read_jsonl(self.config.data, (), self.name, types)
        docs = []
        for i, r in enumerate(rows):
            where = f"math500: {self.config.data}:{i + 1}"
            answer = str(r.get("answer", ""))
            if "problem" not in r and "\n#### " in answer:
                raise TaskError(
                    f"{where}: field 'answer' ends in a '#### N' line, a GSM8K solution, and the "
                    "row has 'question' but no 'problem': this is GSM8K data (use the gsm8k task); "
                    "math500 needs MATH rows with 'problem' and 'answer'"
                )
            docs.append(
                {
                    "id": str(r.get("unique_id", i)),
                    "problem": first_field(r, ("problem", "question"), where),
                    "gold": gold_of(r, where),
                }
            )
        return docs

    def prompt(self, doc: dict[str, Any], shots: int | None = None) -> str:
        """Problem plus the boxed-answer instruction."""
        text = f"{doc['problem']}\n{INSTRUCTION}"
        return text if self.config.chat else f"Problem: {text}\nSolution:"

    def score(self, doc: dict[str, Any], output: str) -> dict[str, Any]:
        """Last boxed answer, checked by math-verify against the gold."""
        got = last_boxed(output)
        return {"extracted": got, "gold": doc["gold"], "correct": self.verifier(doc["gold"], got)}

    def score_many(self, docs: Sequence[dict], outputs: Sequence[str]) -> list[dict[str, Any]]:
        """Sequential through the one worker process."""
        return [self.score(d, o) for d, o in zip(docs, outputs, strict=True)]
