"""Fuzzing: random JSON bodies never produce a 5xx; schemathesis finds nothing against the schema."""

from __future__ import annotations

import json
import os
import random

import httpx
import pytest
import schemathesis

from tests.serve.helpers import LiveServer

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


# ---------------------------------------------------------------------- schemathesis
# The OpenAPI schema is the truth: schemathesis generates requests from it (valid and invalid,
# boundary values, unsupported methods, missing keys) and checks every response against it
# with all of its checks. The server under test holds a short context so that generation stays
# quick: a valid request runs at most 20 tokens (prompt included).
FUZZ_KEY = "fuzz-key"


@schemathesis.check
def refused_only_by_rules_no_schema_can_state(ctx, response, case) -> bool | None:
    """A request valid by the schema is refused (400) only with a code of protocol.RULE_CODES."""
    from geode.serve.protocol import RULE_CODES

    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    code = response.json()["error"]["code"]
    if code not in RULE_CODES:
        raise AssertionError(f"valid data refused with code {code!r}: {response.text[:300]}")
    return None


@pytest.fixture(scope="module")
def fuzz_server(checkpoint):
    from geode.serve.app import create_app

    app = create_app(
        checkpoint, api_keys=[FUZZ_KEY], max_batch=16, max_queue=10_000, max_seq_len=20,
        model_name="tiny",
    )  # fmt: skip
    live = LiveServer(app).start()
    yield live
    live.stop()


CHECKS_EXPECTED = {  # checks that must have run on some response (all enabled ones run)
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "positive_data_acceptance",
    "negative_data_rejection",
    "ignored_auth",
    "unsupported_method",
    "refused_only_by_rules_no_schema_can_state",
}


def test_schemathesis_finds_nothing(fuzz_server):
    """Every check of schemathesis, all phases but the stateful one (no links), bounded examples."""
    from schemathesis.engine import Status, events, from_schema

    auth = {"Authorization": f"Bearer {FUZZ_KEY}"}
    # a fresh seed each run (more of the space over time); GEODE_FUZZ_SEED replays a failure
    seed = int(os.environ.get("GEODE_FUZZ_SEED", random.randrange(2**31)))
    config = schemathesis.Config.from_dict(
        {
            "seed": seed,
            "headers": auth,
            "request-timeout": 120,  # generous: a loaded CI machine
            "generation": {"max-examples": 8, "mode": "all"},
            "checks": {  # a 400 for valid data is allowed only with a rule code: the check above
                "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404"]},
            },
            "phases": {"stateful": {"enabled": False}},
        }
    )
    schema = schemathesis.openapi.from_url(
        fuzz_server.url + "/openapi.json", headers=auth, config=config
    )
    failures, errors, ran, cases = [], [], set(), 0
    for event in from_schema(schema).execute():
        if isinstance(event, (events.ScenarioFinished, events.FuzzScenarioFinished)):
            cases += len(event.recorder.cases)
            for nodes in event.recorder.checks.values():
                for node in nodes:
                    ran.add(node.name)
                    if node.status == Status.FAILURE:
                        f = node.failure_info
                        failures.append(
                            f"{event.recorder.label} {node.name}: {f.failure.title}: "
                            f"{f.failure.message[:300]}\n  {f.code_sample[:600]}"
                        )
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            errors.append(f"{getattr(event, 'label', '')}: {event.info.format()[:3000]}")
    replay = f"(replay: GEODE_FUZZ_SEED={seed})"
    assert not errors, "\n".join([replay, *errors])
    assert not failures, "\n".join([replay, *sorted(set(failures))[:20]])
    assert CHECKS_EXPECTED <= ran, CHECKS_EXPECTED - ran
    assert cases > 100
