"""Server behaviour: error shapes, auth, 429, disconnects, health, metrics, the chat page, CLI."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest

from geode.serve import app as app_module
from geode.serve.app import create_app
from tests.serve.helpers import LiveServer, wait_until

USER = [{"role": "user", "content": "hi"}]
BAD_INPUTS = [
    # (path, body, param named in the error)
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": "a"}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": "abc"}, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, "model"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"prompt": "x" * 3000, "max_tokens": 1}, "max_tokens"),
    ("/v1/completions", {"temperature": 0}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": USER, "temperature": 9}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": USER, "model": "other"}, "model"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 5000}, "max_tokens"),
    (
        "/v1/chat/completions",
        {
            "messages": USER,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}},
            },
        },
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ]
        },
        "messages.0.content.1",
    ),
    ("/tokenize", {"prompt": 3}, "prompt"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
]


def check_error(r: httpx.Response, status: int) -> dict:
    """The response is an OpenAI-shaped error with this status."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize(("path", "body", "param"), BAD_INPUTS)
def test_bad_input_is_400_naming_the_field(server, path, body, param):
    r = httpx.post(server.url + path, json=body, timeout=30)
    err = check_error(r, 400)
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"", b"\xff\xfe"])
def test_malformed_body_is_400(server, raw):
    r = httpx.post(
        server.url + "/v1/completions",
        content=raw,
        timeout=30,
        headers={"content-type": "application/json"},
    )
    check_error(r, 400)
    assert httpx.get(server.url + "/health").status_code == 200  # still alive


def test_unknown_route_is_openai_shaped_404(server):
    check_error(httpx.get(server.url + "/v1/nothing"), 404)


def test_tokenize_detokenize_info(server):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert r["tokens"][0] == 2 and r["count"] == len(r["tokens"])
    text = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"][1:]}).json()
    assert text["prompt"] == "hello world"
    chat = httpx.post(server.url + "/tokenize", json={"messages": USER}).json()
    assert chat["count"] > 3
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["vocab_size"] == 420 and info["eos_token_id"] == 1
    assert info["model_max_length"] == 1024


def test_metrics_prometheus_text(server, client):
    client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    for path in ("/v1/no-such-route-123", "/v1/models/no-such-model-456"):
        assert httpx.get(server.url + path).status_code == 404
    text = httpx.get(server.url + "/metrics").text
    # label values are routes, never raw URLs (those would grow the counters without bound)
    assert "no-such" not in text
    assert re.search(r'^geode_http_requests_total\{path="/v1/other",status="404"\} ', text, re.M)
    assert 'path="/v1/models/{model}",status="404"' in text
    sample = re.compile(
        r'^[a-zA-Z_:][\w:]*(\{[a-zA-Z_]\w*="[^"]*"(,[a-zA-Z_]\w*="[^"]*")*\})? '
        r"[-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|\+Inf|NaN)$"
    )
    names = set()
    for line in text.strip().splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \w+ ", line), line
            continue
        assert sample.match(line), line
        names.add(line.split("{")[0].split(" ")[0])
    for want in (
        "geode_http_requests_total",
        "geode_generation_tokens_total",
        "geode_queue_depth",
        "geode_time_to_first_token_seconds_count",
        "geode_tokens_per_second",
        "geode_kv_cache_bytes",
    ):
        assert want in names
    count = re.search(r"^geode_time_to_first_token_seconds_count (\d+)", text, re.M)
    assert int(count.group(1)) >= 1


def test_chat_page_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "<title>geode chat</title>" in r.text
    assert "cdn" not in r.text.lower() and "https://" not in r.text
    js = httpx.get(server.url + "/static/app.js")
    assert js.status_code == 200 and "/v1/chat/completions" in js.text
    assert httpx.get(server.url + "/static/style.css").status_code == 200
    assert httpx.get(server.url + "/static/../app.py").status_code == 404


def _idle(server: LiveServer) -> bool:
    st = server.state
    return not st.engine.has_unfinished() and st.scheduler.num_running == 0


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Engine steps of >= 5 ms for one test: a long request outlasts the client for sure (the
    engine alone decodes the tiny model's 900 tokens in about half a second)."""
    engine = server.state.engine
    step = engine.step

    def slow_step():
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)


