"""Where evaluation prompts go: the in-process geode engine or an OpenAI-compatible endpoint.

Both backends take the same `Gen` requests and return the same strings, so a task run through
`EngineBackend` and through `geode serve` + `EndpointBackend` gives identical per-sample
results with greedy decoding. A prompt is either text (a raw completion prompt: the engine
adds <bos>; an endpoint gets `/v1/completions`) or a list of chat messages (rendered with
`geode.chat.render` in process; sent to `/v1/chat/completions` by an endpoint). With
`chat=True` a text prompt is sent as a single user message. Image parts go to a vision model's
engine as `render_multimodal` renders them (soft-token placeholders + pixel values, as `geode
serve` does); a text-only model refuses them.

Neither backend truncates: a request longer than the context fails (the runner fits prompts
first, see `geode.eval.fit`). `prompt_tokens` and `max_context` tell the runner what fits: exact
in process; for an endpoint from the served tokenizer (`tokenizer=`), else the server's
`/tokenize` (geode serve, vLLM), else an estimate, and `max_model_len` from `/v1/models`.
Errors are `BackendError`s marked `retryable` (connection, timeout, 429, 5xx: a rerun may
succeed) or not (a request the server rejects).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

Prompt = str | list[dict[str, Any]]
Progress = Callable[[int], None] | None


class BackendError(RuntimeError):
    """A backend failed (after retries); the message names the URL or the request.

    `retryable`: the cause may go away (endpoint down, overloaded, timed out), so rerunning
    resumes; otherwise the request itself was rejected and a rerun fails the same way.
    """

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Gen:
    """One generation request."""

    prompt: Prompt
    max_tokens: int = 256
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class Backend:
    """The interface tasks use: generate text, score continuations."""

    name = "backend"
    chat = False

    def generate(self, requests: Sequence[Gen], progress: Progress = None) -> list[str]:
        """The generated text of each request, in order."""
        raise NotImplementedError

    def loglikelihood(
        self, pairs: Sequence[tuple[str, str]], progress: Progress = None
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is the greedy one) for each pair."""
        raise NotImplementedError(f"{self.name} cannot score log-likelihoods")

    @property
    def identity(self) -> str:
        """What produced the outputs (stored with the samples; a resume must match it)."""
        return self.name

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` (an estimate of 4 characters per token without a tokenizer)."""
        return max(1, len(text) // 4)

    def prompt_tokens(self, prompt: Prompt) -> int:
        """Tokens the backend sends for `prompt` (<bos> and chat template included)."""
        if isinstance(prompt, str):
            text = prompt
        else:  # message contents: str, or OpenAI parts (their text is counted)
            text = "".join(
                c if isinstance(c, str) else "".join(p.get("text", "") for p in c or ())
                for c in (m.get("content") for m in prompt)
            )
        return self.count_tokens(text) + 1

    @property
    def max_context(self) -> int | None:
        """The longest prompt + output this backend accepts, if known."""
        return None


def _as_messages(prompt: Prompt) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_ids(tokenizer: Any, prompt: Prompt, chat: bool) -> list[int]:
    """Token ids of a prompt as geode sends it: <bos> + text, or the rendered chat template
    (what the engine backend and `geode serve` both do)."""
    if isinstance(prompt, str) and not chat:
        from geode.infer.engine import encode_prompt

        return encode_prompt(tokenizer, prompt)
    from geode.chat import render

    return list(tokenizer.encode(render(_as_messages(prompt), bos=True)))


def has_media(prompt: Prompt) -> bool:
    """The prompt is chat messages with image or video parts."""
    from geode.chat import IMAGE_PART_TYPES, VIDEO_PART_TYPES

    kinds = IMAGE_PART_TYPES + VIDEO_PART_TYPES
    return not isinstance(prompt, str) and any(
        isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in kinds for p in m["content"])
        for m in prompt
    )


def image_inputs(model: Any, tokenizer: Any, prompt: Prompt) -> tuple[list[int], Any]:
    """(token ids, pixel values (N, 3, S, S)) of chat messages with images, rendered with
    `render_multimodal` for this vision model; BackendError for a text-only model."""
    from geode.chat import render_multimodal

    vision = getattr(model, "vision", None)
    if vision is None:
        raise BackendError("engine: the prompt has image parts but the model is text-only")
    rendered = render_multimodal(
        _as_messages(prompt), bos=True, mm_tokens_per_image=vision.mm_tokens_per_image
    )
    ids = rendered.token_ids(tokenizer, image_token_index=vision.image_token_index)
    return ids, rendered.process(vision.image_size).pixel_values


class FunctionBackend(Backend):
    """A backend from a Python function `prompt -> text` (tests, replaying stored outputs)."""

    name = "function"

    def __init__(self, fn: Callable[[Gen], str], loglikelihood_fn=None):
        self.fn, self.ll_fn = fn, loglikelihood_fn

    def generate(self, requests: Sequence[Gen], progress: Progress = None) -> list[str]:
        """Call the function on each request."""
        out = []
        for r in requests:
            out.append(self.fn(r))
            if progress:
                progress(1)
        return out

    def loglikelihood(self, pairs, progress: Progress = None) -> list[tuple[float, bool]]:
        """Call the log-likelihood function on each (context, continuation)."""
        if self.ll_fn is None:
            return super().loglikelihood(pairs)
        return [self.ll_fn(c, x) for c, x in pairs]


class EngineBackend(Backend):
    """The in-process geode engine (batched continuous decoding)."""

    name = "engine"
    source: str | None = None  # the checkpoint directory, when loaded from one

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        chat: bool = False,
        batch_size: int = 32,
        max_seq_len: int | None = None,
    ):
        from geode.infer import Engine

        self.engine = Engine(
            model, tokenizer, max_batch=batch_size, seed=0, max_seq_len=max_seq_len
        )
        self.tokenizer = tokenizer
        self.chat = chat
        self.batch_size = batch_size

    @classmethod
    def from_path(
        cls, path: str, *, dtype: str | None = None, quant: str | None = None, **kwargs: Any
    ) -> EngineBackend:
        """Load a geode checkpoint directory (with its tokenizer.model) or .gguf file, in
        `dtype` (default: as stored), weight-only quantized to `quant` ("int8"/"int4")."""
        from geode.infer.load import load_for_inference

        model, tok = load_for_inference(path, dtype, quant=quant, require_tokenizer=True)
        backend = cls(model, tok, **kwargs)
        backend.source = str(path) + "".join(f":{x}" for x in (dtype, quant) if x)
        return backend

    @property
    def identity(self) -> str:
        """`engine:<checkpoint>[:dtype][:quant]`."""
        return f"engine:{self.source or 'in-memory model'}"

    @property
    def max_context(self) -> int:
        """The engine's max_seq_len."""
        return self.engine.max_seq_len

    def count_tokens(self, text: str) -> int:
        """Exact token count with the model's tokenizer."""
        return len(self.tokenizer.encode(text))

    def _ids(self, prompt: Prompt) -> list[int]:
        """Prompt token ids, <bos> first (a chat prompt is rendered with geode.chat)."""
        return self._inputs(prompt)[0]

    def _inputs(self, prompt: Prompt) -> tuple[list[int], Any]:
        """(prompt ids, pixel values or None): images through `image_inputs`."""
        if has_media(prompt):
            return image_inputs(self.engine.model, self.tokenizer, prompt)
        return prompt_ids(self.tokenizer, prompt, self.chat), None

    def prompt_tokens(self, prompt: Prompt) -> int:
        """Exact: the length of the ids the engine gets."""
        return len(self._ids(prompt))

    def _check_fits(self, n_prompt: int, max_tokens: int) -> None:
        """Refuse (never truncate) a request longer than the context, as a server does."""
        if n_prompt + max_tokens > self.max_context:
            raise BackendError(
                f"engine: the context is {self.max_context} tokens, but {n_prompt + max_tokens} "
                f"were requested ({n_prompt} in the prompt, {max_tokens} to generate); "
                "shorten the prompt or lower max_tokens"
            )

    def generate(self, requests: Sequence[Gen], progress: Progress = None) -> list[str]:
        """Generate in batches of `batch_size`."""
        from geode.infer import Request

        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            batch = []
            for g in requests[start : start + self.batch_size]:
                ids, images = self._inputs(g.prompt)
                self._check_fits(len(ids), g.max_tokens)
                batch.append(
                    Request(
                        ids,
                        images=images,
                        max_new_tokens=g.max_tokens,
                        temperature=g.temperature,
                        stop=tuple(g.stop),
                        seed=g.seed,
                    )
                )
            out += [r.text or "" for r in self.engine.generate(batch)]
            if progress:
                progress(len(batch))
        return out

    def loglikelihood(self, pairs, progress: Progress = None) -> list[tuple[float, bool]]:
        """Sum of the continuation tokens' log-probabilities from one prefill per pair."""
        from geode.infer import Request

        reqs, spans = [], []
        for context, continuation in pairs:
            ctx, images = self._inputs(context)
            cont = list(self.tokenizer.encode(continuation))
            if not cont:
                raise ValueError(f"empty continuation {continuation!r} after tokenization")
            ids = ctx + cont
            self._check_fits(len(ids), 1)
            reqs.append(
                Request(ids, images=images, max_new_tokens=1, temperature=0.0, prompt_logprobs=1)
            )
            spans.append((ids, len(cont)))
        out: list[tuple[float, bool]] = []
        for start in range(0, len(reqs), self.batch_size):
            chunk = reqs[start : start + self.batch_size]
            for res, (ids, n) in zip(
                self.engine.generate(chunk), spans[start : start + self.batch_size], strict=True
            ):
                lps = res.prompt_logprobs[-n:]
                tops = res.prompt_top_logprobs[-n:]
                greedy = all(
                    max(top, key=top.get) == t for top, t in zip(tops, ids[-n:], strict=True)
                )
                out.append((float(sum(lps)), greedy))
            if progress:
                progress(len(chunk))
        return out


class EndpointBackend(Backend):
    """An OpenAI-compatible server (vLLM, llama.cpp's llama-server, `geode serve`, OpenAI).

    `url` is the server root or its `/v1` base. Requests run `concurrency` at a time; a
    connection error, timeout, 429 or 5xx is retried `retries` times with exponential backoff
    (jittered), then fails as retryable; any other HTTP error fails at once, not retryable,
    with the server's message. `tokenizer` (optional, the served model's) gives exact token
    counts and token-exact log-likelihoods; without it prompts are counted by the server's
    `/tokenize` when it has one.
    """

    name = "endpoint"

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        chat: bool = False,
        concurrency: int = 8,
        retries: int = 3,
        timeout: float = 120.0,
        backoff: float = 1.0,
        tokenizer: Any = None,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint URL must start with http:// or https://, got {url!r}")
        base = url.rstrip("/")
        for suffix in ("/chat/completions", "/completions"):
            base = base.removesuffix(suffix)
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.api_key, self.chat = api_key, chat
        self.concurrency, self.retries = max(1, concurrency), max(0, retries)
        self.timeout, self.backoff = timeout, backoff
        self._model = model
        self._max_len: int | None = None
        self._probed = False  # /v1/models asked (model name, max_model_len)
        self._tokenize_ok: bool | None = None  # does the server have /tokenize?
        self._lock = threading.Lock()
        self.tokenizer = tokenizer  # optional: exact token counts and token-id scoring

    def count_tokens(self, text: str) -> int:
        """Exact with a tokenizer, else the 4-characters-per-token estimate."""
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text))
        return super().count_tokens(text)

    @property
    def identity(self) -> str:
        """`endpoint:<base URL>:<model>`."""
        return f"endpoint:{self.base}:{self.model}"

    def _probe(self) -> None:
        """Ask /v1/models once: the model name (if not given) and its max_model_len."""
        with self._lock:
            if self._probed:
                return
            self._probed = True
            card: dict = {}
            try:
                cards = self._request("GET", "/models", None)["data"]
                named = [c for c in cards if c.get("id") == self._model]
                card = (named or cards)[0]
            except (BackendError, KeyError, IndexError, TypeError, AttributeError):
                pass
            if self._model is None:
                self._model = card.get("id") or "default"
            max_len = card.get("max_model_len")
            self._max_len = max_len if isinstance(max_len, int) and max_len > 0 else None

    @property
    def model(self) -> str:
        """The model name sent with each request (the server's first model if not given)."""
        self._probe()
        return self._model

    @property
    def max_context(self) -> int | None:
        """The served model's `max_model_len` from /v1/models (geode serve, vLLM), if given."""
        self._probe()
        return self._max_len

    def prompt_tokens(self, prompt: Prompt) -> int:
        """Exact with the served tokenizer (ids as geode sends them), else the server's
        /tokenize count, else the 4-characters-per-token estimate."""
        if self.tokenizer is not None:
            return len(prompt_ids(self.tokenizer, prompt, self.chat))
        if self._tokenize_ok is not False:
            body: dict[str, Any] = {"model": self.model}
            if self.chat or not isinstance(prompt, str):
                body.update(messages=_as_messages(prompt), add_generation_prompt=True)
            else:
                body["prompt"] = prompt
            try:
                count = self._request("POST", "/tokenize", body, root=True)["count"]
                if isinstance(count, int):
                    self._tokenize_ok = True
                    return count
            except (BackendError, KeyError, TypeError):
                if self._tokenize_ok:  # it worked before: a real failure
                    raise
            self._tokenize_ok = False
        return super().prompt_tokens(prompt)

    def _request(self, method: str, path: str, body: dict | None, root: bool = False) -> dict:
        """One HTTP call with retries; the parsed JSON response (`root`: path under the
        server root instead of /v1, as /tokenize is)."""
        url = (self.base.removesuffix("/v1") if root else self.base) + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500]
                last = f"HTTP {e.code} from {url}: {detail}"
                if e.code != 429 and e.code < 500:
                    raise BackendError(last, retryable=False) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"cannot reach {url}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                last = f"{url} returned invalid JSON: {e}"
        raise BackendError(f"{last} (after {self.retries + 1} attempts)", retryable=True)

    def _one(self, g: Gen) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": g.max_tokens,
            "temperature": g.temperature,
        }
        if g.stop:
            body["stop"] = list(g.stop)
        if g.seed is not None:
            body["seed"] = g.seed
        if self.chat or not isinstance(g.prompt, str):
            body["messages"] = _as_messages(g.prompt)
            data = self._request("POST", "/chat/completions", body)
            try:
                return data["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise BackendError(f"unexpected chat response: {str(data)[:300]}") from None
        body["prompt"] = g.prompt
        data = self._request("POST", "/completions", body)
        try:
            return data["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"unexpected completion response: {str(data)[:300]}") from None

    def _map(self, fn: Callable, items: Sequence, progress: Progress) -> list:
        """fn over items, `concurrency` at a time, results in order."""
        _ = self.model  # resolve once, before the threads start

        def call(x):
            r = fn(x)
            if progress:
                progress(1)
            return r

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(call, items))

    def generate(self, requests: Sequence[Gen], progress: Progress = None) -> list[str]:
        """POST each request (bounded concurrency, retries)."""
        return self._map(self._one, requests, progress)

    def _ll(self, pair: tuple[str, str]) -> tuple[float, bool]:
        """Echoed prompt logprobs of context + continuation (`echo`, `logprobs=1`, 0 tokens).

        With a tokenizer the prompt goes as token ids (<bos>, context, continuation tokenized
        apart, as the engine backend does) and the last len(continuation ids) logprobs count;
        without one it goes as text and the trailing tokens that spell the continuation count.
        """
        context, continuation = pair
        n_cont = None
        prompt: str | list[int] = context + continuation
        if self.tokenizer is not None:
            from geode.infer.engine import encode_prompt

            ctx = encode_prompt(self.tokenizer, context)
            cont = list(self.tokenizer.encode(continuation))
            prompt = ctx + cont
            n_cont = len(cont)
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 1,
            "temperature": 0.0,
        }
        data = self._request("POST", "/completions", body)
        try:
            lp = data["choices"][0]["logprobs"]
            lps, names = lp["token_logprobs"], lp["tokens"]
            tops = lp.get("top_logprobs") or [None] * len(lps)
        except (KeyError, IndexError, TypeError):
            raise BackendError(
                f"{self.base}/completions gave no echoed prompt logprobs (needs `echo` and "
                f"`logprobs` support, as vLLM has): {str(data)[:300]}"
            ) from None
        if n_cont is None:  # the trailing tokens that cover the continuation's characters
            n_cont, covered = 0, 0
            while covered < len(continuation) and n_cont < len(names) - 1:
                n_cont += 1
                covered += len(names[-n_cont])
        total, greedy = 0.0, True
        for t, top, name in zip(lps[-n_cont:], tops[-n_cont:], names[-n_cont:], strict=True):
            if t is None:
                raise BackendError(f"{self.base}/completions: no logprob for token {name!r}")
            total += t
            if top:
                greedy = greedy and max(top, key=top.get) == name
        return total, greedy

    def loglikelihood(self, pairs, progress: Progress = None) -> list[tuple[float, bool]]:
        """Score each pair through `/v1/completions` with echo."""
        return self._map(self._ll, pairs, progress)
