"""Annotators that pick the better of two responses: a prompted LLM judge, a reward model
(one RM, a WARM weight average, or a prediction ensemble) and a programmatic verifier.

Each judge takes `JudgeItem`s and returns, per item, 0 (response A preferred), 1 (B
preferred) or None (skipped). A skip is never silent: `judge.skipped` counts skips by
reason ("timeout", "error", "garbage", "tie", "disagree") and `judge.judged` counts verdicts.

The LLM judge's prompt (OAIF, Guo et al. 2024, arXiv:2402.04792, §3 and App. A, in short):
`JUDGE_PROMPT` below, `{instruction}` an optional extra line such as "Prefer the shorter
answer." It is sent to any `geode.eval.backends.Backend`: the in-process engine on a geode
model, or an OpenAI-compatible endpoint (timeouts and retries are the backend's; a request
that still fails skips its item).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from geode.data import tasks as synth
from geode.eval.backends import Backend, BackendError, Gen

from .pairs import encode_response, prompt_text, response_text, sequences_batch, text_response

JUDGE_PROMPT = """You are comparing two responses to the same request.

[Request]
{prompt}

[Response A]
{a}

[Response B]
{b}

{instruction}Which response is better? Reply with a single letter: A or B."""

_VERDICT = re.compile(r"\b([AB])\b")


@dataclass
class JudgeItem:
    """Two responses to one prompt (chat messages); `answer` is the verifier's gold, if any."""

    prompt: list[dict[str, Any]]
    a: str
    b: str
    answer: Any = None


@dataclass
class Judge:
    """Base: `judge(items)` -> verdicts (0 = A, 1 = B, None = skipped), with counts."""

    judged: int = 0
    skipped: Counter = field(default_factory=Counter)

    def judge(self, items: Sequence[JudgeItem]) -> list[int | None]:
        """Verdicts for `items`, counting judged and skipped ones."""
        verdicts = self._judge(items)
        for v, reason in verdicts:
            if v is None:
                self.skipped[reason] += 1
            else:
                self.judged += 1
        return [v for v, _ in verdicts]

    def _judge(self, items: Sequence[JudgeItem]) -> list[tuple[int | None, str]]:
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        """{"judged": n, "skipped": n, "skipped_<reason>": n, ...}."""
        out = {"judged": self.judged, "skipped": sum(self.skipped.values())}
        out.update({f"skipped_{k}": v for k, v in sorted(self.skipped.items())})
        return out


def _prefer(score_a: float, score_b: float) -> tuple[int | None, str]:
    if score_a == score_b:
        return None, "tie"
    return (0 if score_a > score_b else 1), ""


@dataclass
class VerifierJudge(Judge):
    """The exact verifier of the synthetic tasks: a correct answer beats a wrong one; between
    two equally correct answers the shorter wins (correct-and-concise); equal -> skipped."""

    def _judge(self, items: Sequence[JudgeItem]) -> list[tuple[int | None, str]]:
        out = []
        for it in items:
            if it.answer is None:
                raise ValueError("VerifierJudge: item has no gold answer")
            key = [(synth.verify(it.answer, r), -len(r)) for r in (it.a, it.b)]
            out.append((None, "tie") if key[0] == key[1] else (0 if key[0] > key[1] else 1, ""))
        return out


@dataclass
class RewardModelJudge(Judge):
    """Higher reward wins. `models`: one reward model (a WARM average is one), or several
    whose scores are averaged (the prediction ensemble)."""

    models: Sequence[torch.nn.Module] = ()
    tokenizer: Any = None
    max_len: int | None = None

    def _judge(self, items: Sequence[JudgeItem]) -> list[tuple[int | None, str]]:
        if not items:
            return []
        scores = score_responses(
            self.models,
            self.tokenizer,
            [(it.prompt, r) for it in items for r in (it.a, it.b)],
            self.max_len,
        ).view(-1, 2)  # (N, 2)
        return [_prefer(float(a), float(b)) for a, b in scores]


