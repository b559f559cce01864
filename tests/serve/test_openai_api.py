"""The server through the official openai client: completions, chat, streaming, tools, JSON."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from geode.infer import Engine, Request


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_text_prompt(client):
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=5, temperature=0)
    assert len(r.choices) == 1 and r.object == "text_completion"
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 3  # <bos> hello ▁world
    assert 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_matches_engine(client, server):
    """Greedy output through HTTP equals the engine's own output for the same prompt."""
    state = server.state
    r = client.completions.create(model="tiny", prompt=[2, 50, 60], max_tokens=8, temperature=0)
    ref = Engine(state.engine.model, state.tokenizer).generate(
        Request([2, 50, 60], max_new_tokens=8, temperature=0)
    )[0]
    assert r.choices[0].text == ref.text


def test_completion_prompt_forms(client):
    """A list of strings, a list of ids and a list of id lists each give one choice per prompt."""
    r = client.completions.create(model="tiny", prompt=["a", "b c"], max_tokens=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    r = client.completions.create(model="tiny", prompt=[2, 5, 9], max_tokens=2, temperature=0)
    assert len(r.choices) == 1
    r = client.completions.create(model="tiny", prompt=[[2, 5], [2, 7, 8]], max_tokens=2)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 5


def test_completion_n_seed_and_stop(client):
    kw = dict(model="tiny", prompt="the", max_tokens=6, temperature=1.0, seed=7)
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert len(a.choices) == 3
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    first = a.choices[0].text
    if len(first) > 2:
        r = client.completions.create(stop=[first[1:3]], **kw)
        assert first[1:3] not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def test_completion_logprobs(client):
    r = client.completions.create(
        model="tiny", prompt="hello", max_tokens=4, logprobs=3, temperature=0
    )
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3
        assert chosen <= 0 and abs(chosen - max(top.values())) < 1e-4  # greedy = the best


def test_completion_echo_prompt_logprobs(client, server):
    """echo + logprobs: every prompt token scored (first None), as the engine scores them."""
    ids = [2, 40, 41, 42, 43]
    r = client.completions.create(
        model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    ref = Engine(server.state.engine.model, server.state.tokenizer).generate(
        Request(ids, max_new_tokens=1, temperature=0, prompt_logprobs=1)
    )[0]
    for got, want in zip(lp.token_logprobs[1 : len(ids)], ref.prompt_logprobs[1:], strict=True):
        assert abs(got - want) < 1e-4
    # max_tokens=0 with echo: scoring only (lm-evaluation-harness loglikelihood style)
    r0 = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert len(r0.choices[0].logprobs.token_logprobs) == len(ids)
    assert r0.usage.completion_tokens == 0


def test_completion_stream_with_usage(client):
    stream = client.completions.create(
        model="tiny",
        prompt="hello",
        max_tokens=6,
        stream=True,
        temperature=0,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
    full = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0)
    assert text == full.choices[0].text
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_chat_basic_and_logprobs(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert isinstance(c.message.content, str)
    assert len(c.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)


def test_chat_stream(client):
    kw = dict(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    stream = client.chat.completions.create(stream=True, **kw)
    chunks = list(stream)
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert text == client.chat.completions.create(**kw).choices[0].message.content


def test_chat_stream_raw_sse_done(server):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_chat_n_and_tool_history(client):
    messages = [
        {"role": "user", "content": "weather in paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = client.chat.completions.create(model="tiny", messages=messages, n=2, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "add two digits",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 9},
                    "b": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["paris", "rome"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "weather"}}]
)
def test_chat_forced_tool_call(client, choice):
    """tool_choice required/named: constrained decoding makes even a random model call a tool."""
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "add 2 and 3"}],
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=120,
        seed=1,
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    (call,) = c.message.tool_calls
    if isinstance(choice, dict):
        assert call.function.name == "weather"
    spec = next(t["function"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])


def test_chat_forced_tool_call_streamed(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "weather?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "weather"}},
        max_tokens=80,
        stream=True,
    )
    calls = [tc for ch in stream for c in ch.choices for tc in (c.delta.tool_calls or [])]
    assert calls and calls[0].function.name == "weather"
    assert json.loads(calls[0].function.arguments)["city"] in ("paris", "rome")


def test_chat_tools_auto_and_none(client):
    for choice in ("auto", "none"):
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=5,
        )
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_chat_json_schema(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"enum": ["fox", "dog"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "count", "ok"],
        "additionalProperties": False,
    }
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "json please"}],
            max_tokens=100,
            seed=seed,
            temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_chat_json_object(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "json"}],
        max_tokens=200,
        seed=3,
        response_format={"type": "json_object"},
        temperature=0.5,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # a random model may write a long object; what it wrote is still a JSON prefix
        assert r.choices[0].message.content.startswith("{")


