"""Fuzzing: random JSON bodies (right keys, wrong/odd values) never produce a 5xx."""

from __future__ import annotations

import json

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
SMALL = st.sampled_from([None, -1, 0, 1, 3, 1.5, "4", 10**9, [], {}])
PROMPT = st.one_of(
    st.text(max_size=20),
    st.lists(st.text(max_size=5), max_size=3),
    st.lists(st.integers(-5, 500), max_size=6),
    st.lists(st.lists(st.integers(-5, 500), max_size=4), max_size=2),
    ANY,
)
COMMON = {
    "model": st.sampled_from(["tiny", "other", None, 3]),
    "n": st.sampled_from([None, -1, 0, 1, 2, 17, "a"]),
    "temperature": ANY,
    "top_p": ANY,
    "top_k": ANY,
    "min_p": ANY,
    "stop": ANY,
    "seed": ANY,
    "presence_penalty": ANY,
    "frequency_penalty": ANY,
    "repetition_penalty": ANY,
    "stream": st.sampled_from([None, False, True, "yes"]),
    "stream_options": ANY,
}
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "x", 1])},
    optional={"content": ANY | st.text(max_size=10), "tool_calls": ANY, "name": ANY},
)


def bodies(extra: dict) -> st.SearchStrategy:
    """Dicts with any subset of the fields; max_tokens always small (bounded runtime)."""
    return st.fixed_dictionaries(
        {"max_tokens": st.sampled_from([-1, 0, 1, 2, "3", 2.5])},
        optional={**COMMON, **extra},
    )


COMPLETION = bodies({"prompt": PROMPT, "logprobs": SMALL, "echo": ANY})
CHAT = bodies(
    {
        "messages": st.lists(MESSAGE, max_size=3) | ANY,
        "logprobs": ANY,
        "top_logprobs": SMALL,
        "tools": ANY,
        "tool_choice": ANY,
        "response_format": ANY
        | st.fixed_dictionaries(
            {"type": st.sampled_from(["json_object", "json_schema", "text", "x"])},
            optional={"json_schema": ANY},
        ),
        "max_completion_tokens": st.sampled_from([0, 1, 2, "x", 10**9]),
    }
)

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _post(server, path: str, body: object) -> None:
    data = json.dumps(body, allow_nan=True)  # NaN/Infinity as Python writes them
    r = httpx.post(
        server.url + path, content=data, timeout=60, headers={"content-type": "application/json"}
    )
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}


@FUZZ
@given(body=COMPLETION)
def test_fuzz_completions(server, body):
    _post(server, "/v1/completions", body)


@FUZZ
@given(body=CHAT)
def test_fuzz_chat(server, body):
    _post(server, "/v1/chat/completions", body)


@FUZZ
@given(body=ANY)
def test_fuzz_any_json(server, body):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        _post(server, path, body)
