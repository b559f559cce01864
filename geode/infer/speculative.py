"""Speculative decoding: a drafter proposes k tokens, the target verifies them in one run.

A round for one sequence whose last sampled token is t at position n:
  1. the drafter proposes d_1..d_k (and, for a model drafter, the distributions q_i it drew them
     from); the n-gram drafter proposes deterministically (q_i = one-hot at d_i);
  2. the target runs [t, d_1..d_k] at positions n..n+k in one multi-token forward, giving the
     distributions p_1..p_{k+1} of the tokens after t, d_1, ..., d_k;
  3. `verify` keeps the longest accepted prefix d_1..d_m and adds one token of its own, so a
     round yields m + 1 >= 1 tokens; the target cache forgets the k - m rejected positions
     (`HybridCache.rollback`).

Sampling (Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling", Algorithm 2): accept d_i with probability min(1, p_i(d_i) / q_i(d_i));
at the first rejection draw the token from norm(max(0, p_i - q_i)); when all k are accepted draw
a bonus token from p_{k+1}. The emitted tokens are then distributed exactly as plain sampling
from p. p and q are the *processed* distributions (temperature, top-k, top-p, min-p applied as
the sampler does: `processed_logits`), so the guarantee covers the sampler's output, not the
raw model's. Greedy: accept while d_i == argmax p_i, then emit argmax p_{m+1}: token for token
the output of plain greedy decoding.

Drafters: `NgramDrafter` (prompt lookup, Saxena 2023: the continuation of the last n-gram's
earlier occurrence in the context; no model) and `ModelDrafter` (a smaller model with the same
tokenizer, its own cache rows; `check_draft` verifies compatibility). `AdaptiveK` grows k by one
after a fully accepted round (up to k_max) and shrinks it by one otherwise (down to 1).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from . import kernels
from .cache import HybridCache
from .sampling import SamplingParams, sample_from_logits, tempered_logits

# ---------------------------------------------------------------------- distributions


def can_speculate(params: SamplingParams, n_out: int) -> bool:
    """Whether a sequence's next tokens may be drafted: its sampling distribution must depend
    on nothing but the logits (no logits processors or penalties, min_new_tokens reached)."""
    return (
        not params.logits_processors and not params.has_penalties and n_out >= params.min_new_tokens
    )


def processed_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (N, V) float32 of one sampled (temperature > 0) sequence -> the sampler's filtered
    logits (N, V) (`sampling.tempered_logits`: temperature, then top-k, top-p, min-p); softmax
    of the result is the distribution the sampler draws from."""
    return tempered_logits(logits, [params] * logits.shape[0])


def _draw(probs: torch.Tensor, u: torch.Tensor) -> int:
    """One inverse-CDF draw from unnormalised probabilities (V,) with the uniform u (1,)."""
    return int(sample_from_logits(probs.log()[None], u)[0])


# ---------------------------------------------------------------------- verification


def verify_greedy(logits: torch.Tensor, draft: Sequence[int]) -> list[int]:
    """Greedy verification: logits (k+1, V) float32 of the target after [t, d_1..d_k] ->
    the accepted drafts d_1..d_m (each the target's argmax) plus the target's argmax after them."""
    best = kernels.argmax(logits).tolist()  # (k+1,)
    m = 0
    while m < len(draft) and draft[m] == best[m]:
        m += 1
    return list(draft[:m]) + [best[m]]


