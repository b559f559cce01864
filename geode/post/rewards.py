"""Rewards for RL: verifiers, reward models, format and length terms, and their weighted sum.

Each `[[rl.rewards]]` entry (a `RewardSpec`: kind, weight, options) builds one term, a callable
`samples -> list[float]`. `Rewards` adds the weighted terms per sample and keeps each term's
values for metrics. A term that raises, returns NaN/inf or runs past its timeout for a sample
fails that sample: it scores `failed_reward` for the whole reward, is marked failed and counted
in `Rewards.stats` ("<term>/<reason>"), and scoring goes on with the other samples.

Built-in kinds (options in brackets):
  synth          the synthetic task family's exact verifier (`#### N` == sample.answer): 1/0
  math           final answer (`\\boxed{}`, else `#### N`, else "the answer is X") checked by
                 math-verify against sample.answer in a worker process [timeout = 10 s]: 1/0
  code           sample.tests (HumanEval-style `check(candidate)`) on the completion's code in
                 geode.sandbox, meta["entry_point"] the function [timeout = 5 s, workers = 2]: 1/0
  reward_model   reward model score [path | paths, mode = "warm" | "ensemble", max_len,
                 batch_size]: several paths are weight-averaged (WARM) unless mode = "ensemble"
  format         mean of the enabled checks [answer = "synth" | "boxed" | "any" | "",
                 thinking = false, trailing = true]: answer line present / thinking closed /
                 nothing after the answer
  length         penalty [mode = "linear": target, per_token; mode = "dapo": max_len, cache]
Options for any kind: `name` (the term's name; default the kind), and, for kinds without their
own timeout (all but math and code), `timeout`: run the term in a forked worker process, one
sample at a time, killing it after `timeout` seconds (for pure-Python terms).

The answer of a completion is read from its content outside any thinking section
(`geode.chat.parse`; meta["in_thinking"] = True when the prompt opened one).
"""

from __future__ import annotations

import math
import multiprocessing
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from geode.chat import ParsedOutput, parse
from geode.data import tasks as synth
from geode.recipe import RecipeError

KNOWN_PLUGINS = {  # kinds registered by other modules, imported on first use
    "thinking": "geode.post.thinking",
    "diversity": "geode.post.cfgdistill",
}


@dataclass
class Sample:
    """One completion to score, with what its verifiers need."""

    prompt: list[dict]  # chat messages of the prompt
    completion: str  # the model's text (thinking included, as generated)
    answer: str | None = None  # verifiable target (task answer / math answer); None: none
    tests: str | None = None  # code: unit tests (HumanEval-style check program)
    group: int = 0  # samples of one prompt share a group id (diversity terms)
    token_ids: Sequence[int] = ()  # generated ids (length / thinking terms)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    """A term's value for a sample it could not score (the sample fails; `reason` counted)."""

    reason: str


class RewardTerm(Protocol):
    """One reward: a value per sample (float, or `Failed`); may raise, hang or return NaN."""

    name: str

    def __call__(self, samples: Sequence[Sample]) -> list[float]: ...


_REGISTRY: dict[str, type] = {}


def register_reward(kind: str) -> Callable[[type], type]:
    """Class decorator: `kind` builds the class as `cls(options: dict, tokenizer=None)`."""

    def deco(cls: type) -> type:
        _REGISTRY[kind] = cls
        return cls

    return deco


def reward_kinds() -> list[str]:
    """The kinds a recipe may name: registered ones and those of KNOWN_PLUGINS."""
    return sorted(set(_REGISTRY) | set(KNOWN_PLUGINS))


@dataclass
class RewardSpec:
    """One `[[rl.rewards]]` entry."""

    kind: str
    weight: float = 1.0
    options: dict = field(default_factory=dict)


