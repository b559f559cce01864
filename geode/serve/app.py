"""The OpenAI-compatible HTTP server: `create_app(...)` builds a FastAPI app over one model.

    app = create_app("out/final")                 # loads in the background; /health 503 -> 200
    app = create_app((model, tokenizer), api_keys=["sk-local"], max_batch=16)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics, POST /tokenize, POST /detokenize, GET /tokenizer_info, and the chat page at /.
Every error is OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}` (`code` always
a string); bad input is a 400 naming the field, never a 500. With API keys, every route but
/health and the chat page needs one; request bodies over `max_body_bytes` are 413s. The OpenAPI
schema (/openapi.json, geode/serve/openapi.py) states all of this. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from geode.infer import Delta, RequestError, Result, SamplingParams
from geode.infer import Request as EngineRequest
from geode.infer.engine import encode_prompt
from geode.infer.thinking import thinking_ids

from . import openapi
from . import protocol as P
from .scheduler import Handle, QueueFull, Scheduler

_PARAM_NAMES = {  # engine field -> API field
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "prompt_logprobs": "logprobs",
}


DEFAULT_CHAT_MAX_TOKENS = 4096  # chat completions without max_tokens / max_completion_tokens
# Request bodies larger than this are refused (413) before any parsing: 2 MiB holds a 128K-token
# prompt as text (~0.5 MB) or as a JSON id list (~0.9 MB).
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
# keys and values of recent prompts' token blocks, reused by requests sharing a prefix
DEFAULT_PREFIX_CACHE_BYTES = 256 * 1024 * 1024
# `code` of an error that has no more specific one
_STATUS_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    499: "client_disconnected",
    500: "internal_error",
    503: "model_unavailable",
}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers


def error_response(e: APIError) -> JSONResponse:
    """The JSON response of an APIError."""
    code = e.code or _STATUS_CODES.get(e.status, "error")
    body = P.ErrorResponse(
        error=P.ErrorBody(message=e.message, type=e.type, param=e.param, code=code)
    )
    return JSONResponse(body.model_dump(), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------------- server state
@dataclasses.dataclass
class ServerConfig:
    """Options of `create_app`."""

    model_name: str = "geode"
    api_keys: tuple[str, ...] = ()
    max_batch: int = 32
    max_queue: int = 256
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    max_seq_len: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    dtype: str | None = None
    quant: str | None = None
    engine_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    thinking_budget: int | None = None  # default of the request field (None: no budget)
    image_dir: str | None = None  # local image files allowed under here (None: data: URLs only)


class ServerState:
    """The loaded model, engine, scheduler and grammar compiler (None while loading)."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.engine: Any = None
        self.tokenizer: Any = None
        self.scheduler: Scheduler | None = None
        self.grammars: Any = None
        self.load_error: str | None = None
        self.started = time.time()
        self.http_requests: dict[tuple[str, int], int] = {}
        self._grammar_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """Model loaded and scheduler running."""
        return self.scheduler is not None

    @property
    def max_len(self) -> int:
        """Context length (prompt + completion)."""
        return self.engine.max_seq_len

    def get_grammars(self) -> Any:
        """The llguidance grammar compiler, built on first use."""
        with self._grammar_lock:
            if self.grammars is None:
                from .constrain import Grammars

                self.grammars = Grammars(self.tokenizer, self.engine.eos_token_ids)
            return self.grammars


def _load(source: Any, config: ServerConfig) -> tuple[Any, Any]:
    """Model and tokenizer from a checkpoint path or a (model, tokenizer) pair; the model cast
    to `config.dtype` and quantized to `config.quant` when given."""
    if isinstance(source, (str, os.PathLike)):
        from geode.infer.load import load_for_inference

        return load_for_inference(source, config.dtype, quant=config.quant, require_tokenizer=True)
    model, tokenizer = source
    if tokenizer is None:
        raise ValueError("the server needs a tokenizer")
    if config.dtype is not None:
        from geode.checkpoint import parse_dtype

        model = model.to(parse_dtype(config.dtype))
    if config.quant is not None:
        from geode.infer.quant import quantize

        quantize(model, config.quant)
    return model, tokenizer


