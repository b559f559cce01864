"""Synthetic verifiable tasks: determinism, exact verification, graded difficulty, splits."""

from __future__ import annotations

import random
import re

import pytest

from geode.data import DataError
from geode.data.tasks import (
    format_answer,
    generate,
    make_problem,
    parse_answer,
    split_of,
    verify,
)

_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def test_deterministic_and_prefix_stable() -> None:
    a = generate(40, seed=7, min_steps=1, max_steps=5)
    assert a == generate(40, seed=7, min_steps=1, max_steps=5)
    assert generate(10, seed=7, min_steps=1, max_steps=5) == a[:10]
    assert [p.question for p in generate(40, seed=8, min_steps=1, max_steps=5)] != [
        p.question for p in a
    ]
    assert make_problem(3, 5) == make_problem(3, 5)


@pytest.mark.parametrize("steps, max_value", [(1, 10), (3, 100), (6, 1000), (8, 10_000)])
def test_solutions_are_correct_and_verify(steps: int, max_value: int) -> None:
    for p in generate(150, seed=steps, min_steps=steps, max_steps=steps, max_value=max_value):
        assert p.steps == steps
        lines = p.solution.splitlines()
        assert lines[-1] == format_answer(p.answer) and p.answer >= 2
        equations = _EQ.findall(p.solution)
        assert len(equations) >= steps
        for a, op, b, c in equations:  # every step's arithmetic is right
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c
        assert int(equations[-1][3]) == p.answer
        assert parse_answer(p.solution) == p.answer
        assert verify(p, p.solution) and verify(p, p.document())
        assert verify(p.answer, "so the answer is\n" + format_answer(p.answer))


def test_perturbed_answers_do_not_verify() -> None:
    rng = random.Random(0)
    for p in generate(300, seed=11, min_steps=1, max_steps=6, max_value=500):
        body = p.solution.rsplit("\n", 1)[0]
        for wrong in (p.answer + 1, p.answer - 1, p.answer * 10, -p.answer, rng.randint(0, 9)):
            if wrong != p.answer:
                assert not verify(p, f"{body}\n{format_answer(wrong)}")
        assert not verify(p, body)  # no answer line
        assert not verify(p, f"{body}\n#### {p.answer}.5")
        assert not verify(p, f"{body}\nThe answer is {p.answer}")  # format matters


def test_parse_answer_formats() -> None:
    assert parse_answer("#### 1,234") == 1234
    assert parse_answer("x\n#### $18\n") == 18
    assert parse_answer("#### -7") == -7
    assert parse_answer("#### 2.50") == 2.5
    assert parse_answer("#### 3.0") == 3 and isinstance(parse_answer("#### 3.0"), int)
    assert parse_answer("#### 1\nwait\n#### 2") == 2  # the last answer line counts
    assert parse_answer("no answer here 42") is None
    assert parse_answer("#### ") is None


def test_difficulty_is_graded() -> None:
    easy = generate(200, seed=1, min_steps=1, max_steps=1, max_value=10)
    hard = generate(200, seed=1, min_steps=6, max_steps=6, max_value=1000)
    assert all(p.steps == 1 for p in easy) and all(p.steps == 6 for p in hard)
    assert max(int(p.canonical.split(";")[0]) for p in easy) <= 10
    assert all(p.answer < 10 * 1000 for p in hard)
    mean = lambda ps: sum(len(p.solution) for p in ps) / len(ps)  # noqa: E731
    assert mean(hard) > 2 * mean(easy)


def test_splits_cannot_overlap() -> None:
    kw = dict(min_steps=1, max_steps=3, max_value=30)
    train = generate(3000, seed=0, **kw)
    held = generate(300, seed=0, split="heldout", **kw) + generate(
        300, seed=99, split="heldout", **kw
    )
    assert all(p.split == "train" for p in train) and all(p.split == "heldout" for p in held)
    assert not {p.canonical for p in train} & {p.canonical for p in held}
    train_text = "\n".join(p.document() for p in train)
    for p in held:
        assert p.question not in train_text
        assert split_of(p.canonical) == "heldout"
    # about 10% of canonical forms are held out
    share = sum(split_of(make_problem(5, i).canonical) == "heldout" for i in range(4000)) / 4000
    assert 0.07 < share < 0.13


def test_unique_and_bad_arguments() -> None:
    ps = generate(100, seed=2, min_steps=1, max_steps=1, max_value=10)
    assert len({p.canonical for p in ps}) == 100
    with pytest.raises(DataError, match="unique"):
        generate(10_000, seed=0, min_steps=1, max_steps=1, max_value=5)
    with pytest.raises(DataError, match="min_steps"):
        generate(1, min_steps=3, max_steps=2)
    with pytest.raises(DataError, match="split"):
        generate(1, split="test")  # type: ignore[arg-type]