def verify_sampled(
    logits: torch.Tensor,
    draft: Sequence[int],
    q: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator,
) -> list[int]:
    """Leviathan/Chen verification of k drafted tokens (see the module docstring).

    logits (k+1, V) float32: the target's raw logits after [t, d_1..d_k]; q (k, V): the draft's
    processed probabilities (None: the draft is deterministic, q_i = one-hot at d_i). Uniforms
    come from `generator` (k for the acceptance tests, one for the final draw). Returns
    d_1..d_m plus one token drawn from the residual (first rejection) or from p_{k+1} (bonus).
    """
    k = len(draft)
    z = processed_logits(logits[: k + 1], params)  # (k+1, V)
    p = z.softmax(-1)  # (k+1, V)
    u = torch.rand(k + 1, generator=generator, dtype=torch.float64)
    m = k
    if k:
        d = torch.tensor(list(draft), dtype=torch.long, device=p.device)
        px = p[torch.arange(k), d].double()  # (k,) p_i(d_i)
        qx = q[torch.arange(k), d].double() if q is not None else torch.ones_like(px)
        # accept d_i iff r_i < p_i(d_i) / q_i(d_i), r_i ~ U[0, 1)  (q_i(d_i) > 0: d_i was drawn from q_i)
        rejected = (u[:k] * qx >= px).nonzero()
        m = int(rejected[0, 0]) if len(rejected) else k
    if m == k:  # all accepted: the bonus token from p_{k+1}, as plain sampling would draw it
        return list(draft) + [int(sample_from_logits(z[k : k + 1], u[k:]))]
    if q is None:  # residual of a one-hot q: p without the rejected token
        residual = p[m].clone()
        residual[draft[m]] = 0.0
    else:
        residual = (p[m] - q[m]).clamp(min=0.0)  # max(0, p - q), normalised by the draw
    if not bool((residual > 0).any()):  # p == q up to rounding: the residual is p itself
        residual = p[m]
    return list(draft[:m]) + [_draw(residual, u[k:])]


def verify(
    logits: torch.Tensor,
    draft: Sequence[int],
    q: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator,
) -> list[int]:
    """Verify one sequence's drafts: greedy params -> `verify_greedy`, else `verify_sampled`."""
    if params.greedy:
        return verify_greedy(logits[: len(draft) + 1], draft)
    return verify_sampled(logits, draft, q, params, generator)


# ---------------------------------------------------------------------- adaptive k


class AdaptiveK:
    """Draft length of one sequence: +1 after a round with every draft accepted (up to k_max),
    -1 otherwise (down to 1)."""

    def __init__(self, k_max: int, k: int | None = None):
        check_k(k_max)
        self.k_max = k_max
        self.k = k_max if k is None else min(max(1, k), k_max)

    def update(self, proposed: int, accepted: int) -> int:
        """Record a round (proposed drafts, accepted drafts); returns the next k."""
        if proposed > 0:
            self.k = min(self.k + 1, self.k_max) if accepted >= proposed else max(1, self.k - 1)
        return self.k


def check_k(k: Any) -> None:
    """num_draft_tokens must be an integer >= 1."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_draft_tokens={k!r} is invalid: must be an integer >= 1")


# ---------------------------------------------------------------------- drafters


class NgramDrafter:
    """Prompt-lookup drafting (Saxena 2023, "Prompt Lookup Decoding"): find the last n tokens of
    the context earlier in it and propose the (up to k) tokens that followed; with no match try
    n - 1, ... down to `min_n`; no match at all -> no drafts (the round decodes one token)."""

    def __init__(self, n: int = 3, k: int = 4, min_n: int = 1):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n-gram size n={n!r} is invalid: must be an integer >= 1")
        if isinstance(min_n, bool) or not isinstance(min_n, int) or not 1 <= min_n <= n:
            raise ValueError(f"min_n={min_n!r} is invalid: must be an integer in [1, n={n}]")
        check_k(k)
        self.n, self.k, self.min_n = n, k, min_n

    def __repr__(self) -> str:
        return f"NgramDrafter(n={self.n}, k={self.k})"

    def propose(self, tokens: Sequence[int], k: int | None = None) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the context's
        last n-gram (longest n first); [] when none occurs."""
        k = self.k if k is None else k
        L = len(tokens)
        for n in range(min(self.n, L - 1), self.min_n - 1, -1):
            tail = list(tokens[L - n :])
            first = tail[0]
            # most recent start s < L - n with tokens[s:s+n] == tail and a token after it
            for s in range(L - n - 1, -1, -1):
                if tokens[s] == first and list(tokens[s : s + n]) == tail:
                    return list(tokens[s + n : min(L, s + n + k)])
        return []

    def draft(
        self,
        keys: Sequence[Hashable],
        contexts: Sequence[Sequence[int]],
        ks: Sequence[int],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
    ) -> tuple[list[list[int]], None]:
        """Drafts per sequence (deterministic: no q)."""
        return [self.propose(c, k) for c, k in zip(contexts, ks, strict=True)], None

    def release(self, key: Hashable) -> None:
        """Nothing is kept per sequence."""