@dataclass
class Scored:
    """The rewards of one batch of samples."""

    rewards: torch.Tensor  # (N,) float32: weighted sum, failed_reward where failed
    terms: dict[str, torch.Tensor]  # {name: (N,) float32}, NaN where that term failed
    failed: torch.Tensor  # (N,) bool
    failures: dict[str, int]  # {term name: failed samples} in this call


class Term:
    """Base of the built-in terms: options read with `opt`, unknown keys reported by build."""

    name = ""
    own_timeout = False  # True: the term handles `timeout` itself

    def __init__(self, options: Mapping[str, Any], tokenizer: Any = None):
        self.options = dict(options)
        self.read: set[str] = set()
        self.tokenizer = tokenizer

    def opt(self, key: str, default: Any, choices: Sequence[Any] | None = None) -> Any:
        """Option `key` (type of `default`; int accepted for float), else `default`."""
        self.read.add(key)
        if key not in self.options:
            return default
        value = self.options[key]
        want = type(default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
            raise ValueError(f"option {key!r} = {value!r}: expected a {want.__name__}")
        if choices is not None and value not in choices:
            raise ValueError(f"option {key!r} = {value!r}: expected one of {list(choices)}")
        return value

    def __call__(self, samples: Sequence[Sample]) -> list[float | Failed]:
        """One value (or `Failed`) per sample."""
        raise NotImplementedError


def parsed(sample: Sample) -> ParsedOutput:
    """The completion cut into thinking / content (`geode.chat.parse`)."""
    return parse(sample.completion, in_thinking=bool(sample.meta.get("in_thinking", False)))


def answer_text(sample: Sample) -> str:
    """The completion's content outside thinking, up to <end_of_turn>."""
    return parsed(sample).content


# ---- verifiers ------------------------------------------------------------------------------


@register_reward("synth")
class SynthReward(Term):
    """1 if the final `#### N` of the content equals sample.answer exactly (geode.data.tasks)."""

    name = "synth"

    def __call__(self, samples: Sequence[Sample]) -> list[float | Failed]:
        out: list[float | Failed] = []
        for s in samples:
            if s.answer is None:
                out.append(Failed("missing answer"))
                continue
            expected = float(str(s.answer).replace(",", ""))  # ValueError: counted as error
            out.append(float(synth.verify(expected, answer_text(s))))
        return out


_ANSWER_IS = re.compile(r"answer is\s*:?\s*([^\n]+)", re.IGNORECASE)


def final_answer(text: str) -> str | None:
    """The final answer of a solution: last `\\boxed{}`, else `#### N`, else "the answer is X"."""
    from geode.eval.tasks.math500 import last_boxed

    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    number = synth.parse_answer(text)
    if number is not None:
        return str(number)
    found = _ANSWER_IS.findall(text)
    if not found:
        return None
    answer = found[-1].strip().rstrip(".").strip().strip("$").strip()
    return answer or None


@register_reward("math")
class MathReward(Term):
    """1 if math-verify finds the final answer equivalent to sample.answer (gold first), in
    geode.eval's worker process: a check past `timeout` kills and restarts the worker and
    fails the sample (reason "timeout")."""

    name = "math"
    own_timeout = True

    def __init__(self, options: Mapping[str, Any], tokenizer: Any = None):
        super().__init__(options, tokenizer)
        from geode.eval.tasks.math500 import MathVerifier

        timeout = self.opt("timeout", 10.0)
        if timeout <= 0:
            raise ValueError(f"option 'timeout' = {timeout}: must be > 0")
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise ValueError("needs the `math-verify` package: pip install math-verify") from None
        self.verifier = MathVerifier(timeout)  # one warm worker for the whole run

    def __call__(self, samples: Sequence[Sample]) -> list[float | Failed]:
        from geode.eval.tasks.math500 import gold_of

        out: list[float | Failed] = []
        for i, s in enumerate(samples):
            if s.answer is None:
                out.append(Failed("missing answer"))
                continue
            gold = gold_of({"answer": str(s.answer)}, f"math reward: sample {i}")
            before = self.verifier.timeouts
            ok = self.verifier(gold, final_answer(answer_text(s)))
            out.append(Failed("timeout") if self.verifier.timeouts > before else float(ok))
        return out

    def close(self) -> None:
        """Stop the worker process."""
        self.verifier.close()


@register_reward("code")
class CodeReward(Term):
    """1 if the completion's code passes sample.tests in the sandbox (a failing, crashing or
    timed-out program scores 0). The code is the first ```python block of the content (else
    the content); meta["entry_point"] names the function `check` is called on, and
    meta["code_prompt"] (HumanEval's prompt, optional) is put before the code."""

    name = "code"
    own_timeout = True

    def __init__(self, options: Mapping[str, Any], tokenizer: Any = None):
        super().__init__(options, tokenizer)
        self.timeout = self.opt("timeout", 5.0)
        self.workers = self.opt("workers", 2)
        if self.timeout <= 0 or self.workers < 1:
            raise ValueError(
                f"need timeout > 0 and workers >= 1, got {self.timeout}, {self.workers}"
            )
        self.outcomes: Counter = Counter()  # program statuses over the run ("passed", ...)

    def _one(self, s: Sample) -> float | Failed:
        from geode.eval.tasks.humaneval import _FENCE, check

        if not s.tests:
            return Failed("missing tests")
        entry = s.meta.get("entry_point")
        if not entry:
            return Failed("missing entry_point")
        content = answer_text(s)
        m = _FENCE.search(content)
        code = m.group(1) if m else content
        prompt = s.meta.get("code_prompt", "")
        if prompt and f"def {entry}" in code:  # a whole function: let the new def override
            code = "\n    pass\n\n" + code
        problem = {"prompt": prompt, "test": s.tests, "entry_point": entry}
        res = check(problem, code, self.timeout)
        self.outcomes[res["status"].split(":")[0]] += 1
        return float(res["passed"])

    def __call__(self, samples: Sequence[Sample]) -> list[float | Failed]:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self._one, samples))


