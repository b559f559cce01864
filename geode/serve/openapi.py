"""The server's OpenAPI schema, made to say what the server does.

FastAPI derives the request and 200 bodies from the pydantic models; this module adds the rest:
every status code an operation answers with (each with the error body), `text/event-stream`
for streamed completions, the security schemes when API keys are set (and 401 on the routes
they protect), and the bounds that depend on the loaded model, marked `x-geode` in
`protocol.py`: token ids below the tokenizer's piece count, `max_tokens` up to the context, the
served model's name. FastAPI's 422 is dropped: validation errors are 400s here.
"""

from __future__ import annotations

from typing import Any

from fastapi.openapi.utils import get_openapi

from . import protocol as P

PUBLIC_PATHS = ("/health", "/")  # and /static/*: the chat page; everything else needs a key
STATIC_PREFIX = "/static/"

ERRORS = {
    400: "invalid request: the error names the field (`param`); a request valid by this schema "
    "is refused only by a rule no JSON schema can state, with one of these codes: "
    + "; ".join(f"`{code}`: {why}" for code, why in P.RULE_CODES.items()),
    401: "missing or invalid API key",
    404: "not found",
    413: "request body over the server's limit",
    429: "queue full: retry after `Retry-After` seconds",
    500: "internal error",
    503: "the model is loading (`Retry-After`) or failed to load",
}
SSE = {  # each event: `data: <chunk JSON>` (or an error object), the last `data: [DONE]`
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {"data": {"type": "string"}},
            "required": ["data"],
            "description": "one server-sent event: a chunk as JSON text, or `[DONE]` last",
        }
    }
}


def is_public(path: str) -> bool:
    """True for the paths served without an API key: /health and the chat page."""
    return path in PUBLIC_PATHS or path.startswith(STATIC_PREFIX)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` entries: the error body under each of `statuses`."""
    return {s: {"model": P.ErrorResponse, "description": ERRORS[s]} for s in statuses}


def streamed(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route that streams with `stream: true`: SSE next to the JSON body."""
    return {
        200: {"content": SSE, "description": "the result, or its chunks as SSE"},
        **errors(*statuses),
    }


def build(
    app: Any,
    *,
    model_name: str,
    secured: bool,
    vocab: int | None,
    context: int | None,
) -> dict[str, Any]:
    """The OpenAPI document of `app` (vocab / context None while the model loads)."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
    )
    _fill_marks(schema, model_name, vocab, context)
    comps = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        comps.get("schemas", {}).pop(name, None)
    if secured:
        comps["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if "requestBody" in op:
                responses.setdefault("413", _error(ref, 413))
            responses.setdefault("500", _error(ref, 500))
            if secured and not is_public(path):
                op["security"] = [{"bearer": []}, {"apiKey": []}]
                responses.setdefault("401", _error(ref, 401))
    return schema


def _error(ref: dict[str, str], status: int) -> dict[str, Any]:
    return {"description": ERRORS[status], "content": {"application/json": {"schema": ref}}}


def _fill_marks(node: Any, model_name: str, vocab: int | None, context: int | None) -> None:
    """Replace the `x-geode` marks of protocol.py, in place, with the loaded model's values."""
    if isinstance(node, list):
        for x in node:
            _fill_marks(x, model_name, vocab, context)
        return
    if not isinstance(node, dict):
        return
    mark = node.pop("x-geode", None)
    if mark == "model":
        node.pop("anyOf", None)
        node["anyOf"] = [{"type": "string", "enum": [model_name]}, {"type": "null"}]
    elif mark == "token-id" and vocab is not None:
        _set_integer(node, "maximum", vocab - 1)
    elif mark == "context" and context is not None:
        _set_integer(node, "maximum", context)
    for value in node.values():
        _fill_marks(value, model_name, vocab, context)


def _set_integer(node: dict[str, Any], key: str, value: int) -> None:
    """Set `key` on the integer schema `node`, or on its integer branches."""
    branches = node.get("anyOf")
    if branches is None:
        node[key] = value
    for b in branches or ():
        if b.get("type") == "integer":
            b[key] = value
