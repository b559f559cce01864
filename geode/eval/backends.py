"""Where evaluation prompts go: the in-process geode engine or an OpenAI-compatible endpoint.

Both backends take the same `Gen` requests and return the same strings, so a task run through
`EngineBackend` and through `geode serve` + `EndpointBackend` gives identical per-sample
results with greedy decoding. A prompt is either text (a raw completion prompt: the engine
adds <bos>; an endpoint gets `/v1/completions`) or a list of chat messages (rendered with
`geode.chat.render` in process; sent to `/v1/chat/completions` by an endpoint). With
`chat=True` a text prompt is sent as a single user message.
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
    """A backend failed for good (after retries); the message names the URL or the request."""


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

    @property
    def max_context(self) -> int | None:
        """The longest prompt + output this backend accepts, if known."""
        return None


def _as_messages(prompt: Prompt) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


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

    def __init__(self, model: Any, tokenizer: Any, *, chat: bool = False, batch_size: int = 32):
        from geode.infer import Engine

        self.engine = Engine(model, tokenizer, max_batch=batch_size, seed=0)
        self.tokenizer = tokenizer
        self.chat = chat
        self.batch_size = batch_size

    @classmethod
    def from_path(cls, path: str, **kwargs: Any) -> EngineBackend:
        """Load a geode checkpoint directory (with its tokenizer.model)."""
        import geode

        backend = cls(geode.load_model(path), geode.load_tokenizer(path), **kwargs)
        backend.source = str(path)
        return backend

    @property
    def identity(self) -> str:
        """`engine:<checkpoint>`."""
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
        if isinstance(prompt, str) and not self.chat:
            ids = list(self.tokenizer.encode(prompt))
            bos = self.tokenizer.bos_id
            return ids if ids and ids[0] == bos else [bos, *ids]
        from geode.chat import render

        return list(self.tokenizer.encode(render(_as_messages(prompt), bos=True)))

    def _fit(self, ids: list[int], max_tokens: int) -> tuple[list[int], int]:
        """Left-truncate (keeping <bos>) so that prompt + output fits the context."""
        ctx = self.max_context
        max_tokens = max(1, min(max_tokens, ctx - 1))
        if len(ids) + max_tokens > ctx:
            keep = ctx - max_tokens - 1
            ids = [ids[0], *ids[len(ids) - keep :]]
        return ids, max_tokens

    def generate(self, requests: Sequence[Gen], progress: Progress = None) -> list[str]:
        """Generate in batches of `batch_size`."""
        from geode.infer import Request

        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            batch = []
            for g in requests[start : start + self.batch_size]:
                ids, n = self._fit(self._ids(g.prompt), g.max_tokens)
                batch.append(
                    Request(
                        ids,
                        max_new_tokens=n,
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
            ctx = self._ids(context)
            cont = list(self.tokenizer.encode(continuation))
            if not cont:
                raise ValueError(f"empty continuation {continuation!r} after tokenization")
            ids = ctx + cont
            if len(ids) + 1 > self.max_context:
                ids = [ids[0], *ids[len(ids) + 2 - self.max_context :]]
            reqs.append(Request(ids, max_new_tokens=1, temperature=0.0, prompt_logprobs=1))
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
    (jittered); any other HTTP error fails at once with the server's message. `tokenizer`
    (optional, the served model's) gives exact token counts and token-exact log-likelihoods.
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

    @property
    def model(self) -> str:
        """The model name sent with each request (the server's first model if not given)."""
        with self._lock:
            if self._model is None:
                try:
                    data = self._request("GET", "/models", None)
                    self._model = data["data"][0]["id"]
                except (BackendError, KeyError, IndexError, TypeError):
                    self._model = "default"
            return self._model

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        """One HTTP call with retries; the parsed JSON response."""
        url = self.base + path
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
                    raise BackendError(last) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"cannot reach {url}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                last = f"{url} returned invalid JSON: {e}"
        raise BackendError(f"{last} (after {self.retries + 1} attempts)")

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
            ctx = list(self.tokenizer.encode(context))
            cont = list(self.tokenizer.encode(continuation))
            bos = self.tokenizer.bos_id
            prompt = ([bos] if not ctx or ctx[0] != bos else []) + ctx + cont
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
