"""The generation engine: the one loop that chat, the server, eval, RL and distillation call.

    engine = Engine(model, tokenizer)
    results = engine.generate([Request("Once upon", max_new_tokens=32, temperature=0)])
    for delta in engine.stream(Request([2, 651, 1234], max_new_tokens=8)):
        print(delta.text, end="")

Step-level API (continuous batching; the server's scheduler and RL rollouts drive it):
`add_request(req) -> id`, `step() -> list[Delta]` (admits waiting requests, prefilling each in
chunks and sampling its first token, then decodes one token for every running sequence),
`abort(id)`, `has_unfinished()`. One caller drives an engine at a time.

Running sequences occupy rows 0..B-1 of a `HybridCache`; a finishing sequence's row is filled
by moving the last row into it, so a decode step works on views and never copies the cache.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import kernels
from .cache import HybridCache
from .native import NativeDecoder, Unsupported
from .optimize import optimize_for_decode
from .sampling import (
    RequestError,
    SamplingParams,
    apply_penalties,
    filter_logits,
    sample_from_logits,
)

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


class Request:
    """A prompt (text or token ids) plus its sampling parameters.

    `Request([2, 45, 7], max_new_tokens=16, temperature=0)`; keyword arguments are the fields of
    `SamplingParams` (or pass `params=`). `add_bos`: prepend <bos> to a text prompt (unless it
    already starts with it).
    """

    def __init__(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        add_bos: bool = True,
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

    def __repr__(self) -> str:
        p = self.prompt if isinstance(self.prompt, str) else f"<{len(self.prompt)} ids>"
        return f"Request({p!r}, id={self.request_id!r}, {self.params})"


TopLogprobs = dict[int, float]  # token id -> log-probability, most likely first


@dataclass
class Result:
    """Everything generated for one request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids, a final stop / eos id included
    text: str | None  # decoded output (None without a tokenizer); a stop string is cut off
    finish_reason: str  # "stop" (eos, stop id or stop string), "length", or "abort"
    stop_reason: int | str | None = None  # the stop id or stop string that ended it
    logprobs: list[float] | None = None  # log p(token) under the model, per generated token
    top_logprobs: list[TopLogprobs] | None = None  # the top-n alternatives per generated token
    prompt_logprobs: list[float | None] | None = None  # per prompt token; the first is None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # timings (s) and token counts


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


class _DiffDecoder:
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


class _Sequence:
    """Per-request state while it is waiting or running."""

    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, gen: torch.Generator):
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.gen = gen
        self.out: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs is not None else None
        self.top: list[TopLogprobs] | None = [] if params.logprobs else None
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top: list[TopLogprobs | None] | None = None
        self.counts: torch.Tensor | None = None  # (V,) output occurrences, with penalties
        self.seen: torch.Tensor | None = None  # (V,) bool, prompt or output
        self.decoder: Any = None
        self.text = ""  # decoded output so far (stop string cut off once matched)
        self.emitted = 0  # characters of `text` already streamed
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.t_add = time.perf_counter()
        self.t_first: float | None = None

    @property
    def pos(self) -> int:
        """Position of the last sampled token (the next one fed to the model)."""
        return len(self.prompt) + len(self.out) - 1


