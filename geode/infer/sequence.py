"""Per-request state of the engine and its postprocessing (detokenize, stop ids/strings, logprobs).

A `Sequence` is one request inside the engine. Its token stream is `prompt + out + pending`:
`out` holds the emitted tokens (sampled, or forced by `Engine.append`, told apart by `sampled`,
1 / 0 per token), `pending` the forced tokens not emitted yet. `cached` positions of the stream
are in the sequence's cache row; every step runs a chunk of the stream from `cached` on (a
prompt chunk, one decode token, or forced tokens), and when the chunk reaches the stream's end
the logits of its last position give the next sampled token. Column j of a chunk starting at
position a scores the stream's token at a + j + 1: a prompt token (prompt logprobs), a forced
token (its logprob; it is emitted then) or, at the end, the token sampled now.

`encode_prompt` is the one place that turns text into prompt ids with <bos>.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .sampling import RequestError, SamplingParams

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}

TopLogprobs = dict[int, float]  # token id -> log-probability, most likely first


def encode_prompt(tokenizer: Any, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of a text prompt, with <bos> first when `add_bos` (unless already there)."""
    ids = list(tokenizer.encode(text))
    bos = getattr(tokenizer, "bos_id", -1)
    if add_bos and bos is not None and bos >= 0 and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


class Request:
    """A prompt (text or token ids) plus its sampling parameters.

    `Request([2, 45, 7], max_new_tokens=16, temperature=0)`; keyword arguments are the fields of
    `SamplingParams` (or pass `params=`). `add_bos`: prepend <bos> to a text prompt (unless it
    already starts with it). `guidance_prompt`: the unconditional prompt of classifier-free
    guidance (text or ids; default [<bos>]), used when `guidance_scale` != 1. Images: a
    `geode.chat.MultimodalPrompt` as the prompt, or token ids with image placeholders and
    `images=` pixel values (N_images, C, S, S) (geode.infer.multimodal).
    """

    def __init__(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        add_bos: bool = True,
        guidance_prompt: str | Seq[int] | None = None,
        images: torch.Tensor | None = None,
        **sampling: Any,
    ):
        unknown = sorted(set(sampling) - _SAMPLING_FIELDS)
        if unknown:
            raise RequestError(f"unknown sampling parameter(s) {unknown}")
        if params is not None and sampling:
            raise RequestError("pass either params= or sampling keyword arguments, not both")
        self.prompt = prompt
        self.params = params if params is not None else SamplingParams(**sampling)
        self.request_id = request_id
        self.add_bos = add_bos
        self.guidance_prompt = guidance_prompt
        self.images = images

    def __repr__(self) -> str:
        p = self.prompt if isinstance(self.prompt, str) else f"<{len(self.prompt)} ids>"
        if not hasattr(self.prompt, "__len__"):  # a MultimodalPrompt
            p = type(self.prompt).__name__
        return f"Request({p!r}, id={self.request_id!r}, {self.params})"


