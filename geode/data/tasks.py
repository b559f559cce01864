"""Synthetic verifiable tasks: multi-step arithmetic word problems with an exact verifier.

A problem tells a short story about one person's collection of items: a starting amount,
then `steps` operations (gain, lose, gain several equal groups, multiply, split equally and
keep one share). Every intermediate result is a whole number >= 2. The solution works the
problem one sentence per step and ends with the answer line `#### N`, the format of GSM8K
(Cobbe et al., 2021), so SFT, RL with verifiable rewards and evaluation read answers the same
way for both.

Difficulty is graded by the number of steps and by `max_value`, the magnitude of the start
amount and of the added/removed amounts (intermediate values stay below 10 * max_value).

Everything is deterministic: problem i of seed s is drawn from its own RNG seeded with
"s:i", whatever the other arguments. The split of a problem is a function of its canonical
form (start amount and operations, not the names/items/wording), hashed: train and held-out
problems can never share an arithmetic skeleton, so no held-out question (in any wording)
appears in the training split, for any seeds.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from . import DataError

ANSWER_PREFIX = "####"
HELDOUT_FRACTION = 0.1  # default share of canonical forms reserved for the held-out split
Split = Literal["train", "heldout"]

# (name, subject pronoun, object pronoun, possessive)
_PEOPLE = [
    ("Mia", "she", "her", "her"),
    ("Noah", "he", "him", "his"),
    ("Ava", "she", "her", "her"),
    ("Liam", "he", "him", "his"),
    ("Zara", "she", "her", "her"),
    ("Omar", "he", "him", "his"),
    ("Priya", "she", "her", "her"),
    ("Kenji", "he", "him", "his"),
    ("Lucia", "she", "her", "her"),
    ("Tomas", "he", "him", "his"),
    ("Amara", "she", "her", "her"),
    ("Ivan", "he", "him", "his"),
]
_FRIENDS = ["Sam", "Lee", "Ana", "Ben", "Eli", "Kim", "Raj", "Una", "Yusuf", "Nora"]
_ITEMS = [
    ("apples", "bags"),
    ("marbles", "jars"),
    ("stickers", "sheets"),
    ("books", "boxes"),
    ("coins", "purses"),
    ("pencils", "packs"),
    ("cards", "decks"),
    ("shells", "buckets"),
    ("stamps", "albums"),
    ("beads", "strings"),
    ("cookies", "tins"),
    ("seeds", "packets"),
    ("buttons", "tubs"),
    ("eggs", "cartons"),
]

# Templates per operation: (question sentence, solution sentence). Fields: {Name}, {Sub}
# (capitalised subject pronoun), {sub}, {obj}, {pos}, {friend}, {items}, {groups}, {a}, {k},
# {m}, {km}, {v} (amount before the step), {r} (amount after).
_START = [
    ("{Name} has {v} {items}.", "{Name} starts with {v} {items}."),
    ("{Name} collects {v} {items}.", "{Name} starts with {v} {items}."),
    ("At the start of the week, {Name} owns {v} {items}.", "{Name} starts with {v} {items}."),
]
_OPS: dict[str, list[tuple[str, str]]] = {
    "add": [
        ("{Sub} finds {a} more {items}.", "{Sub} finds {a} more, so {sub} has {v} + {a} = {r}."),
        ("{Friend} gives {obj} {a} {items}.", "{Sub} gets {a} more, so {sub} has {v} + {a} = {r}."),
        ("{Sub} buys {a} more {items}.", "{Sub} buys {a} more, so {sub} has {v} + {a} = {r}."),
    ],
    "sub": [
        (
            "{Sub} gives {a} {items} to {friend}.",
            "{Sub} gives away {a}, so {sub} has {v} - {a} = {r}.",
        ),
        ("{Sub} loses {a} {items}.", "{Sub} loses {a}, so {sub} has {v} - {a} = {r}."),
        (
            "{Sub} uses {a} of {pos} {items} for a project.",
            "{Sub} uses {a}, so {sub} has {v} - {a} = {r}.",
        ),
    ],
    "groups": [
        (
            "{Sub} buys {k} {groups} with {m} {items} in each.",
            "{k} {groups} of {m} is {k} * {m} = {km} {items}, so {sub} has {v} + {km} = {r}.",
        ),
        (
            "{Friend} gives {obj} {k} {groups} of {items}, each holding {m}.",
            "{k} {groups} of {m} is {k} * {m} = {km} {items}, so {sub} has {v} + {km} = {r}.",
        ),
    ],
    "mul": [
        (
            "Then {sub} trades so that {sub} has {k} times as many {items} as before.",
            "{k} times as many is {v} * {k} = {r}.",
        ),
        (
            "{Pos} collection then grows to {k} times its size.",
            "{k} times the size is {v} * {k} = {r}.",
        ),
    ],
    "div": [
        (
            "{Sub} splits {pos} {items} equally into {k} piles and keeps one pile.",
            "One of {k} equal piles is {v} / {k} = {r}.",
        ),
        (
            "{Sub} shares {pos} {items} equally among {k} friends, {obj}self included, "
            "and keeps {pos} share.",
            "Each of the {k} shares is {v} / {k} = {r}.",
        ),
    ],
}
_QUESTION = [
    "How many {items} does {Name} have now?",
    "How many {items} does {Name} have at the end?",
    "How many {items} does {Name} end up with?",
]
_ANSWER_RE = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


@dataclass(frozen=True)
class Problem:
    """One generated word problem with its worked solution and exact integer answer."""

    question: str
    solution: str  # one sentence per step, then the answer line "#### N"
    answer: int
    steps: int
    max_value: int
    canonical: str  # start and operations, e.g. "12;add:5;groups:3,4;div:3"
    split: str  # "train" or "heldout", a function of `canonical`

    @property
    def uid(self) -> str:
        """A stable id: 16 hex digits of the SHA-256 of the canonical form."""
        return hashlib.sha256(self.canonical.encode()).hexdigest()[:16]

    def document(self) -> str:
        """Question, blank line, solution: the text used as a pretraining document."""
        return f"{self.question}\n\n{self.solution}"

    def to_dict(self) -> dict:
        """A JSON-ready dict (with `uid`)."""
        return {**asdict(self), "uid": self.uid}


def format_answer(value: int | float) -> str:
    """The answer line for `value`, e.g. `#### 42`."""
    return f"{ANSWER_PREFIX} {value}"


def parse_answer(text: str) -> int | float | None:
    """The number on the last `#### N` line of `text` (commas and `$` allowed), or None."""
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    raw = matches[-1].replace(",", "")
    try:
        value = float(raw) if "." in raw else int(raw)
    except ValueError:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def verify(problem: Problem | int | float, text: str) -> bool:
    """True iff the final `#### N` answer in `text` equals the problem's answer exactly."""
    expected = problem.answer if isinstance(problem, Problem) else problem
    got = parse_answer(text)
    return got is not None and got == expected