def create_app(
    source: str | os.PathLike | tuple[Any, Any],
    *,
    api_keys: Sequence[str] | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    max_seq_len: int | None = None,
    model_name: str | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    dtype: str | None = None,
    quant: str | None = None,
    on_load_error: Callable[[str], None] | None = None,
    thinking_budget: int | None = None,
    image_dir: str | os.PathLike | None = None,
) -> FastAPI:
    """A FastAPI app serving one model (a checkpoint directory or a (model, tokenizer) pair).

    A path is loaded in a background thread at startup (GET /health answers 503 until then;
    if loading fails, /health reports the error and `on_load_error(message)` is called, e.g.
    to stop the process). max_batch: sequences decoded together; max_queue: requests waiting
    beyond that before 429 (which request runs when is the engine scheduler's choice);
    prefix_cache_bytes: the engine's prefix cache (keys and values of recent prompts' blocks,
    reused by requests sharing a prefix; 0 = off); max_body_bytes: larger request bodies are
    413s; dtype ("float32", "bfloat16") and quant ("int8", "int4"): how the weights are held.
    thinking_budget: the default of the requests' `thinking_budget` field (None: no budget).
    image_dir: a VLM's `image_url` parts may name files under it (None: `data:` URLs only; an
    http(s) URL is never fetched).
    """
    if model_name is None:
        model_name = Path(source).name if isinstance(source, (str, os.PathLike)) else "geode"
    config = ServerConfig(
        model_name=model_name,
        api_keys=tuple(api_keys or ()),
        max_batch=max_batch,
        max_queue=max_queue,
        prefix_cache_bytes=prefix_cache_bytes,
        max_seq_len=max_seq_len,
        max_body_bytes=max_body_bytes,
        dtype=dtype,
        quant=quant,
        engine_kwargs=dict(engine_kwargs or {}),
        thinking_budget=thinking_budget,
        image_dir=None if image_dir is None else os.fspath(image_dir),
    )
    SamplingParams(thinking_budget=thinking_budget).validate()  # RequestError (a ValueError)
    if prefix_cache_bytes < 0:
        raise ValueError(f"prefix_cache_bytes must be >= 0, got {prefix_cache_bytes}")
    if quant is not None and quant not in ("int8", "int4"):
        raise ValueError(f"quant must be 'int8' or 'int4', got {quant!r}")
    state = ServerState(config)

    async def load() -> None:
        try:
            model, tokenizer = await asyncio.to_thread(_load, source, config)
            from geode.infer import Engine

            engine = Engine(
                model,
                tokenizer,
                max_batch=max_batch,
                max_seq_len=max_seq_len,
                **{"prefix_cache_bytes": prefix_cache_bytes, **config.engine_kwargs},
            )
            state.engine, state.tokenizer = engine, tokenizer
            sched = Scheduler(engine, max_queue=max_queue)
            sched.start()
            state.scheduler = sched
        except Exception as e:  # reported by /health; the server stays up unless told
            state.load_error = f"{type(e).__name__}: {e}"
            if on_load_error is not None:
                on_load_error(state.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(load())
        app.state.load_task = task
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if state.scheduler is not None:
                await state.scheduler.stop()

    app = FastAPI(
        title="geode",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible API over a geode model.",
    )
    app.state.geode = state

    def schema() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = openapi.build(
            app,
            model_name=state.config.model_name,
            secured=bool(state.config.api_keys),
            vocab=state.engine.token_vocab_size if state.ready else None,
            context=state.max_len if state.ready else None,
        )
        if state.ready:  # final once the model's bounds are known
            app.openapi_schema = doc
        return doc

    app.openapi = schema  # type: ignore[method-assign]
    _install_errors(app)
    _install_middleware(app, state)
    _install_routes(app, state)
    return app


# ---------------------------------------------------------------------- errors and auth
_FIELD_IN_MSG = re.compile(r"^(?:Value error, )?([A-Za-z_][\w.\[\]]*): ")


def _validation_error(exc: RequestValidationError) -> APIError:
    errs = exc.errors()
    if not errs:
        return APIError(400, "invalid request")
    e = errs[0]
    if e.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {e.get('msg')}", code="invalid_json")
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if not loc and e.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "the request body must be a JSON object", code="invalid_body")
    if not loc and e.get("type") == "missing":
        return APIError(
            400, "the request body is empty: expected a JSON object", code="invalid_body"
        )
    # Union members show up in loc as type names ("list[int]", "str"): drop them.
    loc = [
        x
        for x in loc
        if not re.match(
            r"^(str|int|float|bool|list\[.*|dict\[.*|function-|"
            r"literal\[|NamedToolChoice|ContentPart)",
            x,
        )
    ]
    msg = str(e.get("msg", "invalid value"))
    m = _FIELD_IN_MSG.match(msg)
    if m and not loc:
        param = m.group(1)
        msg = msg[m.end() :]
    else:
        param = ".".join(loc) or None
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
    if e.get("type") == "missing":
        msg = "field required"
    code = "invalid_value"
    if e.get("type") == "geode_rule":  # a rule between fields (protocol.RULE_CODES)
        code = e.get("ctx", {}).get("code", code)
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code=code)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        # exc.headers: e.g. the `Allow` of a 405
        return error_response(
            APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers)
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))


class _AuthAndCount:
    """Pure ASGI middleware: API keys, the body-size limit, request counts per path and status.

    (Not BaseHTTPMiddleware: that wraps `receive` and hides client disconnects from handlers.)
    """

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state
        self.keys = set(state.config.api_keys)
        self.max_body = state.config.max_body_bytes

    # Label values: the routes, not raw URLs (one counter per URL would grow without bound).
    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize")

    def _count(self, path: str, status: int) -> None:
        if path not in self.ROUTES:
            path = "/v1/models/{model}" if path.startswith("/v1/models/") else "/v1/other"
        k = (path, status)
        self.state.http_requests[k] = self.state.http_requests.get(k, 0) + 1

    def _authorized(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if token is None:
            token = headers.get("x-api-key")
        return token in self.keys

    async def _read_body(self, headers: dict[str, str], receive: Any) -> bytes | APIError | None:
        """The whole body (None if the client left), or the 4xx error refusing it."""
        too_large = APIError(
            413,
            f"request body exceeds the server's limit of {self.max_body} bytes",
            code="request_too_large",
        )
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return APIError(400, f"invalid Content-Length header {length!r}")
            if int(length) > self.max_body:
                return too_large
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return too_large
            if not message.get("more_body", False):
                return bytes(body)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        counted = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }

        async def refuse(error: APIError) -> None:
            if counted:
                self._count(path, error.status)
            await error_response(error)(scope, receive, send)

        if self.keys and not openapi.is_public(path) and not self._authorized(headers):
            return await refuse(
                APIError(
                    401,
                    "missing or invalid API key (send 'Authorization: Bearer KEY')",
                    type="authentication_error",
                    code="invalid_api_key",
                )
            )
        body = await self._read_body(headers, receive)
        if body is None:
            return
        if isinstance(body, APIError):
            return await refuse(body)
        sent = False

        async def replay() -> dict:
            """The buffered body once, then the client's own messages (disconnects)."""
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def send_counted(message: dict) -> None:
            if counted and message["type"] == "http.response.start":
                self._count(path, int(message["status"]))
            await send(message)

        await self.app(scope, replay, send_counted)


