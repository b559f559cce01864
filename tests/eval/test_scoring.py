"""Task scoring against ground truth: GSM8K, MATH-500, HumanEval, synthetic tasks, NIAH, MRCR."""

from __future__ import annotations

import json
import random

import pytest

from geode.eval import FunctionBackend, TaskConfig, evaluate, get_task
from geode.eval.tasks.gsm8k import extract_answer, gold_answer
from geode.eval.tasks.math500 import MathVerifier, gold_of, last_boxed

from .conftest import shared_file


def _question_of(prompt: str) -> str:
    return prompt.rsplit("Question: ", 1)[1].rsplit("\nAnswer:", 1)[0]


def test_gsm8k_extraction_matches_every_gold_answer():
    rows = [json.loads(x) for x in shared_file("gsm8k", "test.jsonl").read_text().splitlines()]
    for r in rows:
        gold = r["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_answer(r["answer"]) == gold_answer(r["answer"])
        assert str(extract_answer(r["answer"])) == gold


def test_gsm8k_flexible_extraction():
    assert extract_answer("so she has 1,234 apples.") == 1234
    assert extract_answer("costs $5.50 then 7") == 7
    assert extract_answer("#### 12\nlater 99") == 12
    assert extract_answer("no numbers") is None


def test_gsm8k_gold_scores_100_and_corrupted_0(tmp_path):
    test = shared_file("gsm8k", "test.jsonl")
    rows = [json.loads(x) for x in test.read_text().splitlines()]
    by_q = {r["question"]: r["answer"] for r in rows}

    def gold(g):
        return " " + by_q[_question_of(g.prompt)]

    def corrupted(g):
        ans = gold_answer(by_q[_question_of(g.prompt)])
        return f" The answer is wrong.\n#### {ans + 1}"

    cfg = TaskConfig(limit=60, data=str(test))
    res = evaluate(["gsm8k"], FunctionBackend(gold), tmp_path / "a", cfg, progress=False)
    assert res["tasks"]["gsm8k"]["accuracy"] == 1.0
    res = evaluate(["gsm8k"], FunctionBackend(corrupted), tmp_path / "b", cfg, progress=False)
    assert res["tasks"]["gsm8k"]["accuracy"] == 0.0
    # 8 shots from the train split, the same block for every question
    task = get_task("gsm8k", TaskConfig(data=str(test)))
    docs = task.load()
    assert task.prompt(docs[0]).count("Question: ") == 9
    assert (
        task.prompt(docs[0]).split("Question: ")[1] == task.prompt(docs[1]).split("Question: ")[1]
    )


def test_gsm8k_missing_data_is_a_clear_error(tmp_path):
    from geode.eval import TaskError

    with pytest.raises(TaskError, match="needs --data"):
        get_task("gsm8k").load()
    with pytest.raises(TaskError, match="not found"):
        get_task("gsm8k", TaskConfig(data=str(tmp_path / "nope.jsonl"))).load()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:1: missing field\(s\) \['answer'\]"):
        get_task("gsm8k", TaskConfig(data=str(bad), shots=0)).load()


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{(3, \\frac{\\pi}{2})}.") == "(3, \\frac{\\pi}{2})"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unbalanced") is None


def test_math500_reference_solutions_verify():
    path = shared_file("math500", "test.jsonl")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    verifier = MathVerifier(timeout=10)
    try:
        misses = []
        for i, r in enumerate(rows[:120]):
            gold = gold_of(r, f"row {i}")
            solution = r["answer"].split("The answer is:")[0]
            if not verifier(gold, last_boxed(solution)):
                misses.append((i, gold))
        assert len(misses) <= 1, misses  # >= 99% of reference solutions
        rng = random.Random(0)
        wrong = 0
        sample = rng.sample(rows, 25)
        for i, r in enumerate(sample):
            gold = gold_of(r, f"row {i}")
            wrong += not verifier(gold, f"{gold}+1")
        assert wrong == 25  # a perturbed answer never verifies
        assert verifier("\\frac{1}{2}", "0.5") and verifier("\\frac{1}{2}", "\\dfrac12")
    finally:
        verifier.close()