# ---- reward models --------------------------------------------------------------------------


@register_reward("reward_model")
class RewardModelReward(Term):
    """The score of a reward model (geode.post.reward) on prompt + completion, in the RM's
    chat format and tokenizer (geode.post.judges.score_responses). Several models: their
    WARM weight average (mode "warm", Rame et al. 2024, eq. 2) or the mean of their scores
    (mode "ensemble", eq. 3)."""

    name = "reward_model"

    def __init__(self, options: Mapping[str, Any], tokenizer: Any = None):
        super().__init__(options, tokenizer)
        from geode.fileio import sha256_file
        from geode.post.reward import average_models, load_reward_model
        from geode.tokenizer import find_tokenizer, load_tokenizer

        path, paths = self.opt("path", ""), self.opt("paths", [])
        paths = ([path] if path else []) + [str(p) for p in paths]
        if not paths:
            raise ValueError("needs option 'path' (a reward model dir) or 'paths' (several)")
        mode = self.opt("mode", "warm", ("warm", "ensemble"))
        self.max_len = self.opt("max_len", 0) or None
        self.batch_size = self.opt("batch_size", 32)
        found = [find_tokenizer(p) for p in paths]
        shas = {sha256_file(f) for f in found if f is not None}
        if len(shas) > 1:
            raise ValueError(f"reward models {paths} have different tokenizers")
        if found[0] is not None:
            self.tokenizer = load_tokenizer(found[0])
        elif tokenizer is None:
            raise ValueError(f"{paths[0]} has no tokenizer and none was given")
        rms = [load_reward_model(p) for p in paths]
        self.models = [average_models(rms)] if mode == "warm" and len(rms) > 1 else rms

    def __call__(self, samples: Sequence[Sample]) -> list[float | Failed]:
        from geode.post.judges import score_responses

        out: list[float | Failed] = []
        for i in range(0, len(samples), self.batch_size):
            chunk = samples[i : i + self.batch_size]
            rows = [(s.prompt, s.completion) for s in chunk]
            out += score_responses(self.models, self.tokenizer, rows, self.max_len).tolist()
        return out