def _install_middleware(app: FastAPI, state: ServerState) -> None:
    app.add_middleware(_AuthAndCount, state=state)


# ---------------------------------------------------------------------- helpers
def _require_ready(state: ServerState) -> None:
    if state.ready:
        return
    if state.load_error:
        raise APIError(503, f"the model failed to load: {state.load_error}", type="server_error")
    raise APIError(
        503,
        "the model is still loading",
        type="server_error",
        code="loading",
        headers={"Retry-After": "1"},
    )


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.config.model_name:
        raise APIError(
            400,
            f"model: unknown model {name!r}; this server serves {state.config.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _sampling(
    state: ServerState, req: P.SamplingFields, prompt_len: int, max_tokens: int, **extra: Any
) -> SamplingParams:
    """SamplingParams from the request's fields, validated; errors name the API field."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params = SamplingParams(
        max_new_tokens=max_tokens,
        min_new_tokens=min(req.min_tokens, max_tokens),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k in (None, -1) else req.top_k,
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed,
        stop=tuple(stops),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        **extra,
    )
    try:
        params.validate(state.engine.token_vocab_size)  # ids with a tokenizer piece
    except RequestError as e:
        raise _request_error(e) from None
    total = prompt_len + max_tokens
    if total > state.max_len:
        raise APIError(
            400,
            f"max_tokens: this model's maximum context length is {state.max_len} tokens, but "
            f"{total} were requested ({prompt_len} in the prompt, {max_tokens} for the "
            "completion); shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return params


def _thinking_budget(state: ServerState, req: P.SamplingFields) -> int | None:
    """The request's thinking_budget, else the server's default; 400 when the tokenizer has no
    thinking tokens."""
    budget = req.thinking_budget
    if budget is None:
        budget = state.config.thinking_budget
    if budget is not None:
        try:
            thinking_ids(state.tokenizer, budget)
        except RequestError as e:
            raise _request_error(e) from None
    return budget


def _request_error(e: Exception) -> APIError:
    msg = str(e)
    m = re.match(r"^(\w+)=", msg)
    param = m.group(1) if m else None
    if param is not None:
        api = _PARAM_NAMES.get(param, param)
        msg = api + msg[len(param) :]
        param = api
    elif "prompt" in msg:
        param = "prompt"
    return APIError(400, msg, param=param)


def _with_seed(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n samples: a distinct derived seed when a seed is given."""
    if i == 0 or params.seed is None:
        return dataclasses.replace(params)
    return dataclasses.replace(params, seed=(params.seed + i) % 2**63)


def _submit_all(state: ServerState, requests: list[EngineRequest]) -> list[Handle]:
    sched = state.scheduler
    if sched.queue_depth + len(requests) > sched.max_queue:
        sched.stats.requests_rejected += 1
        raise QueueFull(sched.retry_after())
    return [sched.submit(r) for r in requests]


async def _results(request: Request, state: ServerState, handles: list[Handle]) -> list[Result]:
    """Wait for every handle's final result; abort them all if the client disconnects."""
    results: list[Result | None] = [None] * len(handles)

    async def one(i: int, h: Handle) -> None:
        while True:
            item = await h.queue.get()
            if isinstance(item, Exception):
                raise item
            if item.finished:
                results[i] = item.result
                return

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)

    work = asyncio.ensure_future(asyncio.gather(*(one(i, h) for i, h in enumerate(handles))))
    watcher = asyncio.ensure_future(watch())
    work.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise APIError(499, "client disconnected")
        work.result()
    except (RequestError, ValueError) as e:
        raise _request_error(e) from None
    finally:
        watcher.cancel()
        work.cancel()
        for h in handles:
            state.scheduler.abort(h)
    return results  # type: ignore[return-value]


async def _merged(handles: list[Handle]) -> AsyncIterator[tuple[int, Delta]]:
    """(handle index, delta) from several handles as they arrive, until all have finished."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Handle) -> None:
        while True:
            item = await h.queue.get()
            await merged.put((i, item))
            if isinstance(item, Exception) or item.finished:
                return

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, item = await merged.get()
            if isinstance(item, Exception):
                raise item
            if item.finished:
                left -= 1
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _sse(obj: Any) -> str:
    data = (
        obj.model_dump_json(exclude_none=True)
        if hasattr(obj, "model_dump_json")
        else json.dumps(obj)
    )
    return f"data: {data}\n\n"


def _stream_response(
    gen: AsyncIterator[str], state: ServerState, handles: list[Handle]
) -> StreamingResponse:
    """SSE response; an error mid-stream becomes an error event, a disconnect aborts."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in gen:
                yield chunk
        except (RequestError, ValueError) as e:
            err = _request_error(e)
            body = P.ErrorBody(message=err.message, param=err.param, code=_STATUS_CODES[400])
            yield _sse(P.ErrorResponse(error=body))
        except RuntimeError as e:
            body = P.ErrorBody(message=str(e), type="server_error", code=_STATUS_CODES[500])
            yield _sse(P.ErrorResponse(error=body))
        finally:
            for h in handles:
                state.scheduler.abort(h)
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _tok_str(tok: Any, token_id: int) -> str:
    return tok.decode([token_id])