def test_humaneval_canonical_pass_broken_fail(tmp_path):
    task = get_task("humaneval")
    problems = {d["id"]: d for d in task.load()}
    ids = list(problems)[:: len(problems) // 12][:12]

    def canonical(g):
        return next(p for p in problems.values() if p["prompt"] == g.prompt)["canonical_solution"]

    def broken(g):
        return "    return None\n"

    cfg = TaskConfig(limit=None)
    good = evaluate(
        [_Subset(task, ids)], FunctionBackend(canonical), tmp_path / "a", cfg, progress=False
    )
    assert good["tasks"]["humaneval"]["pass@1"] == 1.0
    bad = evaluate(
        [_Subset(task, ids)], FunctionBackend(broken), tmp_path / "b", cfg, progress=False
    )
    assert bad["tasks"]["humaneval"]["pass@1"] == 0.0


HOSTILE = [
    "    while True:\n        pass\n",
    "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
    "    x = bytearray(16 << 30)\n    return x\n",
    "    open('/etc/passwd_pwned', 'w').write('x')\n",
    "    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n",
    "    import os\n    os.system('echo hi > /root/pwned')\n    return None\n",
]


def test_humaneval_hostile_completions_fail_and_the_harness_goes_on(tmp_path):
    task = get_task("humaneval", TaskConfig(options={"timeout": 2}))
    docs = task.load()
    ids = [d["id"] for d in docs[: len(HOSTILE)]]
    by_prompt = {d["prompt"]: i for i, d in enumerate(docs[: len(HOSTILE)])}
    res = evaluate(
        [_Subset(task, ids)],
        FunctionBackend(lambda g: HOSTILE[by_prompt[g.prompt]]),
        tmp_path,
        progress=False,
    )
    assert res["tasks"]["humaneval"]["pass@1"] == 0.0
    assert res["tasks"]["humaneval"]["problems"] == len(HOSTILE)
    import os

    assert not os.path.exists("/etc/passwd_pwned") and not os.path.exists("/root/pwned")


def _Subset(task, ids):
    """The same task (same name and config) restricted to some document ids."""
    keep = set(ids)

    class Sub(type(task)):
        def load(self):
            return [d for d in super().load() if d["id"] in keep]

    return Sub(task.config)


def test_synthetic_tasks_use_the_data_verifier(tmp_path):
    from geode.data.tasks import generate

    task = get_task("tasks", TaskConfig(limit=10))
    docs = task.load()
    heldout = generate(10, seed=0, split="heldout")
    assert [d["question"] for d in docs] == [p.question for p in heldout]
    by_prompt = {task.prompt(d): d["problem"].solution for d in docs}
    res = evaluate([task], FunctionBackend(lambda g: by_prompt[g.prompt]), tmp_path, progress=False)
    assert res["tasks"]["tasks"]["accuracy"] == 1.0


def test_niah_is_deterministic_and_scored():
    cfg = TaskConfig(options={"lengths": [200, 400], "depths": [0, 0.5, 1]})
    a, b = get_task("niah", cfg).load(), get_task("niah", cfg).load()
    assert a == b and len(a) == 6
    for d in a:
        assert f"is {d['gold']}." in d["haystack"]
    first, last = a[3], a[5]  # length 400, depths 0 and 1
    assert first["haystack"].startswith("The special magic number")
    assert last["haystack"].endswith(f"is {last['gold']}.")
    t = get_task("niah", cfg)
    assert t.score(a[0], f" {a[0]['gold']}.")["correct"]
    assert not t.score(a[0], " 1234.")["correct"]


def test_niah_grid_and_heatmap(tmp_path):
    cfg = TaskConfig(options={"lengths": [120, 240], "depths": [0, 1]})
    task = get_task("niah", cfg)
    gold = {task.prompt(d): d["gold"] for d in task.load()}
    res = evaluate(
        [task], FunctionBackend(lambda g: " " + gold[g.prompt]), tmp_path, progress=False
    )
    m = res["tasks"]["niah"]
    assert m["accuracy"] == 1.0 and set(m["grid"]) == {"120", "240"}
    assert (tmp_path / "niah" / "niah_heatmap.png").stat().st_size > 1000


def test_mrcr_generation_and_scoring():
    cfg = TaskConfig(limit=4, options={"turns": 8})
    a, b = get_task("mrcr", cfg).load(), get_task("mrcr", cfg).load()
    assert a == b
    t = get_task("mrcr", cfg)
    for d in a:
        assert len(d["messages"]) == 17 and d["gold"].startswith(d["prefix"])
        assert d["gold"].removeprefix(d["prefix"]) in [m["content"] for m in d["messages"]]
        assert t.score(d, d["gold"])["score"] == 1.0
        assert t.score(d, d["gold"].removeprefix(d["prefix"]))["score"] == 0.0
        half = t.score(d, d["gold"][: len(d["gold"]) // 2])["score"]
        assert 0.3 < half < 1.0
