"""Sampling parameters and the per-step logits pipeline.

Order of operations on one step's logits (float32), per sequence:
  0. classifier-free guidance when guidance_scale != 1 (the engine combines the sequence's
     logits with its unconditional row's: uncond + g * (cond - uncond)),
  1. custom logits processors (constrained decoding),
  2. penalties: repetition (prompt + output), presence and frequency (output only),
  3. min_new_tokens: end-of-sequence / stop ids masked until enough tokens exist,
  4. temperature 0 -> exact argmax; otherwise divide by the temperature,
  5. top-k, then top-p (nucleus), then min-p, then one draw from the renormalised distribution
     with the request's own generator (so a seed reproduces independently of the batch).
Log-probabilities reported to the caller are of the raw model distribution (step 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import kernels

# (generated token ids so far, logits (V,)) -> logits (V,); e.g. a JSON-grammar mask.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


class RequestError(ValueError):
    """A request has an invalid field; the message names the field and its value."""


@dataclass
class SamplingParams:
    """How one sequence is sampled and when it stops (OpenAI / vLLM semantics and defaults)."""

    max_new_tokens: int = 256  # generated tokens at most (finish reason "length")
    min_new_tokens: int = 0  # eos / stop ids are masked until this many tokens exist
    temperature: float = 1.0  # 0 = greedy (exact argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: smallest set with cumulative probability >= top_p
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty: float = 1.0  # CTRL-style, over prompt + output; 1 = off
    presence_penalty: float = 0.0  # subtract once per token present in the output
    frequency_penalty: float = 0.0  # subtract per occurrence in the output
    seed: int | None = None  # per-request generator; None = drawn from the engine's generator
    stop: Sequence[str] = ()  # stop strings (need a tokenizer), matched across token boundaries
    stop_token_ids: Sequence[int] = ()  # extra ids that end the sequence
    ignore_eos: bool = False  # keep going past the end-of-sequence token
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    logprobs: int | None = None  # None: none; 0: chosen token; n: plus the top-n alternatives
    prompt_logprobs: int | None = None  # same for every prompt token (the first has none)
    skip_special_tokens: bool = True  # leave special tokens out of the text
    logits_processors: Sequence[LogitsProcessor] = field(default_factory=tuple)
    # classifier-free guidance (Ho & Salimans 2022, eq. 6; Sanchez et al. 2023 for LMs):
    # logits = uncond + g * (cond - uncond), uncond from Request.guidance_prompt; 1 = off
    guidance_scale: float = 1.0
    # thinking tokens at most; then <end_of_thinking> is forced (geode.infer.thinking); None = off
    thinking_budget: int | None = None

    @property
    def greedy(self) -> bool:
        """Temperature 0: the argmax of the (penalised) logits."""
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Any of the three penalties is active."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise RequestError naming the first invalid field."""

        def bad(name: str, why: str) -> RequestError:
            return RequestError(f"{name}={getattr(self, name)!r} is invalid: {why}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise bad("min_new_tokens", "must be an integer >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise bad("min_new_tokens", f"exceeds max_new_tokens={self.max_new_tokens}")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if not is_num(self.guidance_scale):
            raise bad("guidance_scale", "must be a finite number (1 = off)")
        if self.thinking_budget is not None and (
            not is_int(self.thinking_budget) or self.thinking_budget < 0
        ):
            raise bad("thinking_budget", "must be None or an integer >= 0")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value <= 100):
                raise bad(name, "must be None or an integer in [0, 100]")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if any(not is_int(t) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be integers")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"ids must be in [0, {vocab_size})")


# ---------------------------------------------------------------------- penalties
def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    seen: torch.Tensor,
    repetition: float,
    presence: float,
    frequency: float,
) -> torch.Tensor:
    """Penalise repeats in one row of logits (V,), in place.

    Repetition penalty (Keskar et al. 2019, CTRL, eq. in sec. 4.1): a logit z of a token seen in
    the prompt or output becomes z / r if z > 0 else z * r. Presence/frequency (OpenAI):
    z -= presence * [c > 0] + frequency * c, with c the token's count in the output.
    counts (V,) output occurrences; seen (V,) bool, prompt or output.
    """
    if repetition != 1.0:
        z = logits[seen]
        logits[seen] = torch.where(z > 0, z / repetition, z * repetition)
    if presence != 0.0 or frequency != 0.0:
        logits -= presence * (counts > 0).to(logits.dtype) + frequency * counts.to(logits.dtype)
    return logits