@dataclass
class Result:
    """Everything generated for one request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids (forced ones included), a final stop / eos id included
    text: str | None  # decoded output (None without a tokenizer); a stop string is cut off
    finish_reason: str  # "stop" (eos, stop id or stop string), "length", or "abort"
    stop_reason: int | str | None = None  # the stop id or stop string that ended it
    logprobs: list[float] | None = None  # log p(token) under the model, per generated token
    top_logprobs: list[TopLogprobs] | None = None  # the top-n alternatives per generated token
    prompt_logprobs: list[float | None] | None = None  # per prompt token; the first is None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # timings (s) and token counts
    sampled_mask: list[int] = field(default_factory=list)  # per token: 1 sampled, 0 forced


@dataclass
class Delta:
    """What one step produced for one request (a streaming chunk)."""

    request_id: str
    token_ids: list[int]
    text: str  # new text ("" without a tokenizer or while held back for stop strings/UTF-8)
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    finished: bool = False
    finish_reason: str | None = None
    result: Result | None = None  # on the final delta
    sampled_mask: list[int] = field(default_factory=list)  # per token: 1 sampled, 0 forced


class DiffDecoder:
    """Fallback incremental detokenizer: decode everything, emit the new suffix, hold back an
    incomplete UTF-8 character (decoded as U+FFFD) until it completes."""

    def __init__(self, tokenizer: Any, skip_special: bool):
        self.tok, self.skip, self.ids, self.text = tokenizer, skip_special, [], ""

    def _decode(self) -> str:
        try:
            return self.tok.decode(self.ids, skip_special=self.skip)
        except TypeError:
            return self.tok.decode(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self._decode()
        if full.endswith("\ufffd"):
            return ""
        delta, self.text = full[len(self.text) :], full
        return delta

    def flush(self) -> str:
        full = self._decode()
        delta, self.text = full[len(self.text) :], full
        return delta


def new_decoder(tokenizer: Any, skip_special: bool) -> Any:
    """The tokenizer's incremental decoder (or the decode-and-diff fallback)."""
    if hasattr(tokenizer, "stream_decoder"):
        return tokenizer.stream_decoder(skip_special=skip_special)
    return DiffDecoder(tokenizer, skip_special)


