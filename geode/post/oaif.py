"""Online AI feedback (OAIF, Guo et al. 2024, arXiv:2402.04792, Algorithm 1).

Each step, for a batch of prompts x: the engine samples two responses y1, y2 ~ pi_theta(.|x)
from the policy being trained (same process, same weights: no copy), an annotator (an LLM
judge, a reward model or a verifier; geode.post.judges) picks y+ and y-, and the preference
loss (DPO / IPO / SLiC against the frozen SFT reference) updates theta. Sampling and judging
run without gradient. Skipped pairs (judge timeout, garbage, tie) are counted, never trained on.

Logged per step: seconds spent sampling / judging (the update is the rest of the step), the
judge's agreement with the verifier where the prompt has a gold answer, the verified accuracy
of the samples, their mean length, and judged / skipped counts. `evaluate_policy` compares the
policy with the starting one on held-out prompts: win rate (the judge, ties count 1/2) and
verified accuracy of greedy answers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from geode.data import tasks as synth

from .judges import Judge, JudgeItem, VerifierJudge
from .pairs import EncodedPair, pairs_batch, prompt_text
from .prefdata import PairError, as_messages, read_jsonl


@dataclass
class Prompt:
    """A prompt (chat messages) and, when the task has one, its gold answer."""

    messages: list[dict[str, Any]]
    answer: Any = None


def task_prompts(
    n: int, seed: int = 0, split: synth.Split = "train", **difficulty: int
) -> list[Prompt]:
    """Prompts of the generated arithmetic task, with their answers."""
    return [
        Prompt([{"role": "user", "content": p.question}], p.answer)
        for p in synth.generate(n, seed=seed, split=split, **difficulty)
    ]


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a JSONL file: objects with `prompt` (messages or text) and optional `answer`
    (a pair file works: chosen/rejected are ignored)."""
    out = []
    for where, obj in read_jsonl(path, "prompts"):
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise PairError(f"{where}: missing field 'prompt'")
        out.append(Prompt(as_messages(obj["prompt"], "prompt", where, None), obj.get("answer")))
    if not out:
        raise PairError(f"{path}: no prompts")
    return out


class OnlinePairs:
    """A BatchSource: each `next_batch()` samples, judges and returns one step's pairs."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        judge: Judge,
        *,
        prompts_per_step: int = 8,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        seed: int = 0,
        max_len: int | None = None,
        max_tries: int = 4,
    ):
        if not prompts:
            raise ValueError("OnlinePairs: no prompts")
        self.engine, self.tokenizer, self.prompts, self.judge = engine, tokenizer, prompts, judge
        self.prompts_per_step, self.temperature = prompts_per_step, temperature
        self.max_new_tokens, self.seed, self.max_len = max_new_tokens, seed, max_len
        self.max_tries = max_tries
        self.verifier = VerifierJudge()
        self.draws = 0  # prompts drawn so far (the sampling seeds follow it)
        self.last: dict[str, float] = {}  # the statistics of the latest batch

    def _next_prompts(self) -> list[Prompt]:
        from .rollout import next_prompts

        out = next_prompts(self.prompts, self.draws, self.prompts_per_step, self.seed, "oaif")
        self.draws += self.prompts_per_step
        return out

    @torch.no_grad()
    def sample(self, prompts: Sequence[Prompt]) -> list[tuple[list[int], list[Any]]]:
        """(prompt ids, [result A, result B]) per prompt, sampled from the current weights."""
        from geode.infer import Request

        model = self.engine.model
        was_training = model.training
        ids = [list(self.tokenizer.encode(prompt_text(p.messages))) for p in prompts]
        reqs = [
            Request(x, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                    seed=self.seed * 1_000_003 + 2 * (self.draws + i) + j)
            for i, x in enumerate(ids) for j in range(2)
        ]  # fmt: skip
        try:
            results = self.engine.generate(reqs)
        finally:
            model.train(was_training)
        return [(x, results[2 * i : 2 * i + 2]) for i, x in enumerate(ids)]

    def next_batch(self):
        """Sample two responses per prompt, judge them, and batch the judged pairs."""
        stats = {"sample_s": 0.0, "judge_s": 0.0}
        pairs: list[EncodedPair] = []
        agree = compared = correct = answered = length = samples = 0
        skipped0 = sum(self.judge.skipped.values())
        for _ in range(self.max_tries):
            prompts = self._next_prompts()
            t0 = time.perf_counter()
            sampled = self.sample(prompts)
            t1 = time.perf_counter()
            items = [
                JudgeItem(p.messages, a.text or "", b.text or "", p.answer)
                for p, (_, (a, b)) in zip(prompts, sampled, strict=True)
            ]
            verdicts = self.judge.judge(items)
            stats["sample_s"] += t1 - t0
            stats["judge_s"] += time.perf_counter() - t1
            for p, it, v, (x, (a, b)) in zip(prompts, items, verdicts, sampled, strict=True):
                length += len(a.token_ids) + len(b.token_ids)
                samples += 2
                if p.answer is not None:
                    answered += 2
                    correct += synth.verify(p.answer, it.a) + synth.verify(p.answer, it.b)
                    truth = self.verifier._judge([it])[0][0]
                    if v is not None and truth is not None:
                        compared += 1
                        agree += v == truth
                if v is not None:
                    good, bad = (a, b) if v == 0 else (b, a)
                    pairs.append(EncodedPair(tuple(x), tuple(good.token_ids), tuple(bad.token_ids)))
            if pairs:
                break
        if not pairs:
            raise RuntimeError(
                f"OAIF: the judge skipped every pair of {self.max_tries} tries "
                f"({dict(self.judge.skipped)}); check the judge"
            )
        stats.update(
            pairs=float(len(pairs)),
            skipped=float(sum(self.judge.skipped.values()) - skipped0),
            response_tokens=length / max(samples, 1),
        )
        if answered:
            stats["sample_accuracy"] = correct / answered
        if compared:
            stats["judge_agreement"] = agree / compared
        self.last = stats
        self.t_ready = time.perf_counter()
        return pairs_batch(pairs, self.tokenizer.pad_id, self.max_len)

    def state_dict(self) -> dict[str, Any]:
        """Prompts drawn so far (a resume continues the prompt order, not the samples)."""
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the prompt order after `draws` prompts."""
        self.draws = int(state["draws"])