def split_of(canonical: str, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """'heldout' or 'train' for a canonical form, by a hash (stable across runs and seeds)."""
    digest = hashlib.sha256(b"geode-tasks/" + canonical.encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "heldout" if u < heldout_fraction else "train"


def make_problem(
    seed: int,
    index: int,
    min_steps: int = 2,
    max_steps: int = 4,
    max_value: int = 100,
    heldout_fraction: float = HELDOUT_FRACTION,
) -> Problem:
    """Problem `index` of `seed`: deterministic, independent of every other problem."""
    _check_difficulty(min_steps, max_steps, max_value)
    rng = random.Random(f"{seed}:{index}")
    name, sub, obj, pos = rng.choice(_PEOPLE)
    items, groups = rng.choice(_ITEMS)
    friend = rng.choice(_FRIENDS)
    words = dict(Name=name, Sub=sub.capitalize(), sub=sub, obj=obj, pos=pos, Pos=pos.capitalize())
    words.update(friend=friend, Friend=friend, items=items, groups=groups)
    cap = 10 * max_value  # intermediate amounts stay below this
    steps = rng.randint(min_steps, max_steps)
    v = rng.randint(2, max_value)
    q_tpl, s_tpl = rng.choice(_START)
    question, solution = [q_tpl.format(v=v, **words)], [s_tpl.format(v=v, **words)]
    canonical = [str(v)]
    for _ in range(steps):
        op, nums, r, fields = _draw_op(rng, v, max_value, cap)
        q_tpl, s_tpl = rng.choice(_OPS[op])
        question.append(q_tpl.format(v=v, r=r, **fields, **words))
        solution.append(s_tpl.format(v=v, r=r, **fields, **words))
        canonical.append(f"{op}:{','.join(map(str, nums))}")
        v = r
    question.append(rng.choice(_QUESTION).format(**words))
    solution.append(format_answer(v))
    canon = ";".join(canonical)
    return Problem(
        question=" ".join(question),
        solution="\n".join(solution),
        answer=v,
        steps=steps,
        max_value=max_value,
        canonical=canon,
        split=split_of(canon, heldout_fraction),
    )


def _draw_op(rng: random.Random, v: int, max_value: int, cap: int) -> tuple[str, tuple, int, dict]:
    """One operation valid at amount v: (op, operands, result, template fields)."""
    choices = []
    if v + 2 < cap:
        choices.append("add")
    if v >= 4:
        choices.append("sub")
    if v + 4 < cap:
        choices.append("groups")
    if 2 * v < cap:
        choices.append("mul")
    divisors = [k for k in range(2, 10) if v % k == 0 and v // k >= 2]
    if divisors:
        choices.append("div")
    if not choices:  # v is near the cap and has no small divisor: take some away
        choices.append("sub")
    op = rng.choice(choices)
    if op == "add":
        a = rng.randint(2, min(max_value, cap - v - 1))
        return op, (a,), v + a, {"a": a}
    if op == "sub":
        a = rng.randint(2, min(max_value, v - 2))
        return op, (a,), v - a, {"a": a}
    if op == "groups":
        k = rng.randint(2, min(9, max(2, (cap - v - 1) // 2)))
        m = rng.randint(2, max(2, min(max_value // 2, (cap - v - 1) // k)))
        return op, (k, m), v + k * m, {"k": k, "m": m, "km": k * m}
    if op == "mul":
        k = rng.randint(2, max(2, min(5, (cap - 1) // v)))
        return op, (k,), v * k, {"k": k}
    k = rng.choice(divisors)
    return "div", (k,), v // k, {"k": k}


def _check_difficulty(min_steps: int, max_steps: int, max_value: int) -> None:
    if not 1 <= min_steps <= max_steps:
        raise DataError(f"tasks: need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if max_value < 4:
        raise DataError(f"tasks: max_value must be >= 4, got {max_value}")


def iter_problems(
    seed: int = 0,
    split: Split = "train",
    min_steps: int = 2,
    max_steps: int = 4,
    max_value: int = 100,
    heldout_fraction: float = HELDOUT_FRACTION,
    unique: bool = True,
) -> Iterator[Problem]:
    """Endless stream of problems of one split (unique canonical forms when `unique`)."""
    if split not in ("train", "heldout"):
        raise DataError(f"tasks: split must be 'train' or 'heldout', got {split!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise DataError(f"tasks: heldout_fraction must be in (0, 1), got {heldout_fraction}")
    seen: set[str] = set()
    misses = 0
    index = 0
    while True:
        p = make_problem(seed, index, min_steps, max_steps, max_value, heldout_fraction)
        index += 1
        if p.split != split or (unique and p.canonical in seen):
            misses += 1
            if misses > 1000 + 100 * len(seen):
                raise DataError(
                    f"tasks: only {len(seen)} unique {split} problems found for "
                    f"steps {min_steps}-{max_steps}, max_value {max_value}; "
                    "ask for fewer or raise max_value/max_steps"
                )
            continue
        seen.add(p.canonical)
        yield p


def generate(
    n: int,
    seed: int = 0,
    split: Split = "train",
    min_steps: int = 2,
    max_steps: int = 4,
    max_value: int = 100,
    heldout_fraction: float = HELDOUT_FRACTION,
    unique: bool = True,
) -> list[Problem]:
    """The first `n` problems of `iter_problems(...)` (a prefix of any larger `n`)."""
    it = iter_problems(seed, split, min_steps, max_steps, max_value, heldout_fraction, unique)
    return [next(it) for _ in range(n)]