def _tok_bytes(tok: Any, token_id: int) -> list[int]:
    return (
        list(tok._bytes[token_id])
        if hasattr(tok, "_bytes")
        else list(_tok_str(tok, token_id).encode())
    )


def _top_dict(tok: Any, top: dict[int, float] | None) -> dict[str, float] | None:
    if top is None:
        return None
    out: dict[str, float] = {}
    for t, lp in top.items():
        s = _tok_str(tok, t)
        out[s] = max(lp, out.get(s, float("-inf")))
    return out


class _Offsets:
    """Decodes ids one at a time and says where each one's text begins (`text_offset`).

    A token that decodes to whole characters begins where its own text ends up; one holding
    part of a character split over byte pieces begins at that character.
    """

    def __init__(self, tok: Any, skip_special: bool):
        self.tok, self.skip = tok, skip_special
        self.decoder = tok.stream_decoder(skip_special=skip_special)

    @property
    def text(self) -> str:
        """The text decoded so far."""
        return self.decoder.text

    def push(self, token_id: int) -> int:
        """Decode one more id; returns where its text begins."""
        before = len(self.decoder.text)
        self.decoder.push(token_id)
        own = self.tok.decode([token_id], skip_special=self.skip)
        at = len(self.decoder.text) - len(own)  # after held bytes that turned out invalid
        return at if "\ufffd" not in own and at >= before else before


def _decode_offsets(
    tok: Any, ids: list[int], skip_special: bool, hidden: int = 0
) -> tuple[str, list[int]]:
    """(text of ids[hidden:], where each token's text begins in it); the first `hidden` ids (a
    <bos> the server prepended) add no text and sit at 0."""
    dec = _Offsets(tok, skip_special)
    offsets = [0] * hidden + [dec.push(t) for t in ids[hidden:]]
    dec.decoder.flush()
    return dec.text, offsets


def _legacy_logprobs(
    tok: Any,
    ids: list[int],
    lps: list[float | None],
    tops: list[dict[int, float] | None] | None,
    offsets: list[int],
) -> P.LegacyLogprobs:
    """The completions API's logprobs of `ids`; `offsets[k]`: token k's place in the text."""
    out = P.LegacyLogprobs(top_logprobs=[] if tops is not None else None)
    for k, t in enumerate(ids):
        out.tokens.append(_tok_str(tok, t))
        out.token_logprobs.append(lps[k] if k < len(lps) else None)
        if tops is not None:
            out.top_logprobs.append(_top_dict(tok, tops[k]) if k < len(tops) else None)
    out.text_offset = list(offsets)
    return out


def _chat_logprobs(
    tok: Any, ids: list[int], lps: list[float] | None, tops: list[dict[int, float]] | None
) -> P.ChoiceLogprobs:
    content = []
    for k, t in enumerate(ids):
        alts = []
        if tops is not None and k < len(tops) and tops[k]:
            alts = [
                P.TopLogprob(token=_tok_str(tok, a), logprob=lp, bytes=_tok_bytes(tok, a))
                for a, lp in tops[k].items()
            ]
        content.append(
            P.TokenLogprob(
                token=_tok_str(tok, t),
                logprob=(lps or [0.0])[k] if lps and k < len(lps) else 0.0,
                bytes=_tok_bytes(tok, t),
                top_logprobs=alts,
            )
        )
    return P.ChoiceLogprobs(content=content)


# ---------------------------------------------------------------------- completions
def _prompts(state: ServerState, prompt: Any) -> list[tuple[list[int], int]]:
    """(token ids, how many leading ids the server added: the <bos> of a text prompt)."""
    tok = state.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    out = []
    vocab = state.engine.token_vocab_size  # ids with a tokenizer piece
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            ids = encode_prompt(tok, p)
            # <bos> was added unless the text starts with it (the tokenizer parses it there)
            bos = getattr(tok, "bos_id", -1)
            added = int(bos >= 0 and ids[:1] == [bos] and not p.startswith(tok.id_to_piece(bos)))
            out.append((ids, added))
        else:
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(
                    400,
                    f"prompt: token id {bad} (prompt {i}) is outside the vocabulary [0, {vocab})",
                    param="prompt",
                )
            out.append((list(p), 0))
    return out