@torch.no_grad()
def score_responses(
    models: Sequence[torch.nn.Module],
    tokenizer: Any,
    rows: Sequence[tuple[list[dict[str, Any]], str]],
    max_len: int | None = None,
) -> torch.Tensor:
    """Mean reward of `models` for each (prompt messages, response text) -> (N,) float32."""
    if not models:
        raise ValueError("score_responses: no reward models")
    encoded = [
        (
            tokenizer.encode(prompt_text(p)),
            encode_response(tokenizer, response_text(p, text_response(r))),
        )
        for p, r in rows
    ]
    batch = sequences_batch(encoded, tokenizer.pad_id, max_len)
    ids = batch.tokens.to(next(models[0].parameters()).device)  # (N, T+1)
    return torch.stack([m.eval()(ids) for m in models]).mean(0).cpu()  # (N,)


@dataclass
class LLMJudge(Judge):
    """A prompted LLM judge through a Backend (engine in-process or OpenAI-compatible).

    `instruction` is an extra line steering it (e.g. "Prefer the shorter answer.");
    `both_orders` asks twice with A/B swapped and skips the item when the answers disagree
    (position bias)."""

    backend: Backend | None = None
    instruction: str = ""
    both_orders: bool = False
    max_tokens: int = 8

    def request(self, item: JudgeItem, swap: bool = False) -> Gen:
        """The judge request for one item (responses swapped when `swap`)."""
        a, b = (item.b, item.a) if swap else (item.a, item.b)
        text = JUDGE_PROMPT.format(
            prompt=_conversation(item.prompt),
            a=a,
            b=b,
            instruction=self.instruction.strip() + "\n" if self.instruction.strip() else "",
        )
        return Gen([{"role": "user", "content": text}], max_tokens=self.max_tokens)

    def _ask(self, gens: list[Gen]) -> list[tuple[str | None, str]]:
        """(reply, "") per request, or (None, reason) when the backend failed for it."""
        try:
            return [(r, "") for r in self.backend.generate(gens)]
        except (BackendError, TimeoutError, OSError):
            pass  # one bad request fails the batch: ask one at a time
        out: list[tuple[str | None, str]] = []
        for g in gens:
            try:
                out.append((self.backend.generate([g])[0], ""))
            except (BackendError, TimeoutError, OSError) as e:
                timeout = "timed out" in str(e).lower() or isinstance(e, TimeoutError)
                out.append((None, "timeout" if timeout else "error"))
        return out

    def _judge(self, items: Sequence[JudgeItem]) -> list[tuple[int | None, str]]:
        if self.backend is None:
            raise ValueError("LLMJudge: no backend")
        gens = [self.request(it) for it in items]
        if self.both_orders:
            gens += [self.request(it, swap=True) for it in items]
        replies = self._ask(gens)
        out = []
        for i in range(len(items)):
            first = parse_verdict(*replies[i])
            if not self.both_orders or first[0] is None:
                out.append(first)
                continue
            second = parse_verdict(*replies[i + len(items)])
            if second[0] is None:
                out.append(second)
            elif second[0] != first[0]:  # swapped positions: the same choice flips the letter
                out.append(first)
            else:
                out.append((None, "disagree"))
        return out


def parse_verdict(reply: str | None, reason: str = "") -> tuple[int | None, str]:
    """A judge reply -> (0 for A, 1 for B, "") or (None, reason): exactly one of the letters
    A/B standing alone must appear, else the reply is garbage."""
    if reply is None:
        return None, reason or "error"
    letters = set(_VERDICT.findall(reply))
    if len(letters) != 1:
        return None, "garbage"
    return (0 if letters.pop() == "A" else 1), ""


def _conversation(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt's messages as plain text for the judge (role: content)."""
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n".join(f"{m.get('role')}: {m.get('content', '')}" for m in messages)