def test_stream_disconnect_cancels_sequence(server, slow_steps):
    """Closing a streaming response aborts its sequence: the engine has nothing left after."""
    assert wait_until(lambda: _idle(server))
    aborted = server.state.scheduler.stats.requests_aborted
    body = {"prompt": "the", "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(ln.startswith("data: ") for ln in got)
        assert server.state.engine.has_unfinished()
    assert wait_until(lambda: _idle(server)), "sequence still running after disconnect"
    assert server.state.scheduler.stats.requests_aborted > aborted


def test_nonstream_disconnect_cancels_sequence(server, slow_steps):
    assert wait_until(lambda: _idle(server))
    body = {"prompt": "the", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    assert wait_until(lambda: _idle(server)), "sequence still running after disconnect"


def test_api_keys(checkpoint):
    live = LiveServer(create_app(checkpoint, api_keys=["k1", "k2"], model_name="tiny")).start()
    try:
        base = live.url
        assert httpx.get(base + "/health").status_code == 200  # open
        err = check_error(httpx.get(base + "/v1/models"), 401)
        assert err["type"] == "authentication_error"
        check_error(httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        check_error(httpx.post(base + "/v1/completions", json={"prompt": "x"}), 401)
        ok = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200
        import openai

        c = openai.OpenAI(base_url=base + "/v1", api_key="k1", max_retries=0)
        assert c.completions.create(model="tiny", prompt="a", max_tokens=2).choices
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    finally:
        live.stop()


def test_queue_full_is_429_with_retry_after(checkpoint):
    live = LiveServer(create_app(checkpoint, max_batch=1, max_queue=1)).start()
    try:
        sched = live.state.scheduler
        body = {"prompt": "the", "max_tokens": 900, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as r1:
            lines1 = r1.iter_lines()  # keep it: dropping the iterator closes the stream
            next(lines1)  # running: the batch (1 row) is full
            with httpx.Client(timeout=30) as c2:
                req2 = c2.build_request("POST", live.url + "/v1/completions", json=body)
                r2 = c2.send(req2, stream=True)  # waits in the queue
                try:
                    assert wait_until(lambda: sched.queue_depth == 1)
                    r3 = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
                    err = check_error(r3, 429)
                    assert err["type"] == "rate_limit_error"
                    assert int(r3.headers["Retry-After"]) >= 1
                finally:
                    r2.close()
        assert wait_until(lambda: _idle(live))
        assert sched.queue_depth == 0
    finally:
        live.stop()


def test_health_503_while_loading_then_200(checkpoint, monkeypatch):
    gate = threading.Event()
    real_load = app_module._load

    def slow_load(*args, **kwargs):
        gate.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(app_module, "_load", slow_load)
    app = create_app(checkpoint)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                r = await c.get("/health")
                assert r.status_code == 503 and r.json()["status"] == "loading"
                check_error(await c.post("/v1/completions", json={"prompt": "x"}), 503)
                gate.set()
                await app.state.load_task
                assert (await c.get("/health")).status_code == 200
                r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert r.status_code == 200

    asyncio.run(run())


def test_load_failure_reported_by_health(tmp_path):
    app = create_app(tmp_path / "missing")

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await app.state.load_task
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                r = await c.get("/health")
                assert r.status_code == 503 and r.json()["status"] == "error"

    asyncio.run(run())


def test_cli_help():
    from geode.cli import build_parser

    parser = build_parser()
    for verb in ("serve", "chat"):
        sub = parser._subparsers._group_actions[0].choices[verb]
        text = sub.format_help()
        assert "example:" in text
    serve = parser.parse_args(["serve", "m", "--api-key", "a", "--api-key", "b", "--port", "9"])
    assert serve.api_key == ["a", "b"] and serve.port == 9 and serve.host == "127.0.0.1"


def test_cli_no_pack_weights_reaches_the_engine(tmp_path, monkeypatch):
    """`geode serve --no-pack-weights` builds the engine with pack_weights=False."""
    import uvicorn

    import geode.serve.app as app_mod
    from geode.cli import build_parser
    from geode.cli.serve import run_serve

    seen = []
    monkeypatch.setattr(app_mod, "create_app", lambda *a, **kw: seen.append(kw) or "app")
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **kw: None)
    parser = build_parser()
    for flags, expect in (([], None), (["--no-pack-weights"], {"pack_weights": False})):
        assert run_serve(parser.parse_args(["serve", str(tmp_path), *flags])) == 0
        assert seen[-1]["engine_kwargs"] == expect
