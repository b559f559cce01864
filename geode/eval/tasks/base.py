"""The task interface: load documents, build prompts, extract and score answers, aggregate."""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import Prompt
from ..metrics import mean_with_ci


class TaskError(ValueError):
    """Bad task input: a missing data file, a missing field, an unknown option value."""


@dataclass
class TaskConfig:
    """Options shared by every task (a task ignores those it has no use for)."""

    limit: int | None = None  # first N documents
    shots: int | None = None  # few-shot examples (None: the task's default)
    samples: int = 1  # generations per document (pass@k, majority, ...)
    data: str | None = None  # data file/directory (None: the task's built-in default)
    seed: int = 0
    max_tokens: int | None = None  # None: the task's default
    temperature: float | None = None  # None: 0 for one sample, the task's default for several
    chat: bool = False  # send prompts as chat messages
    options: dict[str, Any] = field(default_factory=dict)  # task-specific extras


class Task:
    """Base class; a generation task overrides `load`, `prompt` and `score`."""

    name = "task"
    kind = "generate"  # or "loglikelihood"
    verifiable = True  # has a right/wrong verdict (self-correction applies)
    default_shots = 0
    default_max_tokens = 256
    sampling_temperature = 0.8  # used when samples > 1 and no temperature was given
    stop: tuple[str, ...] = ()
    primary = "accuracy"
    generates_limit = False  # True: `load` itself makes exactly `limit` documents
    correction_instruction = (  # SCoRe (Kumar et al. 2024), the MATH self-correction instruction
        "There might be an error in the solution above because of lack of understanding of the "
        "question. Please correct the error, if any, and rewrite the solution."
    )

    def __init__(self, config: TaskConfig | None = None):
        self.config = config or TaskConfig()
        self.shot_blocks: list[str] = []  # the few-shot examples `load` drew, in prompt order

    def fewshot(self, shots: int | None = None) -> str:
        """The first `shots` few-shot examples (all of them when None), joined."""
        return "".join(self.shot_blocks if shots is None else self.shot_blocks[:shots])

    @property
    def shots(self) -> int:
        """Few-shot examples in effect."""
        return self.default_shots if self.config.shots is None else self.config.shots

    @property
    def samples_per_doc(self) -> int:
        """Generations per document (tasks that spend `samples` elsewhere return 1)."""
        return max(1, self.config.samples)

    @property
    def gen_stop(self) -> tuple[str, ...]:
        """Stop sequences for generation."""
        return self.stop

    @property
    def max_tokens(self) -> int:
        """Generation budget per request."""
        return self.config.max_tokens or self.default_max_tokens

    @property
    def temperature(self) -> float:
        """Sampling temperature in effect."""
        if self.config.temperature is not None:
            return self.config.temperature
        return self.sampling_temperature if self.config.samples > 1 else 0.0

    # ---------------------------------------------------------------- per task
    def bind(self, backend: Any) -> None:
        """Called by the runner before `load` (tasks that size prompts in tokens use it)."""
        self.backend = backend

    def load(self) -> list[dict[str, Any]]:
        """Documents, each with a unique string 'id' (limit applied by the runner)."""
        raise NotImplementedError

    def prompt(self, doc: dict[str, Any], shots: int | None = None) -> Prompt:
        """The prompt for one document with the first `shots` few-shot examples (None: all;
        the runner lowers it when the prompt does not fit the model's context)."""
        raise NotImplementedError

    def score(self, doc: dict[str, Any], output: str) -> dict[str, Any]:
        """{'extracted': ..., 'correct': bool, ...} for one output."""
        raise NotImplementedError

    def score_many(self, docs: Sequence[dict], outputs: Sequence[str]) -> list[dict[str, Any]]:
        """Score a batch (override to parallelise, e.g. sandboxed execution)."""
        return [self.score(d, o) for d, o in zip(docs, outputs, strict=True)]

    def loglikelihood_requests(
        self, doc: dict[str, Any], shots: int | None = None
    ) -> list[tuple[str, str]]:
        """(context, continuation) pairs to score, with `shots` as in `prompt` (log-likelihood
        tasks)."""
        raise NotImplementedError

    def score_loglikelihood(self, doc: dict, results: list[tuple[float, bool]]) -> dict:
        """Verdict from the pairs' log-likelihoods (log-likelihood tasks)."""
        raise NotImplementedError

    def aggregate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Task metrics over all samples (default: accuracy with a Wilson interval)."""
        ci = mean_with_ci([bool(s["correct"]) for s in samples])
        return {"accuracy": ci["mean"], "accuracy_ci": [ci["ci_low"], ci["ci_high"]], "n": ci["n"]}

    def plots(self, samples: list[dict], metrics: dict, out_dir: Path) -> list[Path]:
        """Task-specific PNGs written under out_dir (default: none)."""
        return []

    def describe(self) -> dict[str, Any]:
        """What identifies this run's configuration (stored so a rerun can resume safely)."""
        return {
            "task": self.name,
            "shots": self.shots,
            "samples": self.config.samples,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "data": self.config.data,
            "chat": self.config.chat,
            "seed": self.config.seed,
        }


def read_jsonl(
    path: str | Path,
    required: Sequence[str] = (),
    task: str = "",
    types: Mapping[str, type | tuple[type, ...]] | None = None,
) -> list[dict]:
    """Rows of a JSONL (optionally .gz) file; TaskError naming the file/line/field on problems
    (a missing `required` field, a field present with a type other than `types[field]`)."""
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"{task}: data file not found: {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    rows = []
    with opener(p, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{task}: {p}:{i}: invalid JSON: {e}") from None
            if not isinstance(row, dict):
                raise TaskError(
                    f"{task}: {p}:{i}: expected a JSON object, got {type(row).__name__}"
                )
            missing = [k for k in required if k not in row]
            if missing:
                raise TaskError(
                    f"{task}: {p}:{i}: missing field(s) {missing}; the row has {sorted(row)}"
                )
            for k, want in (types or {}).items():
                if k in row and not isinstance(row[k], want):
                    names = " or ".join(
                        t.__name__ for t in (want if isinstance(want, tuple) else (want,))
                    )
                    raise TaskError(
                        f"{task}: {p}:{i}: field {k!r} must be {names}, got "
                        f"{type(row[k]).__name__} {str(row[k])[:60]!r}"
                    )
            rows.append(row)
    if not rows:
        raise TaskError(f"{task}: {p} has no rows")
    return rows


def first_field(row: dict, names: Sequence[str], where: str) -> Any:
    """The value of the first of `names` present in row; TaskError listing them if none."""
    for n in names:
        if n in row:
            return row[n]
    raise TaskError(f"{where}: none of the fields {list(names)} present; the row has {sorted(row)}")
