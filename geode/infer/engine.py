"""The generation engine: the one loop that chat, the server, eval, RL and distillation call.

    engine = Engine(model, tokenizer)
    results = engine.generate([Request("Once upon", max_new_tokens=32, temperature=0)])
    for delta in engine.stream(Request([2, 651, 1234], max_new_tokens=8)):
        print(delta.text, end="")

Step-level API (continuous batching; the server and RL rollouts drive it): `add_request(req) ->
id`, `step() -> list[Delta]`, `abort(id)`, `has_unfinished()`, plus `append(id, tokens)`
(forced tokens), `fork(id, n)` (n copies of a running sequence sharing its cache) and
`free_cache()`. One caller drives an engine at a time.

A step, in the shape of nano-vllm's `LLMEngine.step`: the `Scheduler` (scheduler.py, the only
admission policy) plans which sequences run which tokens (a decode token for every ready
sequence, prompt chunks of joining ones within a token budget), the `Runner` (runner.py) runs
them (batched prefill: several sequences' chunks in one forward), the sampler (sampling.py)
picks the next tokens, and each `Sequence` (sequence.py) records them (detokenize, stop
conditions, logprobs). Running sequences occupy rows 0..B-1 of a `HybridCache`, ready ones
first; a finishing sequence's row is filled by moving the last row into it.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
from typing import Any

import torch

from ..family import runner_refusal
from . import kernels
from .cache import HybridCache, kv_block_refusal, recurrent_refusal
from .multimodal import (
    VisionCache,
    chunk_has_images,
    is_multimodal,
    prepare_images,
    run_image_chunk,
)
from .optimize import optimize_for_decode
from .runner import NativeStepRunner, Runner, TorchRunner, group_by_length
from .sampling import RequestError, SamplingParams, sample_tokens
from .scheduler import Chunk, Scheduler
from .sequence import (
    Delta,
    Request,
    Result,
    Sequence,
    TopLogprobs,
    encode_prompt,
    new_decoder,
)
from .thinking import ThinkingBudget

__all__ = ["Delta", "Engine", "Request", "Result", "SamplingParams", "TopLogprobs", "encode_prompt"]

STAT_KEYS = (
    "steps",
    "positions_run",
    "prefill_tokens",
    "decode_tokens",
    "prefix_hits",
    "prefix_hit_tokens",
)


class Engine:
    """Batched, streaming generation over a geode `Transformer` with a hybrid KV cache.

    model: a geode Transformer (float32/bfloat16, any device; quantized layers welcome).
    tokenizer: optional `geode.tokenizer.Tokenizer` for text prompts, text output and stop
    strings. max_batch: running sequences at most (others wait). max_seq_len: longest prompt +
    output (default: the model's max_position_embeddings). prefill_chunk: prompt tokens of one
    sequence per step (bounds the attention score matrix to chunk x context). prefill_budget:
    tokens (decode and prompt chunks) run per `step` (a prefill always makes progress).
    eos_token_ids: ids that end a sequence (default: the config's eos plus the tokenizer's
    <eos>/<end_of_turn>). cuda_graphs: capture decode steps in CUDA graphs (default: on when
    the model is on CUDA). native: on CPU, run decode steps as one C call over the whole
    decoder (geode.infer.native) when the model is supported; the runner owns the weight
    packing and the model's modules stay as they are. optimize: on the CPU torch path (native
    off or unsupported), swap in the decode kernels (geode.infer.optimize; in place,
    parameters untouched). pack_weights: at the native step's first batch of 6+ sequences,
    copy the float projection weights into the layout its GEMM streams. prefix_cache_bytes:
    reuse the KV of cached prompt prefixes (geode.infer.prefix) up to this many bytes; 0 = off.
    draft, num_draft_tokens: speculative decoding (geode.infer.speculative). seed: draws the
    seeds of requests that give none. vision_cache: images whose soft tokens are kept (a VLM's
    requests with images, geode.infer.multimodal; the tower runs once per image).

    Every family runs on the torch runner; a requested path its cache or the registry does not
    support (the native runner for Gemma 4 / RecurrentGemma, the prefix cache where the layers'
    K/V differ in shape or a layer is recurrent) is not used, with a warning and its reason in
    `notes`; speculative decoding of a recurrent family is refused (ValueError naming it).
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
        prefix_cache_bytes: int = 0,
        draft: Any = None,
        num_draft_tokens: int = 4,
        seed: int | None = None,
        vision_cache: int = 64,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {prefix_cache_bytes}")
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.device = model.device
        self.dtype = model.dtype
        self.max_batch = max_batch
        context = self.config.max_position_embeddings
        self.max_seq_len = min(max_seq_len or context, context)
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget or 8 * prefill_chunk
        self.ring_buffer = ring_buffer
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
        self.notes: list[str] = []  # requested paths not used, and why (warned once each)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        if self.cuda_graphs and self._refused("CUDA graphs", _graph_refusal(self.config)):
            self.cuda_graphs = False
        self.runner = self._make_runner(optimize, native, pack_weights)
        self.native = isinstance(self.runner, NativeStepRunner)  # the C decode step is in use
        self.prefix = None
        if prefix_cache_bytes and self._refused(
            "prefix cache", kv_block_refusal(self.config, "the prefix cache")
        ):
            prefix_cache_bytes = 0
        if prefix_cache_bytes:
            from .prefix import PrefixCache

            self.prefix = PrefixCache(prefix_cache_bytes)
        self.speculator = None  # decode hook (see _decode_rows); set by Engine(draft=...)
        self.cache_slack = 0  # extra local-ring slots (rollback of rejected draft tokens)
        if draft is not None:
            from .speculative import build_speculator

            why = recurrent_refusal(self.config, "speculative decoding")
            if why is not None:
                raise ValueError(why)
            self.speculator = build_speculator(self, draft, num_draft_tokens)
            draft_model = getattr(self.speculator.drafter, "model", None)
            if draft_model is not None:
                why = recurrent_refusal(draft_model.config, "a draft model")
                if why is not None:
                    raise ValueError(why)
            self.cache_slack = int(getattr(self.speculator, "slack", 0))
        if self.prefix is not None:
            # a chunk's blocks are stored while the local ring still holds them: chunks of at
            # most the window, whole blocks (geode.infer.prefix.PrefixCache.insert)
            b, w = self.prefix.block, self.config.sliding_window
            prefill_chunk = min(prefill_chunk, max(b, w - w % b))
        self.scheduler = Scheduler(
            max_batch,
            prefill_chunk,
            self.prefill_budget,
            align=getattr(self.prefix, "block", 1),
            on_admit=self._on_admit,
        )
        self._rng = torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
        )
        self._ids = itertools.count()
        self.cache = None  # the engine's HybridCache (grown on admission), bound to the runner
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.vision_cache = VisionCache(vision_cache)  # soft tokens by image hash

    @property
    def cache(self) -> HybridCache | None:
        """The KV cache of the running rows (None while idle after `free_cache`)."""
        return self._cache

    @cache.setter
    def cache(self, cache: HybridCache | None) -> None:
        self._cache = cache
        self.runner.cache = cache  # `runner.run(rows, ids, positions)` runs into it

    def _make_runner(self, optimize: bool, native: bool, pack_weights: bool) -> Runner:
        """The native runner where it runs this model, else the torch one (optimized on CPU)."""
        cpu = self.device.type == "cpu"
        kernel_threads = cpu and kernels.available()
        if native and cpu and self._refused("native runner", runner_refusal(self.config, "native")):
            native = False
        if native and cpu and kernel_threads:
            runner = NativeStepRunner(self.model, TorchRunner(self.model), pack_weights)
            if runner.decoder is not None:
                return runner
        if optimize and cpu:
            optimize_for_decode(self.model)  # in place: faster module classes, same parameters
        return TorchRunner(self.model, self.cuda_graphs, kernel_threads and optimize)

    def _refused(self, what: str, why: str | None) -> bool:
        """Record (note + warning) that a requested path is not used; False when it can run."""
        if why is None:
            return False
        note = f"{what} not used: {why}"
        self.notes.append(note)
        warnings.warn(note, stacklevel=3)
        return True

    @property
    def _native(self) -> Any:
        """The native decode plan (NativeDecoder) or None on the torch path."""
        return getattr(self.runner, "decoder", None)

    @property
    def waiting(self) -> list[Sequence]:
        """Sequences waiting for a row (admission order)."""
        return list(self.scheduler.waiting)

    @property
    def running(self) -> list[Sequence]:
        """Sequences in cache rows: running[i] lives in row i."""
        return self.scheduler.running

    # ------------------------------------------------------------------ public API
    def add_request(self, request: Request | str | Seq[int]) -> str:
        """Validate and queue a request; returns its id. Invalid input raises RequestError."""
        seq = self._make_sequence(request)
        self.scheduler.waiting.append(seq)
        return seq.id

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""
        return self.scheduler.has_unfinished()

    @torch.inference_mode()
    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its cache row; False if unknown."""
        if self.scheduler.drop_waiting(request_id):
            return True
        seq = next((s for s in self.running if s.id == request_id and s.parent is None), None)
        if seq is None:
            return False
        seq.finish_reason = "abort"
        self._release_finished()
        return True

    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """One step: schedule -> run -> sample -> postprocess. Every ready sequence gets one
        token (or its forced tokens and one), joining sequences a prompt chunk (a sequence whose
        prompt completes samples its first token). Returns the deltas, final ones included."""
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        if plan.admitted:
            self.runner.refresh()  # weights may have been replaced since the last step
        self._ensure_cache(len(self.running) - len(plan.admitted))
        for s in plan.admitted:
            self._restore_prefix(s)
        st = self.stats
        st["steps"] += 1
        st["positions_run"] += plan.tokens
        for c in plan.chunks:
            st["decode_tokens" if c.seq.ready else "prefill_tokens"] += c.size
        spec = []
        if self.speculator is not None:
            spec = [
                c
                for c in plan.chunks
                if c.seq.ready
                and c.size == 1
                and not c.seq.pending
                and c.seq.uncond is None
                and c.seq.parent is None
                and c.seq.images is None  # a draft model would read image placeholders as text
            ]
        chunks = [c for c in plan.chunks if not any(c is x for x in spec)]
        deltas = self._decode_rows(spec) if spec else []
        deltas += self._run_chunks(chunks)
        self._release_finished()
        return deltas

    def _release_finished(self) -> None:
        """Free the rows of finished sequences (and of their guidance rows); ready rows first."""
        done = [
            i
            for i, s in enumerate(self.running)
            if s.finish_reason is not None or (s.parent is not None and s.parent.finish_reason)
        ]
        for i in sorted(done, reverse=True):  # highest row first keeps indices valid
            self._release(i)
        self._settle()

    def append(self, request_id: str, tokens: Seq[int]) -> None:
        """Force tokens into a running sequence: the next step runs them through the model
        (no sampling), they join its output with sampled-mask 0, and sampling continues after
        them. RequestError (engine unchanged) for an unknown / not yet started sequence or ids
        outside the vocabulary."""
        seq = self._running_seq(request_id, "append to")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.flatten().tolist()
        try:
            ids = [int(t) for t in tokens]
        except (TypeError, ValueError):
            raise RequestError("append: tokens must be a sequence of token ids") from None
        if not ids:
            raise RequestError("append: tokens is empty")
        bad = next((t for t in ids if not 0 <= t < self.token_vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"append: token id {bad} is outside the vocabulary [0, {self.token_vocab_size})"
            )
        for s in (seq, seq.uncond) if seq.uncond is not None else (seq,):
            need = self._need(s) + len(ids)
            if need > self.max_seq_len:
                what = "" if s is seq else "'s unconditional row (guidance_prompt)"
                raise RequestError(
                    f"append: {len(ids)} forced tokens make request {request_id!r}{what} need "
                    f"{need} positions, more than max_seq_len {self.max_seq_len}"
                )
        self._queue(seq, ids)

    @torch.inference_mode()
    def fork(self, request_id: str, n: int) -> list[str]:
        """n copies of a running sequence (same tokens so far, cache rows copied, each with
        its own generator from now on); returns their ids. RequestError (engine unchanged)
        for an unknown, finished or still prefilling sequence, or too few free rows."""
        seq = self._running_seq(request_id, "fork")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise RequestError(f"fork: n={n!r} must be an integer >= 1")
        if seq.pending:
            raise RequestError(f"fork: request {request_id!r} has forced tokens not run yet")
        if seq.uncond is not None:
            raise RequestError(f"fork: request {request_id!r} uses guidance (guidance_scale)")
        free = self.max_batch - len(self.running)
        if n > free:
            raise RequestError(f"fork: {n} copies need {n} free rows, the engine has {free}")
        src = self.running.index(seq)
        self._ensure_cache(len(self.running), extra_rows=n)
        self.cache.fork(src, n, len(self.running))
        ids = []
        for _ in range(n):
            child = seq.clone(self._new_id(), self._new_generator(), self.tokenizer)
            self.running.append(child)
            ids.append(child.id)
        self._settle()
        return ids

    def free_cache(self) -> None:
        """Drop the KV cache (an idle server frees its memory; the next step reallocates)."""
        if self.has_unfinished():
            raise RuntimeError("free_cache() while requests are in flight")
        self.cache = None

    def generate(self, requests: Request | Seq[Request]) -> list[Result]:
        """Run requests to completion (batched); results in the order given."""
        single = isinstance(requests, Request)
        reqs = [requests] if single else list(requests)
        self._check_idle("generate")
        ids = []
        try:
            for r in reqs:
                ids.append(self.add_request(r))
        except RequestError:
            self.scheduler.waiting.clear()
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

    def stream(self, request: Request | str | Seq[int]) -> Iterator[Delta]:
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

    def _new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def _new_generator(self, seed: int | None = None) -> torch.Generator:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=self._rng).item())
        return torch.Generator().manual_seed(seed)

    def _running_seq(self, request_id: str, what: str) -> Sequence:
        """The running, ready sequence with this id (RequestError otherwise)."""
        seq = next((s for s in self.running if s.id == request_id and s.parent is None), None)
        if seq is None:
            state = "waiting for a row" if any(s.id == request_id for s in self.waiting) else None
            raise RequestError(
                f"cannot {what} request {request_id!r}: "
                + (f"it is {state}" if state else "no running request has that id (finished?)")
            )
        if not seq.ready:
            raise RequestError(f"cannot {what} request {request_id!r}: its prompt is prefilling")
        return seq

    def _make_sequence(self, request: Request | str | Seq[int]) -> Sequence:
        if not isinstance(request, Request):
            request = Request(request)
        params = dataclasses.replace(request.params)  # resolved below; the caller's stays as is
        if isinstance(params.stop, str):
            params.stop = (params.stop,)
        prompt = request.prompt
        images = None
        if request.images is not None or is_multimodal(prompt):
            ids, images = prepare_images(
                self.model, self.tokenizer, prompt, request.images, self.max_seq_len
            )
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("prompt is text but the engine has no tokenizer; pass token ids")
            ids = encode_prompt(self.tokenizer, prompt, request.add_bos)
        else:
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.flatten().tolist()
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise RequestError("prompt must be a string or a sequence of token ids") from None
        if not ids:
            raise RequestError("prompt is empty: at least one token is needed")
        placeholder = images.token if images is not None else None  # may lie past the pieces
        bad = next(
            (t for t in ids if not 0 <= t < self.token_vocab_size and t != placeholder), None
        )
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
        rid = request.request_id if request.request_id is not None else self._new_id()
        if any(s.id == rid for s in itertools.chain(self.scheduler.waiting, self.running)):
            raise RequestError(f"request_id {rid!r} is already in flight")
        seq = Sequence(rid, ids, params, self._new_generator(params.seed))
        seq.images = images
        if self.tokenizer is not None:
            seq.decoder = new_decoder(self.tokenizer, params.skip_special_tokens)
        if params.has_penalties:
            seq.counts = torch.zeros(self.token_vocab_size, dtype=torch.float32)
            seq.seen = torch.zeros(self.token_vocab_size, dtype=torch.bool)
            seq.seen[torch.tensor(ids)] = True
        if params.guidance_scale != 1.0:
            seq.uncond = Sequence(f"{rid}#uncond", self._guidance_ids(request), params, seq.gen)
            seq.uncond.parent = seq
            if self.max_batch < 2:
                raise RequestError("guidance_scale != 1 needs max_batch >= 2 (a second row)")
            need = self._need(seq.uncond)
            if need > self.max_seq_len:
                raise RequestError(
                    f"guidance_prompt of {len(seq.uncond.prompt)} tokens + max_new_tokens = "
                    f"{need} exceeds max_seq_len {self.max_seq_len}"
                )
        if params.thinking_budget is not None:
            seq.thinking = ThinkingBudget.for_prompt(params.thinking_budget, self.tokenizer, ids)
            self._force(seq, seq.thinking.due())  # b = 0 closes a prompt-opened section at once
        return seq

    def _guidance_ids(self, request: Request) -> list[int]:
        """The unconditional prompt of classifier-free guidance (default: [<bos>])."""
        g = request.guidance_prompt
        if g is None:
            bos = getattr(self.tokenizer, "bos_id", -1) if self.tokenizer is not None else -1
            return [bos if bos is not None and bos >= 0 else self.config.bos_token_id]
        if isinstance(g, str):
            if self.tokenizer is None:
                raise RequestError("guidance_prompt is text but the engine has no tokenizer")
            ids = encode_prompt(self.tokenizer, g, request.add_bos)
        else:
            try:
                ids = [int(t) for t in (g.flatten().tolist() if isinstance(g, torch.Tensor) else g)]
            except (TypeError, ValueError):
                raise RequestError("guidance_prompt must be a string or token ids") from None
        if not ids or any(not 0 <= t < self.token_vocab_size for t in ids):
            raise RequestError(
                f"guidance_prompt must be non-empty ids in [0, {self.token_vocab_size})"
            )
        return ids

    # ------------------------------------------------------------------ cache and rows
    def _need(self, seq: Sequence) -> int:
        """Cache positions a sequence can use: prompt, forced tokens and sampled tokens."""
        if seq.parent is not None:  # a guidance row: its prompt, then its sequence's output
            return len(seq.prompt) + self._need(seq.parent) - len(seq.parent.prompt)
        forced = len(seq.out) - seq.n_sampled + len(seq.pending)
        return len(seq.prompt) + forced + seq.params.max_new_tokens

    def _ensure_cache(self, keep: int, extra_rows: int = 0) -> None:
        """Make the cache hold every running row (+ extra_rows) and the longest need, keeping
        the first `keep` rows' contents (the rows that held sequences before this step)."""
        rows = len(self.running) + extra_rows
        capacity = max(self._need(s) for s in self.running)
        c = self.cache
        if c is not None and c.batch >= rows and c.capacity >= capacity:
            return
        kw = {"slack": self.cache_slack} if self.cache_slack else {}
        if c is None or keep == 0:
            # Fresh: exactly what is needed now (a lone sequence gets exactly bytes(n)).
            self.cache = HybridCache(
                self.config, rows, capacity, self.dtype, self.device, self.ring_buffer,
                self.cuda_graphs, **kw,
            )  # fmt: skip
            return
        new_rows = min(self.max_batch, max(rows, c.batch * 2 if c.batch < rows else c.batch))
        new_cap = max(capacity, c.capacity)
        if new_cap > c.capacity:  # grow in steps of 1/4 to amortise copies
            new_cap = min(self.max_seq_len, max(new_cap, c.capacity + c.capacity // 4))
        self.cache = c.resized(new_rows, new_cap, keep)
        for i in range(keep, new_rows):
            self.cache.reset_rows(i)

    def _copy_row(self, src: int, dst: int) -> None:
        """Cache row dst becomes a copy of row src (a shared prefill's follower)."""
        self.cache.fork(src, 1, dst)

    def _swap_rows(self, a: int, b: int) -> None:
        """Exchange two running sequences and their cache rows."""
        self.cache.swap_rows(a, b)
        run = self.running
        run[a], run[b] = run[b], run[a]

    def _settle(self) -> None:
        """Ready sequences first (rows 0..D-1), so a decode step runs on a prefix of rows."""
        d = 0
        for i, s in enumerate(self.running):
            if s.ready:
                if i != d:
                    self._swap_rows(i, d)
                d += 1

    def _release(self, i: int) -> None:
        """Remove running[i]; the last running sequence moves into its row."""
        run = self.running
        seq = run[i]
        if seq.leader is not None:  # a follower leaves its leader
            seq.leader.followers.remove(seq)
        elif seq.followers:  # a leader leaves: the first follower prefills for the rest
            new, rest = seq.followers[0], seq.followers[1:]
            new.leader, new.followers = None, rest
            for f in rest:
                f.leader = new
            if self.prefix is not None:
                self._on_admit(new)
                self._restore_prefix(new)
        last = len(run) - 1
        if i != last:
            self.cache.move_row(last, i)
            run[i] = run[last]
        run.pop()
        self.cache.reset_rows(last)

    # ------------------------------------------------------------------ prefix cache
    def _on_admit(self, seq: Sequence) -> None:
        """Scheduler hook: the longest cached prefix of the prompt is not run again."""
        if self.prefix is None or seq.cached or seq.prompt_logprobs is not None or seq.images:
            return  # (block keys are token ids: images with equal placeholders would collide)
        n, handle = self.prefix.match(seq.prompt)
        if n:
            seq.cached, seq.prefix_handle = n, handle
            self.stats["prefix_hits"] += 1
            self.stats["prefix_hit_tokens"] += n

    def _restore_prefix(self, seq: Sequence) -> None:
        """Write a matched prefix's K/V into the sequence's (fresh) row."""
        row = self.running.index(seq)
        self.cache.reset_rows(row)
        if seq.prefix_handle is not None:
            self.prefix.restore(seq.prefix_handle, self.cache, row)
            seq.prefix_handle = None

    # ------------------------------------------------------------------ run
    def _columns(self, c: Chunk) -> list[int]:
        """Columns of chunk c whose logits are needed: prompt logprobs, forced-token logprobs,
        the sampled token's (the last column of a chunk reaching the stream's end)."""
        s, cols = c.seq, []
        p_len = len(s.prompt)
        forced_from = p_len + len(s.out)  # first pending token's position
        for j in range(c.size):
            target = c.start + j + 1
            if target == s.total:
                cols.append(j)
            elif target < p_len:
                if s.prompt_logprobs is not None:
                    cols.append(j)
            elif target >= forced_from and s.logprobs is not None:
                cols.append(j)
        return cols

    def _run_chunks(self, chunks: list[Chunk]) -> list[Delta]:
        """Run the chunks (grouped for the runner), then postprocess every sequence."""
        if not chunks:
            return []
        cols = [self._columns(c) for c in chunks]
        logits: list[torch.Tensor | None] = [None] * len(chunks)
        text = []
        for i, c in enumerate(chunks):  # chunks with images: one torch forward each, on embeds
            if chunk_has_images(c.seq, c.start, c.end):
                logits[i] = run_image_chunk(
                    self.model, self.cache, self.vision_cache, c.seq, c.row, c.start, c.end,
                    cols[i],
                )  # fmt: skip
            else:
                text.append(i)
        groups: list[list[int]] = []
        if text and self.runner.ragged:
            groups = [text]
        elif text:
            one = [i for i in text if chunks[i].size == 1]
            more = [i for i in text if chunks[i].size > 1]
            groups = [one] if one else []
            sub = group_by_length([chunks[i].size for i in more])
            groups += [[more[j] for j in g] for g in sub]
        for g in groups:
            g = sorted(g, key=lambda i: chunks[i].row)
            out = self._run_group([chunks[i] for i in g], [cols[i] for i in g])
            for i, lg in zip(g, out, strict=True):
                logits[i] = lg
        return self._postprocess(chunks, cols, logits)

    def _run_group(self, chunks: list[Chunk], cols: list[list[int]]) -> list[torch.Tensor]:
        """One runner call over chunks of distinct rows; per chunk logits (len(cols), V)."""
        T = max(c.size for c in chunks)
        K = max(1, max(len(x) for x in cols))
        ids, pos, sel = [], [], []  # rows of (B, T), (B, T), (B, K)
        for c, x in zip(chunks, cols, strict=True):
            pad = T - c.size
            ids.append(c.seq.tokens(c.start, c.end) + [0] * pad)
            pos.append(list(range(c.start, c.end)) + [-1] * pad)
            x = x or [c.size - 1]
            sel.append(x + [x[-1]] * (K - len(x)))
        t = [torch.tensor(v, dtype=torch.long, device=self.device) for v in (ids, pos, sel)]
        rows = [c.row for c in chunks]
        out = self.runner.run(rows, t[0], t[1], self.cache, t[2])  # (B, K, V)
        return [out[b, : len(x)] for b, x in enumerate(cols)]

    # ------------------------------------------------------------------ postprocess
    def _postprocess(
        self, chunks: list[Chunk], cols: list[list[int]], logits: list[torch.Tensor | None]
    ) -> list[Delta]:
        """Record prompt / forced logprobs, emit forced tokens, sample where a chunk reaches
        its stream's end (followers of a shared prefill too), build the deltas."""
        V = self.token_vocab_size
        deltas: dict[str, Delta] = {}
        to_sample: list[Sequence] = []
        rows: list[torch.Tensor] = []
        for c, x, lg in zip(chunks, cols, logits, strict=True):
            s = c.seq
            s.cached = c.end
            lg = lg[:, :V]  # (K, V'): padding rows of the embedding never count
            if s.parent is not None:  # a guidance row: keep its logits for its sequence
                k = max(0, c.end - len(s.prompt) - len(s.out))  # pending tokens now run
                s.out += s.pending[:k]
                del s.pending[:k]
                if c.completes:
                    s.parent.uncond_logits = lg[-1]
                    s.t_first = s.t_first or time.perf_counter()
                continue
            d = deltas.setdefault(s.id, Delta(s.id, [], ""))
            p_len, forced_from = len(s.prompt), len(s.prompt) + len(s.out)
            # log-probs of prompt / forced targets (a decode column's are taken after sampling)
            logp = (
                lg.log_softmax(-1)
                if (s.prompt_logprobs is not None or s.logprobs is not None)
                and any(c.start + j + 1 < s.total for j in x)
                else None
            )
            for k, j in enumerate(x):
                target = c.start + j + 1
                if target == s.total:
                    to_sample.append(s)
                    rows.append(lg[k])
                    for f in s.followers:  # the shared prefill is done: copy the row
                        self._copy_row(c.row, self.running.index(f))
                        f.cached, f.leader = s.cached, None
                        to_sample.append(f)
                        rows.append(lg[k])
                        deltas[f.id] = Delta(f.id, [], "")
                    s.followers = []
                elif target < p_len:
                    self._record_prompt_logprob(s, logp[k], s.prompt[target])
            # forced tokens targeted by this chunk are emitted now (their logprobs known)
            n_forced = max(0, min(c.end + 1, s.total) - max(c.start + 1, forced_from))
            lp_cols = [j for j in x if forced_from <= c.start + j + 1 < s.total]
            for i in range(n_forced):
                t = s.pending.pop(0)
                lp = top = None
                if logp is not None and s.logprobs is not None:
                    k = x.index(lp_cols[i])
                    lp, top = self._token_logprobs(s, logp[k], t)
                self._emit(s, d, t, False, lp, top)
            if self.prefix is not None and not s.ready and c.start < p_len and not s.images:
                self.prefix.insert(s.prompt, self.cache, c.row, c.start, min(c.end, p_len))
        if to_sample:
            for i, s in enumerate(to_sample):
                if s.uncond is not None:  # classifier-free guidance: uncond + g (cond - uncond)
                    u, g = s.uncond_logits, s.params.guidance_scale
                    rows[i] = u + g * (rows[i] - u)
            z = _stack_rows(rows)  # (N, V')
            tokens = sample_tokens(to_sample, z, self.eos_token_ids).tolist()
            need_lp = [i for i, s in enumerate(to_sample) if s.logprobs is not None]
            logp = z[need_lp].log_softmax(-1) if need_lp else None
            for i, (s, t) in enumerate(zip(to_sample, tokens, strict=True)):
                lp = top = None
                if s.logprobs is not None:
                    lp, top = self._token_logprobs(s, logp[need_lp.index(i)], t)
                if s.t_first is None:
                    s.t_first = time.perf_counter()
                self._emit(s, deltas[s.id], t, True, lp, top)
        return [self._close(deltas[s.id], s) for s in self._order(chunks, deltas)]

    def _order(self, chunks: list[Chunk], deltas: dict[str, Delta]) -> list[Sequence]:
        """Sequences with a delta this step, in row order of their chunks (followers after)."""
        out, seen = [], set()
        for s in [c.seq for c in chunks] + list(self.running):
            if s.id in deltas and s.id not in seen:
                seen.add(s.id)
                out.append(s)
        return out

    def _close(self, d: Delta, s: Sequence) -> Delta:
        """Finish a delta: final text and result when the sequence ended."""
        if s.finish_reason is not None:
            d.text += s.finish_text()
            d.finished, d.finish_reason = True, s.finish_reason
            d.result = s.result(self.tokenizer is not None)
        return d

    def _emit(
        self,
        s: Sequence,
        d: Delta,
        t: int,
        sampled: bool,
        lp: float | None,
        top: TopLogprobs | None,
    ) -> None:
        """Append token t to sequence s and to its delta d (ignored once s has finished)."""
        if s.finish_reason is not None:
            return
        if s.uncond is not None and sampled:
            s.uncond.pending.append(t)  # the unconditional row is fed the same tokens
        d.text += s.emit(t, sampled, self.eos_token_ids, lp, top)
        d.token_ids.append(t)
        d.sampled_mask.append(int(sampled))
        if s.logprobs is not None:
            d.logprobs = (d.logprobs or []) + [lp]
            if s.top is not None:
                d.top_logprobs = (d.top_logprobs or []) + [top]
        if s.thinking is not None and s.finish_reason is None:
            self._force(s, s.thinking.observe(t))
            if not s.pending and s.n_sampled >= s.params.max_new_tokens:
                s.finish_reason = "length"  # the forced close took the last of max_new_tokens

    @staticmethod
    def _force(s: Sequence, ids: list[int]) -> None:
        """Queue a thinking budget's forced close (as `append`: pending, run next step). It takes
        one of max_new_tokens, so the context admission checked suffices."""
        if ids:
            s.params = dataclasses.replace(
                s.params, max_new_tokens=s.params.max_new_tokens - len(ids)
            )
            Engine._queue(s, ids)

    @staticmethod
    def _queue(s: Sequence, ids: list[int]) -> None:
        """Forced tokens run next step; a guided sequence's unconditional row gets them at once,
        so the step that samples after them has both rows' logits past them."""
        s.pending += ids
        if s.uncond is not None:
            s.uncond.pending += ids

    @staticmethod
    def _token_logprobs(
        s: Sequence, logp: torch.Tensor, t: int
    ) -> tuple[float, TopLogprobs | None]:
        """log p(t) and the top-n alternatives (n = s.params.logprobs) from one logp row (V,)."""
        k = s.params.logprobs or 0
        top = None
        if k:
            vals, idx = logp.topk(k)
            top = dict(zip(idx.tolist(), vals.tolist(), strict=True))
        return float(logp[t]), top

    @staticmethod
    def _record_prompt_logprob(s: Sequence, logp: torch.Tensor, t: int) -> None:
        """Prompt logprob of token t (and its top-n) from the previous position's logp (V,)."""
        s.prompt_logprobs.append(float(logp[t]))
        k = s.params.prompt_logprobs
        if k:
            vals, idx = logp.topk(k)
            s.prompt_top.append(dict(zip(idx.tolist(), vals.tolist(), strict=True)))

    # ------------------------------------------------------------------ speculative hook
    def _decode_rows(self, chunks: list[Chunk]) -> list[Delta]:
        """Decode ready sequences through `self.speculator` (several tokens per step).

        The speculator's `decode(engine, chunks)` returns, per chunk, (tokens, logprobs or None,
        top_logprobs or None): the tokens the sequence emits this step (accepted drafts + one
        more). It leaves each row's cache holding the sequence's positions up to the last
        emitted token, exclusive (`cache.rollback` of rejected drafts). Tokens after a stop are
        dropped here (the finished row is released).
        """
        outs = self.speculator.decode(self, chunks)
        deltas = []
        for c, (tokens, lps, tops) in zip(chunks, outs, strict=True):
            s = c.seq
            s.cached = c.start + len(tokens)
            d = Delta(s.id, [], "")
            for i, t in enumerate(tokens):
                lp = lps[i] if lps is not None else None
                top = tops[i] if tops is not None else None
                self._emit(s, d, t, True, lp, top)
                if s.pending and i + 1 < len(tokens):  # a forced close (thinking budget)
                    dropped = len(tokens) - i - 1  # comes next: later drafts are not emitted
                    self.cache.rollback(c.row, dropped)
                    s.cached -= dropped
                    break
            deltas.append(self._close(d, s))
        return deltas


def _graph_refusal(config: Any) -> str | None:
    """Why decode steps of this model cannot be captured in a CUDA graph (None: they can)."""
    if config.enable_moe_block:
        return "the MoE block's expert loop reads the routing counts on the host"
    return None


def _stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack of equal (V,) rows, as a strided view when they lie evenly spaced in one
    tensor (a decode step's logits: no copy of B x V floats)."""
    r0 = rows[0]
    if len(rows) == 1:
        return r0[None]
    es, step = r0.element_size(), rows[1].data_ptr() - r0.data_ptr()
    even = (
        step > 0
        and step % es == 0
        and all(
            r.shape == r0.shape
            and r.stride() == r0.stride()
            and r.untyped_storage().data_ptr() == r0.untyped_storage().data_ptr()
            and r.data_ptr() == r0.data_ptr() + i * step
            for i, r in enumerate(rows)
        )
    )
    if even and step // es >= r0.shape[0] * r0.stride(0):  # rows do not overlap
        return r0.as_strided((len(rows), r0.shape[0]), (step // es, r0.stride(0)))
    return torch.stack(rows)
