"""The project's own tool-use task families, with verifiers, held-out splits and experts.

    tasks = generate("calc", 100, seed=0, split="train")   # or "code"
    env = make_env(tasks[0], mode="plan-act-verify")       # a ToolEnv with the family's tools
    demo = demonstration(tasks[0])                         # the ideal conversation (SFT, tests)

`calc`: arithmetic on large numbers (products and sums of 4-7 digit integers) that a small
model cannot do in its head but can with the calculator; the answer line is `#### N`, checked
exactly (geode.data.tasks.verify). `code`: small Python functions described in words, verified
by unit tests run in geode.sandbox (the HumanEval harness, geode.eval.tasks.humaneval.check);
the python tool lets the model try its code first. `lookup`: "What is the price of the
tiger?" with one tool, `lookup(name)`, over a table drawn per task (4 of 20 one-word names,
values 10-99), so the answer `#### V` can only be copied from the tool result; the held-out
split is by (field, name) pair. The split of a task is a hash of its
canonical form (expression; template and parameters), as geode.data.tasks does for the math
task: train and held-out tasks never share one, for any seed.

`expert(task)` is the scripted expert: the ideal assistant turns with their tool calls and the
tool results those calls give (computed, not hard-coded): demonstrations for SFT, and the
fixed policy (`geode.agents.loop.ScriptedPolicy`) with which tests drive the real loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from geode.chat import ToolCall
from geode.data import tasks as synth

from .loop import ACT_AFTER_PLAN, ToolEnv
from .tools import Tool, Toolbox, ToolError, calculate, calculator_tool, python_tool

FAMILIES = ("calc", "code", "lookup")


@dataclass(frozen=True)
class ToolTask:
    """One task: its prompt, answer (calc) or tests (code), split and the tools it needs."""

    family: str
    prompt: str
    answer: Any  # calc: the integer; code: None
    canonical: str  # what the split is a hash of
    split: str  # "train" or "heldout"
    entry_point: str | None = None  # code: the function the tests call
    tests: str | None = None  # code: `def check(candidate): ...` (HumanEval layout)
    solution: str | None = None  # code: a reference solution; calc: the expression
    example: str | None = None  # code: a call the expert tries first, e.g. "f(10)"
    table: tuple[tuple[str, int], ...] | None = None  # lookup: the tool's (name, value) rows

    @property
    def uid(self) -> str:
        """A stable id: family and 12 hex digits of the canonical form's hash."""
        import hashlib

        return f"{self.family}-{hashlib.sha256(self.canonical.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------- calc
def _calc(
    rng: random.Random, heldout_fraction: float, digits: tuple[int, int] = (4, 7)
) -> ToolTask:
    def num() -> int:  # 4 to 7 digits (by default)
        d = rng.randint(*digits)
        return rng.randint(10 ** (d - 1), 10**d - 1)

    a, b, c = num(), num(), num()
    form = rng.choice(["{a} * {b}", "{a} * {b} + {c}", "{a} * {b} - {c}", "({a} + {b}) * {c}"])
    expr = form.format(a=a, b=b, c=c)
    answer = calculate(expr)
    prompt = f"What is {expr}? Use the calculator. End with the answer line #### N."
    return ToolTask("calc", prompt, answer, expr, synth.split_of("calc:" + expr, heldout_fraction),
                    solution=expr)  # fmt: skip


# ---------------------------------------------------------------------- code
# (entry point, signature, description with {params}, reference body, test inputs, draw params)
_CODE: list[tuple[str, str, str, str, list[str], Callable[[random.Random], dict]]] = [
    ("sum_multiples", "n: int", "returns the sum of the integers in [0, n) divisible by {a} or "
     "{b}", "return sum(i for i in range(n) if i % {a} == 0 or i % {b} == 0)",
     ["10", "1", "50", "97"], lambda r: {"a": r.randint(2, 9), "b": r.randint(2, 9)}),
    ("count_char", "s: str", "returns how many times the character {c!r} occurs in s",
     "return s.count({c!r})", ["''", "'banana'", "'a b c d e'", "'xyzzy xyz'"],
     lambda r: {"c": r.choice("abcdexyz ")}),
    ("affine", "xs: list", "returns the list of x * {k} + {m} for each x in xs",
     "return [x * {k} + {m} for x in xs]", ["[]", "[1, 2, 3]", "[-4, 0, 9]"],
     lambda r: {"k": r.randint(-9, 9), "m": r.randint(-20, 20)}),
    ("power_sum", "n: int", "returns the sum of i ** {p} for i from 1 to n inclusive",
     "return sum(i ** {p} for i in range(1, n + 1))", ["0", "1", "5", "12"],
     lambda r: {"p": r.randint(1, 6)}),
    ("pick_mod", "xs: list", "returns the items x of xs with x % {k} == {m}, in order",
     "return [x for x in xs if x % {k} == {m}]", ["[]", "list(range(20))", "[7, 14, 3, 22, 5]"],
     lambda r: (lambda k: {"k": k, "m": r.randint(0, k - 1)})(r.randint(2, 9))),
    ("join_words", "words: list", "returns the words joined by {sep!r}, each reversed",
     "return {sep!r}.join(w[::-1] for w in words)", ["[]", "['ab']", "['abc', 'de', 'f']"],
     lambda r: {"sep": r.choice(["-", ", ", "+", " ", "::", "/"])}),
]  # fmt: skip