# ---- shaping terms --------------------------------------------------------------------------

_ANSWER_LINE = re.compile(r"####\s*\$?\s*-?\d[\d,]*(?:\.\d+)?\s*")


@register_reward("format")
class FormatReward(Term):
    """The share of the enabled checks a completion passes: an answer is present (`#### N`,
    `\\boxed{}` or either), no thinking section is left open, nothing follows the answer
    (and nothing follows <end_of_turn>)."""

    name = "format"

    def __init__(self, options: Mapping[str, Any], tokenizer: Any = None):
        super().__init__(options, tokenizer)
        self.answer = self.opt("answer", "synth", ("synth", "boxed", "any", ""))
        self.thinking = self.opt("thinking", False)
        self.trailing = self.opt("trailing", True)
        if not (self.answer or self.thinking or self.trailing):
            raise ValueError("every check is off (answer = '', thinking = false, trailing = false)")

    def _end(self, content: str) -> int | None:
        """Where the answer ends in `content`, or None without one."""
        from geode.eval.tasks.math500 import last_boxed

        ends = []
        if self.answer in ("synth", "any", ""):
            lines = [m.end() for m in _ANSWER_LINE.finditer(content)]
            ends += lines[-1:]
        if self.answer in ("boxed", "any", ""):
            boxed = last_boxed(content)
            if boxed is not None:
                ends.append(content.rfind(boxed) + len(boxed) + 1)
        return max(ends) if ends else None

    def _checks(self, s: Sample) -> list[bool]:
        p = parsed(s)
        end = self._end(p.content)
        checks = []
        if self.answer:
            checks.append(end is not None)
        if self.thinking:
            checks.append(not any(e.startswith("unterminated thinking") for e in p.errors))
        if self.trailing:
            after_turn = any(e.startswith("ignored") for e in p.errors)
            rest = "" if end is None else p.content[end:].strip(" \t\n$.\\])")
            checks.append(end is not None and not rest and not after_turn)
        return checks

    def __call__(self, samples: Sequence[Sample]) -> list[float | Failed]:
        return [sum(c) / len(c) for c in map(self._checks, samples)]


@register_reward("length")
class LengthReward(Term):
    """A penalty on completion tokens (sample.token_ids, else the tokenizer's count).

    mode "linear": -per_token * max(0, n - target).
    mode "dapo": DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13):
    0 for n <= L_max - L_cache, ((L_max - L_cache) - n) / L_cache up to L_max, -1 beyond;
    L_max = max_len, L_cache = cache."""

    name = "length"

    def __init__(self, options: Mapping[str, Any], tokenizer: Any = None):
        super().__init__(options, tokenizer)
        self.mode = self.opt("mode", "linear", ("linear", "dapo"))
        if self.mode == "linear":
            self.target, self.per_token = self.opt("target", 0), self.opt("per_token", 0.01)
            if "target" not in self.options or self.target < 0 or self.per_token < 0:
                raise ValueError("mode 'linear' needs target >= 0 (tokens) and per_token >= 0")
        else:
            self.max_len, self.cache = self.opt("max_len", 0), self.opt("cache", 0)
            if not 0 < self.cache <= self.max_len:
                raise ValueError(
                    f"mode 'dapo' needs 0 < cache <= max_len, got cache {self.cache}, "
                    f"max_len {self.max_len}"
                )

    def value(self, n: int) -> float:
        """The penalty for a completion of n tokens."""
        if self.mode == "linear":
            return -self.per_token * max(0, n - self.target)
        soft = self.max_len - self.cache
        if n <= soft:
            return 0.0
        return (soft - n) / self.cache if n <= self.max_len else -1.0

    def __call__(self, samples: Sequence[Sample]) -> list[float | Failed]:
        out: list[float | Failed] = []
        for s in samples:
            if s.token_ids:
                out.append(self.value(len(s.token_ids)))
            elif self.tokenizer is not None:
                out.append(self.value(len(self.tokenizer.encode(s.completion))))
            else:
                out.append(Failed("no token_ids and no tokenizer"))
        return out


