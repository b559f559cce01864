"""Pydantic schemas of the OpenAI-compatible API (requests, responses, errors).

Request models ignore unknown fields (clients such as lm-evaluation-harness send extras);
fields geode does not implement are listed in docs/serving.md. Value checks that need the
model (context length, vocabulary) happen in `app.py`; range checks happen here so that a bad
value is a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


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
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """`{"error": {...}}`."""

    error: ErrorBody


# ---------------------------------------------------------------------- shared sampling fields
class StreamOptions(_Req):
    """`stream_options`: `include_usage` adds a final chunk with usage counts."""

    include_usage: bool = False


class SamplingFields(_Req):
    """Sampling fields shared by completions and chat completions (OpenAI + vLLM names)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
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
class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        p = self.prompt
        if isinstance(p, list) and not p:
            raise ValueError("prompt: must not be empty")
        if isinstance(p, list) and any(isinstance(x, list) and not x for x in p):
            raise ValueError("prompt: token-id lists must not be empty")
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
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
    """A content part: `{"type": "text", "text": ...}` or `{"type": "image_url", ...}`."""

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

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema: required when type is json_schema")
        return self


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None

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
                raise ValueError(
                    f"tool_choice: function {self.tool_choice.function.name!r} is not in tools"
                )
        elif self.tool_choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs tools")
        if self.tools and self.response_format and self.response_format.type != "text":
            if self.tool_choice not in (None, "none"):
                raise ValueError("response_format: cannot be combined with tools")
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

    model: str | None = None
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

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(_Out):
    """Text of token ids."""

    prompt: str