def _code(rng: random.Random, heldout_fraction: float) -> ToolTask:
    name, sig, desc, body, inputs, draw = rng.choice(_CODE)
    params = draw(rng)
    solution = f"def {name}({sig}):\n    {body.format(**params)}\n"
    scope: dict[str, Any] = {}
    exec(solution, scope)  # our own reference solution, to compute the expected outputs
    ref = scope[name]
    checks = [f"    assert candidate({x}) == {ref(eval(x))!r}" for x in inputs]
    tests = "def check(candidate):\n" + "\n".join(checks) + "\n"
    prompt = (f"Write a Python function `{name}({sig})` that {desc.format(**params)}. You may "
              "test it with the python tool. Give the final function in a ```python block.")  # fmt: skip
    canonical = f"code:{name}:" + ",".join(f"{k}={v!r}" for k, v in sorted(params.items()))
    return ToolTask("code", prompt, None, canonical, synth.split_of(canonical, heldout_fraction),
                    entry_point=name, tests=tests, solution=solution,
                    example=f"{name}({inputs[-1]})")  # fmt: skip


# ---------------------------------------------------------------------- lookup
LOOKUP_NAMES = ("tiger", "horse", "apple", "lemon", "chair", "table", "river", "stone", "cloud",
                "robot", "piano", "candle", "rabbit", "tomato", "pencil", "garden", "mirror",
                "rocket", "button", "basket")  # fmt: skip
LOOKUP_FIELDS = ("price", "weight", "age", "size", "speed")
_LOOKUP_FORMS = ("What is the {field} of the {name}?", "The {name}: what is its {field}?",
                 "Give the {field} of the {name}.")  # fmt: skip


def _lookup(rng: random.Random, heldout_fraction: float, items: int = 4) -> ToolTask:
    """What is the FIELD of the NAME? The tool's table (`items` names, values 10-99) is drawn
    per task, so the answer is only in the tool result; held out: (name, field) pairs."""
    names = rng.sample(LOOKUP_NAMES, items)
    table = tuple((n, rng.randint(10, 99)) for n in names)
    name, answer = table[rng.randrange(items)]
    field_ = rng.choice(LOOKUP_FIELDS)
    prompt = rng.choice(_LOOKUP_FORMS).format(field=field_, name=name)
    pair = f"lookup:{field_}:{name}"
    canonical = pair + ":" + prompt + ":" + ",".join(f"{n}={v}" for n, v in table)
    return ToolTask("lookup", prompt, answer, canonical, synth.split_of(pair, heldout_fraction),
                    solution=name, table=table)  # fmt: skip


def lookup_tool(table: Sequence[tuple[str, int]]) -> Tool:
    """`lookup(name)`: the value of `name` in the task's table (a ToolError for other names)."""

    def lookup(name: str) -> str:
        rows = dict(table)
        if name not in rows:
            raise ToolError(f"no item named {name!r}")
        return str(rows[name])

    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    return Tool("lookup", "Value of an item.", schema, lookup)


def lookup_turn(task: ToolTask, messages: Sequence[dict[str, Any]],
                rng: random.Random | None = None) -> dict[str, Any]:  # fmt: skip
    """The lookup expert's next assistant message after `messages`: the call with the asked
    name until the tool gave a value, then `#### V` with V its last value; with `rng`, a noisy
    turn instead: a call with another name of the table, or a guessed answer."""
    results = [m["content"] for m in messages if m["role"] == "tool" and m["content"].isdigit()]
    if rng is None:
        if not results:
            return {"role": "assistant", "content": "",
                    "tool_calls": [ToolCall("lookup", {"name": task.solution}).to_openai()]}  # fmt: skip
        return {"role": "assistant", "content": f"#### {results[-1]}"}
    if not results and rng.random() < 0.5:
        other = rng.choice([n for n, _ in task.table or () if n != task.solution])
        return {"role": "assistant", "content": "",
                "tool_calls": [ToolCall("lookup", {"name": other}).to_openai()]}  # fmt: skip
    return {"role": "assistant", "content": f"#### {rng.randint(10, 99)}"}


_MAKERS = {"calc": _calc, "code": _code, "lookup": _lookup}


def make_task(family: str, seed: int, index: int,
              heldout_fraction: float = synth.HELDOUT_FRACTION, **options: Any) -> ToolTask:  # fmt: skip
    """Task `index` of `seed` in a family: deterministic, independent of the others (options:
    calc's `digits` range of its numbers, default (4, 7); lookup's `items` per table, 4)."""
    if family not in _MAKERS:
        raise ValueError(f"tool-use task family must be one of {FAMILIES}, got {family!r}")
    return _MAKERS[family](random.Random(f"{family}:{seed}:{index}"), heldout_fraction, **options)