def greedy_answers(
    engine: Any, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int
) -> list[str]:
    """The greedy response text of each prompt."""
    return responses(engine, tokenizer, prompts, max_new_tokens)


@torch.no_grad()
def responses(
    engine: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    *,
    k: int = 1,
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[str]:
    """k response texts per prompt (prompt-major); with a seed, sample j of prompt i draws with
    seed + i * k + j (the same draws before and after training). The model's mode is kept."""
    from geode.infer import Request

    model = engine.model
    was_training = model.training
    reqs = [
        Request(list(tokenizer.encode(prompt_text(p.messages))), max_new_tokens=max_new_tokens,
                temperature=temperature, seed=None if seed is None else seed + i * k + j)
        for i, p in enumerate(prompts) for j in range(k)
    ]  # fmt: skip
    try:
        return [r.text or "" for r in engine.generate(reqs)]
    finally:
        model.train(was_training)


def evaluate_policy(
    answers: Sequence[str], baseline: Sequence[str], prompts: Sequence[Prompt], judge: Judge
) -> dict[str, float]:
    """Win rate of `answers` over `baseline` under `judge` (ties and skips count 1/2), and
    verified accuracy and mean length (characters) of both, on the same prompts."""
    items = [
        JudgeItem(p.messages, a, b, p.answer)
        for p, a, b in zip(prompts, answers, baseline, strict=True)
    ]
    verdicts = judge.judge(items)
    wins = sum(v == 0 for v in verdicts)
    ties = sum(v is None for v in verdicts)  # equal answers, or the judge could not decide
    out = {"win_rate": (wins + 0.5 * ties) / max(len(items), 1)}
    if all(p.answer is not None for p in prompts):
        out["accuracy"] = sum(synth.verify(p.answer, a) for p, a in zip(prompts, answers)) / len(
            prompts
        )
        out["baseline_accuracy"] = sum(
            synth.verify(p.answer, b) for p, b in zip(prompts, baseline)
        ) / len(prompts)
    out["length"] = sum(map(len, answers)) / max(len(answers), 1)
    out["baseline_length"] = sum(map(len, baseline)) / max(len(baseline), 1)
    return out