def test_concurrent_greedy_equals_sequential(client):
    """16 concurrent requests (continuous batching) give the single-request greedy outputs."""
    prompts = [f"the {w}" for w in ["fox", "dog", "cat", "json", "name", "world", "lazy", "x"]] * 2
    lengths = [3 + (i % 5) * 3 for i in range(len(prompts))]

    def one(i: int) -> str:
        return (
            client.completions.create(
                model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0
            )
            .choices[0]
            .text
        )

    sequential = [one(i) for i in range(len(prompts))]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(one, range(len(prompts))))
    assert concurrent == sequential


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"


def test_64_concurrent_streams_equal_single_requests(server):
    """64 concurrent streaming clients all complete, with the single-request greedy outputs;
    afterwards the engine and scheduler hold no sequence, the KV cache is freed (back to its
    size after a warm-up request: none) and the process's RSS is back near that baseline."""
    import asyncio

    from tests.serve.helpers import rss_mb, wait_until

    prompts = [f"the {w} {i}" for i, w in enumerate(["fox", "dog", "json", "name"] * 16)]
    body = {"max_tokens": 6, "temperature": 0, "stream": True}
    sched = server.state.scheduler

    async def stream_one(c: httpx.AsyncClient, prompt: str) -> str:
        text = ""
        async with c.stream(
            "POST", server.url + "/v1/completions", json={**body, "prompt": prompt}
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def run(ps: list[str]) -> tuple[list[str], int]:
        peak = 0

        async def watch() -> None:  # the cache's largest size while the clients run
            nonlocal peak
            while True:
                peak = max(peak, sched.cache_bytes)
                await asyncio.sleep(0.005)

        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            watcher = asyncio.create_task(watch())
            try:
                texts = await asyncio.wait_for(
                    asyncio.gather(*(stream_one(c, p) for p in ps)), timeout=150
                )
            finally:
                watcher.cancel()
        return texts, peak

    def idle() -> bool:
        return (
            sched.queue_depth == 0
            and sched.num_running == 0
            and not server.state.engine.has_unfinished()
            and sched.cache_bytes == 0
        )

    asyncio.run(run(prompts[:1]))  # warm-up
    assert wait_until(idle)
    base_rss = rss_mb()

    concurrent, peak_cache = asyncio.run(run(prompts))
    assert wait_until(idle), (sched.num_running, sched.cache_bytes)
    rss = rss_mb()
    print(f"RSS {base_rss:.1f} -> {rss:.1f} MiB; KV cache peak {peak_cache} B, after 0 B")
    assert peak_cache > 0  # the cache did grow during the load, and was freed after it
    # measured on 2 CPU cores: in the full suite 407.6 -> 408.6 MiB; alone 338 -> 342 MiB after
    # the first round, then flat (+0.5 MiB over 7 more rounds). The bound leaves room for
    # allocator noise; a leak of 0.5 MiB or more per request (64 of them) would exceed it.
    assert rss - base_rss < 32, f"RSS {base_rss:.1f} -> {rss:.1f} MiB after 64 clients"

    engine = Engine(server.state.engine.model, server.state.tokenizer)  # one at a time
    single = [engine.generate(Request(p, max_new_tokens=6, temperature=0))[0].text for p in prompts]
    assert concurrent == single
    assert len(concurrent) == 64