class Engine:
    """Batched, streaming generation over a geode `Transformer` with a hybrid KV cache.

    model: a geode Transformer (float32/bfloat16, any device; quantized layers welcome).
    tokenizer: optional `geode.tokenizer.Tokenizer` for text prompts, text output and stop
    strings. max_batch: running sequences at most (others wait). max_seq_len: longest prompt +
    output (default: the model's max_position_embeddings). prefill_chunk: prompt tokens per
    forward (bounds the attention score matrix to chunk x context). prefill_budget: prompt
    tokens admitted per `step` (at least one request is always admitted). eos_token_ids: ids
    that end a sequence (default: the config's eos plus the tokenizer's <eos>/<end_of_turn>).
    cuda_graphs: capture decode steps in CUDA graphs (default: on when the model is on CUDA).
    optimize: on CPU, swap in the decode kernels (geode.infer.optimize; in place, parameters
    untouched, the plain forward still used for autograd). native: with `optimize` on CPU, run
    each decode step as one C call over the whole decoder (geode.infer.native) when the model
    is supported; prefill and everything else use the model's torch forward. pack_weights: at
    the native step's first batch of 6+ sequences, copy the float32 / bfloat16 projection
    weights into the layout its GEMM streams (NativeDecoder.pack: batched decode ~1.2-1.8x
    faster per GEMM for the weights' bytes once more in memory). seed: draws the seeds of
    requests that give none.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        max_batch: int = 32,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        prefill_budget: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
        ring_buffer: bool = True,
        cuda_graphs: bool | None = None,
        optimize: bool = True,
        native: bool = True,
        pack_weights: bool = True,
        seed: int | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model.eval()
        self._kernel_threads = False
        if optimize and model.device.type == "cpu":
            optimize_for_decode(model)  # in place: faster module classes, same parameters
            self._kernel_threads = kernels.available()
        # the native step is tried when asked for and the kernels run (see _native_decoder)
        self.native = bool(native and self._kernel_threads)
        self.pack_weights = pack_weights
        self._native: NativeDecoder | None = None  # its plan, built at the first decode step
        self._native_check = True  # re-validate the plan against the model before next use
        self.config = model.config
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        context = self.config.max_position_embeddings
        self.max_seq_len = min(max_seq_len or context, context)
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget or 8 * prefill_chunk
        self.ring_buffer = ring_buffer
        self.device = model.device
        self.dtype = model.dtype
        self.vocab_size = self.config.vocab_size
        # Ids that can be sampled: with a tokenizer, those it has a piece for. An embedding may
        # have padding rows past the tokenizer (Gemma 3 4B-27B: 262,208 rows, 262,144 pieces);
        # they are never sampled, reported in logprobs or accepted in prompts.
        pieces = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
        self.token_vocab_size = min(self.vocab_size, pieces or self.vocab_size)
        if eos_token_ids is None:
            ids = {self.config.eos_token_id}
            if tokenizer is not None:
                if getattr(tokenizer, "eos_id", -1) >= 0:
                    ids.add(tokenizer.eos_id)
                eot = getattr(tokenizer, "special_ids", {}).get("<end_of_turn>")
                if eot is not None:
                    ids.add(eot)
            eos_token_ids = ids
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self._graphs: dict[int, Any] = {}
        self._rng = torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
        )
        self._ids = itertools.count()
        self.cache: HybridCache | None = None
        self.waiting: list[_Sequence] = []
        self.running: list[_Sequence] = []  # running[i] lives in cache row i

    # ------------------------------------------------------------------ public API
    def add_request(self, request: Request | str | Sequence[int]) -> str:
        """Validate and queue a request; returns its id. Invalid input raises RequestError."""
        seq = self._make_sequence(request)
        self.waiting.append(seq)
        return seq.id

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its cache row; False if unknown."""
        for i, seq in enumerate(self.waiting):
            if seq.id == request_id:
                del self.waiting[i]
                return True
        for i, seq in enumerate(self.running):
            if seq.id == request_id:
                seq.finish_reason = "abort"
                self._release(i)
                return True
        return False

    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """One scheduling step: decode one token for every running sequence, then admit waiting
        requests (prefill + first token). Returns the deltas produced, final ones included."""
        deltas: list[Delta] = []
        if self.running:
            deltas += self._decode_step()
        if self.waiting and len(self.running) < self.max_batch:
            deltas += self._admit()
        return deltas

    def generate(self, requests: Request | Sequence[Request]) -> list[Result]:
        """Run requests to completion (batched); results in the order given."""
        single = isinstance(requests, Request)
        reqs = [requests] if single else list(requests)
        self._check_idle("generate")
        ids = []
        try:
            for r in reqs:
                ids.append(self.add_request(r))
        except RequestError:
            self.waiting.clear()
            raise
        results: dict[str, Result] = {}
        try:
            while self.has_unfinished():
                for d in self.step():
                    if d.finished:
                        results[d.request_id] = d.result
        finally:
            for rid in list(ids):
                if rid not in results:
                    self.abort(rid)
        return [results[i] for i in ids]

    def stream(self, request: Request | str | Sequence[int]) -> Iterator[Delta]:
        """Yield the deltas of one request as they are produced (closing the iterator aborts)."""
        self._check_idle("stream")
        rid = self.add_request(request)
        done = False
        try:
            while not done:
                for d in self.step():
                    if d.request_id == rid:
                        done = d.finished
                        yield d
        finally:
            if not done:
                self.abort(rid)

    # ------------------------------------------------------------------ requests
    def _check_idle(self, what: str) -> None:
        if self.has_unfinished():
            raise RuntimeError(
                f"{what}() drives the engine itself, but requests added with add_request are in "
                "flight; finish them with step() first"
            )

    def _make_sequence(self, request: Request | str | Sequence[int]) -> _Sequence:
        if not isinstance(request, Request):
            request = Request(request)
        params = dataclasses.replace(request.params)  # resolved below; the caller's stays as is
        if isinstance(params.stop, str):
            params.stop = (params.stop,)
        prompt = request.prompt
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("prompt is text but the engine has no tokenizer; pass token ids")
            ids = list(self.tokenizer.encode(prompt))
            bos = getattr(self.tokenizer, "bos_id", -1)
            if request.add_bos and bos >= 0 and (not ids or ids[0] != bos):
                ids.insert(0, bos)
        else:
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.flatten().tolist()
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise RequestError("prompt must be a string or a sequence of token ids") from None
        if not ids:
            raise RequestError("prompt is empty: at least one token is needed")
        bad = next((t for t in ids if not 0 <= t < self.token_vocab_size), None)
        if bad is not None:
            why = f"outside the vocabulary [0, {self.token_vocab_size})"
            if 0 <= bad < self.vocab_size:
                why += f" (rows {self.token_vocab_size}.. of the embedding have no tokenizer piece)"
            raise RequestError(f"prompt token id {bad} is {why}")
        if params.max_new_tokens is None:
            params.max_new_tokens = self.max_seq_len - len(ids)
            if params.max_new_tokens < 1:
                raise RequestError(
                    f"prompt of {len(ids)} tokens leaves no room in the context of "
                    f"{self.max_seq_len} tokens"
                )
        params.validate(self.vocab_size)
        total = len(ids) + params.max_new_tokens
        if total > self.max_seq_len:
            limit = (
                "the model's max_position_embeddings"
                if self.max_seq_len == self.config.max_position_embeddings
                else "the engine's max_seq_len"
            )
            raise RequestError(
                f"prompt length {len(ids)} + max_new_tokens {params.max_new_tokens} = {total} "
                f"exceeds {limit} ({self.max_seq_len})"
            )
        if params.stop and self.tokenizer is None:
            raise RequestError(f"stop={list(params.stop)!r} needs a tokenizer; use stop_token_ids")
        rid = request.request_id if request.request_id is not None else f"req-{next(self._ids)}"
        if any(s.id == rid for s in itertools.chain(self.waiting, self.running)):
            raise RequestError(f"request_id {rid!r} is already in flight")
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=self._rng).item())
        seq = _Sequence(rid, ids, params, torch.Generator().manual_seed(seed))
        if self.tokenizer is not None:
            if hasattr(self.tokenizer, "stream_decoder"):
                seq.decoder = self.tokenizer.stream_decoder(skip_special=params.skip_special_tokens)
            else:
                seq.decoder = _DiffDecoder(self.tokenizer, params.skip_special_tokens)
        if params.has_penalties:
            seq.counts = torch.zeros(self.token_vocab_size, dtype=torch.float32)
            seq.seen = torch.zeros(self.token_vocab_size, dtype=torch.bool)
            seq.seen[torch.tensor(ids)] = True
        return seq

    # ------------------------------------------------------------------ cache management
    def _need(self, seq: _Sequence) -> int:
        """Cache positions a sequence can use: prompt + generated tokens."""
        return len(seq.prompt) + seq.params.max_new_tokens

    def _ensure_cache(self, rows: int, capacity: int) -> None:
        """Make the cache hold `rows` rows of `capacity` positions, keeping running rows."""
        c = self.cache
        if c is not None and c.batch >= rows and c.capacity >= capacity:
            return
        static = self.cuda_graphs
        if c is None or not self.running:
            # Fresh: exactly what is needed now (a lone sequence gets exactly bytes(n)).
            self.cache = HybridCache(
                self.config, rows, capacity, self.dtype, self.device, self.ring_buffer, static
            )
        else:
            new_rows = min(self.max_batch, max(rows, c.batch * 2 if c.batch < rows else c.batch))
            new_cap = max(capacity, c.capacity)
            if new_cap > c.capacity:  # grow in steps of 1/4 to amortise copies
                new_cap = min(self.max_seq_len, max(new_cap, c.capacity + c.capacity // 4))
            self.cache = c.resized(new_rows, new_cap, len(self.running))
        self._graphs.clear()

    def _release(self, i: int) -> None:
        """Remove running[i]; the last running sequence moves into its row."""
        last = len(self.running) - 1
        if i != last:
            self.cache.move_row(last, i)
            self.running[i] = self.running[last]
        self.running.pop()
        self.cache.reset_rows(last)

    # ------------------------------------------------------------------ prefill
    def _admit(self) -> list[Delta]:
        """Prefill waiting requests into free rows (within the step's prompt-token budget)."""
        free = self.max_batch - len(self.running)
        batch: list[_Sequence] = []
        budget = self.prefill_budget
        while self.waiting and len(batch) < free:
            n = len(self.waiting[0].prompt)
            if batch and n > budget:
                break
            batch.append(self.waiting.pop(0))
            budget -= n
        self._ensure_cache(
            len(self.running) + len(batch), max(self._need(s) for s in self.running + batch)
        )
        self._native_check = True  # weights may have been replaced since the last decode
        deltas = []
        for seq in batch:
            row = len(self.running)
            self.cache.reset_rows(row)
            logits = self._prefill(seq, self.cache.rows(row, row + 1))  # (1, V) float32
            self.running.append(seq)
            seq.t_first = time.perf_counter()
            deltas += self._advance([seq], logits, rows=[row])
        return deltas

    def _prefill(self, seq: _Sequence, cache: HybridCache) -> torch.Tensor:
        """Run the prompt through the model in chunks; logits (1, V) of its last position.

        Prompt logprobs, when asked for, come from the same chunks: position i's logits score
        prompt token i + 1.
        """
        ids = torch.tensor(seq.prompt, device=self.device)
        n = len(seq.prompt)
        want = seq.params.prompt_logprobs
        if want is not None:
            seq.prompt_logprobs = [None]
            seq.prompt_top = [None] if want else None
        last = None
        for start in range(0, n, self.prefill_chunk):
            stop = min(n, start + self.prefill_chunk)
            pos = torch.arange(start, stop, device=self.device)[None]  # (1, T)
            h = self.model.hidden(ids[None, start:stop], pos, cache)  # (1, T, hidden)
            if want is None:
                if stop == n:
                    last = self.model.logits(h[:, -1]).float()  # (1, V)
                continue
            logits = self.model.logits(h[0]).float()[:, : self.token_vocab_size]  # (T, V')
            last = logits[-1:]
            logp = logits.log_softmax(-1)  # (T, V)
            targets = ids[start + 1 : stop + 1]  # next tokens scored by these positions
            m = targets.numel()
            seq.prompt_logprobs += logp[torch.arange(m), targets].tolist()
            if want:
                vals, idx = logp[:m].topk(want, dim=-1)
                seq.prompt_top += [
                    dict(zip(i, v, strict=True))
                    for i, v in zip(idx.tolist(), vals.tolist(), strict=True)
                ]
        return last

    # ------------------------------------------------------------------ decode
    def _decode_step(self) -> list[Delta]:
        """Feed every running sequence's last token; sample the next one."""
        B = len(self.running)
        ids = [s.out[-1] for s in self.running]
        pos = [s.pos for s in self.running]
        native = self._native_decoder()
        if native is not None:
            # torch single-threaded while the kernels' pool runs: torch's OpenMP workers spin
            # after each parallel region and would take the cores the pool's helpers need
            with kernels.decode_threads():
                logits = native.step(ids, pos, self.cache, pack=self.pack_weights)  # (B, V)
                return self._advance(list(self.running), logits, rows=list(range(B)))
        logits = self._forward_decode(
            torch.tensor(ids, device=self.device)[:, None],
            torch.tensor(pos, device=self.device)[:, None],
        )  # (B, V) float32
        return self._advance(list(self.running), logits, rows=list(range(B)))

    def _native_decoder(self) -> NativeDecoder | None:
        """The native step's plan for this model and cache, or None (torch path).

        Built on first use and rebuilt when the model's tensors changed (checked once per
        admission, not per step: the plan keeps the tensors it points to alive).
        """
        if not self.native:
            return None
        if self._native_check:
            self._native_check = False
            if self._native is None or not self._native.current(self.model):
                self._native = NativeDecoder.build(self.model)
        if self._native is not None and self._native.cache is not self.cache:
            try:
                self._native.bind(self.cache)
            except Unsupported:  # e.g. a static (CUDA-graph) cache: the torch path
                return None
        return self._native

    def _forward_decode(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids, pos (B, 1) -> next-token logits (B, V) float32 (CUDA graph replay when enabled)."""
        if self.cuda_graphs:
            return self._graph_decode(ids, pos)
        if self._kernel_threads:
            with kernels.decode_threads():  # torch ops 1 thread, kernels all threads
                h = self.model.hidden(ids, pos, self.cache)  # (B, 1, hidden)
                return self.model.logits(h[:, 0]).float()
        h = self.model.hidden(ids, pos, self.cache)  # (B, 1, hidden)
        return self.model.logits(h[:, 0]).float()

    def _graph_decode(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Decode through a CUDA graph captured per batch-size bucket (padding rows: pos -1)."""
        B = ids.shape[0]
        bucket = next((b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b >= B), B)
        bucket = min(bucket, self.cache.batch) if self.cache.batch >= B else B
        g = self._graphs.get(bucket)
        if g is None:
            g = self._capture(bucket)
            self._graphs[bucket] = g
        graph, s_ids, s_pos, s_out = g
        s_ids.zero_()
        s_pos.fill_(-1)
        s_ids[:B] = ids
        s_pos[:B] = pos
        graph.replay()
        return s_out[:B].float()

    def _capture(self, bucket: int) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Capture model.hidden + logits for `bucket` rows over the static cache."""
        s_ids = torch.zeros(bucket, 1, dtype=torch.long, device=self.device)
        s_pos = torch.full((bucket, 1), -1, dtype=torch.long, device=self.device)

        def run() -> torch.Tensor:
            h = self.model.hidden(s_ids, s_pos, self.cache)
            return self.model.logits(h[:, 0])

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (allocator, lazy init) off the capture
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s_out = run()
        return graph, s_ids, s_pos, s_out

    # ------------------------------------------------------------------ sampling + bookkeeping
    def _choose(self, seqs: list[_Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Next token per row of logits (B, V) float32 (see sampling.py for the pipeline)."""
        B = len(seqs)
        special = [
            i
            for i, s in enumerate(seqs)
            if s.params.logits_processors
            or s.params.has_penalties
            or len(s.out) < s.params.min_new_tokens
        ]
        z = logits
        if special:
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
                if len(s.out) < p.min_new_tokens:
                    banned = set(p.stop_token_ids)
                    if not p.ignore_eos:
                        banned |= self.eos_token_ids
                    if banned:
                        z[i, torch.tensor(sorted(banned), device=z.device)] = float("-inf")
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        if len(greedy) == B:
            return kernels.argmax(z)
        tokens = torch.empty(B, dtype=torch.long, device=z.device)
        if greedy:
            g = torch.tensor(greedy, device=z.device)
            tokens[g] = kernels.argmax(z[g])
        sampled = [i for i in range(B) if not seqs[i].params.greedy]
        idx = torch.tensor(sampled, device=z.device)
        ps = [seqs[i].params for i in sampled]
        temp = torch.tensor([p.temperature for p in ps], device=z.device, dtype=z.dtype)
        zs = z[idx] / temp[:, None]
        zs = filter_logits(
            zs,
            top_k=torch.tensor([p.top_k for p in ps], device=z.device),
            top_p=torch.tensor([p.top_p for p in ps], device=z.device, dtype=z.dtype),
            min_p=torch.tensor([p.min_p for p in ps], device=z.device, dtype=z.dtype),
        )
        u = torch.cat([torch.rand(1, generator=seqs[i].gen, dtype=torch.float64) for i in sampled])
        tokens[idx] = sample_from_logits(zs, u.to(z.device))
        return tokens

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor, rows: list[int]) -> list[Delta]:
        """Sample, record logprobs, detokenize, check stop conditions; release finished rows.

        logits (B, V) float32; only the first token_vocab_size columns (ids with a tokenizer
        piece) take part: padding rows are never sampled nor counted in the logprobs.
        """
        logits = logits[:, : self.token_vocab_size]  # (B, V'): a view, rows stay contiguous
        tokens = self._choose(seqs, logits).tolist()
        want_lp = [s.params.logprobs is not None for s in seqs]
        chosen_lp: list[float] = []
        tops: list[TopLogprobs | None] = [None] * len(seqs)
        if any(want_lp):
            logp = logits.log_softmax(-1)  # raw model distribution
            chosen_lp = logp[torch.arange(len(seqs)), torch.tensor(tokens)].tolist()
            n_top = max(s.params.logprobs or 0 for s in seqs)
            if n_top:
                vals, idx = logp.topk(n_top, dim=-1)
                vals, idx = vals.tolist(), idx.tolist()
                for i, s in enumerate(seqs):
                    k = s.params.logprobs or 0
                    if k:
                        tops[i] = dict(zip(idx[i][:k], vals[i][:k], strict=True))
        deltas, finished = [], []
        for i, (s, t) in enumerate(zip(seqs, tokens, strict=True)):
            s.out.append(t)
            if s.counts is not None:
                s.counts[t] += 1
                s.seen[t] = True
            d = Delta(s.id, [t], "")
            if want_lp[i]:
                s.logprobs.append(chosen_lp[i])
                d.logprobs = [chosen_lp[i]]
                if s.top is not None:
                    s.top.append(tops[i])
                    d.top_logprobs = [tops[i]]
            d.text = self._update_text_and_stop(s, t)
            if s.finish_reason is None and len(s.out) >= s.params.max_new_tokens:
                s.finish_reason = "length"
            if s.finish_reason is not None:
                d.text += self._finish_text(s)
                d.finished, d.finish_reason = True, s.finish_reason
                d.result = self._result(s)
                finished.append(rows[i])
            deltas.append(d)
        for row in sorted(finished, reverse=True):  # highest row first keeps indices valid
            self._release(row)
        return deltas

    def _update_text_and_stop(self, s: _Sequence, t: int) -> str:
        """Record token t's effect on the text and stop state; return the text to emit now."""
        p = s.params
        enough = len(s.out) >= p.min_new_tokens
        if enough and ((t in self.eos_token_ids and not p.ignore_eos) or t in p.stop_token_ids):
            s.finish_reason, s.stop_reason = "stop", t
            return ""
        if s.decoder is None:
            return ""
        before = len(s.text)
        s.text += s.decoder.push(t)
        if p.stop and enough:
            longest = max(len(x) for x in p.stop)
            start = max(0, before - longest + 1)
            hits = [(s.text.find(x, start), x) for x in p.stop]
            hits = [(at, x) for at, x in hits if at >= 0]
            if hits:
                at, x = min(hits)
                s.text = s.text[: at + len(x)] if p.include_stop_str_in_output else s.text[:at]
                s.finish_reason, s.stop_reason = "stop", x
                s.decoder = None
                return ""
        hold = self._holdback(s.text, p.stop) if p.stop else 0
        out = s.text[s.emitted : len(s.text) - hold]
        s.emitted += len(out)
        return out

    @staticmethod
    def _holdback(text: str, stops: Sequence[str]) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for x in stops:
            for k in range(min(len(x) - 1, len(text)), best, -1):
                if text.endswith(x[:k]):
                    best = k
                    break
        return best

    def _finish_text(self, s: _Sequence) -> str:
        """Text still to emit when a sequence finishes (held-back text, incomplete UTF-8)."""
        if s.decoder is not None:
            s.text += s.decoder.flush()
            s.decoder = None
        out = s.text[s.emitted :]
        s.emitted = len(s.text)
        return out

    def _result(self, s: _Sequence) -> Result:
        now = time.perf_counter()
        return Result(
            request_id=s.id,
            prompt_token_ids=list(s.prompt),
            token_ids=list(s.out),
            text=s.text if self.tokenizer is not None else None,
            finish_reason=s.finish_reason or "abort",
            stop_reason=s.stop_reason,
            logprobs=s.logprobs,
            top_logprobs=s.top,
            prompt_logprobs=s.prompt_logprobs,
            prompt_top_logprobs=s.prompt_top,
            metrics={
                "prompt_tokens": len(s.prompt),
                "generated_tokens": len(s.out),
                "time_to_first_token_s": (s.t_first or now) - s.t_add,
                "total_s": now - s.t_add,
            },
        )