def _install_routes(app: FastAPI, state: ServerState) -> None:
    static = resources.files("geode.serve") / "static"

    @app.get(
        "/health",
        response_model=P.HealthResponse,
        responses={503: {"model": P.HealthResponse, "description": "loading, or load failed"}},
    )
    async def health() -> JSONResponse:
        """200 once the model is loaded, 503 while loading (or if loading failed)."""
        if state.ready:
            return JSONResponse({"status": "ok", "model": state.config.model_name})
        if state.load_error:
            return JSONResponse({"status": "error", "message": state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/v1/models", response_model=P.ModelList)
    async def models() -> P.ModelList:
        """The one served model."""
        max_len = state.max_len if state.ready else None
        return P.ModelList(
            data=[
                P.ModelCard(
                    id=state.config.model_name, max_model_len=max_len, created=int(state.started)
                )
            ]
        )

    @app.get("/v1/models/{name}", response_model=P.ModelCard, responses=openapi.errors(404))
    async def model_card(name: str) -> P.ModelCard:
        """One model by name."""
        if name != state.config.model_name:
            raise APIError(
                404,
                f"model {name!r} not found",
                param="model",
                code="model_not_found",
                type="not_found_error",
            )
        return P.ModelCard(
            id=name,
            created=int(state.started),
            max_model_len=state.max_len if state.ready else None,
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        """The chat page."""
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        """The chat page's script and style sheet."""
        types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
        suffix = Path(name).suffix
        f = static / name
        if "/" in name or suffix not in types or not f.is_file():
            raise APIError(404, f"no static file {name!r}", type="not_found_error")
        return Response(f.read_bytes(), media_type=types[suffix])

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text exposition."""
        return PlainTextResponse(_metrics_text(state), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=openapi.errors(400, 503))
    async def tokenize(req: P.TokenizeRequest) -> P.TokenizeResponse:
        """Token ids of a prompt (or of chat messages rendered with the template)."""
        _require_ready(state)
        _check_model(state, req.model)
        tok = state.tokenizer
        if req.messages is not None:
            text = _render_chat(state, req.messages, None, req.add_generation_prompt)
            if isinstance(text, str):
                ids = list(tok.encode(text))
            else:  # image parts: their soft-token placeholders
                ids, _ = await asyncio.to_thread(_image_inputs, state, text)
        else:
            ids = encode_prompt(tok, req.prompt, add_bos=req.add_special_tokens)
        vision = getattr(state.engine.model, "vision", None)
        image_id = None if vision is None else vision.image_token_index
        strs = None
        if req.return_token_strs:
            strs = ["<image_soft_token>" if t == image_id else tok.id_to_piece(t) for t in ids]
        return P.TokenizeResponse(
            count=len(ids), max_model_len=state.max_len, tokens=ids, token_strs=strs
        )

    @app.post(
        "/detokenize", response_model=P.DetokenizeResponse, responses=openapi.errors(400, 503)
    )
    async def detokenize(req: P.DetokenizeRequest) -> P.DetokenizeResponse:
        """Text of token ids."""
        _require_ready(state)
        _check_model(state, req.model)
        vocab = state.engine.token_vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400, f"tokens: id {bad} is outside the vocabulary [0, {vocab})", param="tokens"
            )
        return P.DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens))

    @app.get("/tokenizer_info", response_model=P.TokenizerInfo, responses=openapi.errors(503))
    async def tokenizer_info() -> JSONResponse:
        """What a client needs to tokenize locally: vocabulary size, special tokens, context."""
        _require_ready(state)
        tok = state.tokenizer
        specials = dict(getattr(tok, "special_ids", {}))
        return JSONResponse(
            {
                "tokenizer_class": "GemmaTokenizer",
                "model": state.config.model_name,
                "vocab_size": tok.vocab_size,
                "model_max_length": state.max_len,
                "bos_token": "<bos>",
                "bos_token_id": tok.bos_id,
                "eos_token": "<eos>",
                "eos_token_id": tok.eos_id,
                "pad_token": "<pad>",
                "pad_token_id": tok.pad_id,
                "add_bos_token": True,
                "special_tokens": specials,
                "eos_token_ids": sorted(state.engine.eos_token_ids),
            }
        )

    @app.post(
        "/v1/completions",
        response_model=P.CompletionResponse,
        responses=openapi.streamed(400, 429, 503),
    )
    async def completions(req: P.CompletionRequest, request: Request) -> Any:
        """Text completion (OpenAI legacy API)."""
        _require_ready(state)
        _check_model(state, req.model)
        prompts = _prompts(state, req.prompt)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # 0: echo only (validated)
        run_tokens = max(1, max_tokens)
        plp = req.logprobs if (req.echo and req.logprobs is not None) else None
        engine_reqs, meta = [], []
        for pi, (ids, _) in enumerate(prompts):
            params = _sampling(
                state,
                req,
                len(ids),
                run_tokens,
                logprobs=req.logprobs,
                prompt_logprobs=plp,
                thinking_budget=_thinking_budget(state, req),
            )
            for j in range(req.n):
                engine_reqs.append(EngineRequest(ids, params=_with_seed(params, j)))
                meta.append((pi, j))
        try:
            handles = _submit_all(state, engine_reqs)
        except QueueFull as e:
            raise APIError(
                429,
                str(e),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        tok = state.tokenizer
        model = state.config.model_name
        if req.stream:
            return _stream_response(
                _stream_completion(state, req, prompts, meta, handles, model), state, handles
            )
        results = await _results(request, state, handles)
        choices = []
        usage = P.Usage()
        for k, ((pi, j), r) in enumerate(zip(meta, results, strict=True)):
            ids, added = prompts[pi]
            gen_ids, gen_lps = r.token_ids, r.logprobs
            gen_tops = r.top_logprobs
            out_text = r.text or ""
            finish = r.finish_reason
            if max_tokens == 0:  # echo only: the sampled token is discarded
                gen_ids, gen_lps, gen_tops, out_text, finish = [], [], [], "", "length"
            lp = None
            # text_offset indexes the returned text: the echoed prompt (as decoded, without the
            # <bos> the server added) + the completion (a stop string may cut it short)
            prompt_text, prompt_offs = _decode_offsets(tok, ids, False, added)
            _, gen_offs = _decode_offsets(tok, gen_ids, True)
            start = len(prompt_text) if req.echo else 0
            gen_offs = [start + min(o, len(out_text)) for o in gen_offs]
            if req.echo:
                if req.logprobs is not None:
                    lp = _legacy_logprobs(
                        tok,
                        ids + gen_ids,
                        list(r.prompt_logprobs or [None] * len(ids)) + list(gen_lps or []),
                        (list(r.prompt_top_logprobs or [None] * len(ids)) + list(gen_tops or []))
                        if req.logprobs
                        else None,
                        prompt_offs + gen_offs,
                    )
                out_text = prompt_text + out_text
            elif req.logprobs is not None:
                lp = _legacy_logprobs(
                    tok,
                    gen_ids,
                    list(gen_lps or []),
                    list(gen_tops or []) if req.logprobs else None,
                    gen_offs,
                )
            choices.append(
                P.CompletionChoice(
                    index=k,
                    text=out_text,
                    logprobs=lp,
                    finish_reason=finish,
                    stop_reason=r.stop_reason,
                )
            )
            if j == 0:
                usage.prompt_tokens += len(ids)
            usage.completion_tokens += len(gen_ids)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return P.CompletionResponse(model=model, choices=choices, usage=usage)

    @app.post(
        "/v1/chat/completions",
        response_model=P.ChatCompletionResponse,
        responses=openapi.streamed(400, 429, 503),
    )
    async def chat_completions(req: P.ChatCompletionRequest, request: Request) -> Any:
        """Chat completion with tools, JSON modes, logprobs and streaming."""
        _require_ready(state)
        _check_model(state, req.model)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
        budget = _thinking_budget(state, req)
        think = budget is not None  # the prompt opens a thinking section of at most `budget`
        text = _render_chat(state, req.messages, tools if use_tools else None, True, think)
        images = None
        if isinstance(text, str):
            ids = list(state.tokenizer.encode(text))
        else:  # image parts: ids with soft-token placeholders + pixel values (off the loop)
            ids, images = await asyncio.to_thread(_image_inputs, state, text)
        unused = req.max_tokens if req.max_completion_tokens is not None else None
        if unused is not None and unused > state.max_len:  # bounded as the schema says
            raise APIError(
                400,
                f"max_tokens: {unused} exceeds this model's context of {state.max_len} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        elif req.max_tokens is not None:
            max_tokens = req.max_tokens
        else:  # the rest of the context, capped so one request cannot reserve a huge cache
            max_tokens = max(1, min(DEFAULT_CHAT_MAX_TOKENS, state.max_len - len(ids)))
        grammar = _chat_grammar(state, req, tools)
        k = (req.top_logprobs or 0) if req.logprobs else None
        base = _sampling(
            state,
            req,
            len(ids),
            max_tokens,
            logprobs=k,
            skip_special_tokens=not (use_tools or think),
            thinking_budget=budget,
        )
        engine_reqs = []
        for j in range(req.n):
            params = _with_seed(base, j)
            if grammar is not None:
                params.logits_processors = (state.get_grammars().processor(grammar),)
            engine_reqs.append(EngineRequest(ids, params=params, images=images))
        try:
            handles = _submit_all(state, engine_reqs)
        except QueueFull as e:
            raise APIError(
                429,
                str(e),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        model = state.config.model_name
        if req.stream:
            return _stream_response(
                _stream_chat(state, req, len(ids), handles, model, use_tools, think),
                state,
                handles,
            )
        results = await _results(request, state, handles)
        choices = []
        for j, r in enumerate(results):
            msg, finish = _assistant_message(r, use_tools, think)
            lp = (
                _chat_logprobs(state.tokenizer, r.token_ids, r.logprobs, r.top_logprobs)
                if req.logprobs
                else None
            )
            choices.append(P.ChatChoice(index=j, message=msg, logprobs=lp, finish_reason=finish))
        completion = sum(len(r.token_ids) for r in results)
        usage = P.Usage(
            prompt_tokens=len(ids), completion_tokens=completion, total_tokens=len(ids) + completion
        )
        return P.ChatCompletionResponse(model=model, choices=choices, usage=usage)


# ---------------------------------------------------------------------- chat helpers
def _render_chat(
    state: ServerState,
    messages: list[P.ChatMessage],
    tools: list[dict] | None,
    add_generation_prompt: bool,
    think: bool = False,
) -> Any:
    """The prompt text, or with image parts (a VLM) the `MultimodalPrompt` of
    `render_multimodal`; 400s name the message part (messages.i.content.j)."""
    from geode.chat import ChatFormatError, render, render_multimodal
    from geode.image import ImageError

    vision = getattr(state.engine.model, "vision", None)
    images = False
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type == "image_url":
                    where = f"messages.{i}.content.{j}"
                    if vision is None:
                        raise APIError(
                            400,
                            f"{where}: image sent to a text-only model (this model has no "
                            "vision tower)",
                            param=where,
                            code="unsupported_content",
                        )
                    if part.image_url is None:
                        raise APIError(
                            400, f"{where}.image_url: field required", param=f"{where}.image_url"
                        )
                    images = True
                    continue
                if part.text is None:
                    raise APIError(
                        400,
                        f"messages.{i}.content.{j}.text: field required",
                        param=f"messages.{i}.content.{j}.text",
                    )
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":
            d["role"] = "system"
        if d["role"] != "assistant" and d.get("content") is None:
            raise APIError(
                400, f"messages.{i}.content: field required", param=f"messages.{i}.content"
            )
        out.append(d)
    try:
        if images:
            return render_multimodal(
                out, add_generation_prompt, tools or None, think=think,
                mm_tokens_per_image=vision.mm_tokens_per_image, image_dir=state.config.image_dir,
            )  # fmt: skip
        return render(
            out, add_generation_prompt=add_generation_prompt, tools=tools or None, think=think
        )
    except (ChatFormatError, ImageError) as e:  # VideoError is an ImageError
        m = re.match(r"message (\d+), part (\d+)\S*:? ?(.*)", str(e), re.S)
        if m is None:
            raise APIError(
                400, f"messages: {e}", param="messages", code="invalid_messages"
            ) from None
        where = f"messages.{m.group(1)}.content.{m.group(2)}"
        code = "invalid_image" if isinstance(e, ImageError) else "invalid_messages"
        raise APIError(400, f"{where}: {m.group(3)}", param=where, code=code) from None


def _image_inputs(state: ServerState, prompt: Any) -> tuple[list[int], Any]:
    """Token ids and pixel values (N, 3, S, S) of a rendered chat with images, checked as the
    engine checks them (placeholders, the context): RequestError -> 400."""
    from geode.image import ImageError
    from geode.infer.multimodal import prepare_images

    model, max_len = state.engine.model, state.max_len
    try:
        pixels = prompt.process(model.vision.image_size).pixel_values
        ids = prompt.token_ids(state.tokenizer, image_token_index=model.vision.image_token_index)
        prepare_images(model, state.tokenizer, ids, pixels, max_len)
    except ImageError as e:
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_image") from None
    except (RequestError, ValueError) as e:
        code = "context_length_exceeded" if "too many images" in str(e) else "invalid_messages"
        raise APIError(400, f"messages: {e}", param="messages", code=code) from None
    return ids, pixels


def _chat_grammar(
    state: ServerState, req: P.ChatCompletionRequest, tools: list[dict]
) -> str | None:
    """The llguidance grammar the output must follow, if any (validated: errors are 400s)."""
    from .constrain import GrammarError

    try:
        if isinstance(req.tool_choice, P.NamedToolChoice):
            fns = [t for t in tools if t["name"] == req.tool_choice.function.name]
            grammar, param = state.get_grammars().tool_call(fns), "tool_choice"
        elif req.tool_choice == "required":
            grammar, param = state.get_grammars().tool_call(tools), "tools"
        elif req.response_format is not None and req.response_format.type != "text":
            schema = None
            if req.response_format.type == "json_schema":
                schema = req.response_format.json_schema.schema_
            grammar = state.get_grammars().json_schema(schema)
            param = "response_format"
        else:
            return None
        state.get_grammars().check(grammar)
    except GrammarError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_schema") from None
    return grammar


def _assistant_message(
    r: Result, use_tools: bool, think: bool = False
) -> tuple[P.AssistantMessage, str]:
    """The reply: content, and with tools or thinking the parsed tool calls / reasoning."""
    from geode.chat import parse

    text = r.text or ""
    finish = r.finish_reason
    if not (use_tools or think):
        return P.AssistantMessage(content=text), finish
    parsed = parse(text, in_thinking=think)
    calls = None
    if parsed.tool_calls and use_tools:
        calls = [
            P.ToolCallOut(
                id=c.id or f"call_{P.new_id('x')[2:]}",
                function={"name": c.name, "arguments": json.dumps(c.arguments)},
            )
            for c in parsed.tool_calls
        ]
        finish = "tool_calls"
    return (
        P.AssistantMessage(
            content=parsed.content or (None if calls else ""),
            reasoning_content=parsed.thinking or None,
            tool_calls=calls,
        ),
        finish,
    )


# ---------------------------------------------------------------------- streaming
async def _stream_completion(
    state: ServerState,
    req: P.CompletionRequest,
    prompts: list,
    meta: list,
    handles: list[Handle],
    model: str,
) -> AsyncIterator[str]:
    rid, created = P.new_id("cmpl"), P.now()
    tok = state.tokenizer
    starts = [0] * len(handles)  # where each choice's completion begins in its text
    decoders = [_Offsets(tok, True) for _ in handles]  # for text_offset
    usage = P.Usage(prompt_tokens=sum(len(ids) for ids, _ in prompts))
    for k, (pi, _) in enumerate(meta):
        if req.echo:
            ids, added = prompts[pi]
            prompt_text, _ = _decode_offsets(tok, ids, False, added)
            starts[k] = len(prompt_text)
            yield _sse(
                P.CompletionResponse(
                    id=rid,
                    created=created,
                    model=model,
                    choices=[P.CompletionChoice(index=k, text=prompt_text)],
                )
            )
    async for k, d in _merged(handles):
        usage.completion_tokens += len(d.token_ids)
        lp = None
        offs = [starts[k] + decoders[k].push(t) for t in d.token_ids]
        if req.logprobs is not None:
            lp = _legacy_logprobs(
                tok,
                d.token_ids,
                list(d.logprobs or []),
                list(d.top_logprobs or []) if req.logprobs else None,
                offs,
            )
        if not d.text and not d.finished and lp is None:
            continue
        choice = P.CompletionChoice(
            index=k, text=d.text, logprobs=lp, finish_reason=d.finish_reason if d.finished else None
        )
        if d.finished and d.result is not None:
            choice.stop_reason = d.result.stop_reason
        yield _sse(P.CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
    if req.stream_options and req.stream_options.include_usage:
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        yield _sse(
            P.CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage)
        )


def _chunk(rid: str, created: int, model: str, choices: list[dict], usage: Any = None) -> str:
    obj: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        obj["usage"] = usage.model_dump()
    return f"data: {json.dumps(obj)}\n\n"


async def _stream_chat(
    state: ServerState,
    req: P.ChatCompletionRequest,
    prompt_len: int,
    handles: list[Handle],
    model: str,
    use_tools: bool,
    think: bool = False,
) -> AsyncIterator[str]:
    rid, created = P.new_id("chatcmpl"), P.now()
    tok = state.tokenizer
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    for k in range(len(handles)):
        yield _chunk(
            rid,
            created,
            model,
            [
                {
                    "index": k,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        )
    completion = 0
    async for k, d in _merged(handles):
        completion += len(d.token_ids)
        lp = None
        if req.logprobs:
            lp = _chat_logprobs(tok, d.token_ids, d.logprobs, d.top_logprobs).model_dump(
                exclude_none=True
            )
        if use_tools or think:  # tool calls, thinking: parsed from the whole output at the end
            if d.finished and d.result is not None:
                msg, finish = _assistant_message(d.result, use_tools, think)
                delta: dict[str, Any] = {}
                if msg.reasoning_content:
                    delta["reasoning_content"] = msg.reasoning_content
                if msg.content:
                    delta["content"] = msg.content
                if msg.tool_calls:
                    delta["tool_calls"] = [
                        {"index": i, **c.model_dump()} for i, c in enumerate(msg.tool_calls)
                    ]
                yield _chunk(
                    rid,
                    created,
                    model,
                    [{"index": k, "delta": delta, "logprobs": lp, "finish_reason": finish}],
                )
            continue
        if not d.text and not d.finished and lp is None:
            continue
        choice = {
            "index": k,
            "delta": {"content": d.text} if d.text else {},
            "logprobs": lp,
            "finish_reason": d.finish_reason if d.finished else None,
        }
        yield _chunk(rid, created, model, [choice])
    if include_usage:
        usage = P.Usage(
            prompt_tokens=prompt_len,
            completion_tokens=completion,
            total_tokens=prompt_len + completion,
        )
        yield _chunk(rid, created, model, [], usage)


# ---------------------------------------------------------------------- metrics
def _metrics_text(state: ServerState) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    reqs = [
        (f'{{path="{p}",status="{s}"}}', float(n))
        for (p, s), n in sorted(state.http_requests.items())
    ]
    metric(
        "geode_http_requests_total", "counter", "HTTP requests to the API by path and status", reqs
    )
    metric("geode_model_loaded", "gauge", "1 once the model is loaded", [("", float(state.ready))])
    sched = state.scheduler
    if sched is not None:
        st = sched.stats
        metric(
            "geode_requests_finished_total",
            "counter",
            "Sequences finished",
            [("", st.requests_finished)],
        )
        metric(
            "geode_requests_aborted_total",
            "counter",
            "Sequences cancelled (disconnects)",
            [("", st.requests_aborted)],
        )
        metric(
            "geode_requests_rejected_total",
            "counter",
            "Requests answered 429 (queue full)",
            [("", st.requests_rejected)],
        )
        metric(
            "geode_prompt_tokens_total",
            "counter",
            "Prompt tokens of finished sequences",
            [("", st.prompt_tokens)],
        )
        metric(
            "geode_generation_tokens_total",
            "counter",
            "Generated tokens",
            [("", st.generation_tokens)],
        )
        metric(
            "geode_queue_depth",
            "gauge",
            "Requests waiting for admission",
            [("", sched.queue_depth)],
        )
        metric(
            "geode_running_requests",
            "gauge",
            "Sequences in the running batch",
            [("", sched.num_running)],
        )
        metric(
            "geode_tokens_per_second",
            "gauge",
            "Generated tokens per second (last 10 s)",
            [("", round(sched.tokens_per_second(), 3))],
        )
        metric("geode_engine_steps_total", "counter", "Engine steps", [("", st.steps)])
        metric(
            "geode_kv_cache_bytes",
            "gauge",
            "Bytes of keys and values held by the KV cache (0 while idle)",
            [("", sched.cache_bytes)],
        )
        prefix = sched.prefix_stats()
        metric(
            "geode_prefix_cache_hits_total",
            "counter",
            "Requests whose prompt began with a cached prefix",
            [("", prefix["hits"])],
        )
        metric(
            "geode_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens taken from the prefix cache instead of being computed",
            [("", prefix["hit_tokens"])],
        )
        metric(
            "geode_prefix_cache_bytes",
            "gauge",
            "Bytes of keys and values held by the prefix cache",
            [("", prefix["bytes"])],
        )
        lines.append("# HELP geode_time_to_first_token_seconds Time from arrival to first token")
        lines.append("# TYPE geode_time_to_first_token_seconds histogram")
        for b, c in st.ttft_buckets.items():
            lines.append(f'geode_time_to_first_token_seconds_bucket{{le="{b}"}} {c}')
        lines.append(f'geode_time_to_first_token_seconds_bucket{{le="+Inf"}} {st.ttft_count}')
        lines.append(f"geode_time_to_first_token_seconds_sum {st.ttft_sum:.6f}")
        lines.append(f"geode_time_to_first_token_seconds_count {st.ttft_count}")
    return "\n".join(lines) + "\n"