# ---- isolation and the combination ----------------------------------------------------------


def _serve(term: Callable, conn: Any) -> None:
    """The worker process: score one sample per message until the pipe closes."""
    while True:
        try:
            sample = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send((True, term([sample])[0]))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which counts it
            conn.send((False, repr(e)))


class Isolated:
    """A term run in a forked worker process, one sample at a time; a sample that takes more
    than `timeout` seconds kills the worker (restarted for the next sample) and fails."""

    def __init__(self, term: Callable, timeout: float):
        self.term, self.timeout = term, timeout
        self.name = getattr(term, "name", "")
        self._proc: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")  # the term is inherited, never pickled
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(self.term, child), daemon=True)
        self._proc.start()
        child.close()

    def __call__(self, samples: Sequence[Sample]) -> list[float | Failed]:
        out: list[float | Failed] = []
        for s in samples:
            if self._proc is None or not self._proc.is_alive():
                self.close()
                self._start()
            self._conn.send(s)
            if not self._conn.poll(self.timeout):
                self.close()
                out.append(Failed("timeout"))
                continue
            try:
                ok, value = self._conn.recv()
            except EOFError:  # the worker died (e.g. a crash in native code)
                self.close()
                out.append(Failed("crash"))
                continue
            out.append(value if ok else Failed("error"))
        return out

    def close(self) -> None:
        """Kill the worker process."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
            self._conn.close()
            self._proc = self._conn = None


def _checked(values: Any, n: int) -> list[float | Failed]:
    """A term's output as n values: NaN/inf -> Failed("nan"), non-numbers -> Failed("error")."""
    values = list(values)
    if len(values) != n:
        raise ValueError(f"returned {len(values)} values for {n} samples")
    out: list[float | Failed] = []
    for v in values:
        if isinstance(v, Failed):
            out.append(v)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            out.append(Failed("error"))
            continue
        out.append(f if math.isfinite(f) else Failed("nan"))
    return out


class Rewards:
    """The weighted sum of the terms of `specs`, with failed samples counted."""

    def __init__(
        self,
        specs: Sequence[RewardSpec],
        *,
        tokenizer: Any = None,
        failed_reward: float = 0.0,
    ):
        if not specs:
            raise RecipeError("rl.rewards: no reward terms (add at least one [[rl.rewards]])")
        self.failed_reward = float(failed_reward)
        self.terms: list[tuple[str, float, Callable]] = []
        for i, spec in enumerate(specs):
            name, term = _build_term(spec, i, tokenizer)
            names = {n for n, _, _ in self.terms}
            if name in names:
                k = 2
                while f"{name}_{k}" in names:
                    k += 1
                name = f"{name}_{k}"
            self.terms.append((name, float(spec.weight), term))
        self.stats: Counter = Counter()  # "<term>/<reason>" -> failed samples over the run
        self.seconds: Counter = Counter()  # term -> seconds spent scoring over the run

    def _values(self, term: Callable, samples: Sequence[Sample]) -> list[float | Failed]:
        """One term's values; when the batch call raises, each sample alone."""
        try:
            return _checked(term(samples), len(samples))
        except Exception:  # noqa: BLE001 - any failure of a term is counted, not raised
            if len(samples) == 1:
                return [Failed("error")]
        return [self._values(term, [s])[0] for s in samples]

    def __call__(self, samples: Sequence[Sample]) -> Scored:
        """Score `samples`: rewards (N,), per-term values, failed mask, failure counts."""
        n = len(samples)
        total = torch.zeros(n, dtype=torch.float64)  # (N,)
        failed = torch.zeros(n, dtype=torch.bool)  # (N,)
        terms: dict[str, torch.Tensor] = {}
        failures: dict[str, int] = {}
        for name, weight, term in self.terms:
            t0 = time.perf_counter()
            values = self._values(term, samples) if n else []
            self.seconds[name] += time.perf_counter() - t0
            col = torch.full((n,), math.nan, dtype=torch.float64)  # (N,)
            for i, v in enumerate(values):
                if isinstance(v, Failed):
                    failed[i] = True
                    failures[name] = failures.get(name, 0) + 1
                    self.stats[f"{name}/{v.reason}"] += 1
                else:
                    col[i] = v
            terms[name] = col.float()
            total += weight * col.nan_to_num(0.0)
        rewards = torch.where(failed, torch.full_like(total, self.failed_reward), total)
        return Scored(rewards.float(), terms, failed, failures)

    def close(self) -> None:
        """Stop the terms' worker processes."""
        for _, _, term in self.terms:
            if callable(getattr(term, "close", None)):
                term.close()