class ModelDrafter:
    """Drafts with a smaller model sharing the target's tokenizer (see `check_draft`).

    The drafter keeps its own cache with one row per drafted sequence (keyed by the caller's
    sequence key) and the tokens that row holds. At each `draft` call a row is truncated to the
    longest common prefix of what it holds and the sequence's context (rejected drafts are
    forgotten), catches up on the new tokens (a whole prompt for a new sequence), then runs k
    steps, drawing greedily or from the processed distribution q as the sequence's params say.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        vocab_size: int | None = None,
        prefill_chunk: int = 512,
        slack: int = 8,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.runner = _draft_runner(self.model)
        pieces = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
        # ids the target may sample: with padding rows in either embedding, those with a piece
        self.vocab_size = vocab_size or min(self.config.vocab_size, pieces or 10**12)
        self.prefill_chunk = prefill_chunk
        self.slack = slack  # ring slots past the window: positions a wrapped row can roll back
        self.cache: HybridCache | None = None
        self.keys: list[Hashable] = []  # keys[i] lives in cache row i
        self.held: dict[Hashable, list[int]] = {}  # tokens whose K/V the key's row holds

    def __repr__(self) -> str:
        return f"ModelDrafter({self.config.num_hidden_layers} layers, {self.config.hidden_size} hidden)"

    # ---------------------------------------------------------------- rows
    def release(self, key: Hashable) -> None:
        """Forget a sequence; the last row moves into its row."""
        if key not in self.held:
            return
        i, last = self.keys.index(key), len(self.keys) - 1
        if i != last:
            self.cache.move_row(last, i)
            self.keys[i] = self.keys[last]
        self.keys.pop()
        self.cache.reset_rows(last)
        del self.held[key]

    def _rows_for(self, keys: Sequence[Hashable], capacity: int) -> list[int]:
        """Rows of `keys` (others released, new ones added empty), the cache large enough."""
        wanted = set(keys)
        for key in [k for k in self.keys if k not in wanted]:
            self.release(key)
        for key in keys:
            if key not in self.held:
                self.keys.append(key)
                self.held[key] = []
        self._ensure_cache(len(self.keys), capacity)
        for key in keys:
            if not self.held[key]:
                self.cache.reset_rows(self.keys.index(key))
        return [self.keys.index(k) for k in keys]

    def _ensure_cache(self, rows: int, capacity: int) -> None:
        c = self.cache
        capacity = min(capacity, self.config.max_position_embeddings)
        if c is not None and c.batch >= rows and c.capacity >= capacity:
            return
        new_rows = max(rows, 2 * c.batch if c is not None else rows)
        new_cap = max(capacity, (c.capacity * 5) // 4 if c is not None else capacity)
        new_cap = min(new_cap, self.config.max_position_embeddings)
        dtype, device = self.model.dtype, self.model.device
        if c is None:
            self.cache = HybridCache(
                self.config, new_rows, new_cap, dtype, device, slack=self.slack
            )
        else:
            self.cache = c.resized(new_rows, new_cap, len(self.keys))

    def _truncate(self, row: int, key: Hashable, length: int) -> int:
        """Keep the first `length` positions of a row (all dropped when its ring cannot roll
        back that far); returns the positions kept."""
        held = self.held[key]
        if length < len(held):
            try:
                self.cache.rollback(row, len(held) - length)
            except ValueError:  # the ring overwrote positions the window needs: start over
                self.cache.reset_rows(row)
                length = 0
            del held[length:]
        return len(held)

    # ---------------------------------------------------------------- drafting
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """ids, pos (N, T) over cache rows 0..N-1 -> logits (N, V') float32 at columns `last`."""
        rows = list(range(ids.shape[0]))
        out = self.runner.run(rows, ids, pos, self.cache, last[:, None])  # (N, 1, V)
        return out[:, 0, : self.vocab_size]

    def _pick(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
        q: list[list[torch.Tensor]],
    ) -> list[int]:
        """Next draft token per row of logits (B, V'); appends each sampled row's q."""
        tokens = kernels.argmax(logits).tolist()
        for b, p in enumerate(params):
            if not p.greedy:
                z = processed_logits(logits[b : b + 1], p)  # (1, V')
                u = torch.rand(1, generator=generators[b], dtype=torch.float64)
                tokens[b] = int(sample_from_logits(z, u)[0])
                q[b].append(z[0].softmax(-1))
        return tokens

    def draft(
        self,
        keys: Sequence[Hashable],
        contexts: Sequence[Sequence[int]],
        ks: Sequence[int],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
    ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Draft ks[b] tokens after each context (prompt + output so far).

        Returns the drafts and, per sequence, q (k_b, V') the processed draft distributions
        (None for greedy sequences). `keys` identify sequences across calls; a key absent from a
        call is released.
        """
        B = len(keys)
        K = max(ks)
        need = max(len(c) for c in contexts) + K
        with torch.inference_mode():
            if need > self.config.max_position_embeddings:  # the draft's context is too short
                for key in list(self.keys):
                    self.release(key)
                return [[] for _ in keys], [None] * B
            rows = self._rows_for(keys, need)
            # 1. catch up: truncate to the common prefix, prefill long gaps row by row
            starts = []
            for b, (key, ctx) in enumerate(zip(keys, contexts, strict=True)):
                held, row = self.held[key], rows[b]
                common = 0
                lim = min(len(held), len(ctx) - 1)  # at least the last token is fed again
                while common < lim and held[common] == ctx[common]:
                    common += 1
                common = self._truncate(row, key, common)
                end = len(ctx) - 1
                if end - common > 8:  # a prompt (or a long gap): its own chunked prefill
                    for s in range(common, end, self.prefill_chunk):
                        e = min(end, s + self.prefill_chunk)
                        ids = torch.tensor([ctx[s:e]], device=self.model.device)
                        pos = torch.arange(s, e, device=self.model.device)[None]
                        sel = torch.tensor([[e - s - 1]], device=self.model.device)
                        self.runner.run([row], ids, pos, self.cache, sel)
                    held.extend(ctx[common:end])
                    common = end
                starts.append(common)
            # 2. one forward over all rows (cache rows 0..N-1 in self.keys order): the gap tokens
            order = {k: i for i, k in enumerate(keys)}
            N = len(self.keys)
            T = max(len(contexts[b]) - starts[b] for b in range(B))
            ids = torch.zeros(N, T, dtype=torch.long)
            pos = torch.full((N, T), -1, dtype=torch.long)
            last = torch.zeros(N, dtype=torch.long)
            for r, key in enumerate(self.keys):
                b = order[key]
                gap = list(contexts[b][starts[b] :])
                ids[r, : len(gap)] = torch.tensor(gap)
                pos[r, : len(gap)] = torch.arange(starts[b], len(contexts[b]))
                last[r] = len(gap) - 1
                self.held[key].extend(gap)
            dev = self.model.device
            logits = self._forward(ids.to(dev), pos.to(dev), last.to(dev))  # (N, V')
            perm = [order[k] for k in self.keys]  # row r holds sequence perm[r]
            inv = torch.tensor([self.keys.index(k) for k in keys])
            logits = logits[inv.to(dev)]  # (B, V') in call order
            q: list[list[torch.Tensor]] = [[] for _ in range(B)]
            drafts = [[t] for t in self._pick(logits, params, generators, q)]
            # 3. k - 1 more single-token steps
            for i in range(1, K):
                step_ids = torch.tensor([[drafts[b][-1]] for b in perm], device=dev)
                step_pos = torch.tensor([[len(contexts[b]) + i - 1] for b in perm], device=dev)
                logits = self._forward(step_ids, step_pos, torch.zeros(N, dtype=torch.long))
                for r, key in enumerate(self.keys):
                    self.held[key].append(drafts[perm[r]][-1])
                nxt = self._pick(logits[inv.to(dev)], params, generators, q)
                for b in range(B):
                    drafts[b].append(nxt[b])
        out = [d[: ks[b]] for b, d in enumerate(drafts)]
        qs = [torch.stack(q[b][: ks[b]]) if q[b] else None for b in range(B)]
        return out, qs


# ---------------------------------------------------------------------- compatibility


def check_draft(
    target_model: torch.nn.Module,
    target_tok: Any,
    draft_model: torch.nn.Module,
    draft_tok: Any,
) -> int:
    """Check that a draft model can draft for a target; returns the number of ids both may
    emit (the tokenizer's pieces, else the shared vocabulary size).

    Same tokenizer (same pieces id by id, same special ids) and embeddings that cover it; the
    embeddings may have padding rows past the tokenizer (Gemma 3: 262,208 rows for 262,144
    pieces), which are never sampled. Without tokenizers the vocabulary sizes must be equal.
    Raises ValueError naming what differs.
    """
    tv, dv = target_model.config.vocab_size, draft_model.config.vocab_size
    if (target_tok is None) != (draft_tok is None):
        has = "target" if target_tok is not None else "draft"
        raise ValueError(
            f"only the {has} has a tokenizer: the draft must use the target's tokenizer "
            "(give both or neither)"
        )
    if target_tok is None:
        if tv != dv:
            raise ValueError(
                f"draft vocabulary size {dv} differs from the target's {tv} (and there is no "
                "tokenizer to say which ids are real pieces)"
            )
        return tv
    n, dn = target_tok.vocab_size, draft_tok.vocab_size
    if n != dn:
        raise ValueError(
            f"the draft's tokenizer has {dn} pieces, the target's {n}: another tokenizer"
        )
    for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
        a, b = getattr(target_tok, name, None), getattr(draft_tok, name, None)
        if a != b:
            raise ValueError(f"the draft's tokenizer has {name}={b}, the target's {a}")
    if not _same_pieces(target_tok, draft_tok, n):
        bad = next(i for i in range(n) if _piece(target_tok, i) != _piece(draft_tok, i))
        raise ValueError(
            f"the draft's tokenizer differs from the target's at id {bad}: "
            f"{_piece(draft_tok, bad)!r} vs {_piece(target_tok, bad)!r}"
        )
    for who, v in (("target", tv), ("draft", dv)):
        if v < n:
            raise ValueError(
                f"the {who} model's embedding has {v} rows, fewer than the tokenizer's {n} pieces"
            )
    return n


def _piece(tok: Any, i: int) -> Any:
    if hasattr(tok, "id_to_piece"):
        return tok.id_to_piece(i)
    return tok.decode([i])


def _same_pieces(a: Any, b: Any, n: int) -> bool:
    """Same pieces id by id (the serialized model compared first: the common case is one file)."""
    sa, sb = getattr(a, "serialized_model", None), getattr(b, "serialized_model", None)
    if sa is not None and sb is not None:
        try:
            if sa() == sb():
                return True
        except (AttributeError, TypeError, ValueError):
            pass
    return all(_piece(a, i) == _piece(b, i) for i in range(n))


# ---------------------------------------------------------------------- construction


def make_drafter(
    draft: Any,
    target_model: torch.nn.Module,
    target_tok: Any,
    num_draft_tokens: int = 4,
) -> NgramDrafter | ModelDrafter:
    """A drafter from `Engine(draft=...)`: an NgramDrafter / ModelDrafter as is, "ngram:N" (or
    "ngram" = n 3), a Transformer (sharing the target's tokenizer), or a checkpoint path (its
    tokenizer, when it has one, must equal the target's)."""
    check_k(num_draft_tokens)
    if isinstance(draft, NgramDrafter | ModelDrafter):
        drafter = draft
    elif isinstance(draft, str) and draft.startswith("ngram"):
        spec = draft[len("ngram") :]
        try:
            n = int(spec[1:]) if spec.startswith(":") else 3 if not spec else None
        except ValueError:
            n = None
        if n is None:
            raise ValueError(f"draft={draft!r}: expected 'ngram' or 'ngram:N' with an integer N")
        return NgramDrafter(n, num_draft_tokens)
    elif isinstance(draft, torch.nn.Module):
        drafter = ModelDrafter(draft, target_tok, slack=num_draft_tokens + 1)
    elif isinstance(draft, str | os.PathLike):
        from .load import load_for_inference

        model, tok = load_for_inference(
            draft, dtype=str(target_model.dtype).removeprefix("torch."),
            device=str(target_model.device),
        )  # fmt: skip
        drafter = ModelDrafter(
            model, tok if tok is not None else target_tok, slack=num_draft_tokens + 1
        )
    else:
        raise ValueError(
            f"draft={draft!r}: expected a model, a checkpoint path, 'ngram:N' or a drafter"
        )
    if isinstance(drafter, ModelDrafter):
        check_draft(target_model, target_tok, drafter.model, drafter.tokenizer)
    return drafter


def _draft_runner(model: torch.nn.Module) -> Any:
    """The runner a draft model decodes with: the native C runner on CPU where it runs this
    model (decode steps of a small model are dominated by per-layer overheads torch adds),
    else the model's torch forward."""
    from .runner import NativeStepRunner, TorchRunner

    plain = TorchRunner(model)
    if model.device.type == "cpu" and kernels.available():
        native = NativeStepRunner(model, plain, pack_weights=False)
        if native.decoder is not None:
            return native
    return plain


# ---------------------------------------------------------------------- the engine's decode hook


class Speculator:
    """Speculative decode steps for an Engine (its `_decode_rows` hook calls `decode`).

    Per ready sequence and step: draft k tokens (k adapted per sequence, `AdaptiveK`), run the
    last token and the drafts through the target in ONE runner call for all rows, verify, and
    roll back the target cache's rejected positions. Sequences whose sampling depends on more
    than the logits (`can_speculate`) and rounds without drafts decode one token through the
    plain sampler, so their output is exactly plain decoding's.
    `stats`: rounds, draft_tokens (proposed), accepted_tokens; `request_stats(id)` the same per
    request (kept for the last 4096 requests).
    """

    KEEP = 4096

    def __init__(self, drafter: NgramDrafter | ModelDrafter, num_draft_tokens: int):
        check_k(num_draft_tokens)
        self.drafter = drafter
        self.k_max = num_draft_tokens
        self.slack = num_draft_tokens + 1  # target ring slots past the window (rollback)
        self.stats = {"rounds": 0, "draft_tokens": 0, "accepted_tokens": 0}
        self._k: dict[str, AdaptiveK] = {}
        self._per_request: dict[str, dict[str, int]] = {}

    def request_stats(self, request_id: str) -> dict[str, int] | None:
        """rounds / draft_tokens / accepted_tokens of one request (None if unknown)."""
        return self._per_request.get(request_id)

    def _k_for(self, engine: Any, c: Any) -> int:
        """Tokens to draft for chunk c: adaptive k within the sequence's and cache's room."""
        s = c.seq
        if not can_speculate(s.params, s.n_sampled):
            return 0
        room = min(
            s.params.max_new_tokens - s.n_sampled - 1,  # the round emits k + 1 at most
            engine.cache.capacity - 1 - c.start,
            engine.max_seq_len - 1 - c.start,
        )
        adaptive = self._k.setdefault(s.id, AdaptiveK(self.k_max))
        return max(0, min(adaptive.k, room))

    def decode(self, engine: Any, chunks: Sequence[Any]) -> list[tuple[list[int], Any, Any]]:
        """One speculative step for ready sequences (chunks of one token each); per chunk
        (tokens emitted, logprobs or None, top_logprobs or None)."""
        from .sampling import sample_tokens

        live = {s.id for s in engine.running}
        for rid in [r for r in self._k if r not in live]:
            del self._k[rid]
        seqs = [c.seq for c in chunks]
        ks = [self._k_for(engine, c) for c in chunks]
        drafts: list[list[int]] = [[] for _ in chunks]
        qs: list[torch.Tensor | None] = [None] * len(chunks)
        todo = [i for i, k in enumerate(ks) if k > 0]
        if todo:
            d, q = self.drafter.draft(
                [seqs[i].id for i in todo],
                [seqs[i].prompt + seqs[i].out for i in todo],
                [ks[i] for i in todo],
                [seqs[i].params for i in todo],
                [seqs[i].gen for i in todo],
            )
            for j, i in enumerate(todo):
                drafts[i] = d[j][: ks[i]]
                qs[i] = q[j] if q is not None else None
        # the target: [last token, drafts] of every row in one run, logits at every column
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].row)
        B, T = len(chunks), 1 + max(len(x) for x in drafts)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.full((B, T), -1, dtype=torch.long)
        for b, i in enumerate(order):
            c, x = chunks[i], drafts[i]
            ids[b, : 1 + len(x)] = torch.tensor([seqs[i].out[-1], *x])
            pos[b, : 1 + len(x)] = torch.arange(c.start, c.start + 1 + len(x))
        dev = engine.device
        rows = [chunks[i].row for i in order]
        logits = engine.runner.run(rows, ids.to(dev), pos.to(dev), engine.cache)  # (B, T, V)
        logits = logits[:, :, : engine.token_vocab_size]  # (B, T, V'): ids with a piece
        engine.stats["positions_run"] += sum(len(x) for x in drafts)
        out: list[tuple[list[int], Any, Any]] = [([], None, None)] * len(chunks)
        for b, i in enumerate(order):
            s, x = seqs[i], drafts[i]
            z = logits[b, : len(x) + 1]  # (k+1, V')
            if x:
                tokens = verify(z, x, qs[i], s.params, s.gen)
                self._record(engine, s.id, len(x), len(tokens) - 1)
                rejected = len(x) - (len(tokens) - 1)
                if rejected:
                    engine.cache.rollback(chunks[i].row, rejected)
            else:  # no drafts: exactly the plain sampler's step
                tokens = sample_tokens([s], z[:1], engine.eos_token_ids).tolist()
            lps = tops = None
            if s.logprobs is not None:
                logp = z[: len(tokens)].log_softmax(-1)  # raw model distribution, as plain
                pairs = [engine._token_logprobs(s, logp[j], t) for j, t in enumerate(tokens)]
                lps = [lp for lp, _ in pairs]
                tops = [top for _, top in pairs] if s.top is not None else None
            out[i] = (tokens, lps, tops)
        return out

    def _record(self, engine: Any, rid: str, proposed: int, accepted: int) -> None:
        """Count a verified round (here, in engine.stats and per request); adapt k."""
        for st in (self.stats, engine.stats):
            st["rounds"] = st.get("rounds", 0) + 1
            st["draft_tokens"] = st.get("draft_tokens", 0) + proposed
            st["accepted_tokens"] = st.get("accepted_tokens", 0) + accepted
        self._k[rid].update(proposed, accepted)
        r = self._per_request.pop(rid, None) or dict.fromkeys(self.stats, 0)
        r["rounds"] += 1
        r["draft_tokens"] += proposed
        r["accepted_tokens"] += accepted
        self._per_request[rid] = r  # most recent last
        if len(self._per_request) > self.KEEP:
            del self._per_request[next(iter(self._per_request))]


def build_speculator(engine: Any, draft: Any, num_draft_tokens: int = 4) -> Speculator:
    """The Speculator of `Engine(draft=..., num_draft_tokens=k)` (see `make_drafter`)."""
    drafter = make_drafter(draft, engine.model, engine.tokenizer, num_draft_tokens)
    if isinstance(drafter, ModelDrafter) and drafter.vocab_size != engine.token_vocab_size:
        drafter.vocab_size = engine.token_vocab_size
    return Speculator(drafter, num_draft_tokens)