def generate(family: str, n: int, seed: int = 0, split: str = "train",
             heldout_fraction: float = synth.HELDOUT_FRACTION, **options: Any) -> list[ToolTask]:  # fmt: skip
    """`n` tasks of one split with distinct canonical forms (no split shares one)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    out: list[ToolTask] = []
    seen: set[str] = set()
    index = 0
    while len(out) < n:
        t = make_task(family, seed, index, heldout_fraction, **options)
        index += 1
        if t.split == split and t.canonical not in seen:
            seen.add(t.canonical)
            out.append(t)
        elif index > 200 * (n + 10):
            raise ValueError(f"only {len(out)} distinct {split} {family} tasks found; ask for "
                             "fewer")  # fmt: skip
    return out


# ---------------------------------------------------------------------- verifiers, envs
def code_check(task: ToolTask, text: str, timeout: float = 5.0) -> tuple[float, str]:
    """(1.0 or 0.0, status) of the code in `text` (its first ```python block, else all of it)
    against the task's tests, run in the sandbox."""
    from geode.eval.tasks.humaneval import _FENCE, check

    m = _FENCE.search(text)
    code = m.group(1) if m else text
    problem = {"prompt": "", "test": task.tests, "entry_point": task.entry_point}
    res = check(problem, code, timeout)
    return float(res["passed"]), res["status"]


def verifier(task: ToolTask) -> Callable[[str], Any]:
    """The task's verifier: final answer text -> reward (calc) or (reward, status) (code)."""
    if task.family in ("calc", "lookup"):
        return lambda text: float(synth.verify(task.answer, text))
    return lambda text: code_check(task, text)


def toolbox(task: ToolTask, **kw: Any) -> Toolbox:
    """The tools a family needs: the calculator (calc), sandboxed python (code) or the task's
    table (lookup)."""
    if task.family == "lookup":
        return Toolbox([lookup_tool(task.table or ())])
    return Toolbox([calculator_tool()] if task.family == "calc" else [python_tool(**kw)])


def make_env(task: ToolTask, *, mode: str = "act", max_turns: int = 4,
             tools: Toolbox | None = None, **kw: Any) -> ToolEnv:  # fmt: skip
    """A ToolEnv of the task with its family's tools and verifier (meta: family, uid, answer);
    lookup's prompt is the question alone (no instruction: a short prompt for a nano model)."""
    meta = {"family": task.family, "uid": task.uid, "answer": task.answer}
    if task.family == "lookup":
        kw.setdefault("instructions", "")
    return ToolEnv(task.prompt, tools or toolbox(task), verifier(task), mode=mode,
                   max_turns=max_turns, meta=meta, **kw)  # fmt: skip


# ---------------------------------------------------------------------- the scripted expert
def expert(task: ToolTask, mode: str = "act") -> list[dict[str, Any]]:
    """The ideal turns after the task's messages: (a plan,) a tool call, its result, the
    final answer. Tool results are computed (the calculator; the reference solution)."""
    turns: list[dict[str, Any]] = []
    if mode == "plan-act-verify":
        plan = {"calc": "Plan: compute the expression with the calculator, then give the answer.",
                "code": "Plan: write the function, run it once with the python tool, then give it.",
                "lookup": "Plan: look the item up, then give its value."}[task.family]  # fmt: skip
        turns += [{"role": "assistant", "content": plan},
                  {"role": "user", "content": ACT_AFTER_PLAN}]  # fmt: skip
    if task.family == "lookup":
        value = str(dict(task.table or ())[task.solution])
        return turns + [lookup_turn(task, []), {"role": "tool", "name": "lookup", "content": value},
                        lookup_turn(task, [{"role": "tool", "content": value}])]  # fmt: skip
    if task.family == "calc":
        call = ToolCall("calculator", {"expression": task.solution}, "call_0")
        value = task.answer
        turns += [
            {"role": "assistant", "content": "", "tool_calls": [call.to_openai()]},
            {"role": "tool", "tool_call_id": "call_0", "name": "calculator", "content": str(value)},
            {"role": "assistant", "content": f"{task.solution} = {value}\n#### {value}"},
        ]  # fmt: skip
        return turns
    code = f"{task.solution}\nprint({task.example})\n"
    scope: dict[str, Any] = {}
    exec(task.solution, scope)  # the reference solution: what the sandbox prints
    out = str(eval(task.example, scope))
    call = ToolCall("python", {"code": code}, "call_0")
    turns += [
        {"role": "assistant", "content": "", "tool_calls": [call.to_openai()]},
        {"role": "tool", "tool_call_id": "call_0", "name": "python", "content": out},
        {"role": "assistant", "content": f"```python\n{task.solution}```"},
    ]
    return turns


def demonstration(task: ToolTask, mode: str = "act") -> dict[str, Any]:
    """The whole ideal episode as the env renders it: {"messages", "tools"} (for SFT)."""
    env = make_env(task, mode=mode)
    return {"messages": env.reset() + expert(task, mode), "tools": env.tools}


__all__ = [
    "FAMILIES",
    "ToolTask",
    "code_check",
    "demonstration",
    "expert",
    "generate",
    "lookup_tool",
    "lookup_turn",
    "make_env",
    "make_task",
    "toolbox",
    "verifier",
]
