"""Pydantic schemas of the OpenAI-compatible API (requests, responses, errors).

Request models ignore unknown fields (clients such as lm-evaluation-harness send extras) and
coerce nothing (strict: `"3"` is not an integer, `false` is not a token id); fields geode does
not implement are listed in docs/serving.md. Their JSON schemas say what the handlers accept:
rules between fields are written into the schema (`anyOf`), and the bounds that depend on the
loaded model are marked `x-geode` and filled in by `openapi.py` (vocabulary, context, name).
Rules no JSON schema can state are 400s with a code of `RULE_CODES`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

# 400 codes of rules a JSON schema cannot state: a request valid by the schema may get these.
RULE_CODES = {
    "context_length_exceeded": "prompt tokens + max_tokens exceed the context",
    "invalid_messages": "the chat template's rules (turn order, tool-call arguments as objects)",
    "invalid_schema": "a tool or response_format JSON schema the grammar compiler rejects",
    "tool_not_found": "tool_choice names a function that is not in tools, or needs tools",
    "unsupported_value": "a combination geode does not implement (best_of != n, "
    "response_format with forced tools)",
}


def rule_error(code: str, message: str) -> PydanticCustomError:
    """A validation error for a rule between fields (`message` starts with the field name)."""
    return PydanticCustomError("geode_rule", message, {"code": code})


def _schema(**extra: Any) -> Any:
    """A `json_schema_extra` that adds `extra` to a model's schema, `properties` entry by entry."""

    def patch(schema: dict[str, Any]) -> None:
        for key, value in extra.items():
            if key == "properties":
                schema.setdefault("properties", {}).update(value)
            else:
                schema[key] = value

    return patch


def _integral(x: Any) -> Any:
    """JSON Schema's integers include 2.0: an integral float becomes an int (strings and bools
    stay as they are, and strict validation refuses them)."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _int(**bounds: int) -> Any:
    """An integer field type as JSON Schema counts integers (2.0 is one), bounded by `bounds`
    (ge, le, gt; inside the type, so that the schema says `minimum` / `maximum`)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Int = _int()
# Marks filled in from the loaded model by openapi.py (`x-geode`).
# (Token ids are range-checked by the handlers, whose errors name the list: "prompt", "tokens".)
TokenId = Annotated[Int, WithJsonSchema({"type": "integer", "minimum": 0, "x-geode": "token-id"})]
ModelName = Annotated[str | None, Field(json_schema_extra={"x-geode": "model"})]


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


def new_id(prefix: str) -> str:
    """A unique response id such as `cmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix time in seconds (the `created` field)."""
    return int(time.time())


# ---------------------------------------------------------------------- errors
class ErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str  # always a string (OpenAI's codes: "invalid_api_key", "context_length_exceeded")


class ErrorResponse(BaseModel):
    """`{"error": {...}}`."""

    error: ErrorBody


# ---------------------------------------------------------------------- shared sampling fields
class StreamOptions(_Req):
    """`stream_options`: `include_usage` adds a final chunk with usage counts."""

    include_usage: bool = False


_STOP_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16},
        {"type": "null"},
    ]
}


class SamplingFields(_Req):
    """Sampling fields shared by completions and chat completions (OpenAI + vLLM names)."""

    model: ModelName = None
    max_tokens: _int(ge=0) | None = Field(default=None, json_schema_extra={"x-geode": "context"})
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: _int(ge=-1, le=2**31 - 1) | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: _int(ge=1, le=16) = 1
    stop: Annotated[str | list[str] | None, WithJsonSchema(_STOP_SCHEMA)] = None  # checked below
    stop_token_ids: list[TokenId] | None = None
    # |seed| < 2**53: every bound exact as a JSON number (a float) is, on every client
    seed: _int(ge=-(2**53 - 1), le=2**53 - 1) | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: _int(ge=0) = 0
    ignore_eos: bool = False
    # thinking tokens at most, then <end_of_thinking> is forced (default: --thinking-budget)
    thinking_budget: _int(ge=0) | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check_stop(self) -> SamplingFields:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16:
            raise ValueError("stop: at most 16 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop: stop strings must be non-empty")
        return self


# ---------------------------------------------------------------------- completions
_NOT_EMPTY = Field(min_length=1)


def _empty_or_null(kind: str, size: str) -> dict[str, Any]:
    """Schema of a field geode does not implement: absent, null or empty."""
    return {"anyOf": [{"type": kind, size: 0}, {"type": "null"}]}


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    model_config = ConfigDict(
        json_schema_extra=_schema(
            **{
                "anyOf": [  # max_tokens 0 (scoring only) needs echo and no streaming
                    {"properties": {"max_tokens": {"type": ["integer", "null"], "minimum": 1}}},
                    {
                        "properties": {"echo": {"const": True}, "stream": {"const": False}},
                        "required": ["echo"],
                    },
                ],
            }
        )
    )

    prompt: (
        str
        | Annotated[list[str], _NOT_EMPTY]
        | Annotated[list[TokenId], _NOT_EMPTY]
        | Annotated[list[Annotated[list[TokenId], _NOT_EMPTY]], _NOT_EMPTY]
    )
    logprobs: _int(ge=0, le=20) | None = None
    echo: bool = False
    suffix: Annotated[str | None, WithJsonSchema(_empty_or_null("string", "maxLength"))] = None
    best_of: _int(ge=1, le=16) | None = None
    logit_bias: Annotated[
        dict[str, float] | None, WithJsonSchema(_empty_or_null("object", "maxProperties"))
    ] = None

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise rule_error("unsupported_value", "best_of: only best_of == n is supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo=true")
        if self.max_tokens == 0 and self.stream:
            raise ValueError("max_tokens: must be >= 1 when streaming")
        return self


