"""Forced tool calls with ordinary (open) OpenAI tool schemas always end as parseable calls."""

from __future__ import annotations

import json

from geode.serve.constrain import TOOL_STRING_MAX, close_schema


def test_close_schema():
    open_schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {}}}},
            "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "free": {"type": "object", "additionalProperties": True},
        },
    }
    closed = close_schema(open_schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["city"]["maxLength"] == TOOL_STRING_MAX
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert "maxLength" not in closed["properties"]["code"]  # the schema's own bound
    assert closed["properties"]["free"]["additionalProperties"] is True  # said otherwise
    assert "additionalProperties" not in open_schema  # a copy


def test_forced_tool_call_with_an_open_schema_ends_as_a_tool_call(client):
    """An ordinary OpenAI tools schema (no additionalProperties: false, unbounded strings) on a
    random model at temperature 1: the call ends, parses, and follows the schema."""
    params = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    for seed in range(4):
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "weather in paris?"}],
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=1.0,
            seed=seed,
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", (seed, c)
        (call,) = c.message.tool_calls
        args = json.loads(call.function.arguments)
        assert isinstance(args["city"], str) and set(args) <= {"city", "unit"}
        assert all(len(v) <= TOOL_STRING_MAX for v in args.values())