def holdback(text: str, stops: Seq[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for x in stops:
        for k in range(min(len(x) - 1, len(text)), best, -1):
            if text.endswith(x[:k]):
                best = k
                break
    return best


class Sequence:
    """One request's state inside the engine (see the module docstring)."""

    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, gen: torch.Generator):
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.gen = gen
        self.out: list[int] = []
        self.sampled: list[int] = []  # per out token: 1 sampled, 0 forced
        self.n_sampled = 0
        self.pending: list[int] = []  # forced tokens not emitted yet
        self.cached = 0  # stream positions held by the cache row
        self.logprobs: list[float] | None = [] if params.logprobs is not None else None
        self.top: list[TopLogprobs] | None = [] if params.logprobs else None
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top: list[TopLogprobs | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]
            self.prompt_top = [None] if params.prompt_logprobs else None
        self.counts: torch.Tensor | None = None  # (V,) output occurrences, with penalties
        self.seen: torch.Tensor | None = None  # (V,) bool, prompt or output
        self.decoder: Any = None
        self.text = ""  # decoded output so far (stop string cut off once matched)
        self.emitted = 0  # characters of `text` already streamed
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.leader: Sequence | None = None  # same prompt admitted together: shares its prefill
        self.followers: list[Sequence] = []
        self.prefix_handle: Any = None  # a prefix-cache match to restore into the row
        # classifier-free guidance: the hidden unconditional row (fed the same output tokens,
        # never sampled nor reported) and its latest next-token logits (V,)
        self.uncond: Sequence | None = None
        self.parent: Sequence | None = None  # set on the hidden row: the guided sequence
        self.uncond_logits: torch.Tensor | None = None
        self.thinking: Any = None  # a ThinkingBudget (geode.infer.thinking) with thinking_budget
        self.images: Any = None  # the prompt's images (geode.infer.multimodal.PromptImages)
        self.t_add = time.perf_counter()
        self.t_first: float | None = None

    # ------------------------------------------------------------------ the token stream
    @property
    def total(self) -> int:
        """Length of the stream prompt + out + pending."""
        return len(self.prompt) + len(self.out) + len(self.pending)

    @property
    def ready(self) -> bool:
        """Prefill done: the first token has been produced."""
        return self.t_first is not None

    def tokens(self, start: int, end: int) -> list[int]:
        """Stream tokens at positions [start, end)."""
        p, o = len(self.prompt), len(self.out)
        stream = self.prompt[start:end] if start < p else []
        if end > p and start < p + o:
            stream += self.out[max(0, start - p) : end - p]
        if end > p + o:
            stream += self.pending[max(0, start - p - o) : end - p - o]
        return stream

    # ------------------------------------------------------------------ postprocess
    def emit(
        self,
        t: int,
        sampled: bool,
        eos_ids: frozenset[int],
        logprob: float | None = None,
        top: TopLogprobs | None = None,
    ) -> str:
        """Append one output token (sampled or forced); returns the text to stream now.

        Sampled tokens are checked against eos / stop ids, stop strings and max_new_tokens;
        forced ones only extend the text. Sets finish_reason when the sequence ends.
        """
        self.out.append(t)
        self.sampled.append(int(sampled))
        self.n_sampled += int(sampled)
        if self.counts is not None:
            self.counts[t] += 1
            self.seen[t] = True
        if self.logprobs is not None:
            self.logprobs.append(logprob)
            if self.top is not None:
                self.top.append(top)
        text = self._update_text_and_stop(t, sampled, eos_ids)
        if sampled and self.finish_reason is None and self.n_sampled >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return text

    def _update_text_and_stop(self, t: int, sampled: bool, eos_ids: frozenset[int]) -> str:
        """Record token t's effect on the text and stop state; return the text to emit now."""
        p = self.params
        enough = self.n_sampled >= p.min_new_tokens
        stop_id = (t in eos_ids and not p.ignore_eos) or t in p.stop_token_ids
        if sampled and enough and stop_id:
            self.finish_reason, self.stop_reason = "stop", t
            return ""
        if self.decoder is None:
            return ""
        before = len(self.text)
        self.text += self.decoder.push(t)
        if p.stop and enough and sampled:
            longest = max(len(x) for x in p.stop)
            start = max(0, before - longest + 1)
            hits = [(self.text.find(x, start), x) for x in p.stop]
            hits = [(at, x) for at, x in hits if at >= 0]
            if hits:
                at, x = min(hits)
                self.text = (
                    self.text[: at + len(x)] if p.include_stop_str_in_output else self.text[:at]
                )
                self.finish_reason, self.stop_reason = "stop", x
                self.decoder = None
                return ""
        hold = holdback(self.text, p.stop) if p.stop else 0
        out = self.text[self.emitted : len(self.text) - hold]
        self.emitted += len(out)
        return out

    def finish_text(self) -> str:
        """Text still to emit when the sequence finishes (held-back text, incomplete UTF-8)."""
        if self.decoder is not None:
            self.text += self.decoder.flush()
            self.decoder = None
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def result(self, with_text: bool) -> Result:
        """The Result of this sequence as it stands."""
        now = time.perf_counter()
        return Result(
            request_id=self.id,
            prompt_token_ids=list(self.prompt),
            token_ids=list(self.out),
            text=self.text if with_text else None,
            finish_reason=self.finish_reason or "abort",
            stop_reason=self.stop_reason,
            logprobs=self.logprobs,
            top_logprobs=self.top,
            prompt_logprobs=self.prompt_logprobs,
            prompt_top_logprobs=self.prompt_top,
            metrics={
                "prompt_tokens": len(self.prompt),
                "generated_tokens": len(self.out),
                "time_to_first_token_s": (self.t_first or now) - self.t_add,
                "total_s": now - self.t_add,
                **({"thinking_tokens": self.thinking.used} if self.thinking is not None else {}),
            },
            sampled_mask=list(self.sampled),
        )

    def clone(self, rid: str, gen: torch.Generator, tokenizer: Any) -> Sequence:
        """A copy of this sequence's state under a new id and generator (fork)."""
        c = Sequence(rid, list(self.prompt), self.params, gen)
        c.out, c.sampled, c.n_sampled = list(self.out), list(self.sampled), self.n_sampled
        c.pending, c.cached = list(self.pending), self.cached
        for name in ("logprobs", "top", "prompt_logprobs", "prompt_top"):
            v = getattr(self, name)
            setattr(c, name, list(v) if v is not None else None)
        if self.counts is not None:
            c.counts, c.seen = self.counts.clone(), self.seen.clone()
        if self.decoder is not None:
            c.decoder = new_decoder(tokenizer, self.params.skip_special_tokens)
            for t in self.out:
                c.decoder.push(t)
        c.text, c.emitted = self.text, self.emitted
        c.t_first = self.t_first
        c.thinking = self.thinking.copy() if self.thinking is not None else None
        return c