class LegacyLogprobs(_Out):
    """The completions API's logprobs object."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Out):
    """One completion."""

    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Usage(_Out):
    """Token counts."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(_Out):
    """A completions response (or, with `stream`, one chunk of it)."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------- chat
class ImageURL(_Req):
    """An image reference (accepted by the schema, rejected until the model is multimodal)."""

    url: str
    detail: str | None = None


class ContentPart(_Req):
    """A content part: `{"type": "text", "text": ...}` or `{"type": "image_url", ...}`.

    The schema lists text parts only: an image part is answered with a 400 naming it (this model
    has no vision tower) and a text part needs its text.
    """

    model_config = ConfigDict(
        json_schema_extra=_schema(
            **{
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                "required": ["type", "text"],
            }
        )
    )

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(_Req):
    """A function call in an assistant message (arguments as a JSON string)."""

    name: str
    arguments: str = "{}"


class ToolCallIn(_Req):
    """A tool call in an assistant message."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Req):
    """A message: system, user, assistant (optionally with tool calls) or tool result."""

    model_config = ConfigDict(
        json_schema_extra=_schema(
            **{
                "anyOf": [  # content may be left out of assistant messages only
                    {"properties": {"role": {"const": "assistant"}}},
                    {
                        "properties": {"content": {"type": ["string", "array"]}},
                        "required": ["content"],
                    },
                ]
            }
        )
    )

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Req):
    """A function declaration."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Req):
    """A tool: only `function` tools exist."""

    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Req):
    """`{"name": ...}` of a named tool choice."""

    name: str


class NamedToolChoice(_Req):
    """`{"type": "function", "function": {"name": ...}}`: call this tool."""

    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Req):
    """`response_format.json_schema`."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Req):
    """`response_format`: text, json_object or json_schema (the last two are enforced)."""

    model_config = ConfigDict(
        json_schema_extra=_schema(
            anyOf=[  # json_schema needs its json_schema
                {"properties": {"type": {"enum": ["text", "json_object"]}}},
                {"properties": {"json_schema": {"type": "object"}}, "required": ["json_schema"]},
            ]
        )
    )

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema: required when type is json_schema")
        return self


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    model_config = ConfigDict(
        json_schema_extra=_schema(
            **{
                "anyOf": [  # top_logprobs > 0 needs logprobs=true
                    {"properties": {"top_logprobs": {"enum": [None, 0]}}},
                    {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
                ],
                "properties": {
                    "max_tokens": {"type": ["integer", "null"], "minimum": 1, "x-geode": "context"}
                },
            }
        )
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: _int(ge=1) | None = Field(
        default=None, json_schema_extra={"x-geode": "context"}
    )
    logprobs: bool = False
    top_logprobs: _int(ge=0, le=20) | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logit_bias: Annotated[
        dict[str, float] | None, WithJsonSchema(_empty_or_null("object", "maxProperties"))
    ] = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        if self.max_tokens == 0:
            raise ValueError("max_tokens: must be >= 1 for chat completions")
        names = [t.function.name for t in self.tools or []]
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise rule_error(
                    "tool_not_found",
                    f"tool_choice: function {self.tool_choice.function.name!r} is not in tools",
                )
        elif self.tool_choice == "required" and not names:
            raise rule_error("tool_not_found", "tool_choice: 'required' needs tools")
        if self.tools and self.response_format and self.response_format.type != "text":
            if self.tool_choice not in (None, "none"):
                raise rule_error(
                    "unsupported_value", "response_format: cannot be combined with tools"
                )
        return self


class TopLogprob(_Out):
    """An alternative token and its log-probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """The chosen token, its log-probability and the top alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Out):
    """The chat API's logprobs object."""

    content: list[TokenLogprob] | None = None


class ToolCallOut(_Out):
    """A parsed tool call."""

    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]


class AssistantMessage(_Out):
    """The generated message."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Out):
    """One chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Out):
    """A chat completions response."""

    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


# ---------------------------------------------------------------------- models, tokenizer
class ModelCard(_Out):
    """An entry of `GET /v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "geode"
    max_model_len: int | None = None


class ModelList(_Out):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Req):
    """`POST /tokenize`: a prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(
        json_schema_extra=_schema(
            **{
                "anyOf": [  # exactly one of prompt or messages
                    {
                        "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}},
                        "required": ["prompt"],
                    },
                    {
                        "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}},
                        "required": ["messages"],
                    },
                ]
            }
        )
    )

    model: ModelName = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        return self


class TokenizeResponse(_Out):
    """Token ids of a prompt."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Req):
    """`POST /detokenize`."""

    model: ModelName = None
    tokens: list[TokenId]


class DetokenizeResponse(_Out):
    """Text of token ids."""

    prompt: str


class HealthResponse(_Out):
    """`GET /health`: 200 `ok` once the model is loaded, 503 `loading` or `error` before."""

    status: Literal["ok", "loading", "error"]
    model: str | None = None
    message: str | None = None


class TokenizerInfo(_Out):
    """`GET /tokenizer_info`: what a client needs to tokenize locally."""

    tokenizer_class: str
    model: str
    vocab_size: int
    model_max_length: int
    bos_token: str
    bos_token_id: int
    eos_token: str
    eos_token_id: int
    pad_token: str
    pad_token_id: int
    add_bos_token: bool
    special_tokens: dict[str, int]
    eos_token_ids: list[int]