# ---------------------------------------------------------------------- truncation
def filter_logits(
    logits: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask logits (B, V) (already divided by the temperature) to -inf outside the kept set.

    top_k (B,) long (0 = off): keep the k largest. top_p (B,) (1 = off): nucleus sampling
    (Holtzman et al. 2019, eq. 2): the smallest prefix of the sorted distribution whose mass is
    >= p (the most likely token always kept). min_p (B,) (0 = off): keep p_i >= min_p * p_max
    (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling", eq. 1). Applied in that order,
    each to the renormalised result of the previous one.
    """
    B, V = logits.shape
    neg = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    if top_k is not None and bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # (B,)
        kmax = int(k.max())
        top = logits.topk(kmax, dim=-1).values  # (B, kmax), descending
        kth = top.gather(1, (k - 1)[:, None])  # (B, 1): the k-th largest value
        logits = torch.where(logits < kth, neg, logits)
    if top_p is not None and bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p[:, None]  # token i kept iff mass before it < p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)  # (B, V)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # (B, 1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def tempered_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Steps 4-5's distribution: logits (B, V) of sampled (temperature > 0) rows, row b divided
    by params[b].temperature, then top-k, top-p, min-p (`filter_logits`); its softmax is what
    the sampler draws from (speculative verification uses the same)."""
    dev, dt = logits.device, logits.dtype
    temp = torch.tensor([p.temperature for p in params], device=dev, dtype=dt)  # (B,)
    return filter_logits(
        logits / temp[:, None],
        top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev),
        top_p=torch.tensor([p.top_p for p in params], device=dev, dtype=dt),
        min_p=torch.tensor([p.min_p for p in params], device=dev, dtype=dt),
    )


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from softmax(logits) (B, V) with one uniform in [0, 1) per row -> (B,).

    The draw of row b depends only on row b and uniforms[b], whatever else is in the batch.
    """
    probs = logits.float().softmax(dim=-1)  # (B, V)
    cdf = probs.double().cumsum(dim=-1)  # (B, V), float64 so the tail is resolved
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]  # (B, 1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)  # first index with cdf > u
    idx = idx.clamp(max=logits.shape[-1] - 1)
    # A zero-probability token can never be picked: step back to the last positive-mass token.
    picked_zero = probs.gather(1, idx[:, None]).squeeze(1) <= 0
    if bool(picked_zero.any()):
        last_pos = (probs > 0).cumsum(-1).argmax(-1)  # index of the last positive entry
        idx = torch.where(picked_zero, last_pos, idx)
    return idx


# ---------------------------------------------------------------------- the step's sampler
def prepare_logits(seqs: Sequence, logits: torch.Tensor, eos_ids: frozenset[int]) -> torch.Tensor:
    """Steps 1-3 of the pipeline (processors, penalties, min_new_tokens) on logits (B, V).

    seqs[i] (an engine Sequence) gives row i's params, output so far (`out`, `n_sampled`) and
    penalty state (`counts`, `seen`). Returns `logits` itself when no row needs a change,
    else a modified copy.
    """
    special = [
        i
        for i, s in enumerate(seqs)
        if s.params.logits_processors
        or s.params.has_penalties
        or s.n_sampled < s.params.min_new_tokens
    ]
    if not special:
        return logits
    z = logits.clone()
    for i in special:
        s, p = seqs[i], seqs[i].params
        for proc in p.logits_processors:
            z[i] = proc(list(s.out), z[i])
        if p.has_penalties:
            apply_penalties(
                z[i],
                s.counts.to(z.device),
                s.seen.to(z.device),
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty,
            )
        if s.n_sampled < p.min_new_tokens:
            banned = set(p.stop_token_ids)
            if not p.ignore_eos:
                banned |= eos_ids
            if banned:
                z[i, torch.tensor(sorted(banned), device=z.device)] = float("-inf")
    return z


def sample_tokens(seqs: Sequence, logits: torch.Tensor, eos_ids: frozenset[int]) -> torch.Tensor:
    """The next token (B,) of each sequence from its row of logits (B, V) float32 (the whole
    pipeline in this module's docstring; each row draws with its sequence's `gen`)."""
    z = prepare_logits(seqs, logits, eos_ids)
    B = len(seqs)
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    if len(greedy) == B:
        return kernels.argmax(z)
    tokens = torch.empty(B, dtype=torch.long, device=z.device)
    if greedy:
        g = torch.tensor(greedy, device=z.device)
        tokens[g] = kernels.argmax(z[g])
    sampled = [i for i in range(B) if not seqs[i].params.greedy]
    idx = torch.tensor(sampled, device=z.device)
    zs = tempered_logits(z[idx], [seqs[i].params for i in sampled])
    u = torch.cat([torch.rand(1, generator=seqs[i].gen, dtype=torch.float64) for i in sampled])
    tokens[idx] = sample_from_logits(zs, u.to(z.device))
    return tokens
