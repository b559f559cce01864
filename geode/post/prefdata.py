"""The preference task geode generates itself, and the pair file format.

On the synthetic verifiable arithmetic problems (`geode.data.tasks`), a correct-and-concise
response (the worked solution) is preferred over a wrong one (the last step's result and the
answer line changed), a rambling one (the right solution padded with filler sentences), or a
rambling wrong one. `noise` flips exactly round(noise * n) pairs, chosen by the seed, and
marks them `"flipped": true`, so the label noise is known.

One pair per JSONL line, in TRL's conversational preference layout plus metadata:
  {"prompt": [{"role": "user", "content": Q}], "chosen": [{"role": "assistant", "content": A+}],
   "rejected": [{"role": "assistant", "content": A-}], "answer": N, "uid": ..., "kind": ...,
   "flipped": false}
`prompt` may also be a string and `chosen` / `rejected` plain strings (the assistant's text).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from geode.data import tasks as synth
from geode.fileio import atomic_write_bytes

PAIR_KINDS = ("wrong", "rambling", "rambling_wrong")
EASY = {"min_steps": 1, "max_steps": 2, "max_value": 20}  # what a nano model learns in minutes

_FILLER = [
    "Let me read the problem again carefully.",
    "I will go through it one step at a time.",
    "Let me double-check that step.",
    "That seems right, so I will continue.",
    "Okay, now the next part of the story.",
    "It is important not to skip anything here.",
]


class PairError(ValueError):
    """A preference pair is malformed; the message names the file, line and field."""


def wrong_solution(problem: synth.Problem, rng: random.Random) -> str:
    """The worked solution with an arithmetic slip in the last step (a wrong final answer)."""
    wrong = problem.answer + rng.choice([-1, 1]) * rng.randint(1, max(2, problem.answer // 3))
    if wrong == problem.answer or wrong < 0:
        wrong = problem.answer + 1
    lines = problem.solution.split("\n")
    last = lines[-2]  # the last step; lines[-1] is the answer line
    cut = last.rfind(f"= {problem.answer}")
    if cut >= 0:
        lines[-2] = last[:cut] + f"= {wrong}" + last[cut + len(f"= {problem.answer}") :]
    lines[-1] = synth.format_answer(wrong)
    return "\n".join(lines)


def rambling(solution: str, rng: random.Random, extra: int = 3) -> str:
    """`solution` with `extra` filler sentences inserted before its lines (the answer stays)."""
    lines = solution.split("\n")
    for _ in range(extra):
        at = rng.randint(0, len(lines) - 1)  # never after the answer line
        lines.insert(at, rng.choice(_FILLER))
    return "\n".join(lines)


def make_pairs(
    n: int,
    seed: int = 0,
    split: synth.Split = "train",
    noise: float = 0.0,
    kinds: Iterable[str] = PAIR_KINDS,
    **difficulty: int,
) -> list[dict[str, Any]]:
    """`n` preference pairs on `split` problems; exactly round(noise * n) of them flipped."""
    kinds = tuple(kinds)
    if not kinds or any(k not in PAIR_KINDS for k in kinds):
        raise ValueError(
            f"make_pairs: kinds must be a non-empty subset of {PAIR_KINDS}, got {kinds}"
        )
    rng = random.Random(f"geode-prefs:{seed}:{split}")
    pairs = []
    for i, p in enumerate(synth.generate(n, seed=seed, split=split, **difficulty)):
        kind = kinds[i % len(kinds)]
        good = p.solution
        if kind == "wrong":
            bad = wrong_solution(p, rng)
        elif kind == "rambling":
            bad = rambling(p.solution, rng)
        else:
            bad = rambling(wrong_solution(p, rng), rng)
        pairs.append(
            {
                "prompt": [{"role": "user", "content": p.question}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
                "answer": p.answer,
                "uid": p.uid,
                "kind": kind,
                "flipped": False,
            }
        )
    return flip_labels(pairs, noise, seed)


def flip_labels(
    pairs: list[dict[str, Any]], fraction: float, seed: int = 0
) -> list[dict[str, Any]]:
    """Copies of `pairs` with exactly round(fraction * n) of them (drawn by `seed`) swapped,
    chosen <-> rejected, and their `flipped` mark toggled: label noise of a known rate."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"flip_labels: fraction must be in [0, 1], got {fraction}")
    rng = random.Random(f"geode-flip:{seed}")
    flip = set(rng.sample(range(len(pairs)), round(fraction * len(pairs))))
    out = []
    for i, p in enumerate(pairs):
        q = dict(p)
        if i in flip:
            q["chosen"], q["rejected"] = p["rejected"], p["chosen"]
            q["flipped"] = not p.get("flipped", False)
        out.append(q)
    return out


def sft_examples(
    n: int, seed: int = 0, rambling_fraction: float = 0.5, **difficulty: int
) -> list[dict[str, Any]]:
    """Chat examples ({"messages": [...]}) of correct solutions, a fraction of them rambling:
    the SFT data of a policy that preference training should make concise."""
    rng = random.Random(f"geode-sft:{seed}")
    out = []
    for p in synth.generate(n, seed=seed, split="train", **difficulty):
        text = rambling(p.solution, rng) if rng.random() < rambling_fraction else p.solution
        out.append(
            {
                "messages": [
                    {"role": "user", "content": p.question},
                    {"role": "assistant", "content": text},
                ]
            }
        )
    return out


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write one JSON object per line, atomically; returns the path."""
    path = Path(path)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, data.encode("utf-8"))
    return path


def as_messages(value: Any, field: str, where: str, role: str | None) -> list[dict[str, Any]]:
    """A pair field as a validated message list (a string becomes one message of `role`;
    `role` given: the list must end with an assistant turn)."""
    if isinstance(value, str):
        if not value.strip():
            raise PairError(f"{where}: field {field!r} is empty")
        return [{"role": role or "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise PairError(f"{where}: field {field!r} must be a string or a non-empty message list")
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise PairError(f"{where}: {field}[{j}] must be a message with 'role' and 'content'")
    if role and value[-1]["role"] not in ("assistant", "model"):
        raise PairError(f"{where}: field {field!r} has no assistant turn at its end")
    return list(value)


def validate_pair(obj: Any, where: str = "pair") -> dict[str, Any]:
    """A pair with `prompt`, `chosen`, `rejected` as message lists (extra keys kept)."""
    if not isinstance(obj, Mapping):
        raise PairError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise PairError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    out = dict(obj)
    out["prompt"] = as_messages(obj["prompt"], "prompt", where, None)
    if out["prompt"][-1]["role"] in ("assistant", "model"):
        raise PairError(f"{where}: field 'prompt' must end with a user turn")
    for key in ("chosen", "rejected"):
        out[key] = as_messages(obj[key], key, where, "assistant")
    return out


def read_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[str, Any]]:
    """(`file:line`, object) of each non-blank line of a JSONL file of `what`; PairError on a
    missing file or a line that is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise PairError(f"{path}: no such {what} file")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairError(f"{where}: not JSON ({e.msg})") from None
            yield where, obj


def read_pairs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Validated pairs of a JSONL file; a bad line raises PairError naming file and line."""
    pairs = [validate_pair(obj, where) for where, obj in read_jsonl(path, "preference")]
    if not pairs:
        raise PairError(f"{path}: no preference pairs")
    return pairs