def _build_term(spec: RewardSpec, i: int, tokenizer: Any) -> tuple[str, Callable]:
    """The term of entry i (wrapped in `Isolated` when it asks for a timeout)."""
    where = f"rl.rewards[{i}] (kind {spec.kind!r})"
    if not isinstance(spec.kind, str) or not spec.kind:
        raise RecipeError(f"rl.rewards[{i}]: 'kind' must be a non-empty string, got {spec.kind!r}")
    if spec.kind not in _REGISTRY and spec.kind in KNOWN_PLUGINS:
        import importlib

        try:
            importlib.import_module(KNOWN_PLUGINS[spec.kind])
        except ImportError as e:
            raise RecipeError(f"{where}: cannot import {KNOWN_PLUGINS[spec.kind]} ({e})") from None
    cls = _REGISTRY.get(spec.kind)
    if cls is None:
        raise RecipeError(f"{where}: unknown reward kind; known: {reward_kinds()}")
    weight = spec.weight
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
    ):
        raise RecipeError(f"{where}: weight = {weight!r}: expected a finite number")
    if not isinstance(spec.options, Mapping):
        raise RecipeError(f"{where}: options must be a table, got {spec.options!r}")
    options = dict(spec.options)
    name = options.pop("name", spec.kind)
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{where}: option 'name' = {name!r}: expected a non-empty string")
    timeout = None
    if not getattr(cls, "own_timeout", False) and "timeout" in options:
        timeout = options.pop("timeout")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise RecipeError(f"{where}: option 'timeout' = {timeout!r}: expected seconds > 0")
    try:
        term = cls(options, tokenizer=tokenizer)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise RecipeError(f"{where}: {e}") from None
    if isinstance(term, Term):
        unknown = sorted(set(options) - term.read)
        if unknown:
            raise RecipeError(f"{where}: unknown option(s) {unknown}")
    term.name = name
    return name, (Isolated(term, float(timeout)) if timeout is not None else term)


def build_rewards(
    specs: Sequence[Mapping[str, Any] | RewardSpec],
    tokenizer: Any = None,
    *,
    failed_reward: float = 0.0,
) -> Rewards:
    """`Rewards` from recipe entries ({kind, weight, options} tables or RewardSpecs)."""
    out = []
    for i, s in enumerate(specs):
        if isinstance(s, RewardSpec):
            out.append(s)
            continue
        if not isinstance(s, Mapping):
            raise RecipeError(f"rl.rewards[{i}]: expected a table, got {s!r}")
        unknown = sorted(set(s) - {"kind", "weight", "options"})
        if unknown:
            raise RecipeError(f"rl.rewards[{i}]: unknown key(s) {unknown} (kind, weight, options)")
        if "kind" not in s:
            raise RecipeError(f"rl.rewards[{i}]: missing 'kind'")
        out.append(RewardSpec(s["kind"], s.get("weight", 1.0), s.get("options", {})))
    return Rewards(out, tokenizer=tokenizer, failed_reward=failed_reward)
