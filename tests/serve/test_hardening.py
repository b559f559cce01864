"""Server hardening: keys on every route, body limit, 405 + Allow, one `code` type, correct
`text_offset`, and `geode serve` exiting on a model that fails to load."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.routing import APIRoute
from starlette.routing import Route

from geode.serve.app import create_app
from geode.serve.openapi import is_public
from tests.serve.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _serve(app, run) -> None:
    """Run `run(client)` against `app` with its lifespan, once the model is loaded."""

    async def main() -> None:
        async with app.router.lifespan_context(app):
            await app.state.load_task
            assert app.state.geode.ready, app.state.geode.load_error
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                await run(c)

    asyncio.run(main())


def _routes(app) -> list[tuple[str, str]]:
    """(method, path with parameters filled) of every route the app has, docs included."""
    out = []
    for r in app.routes:
        if isinstance(r, (APIRoute, Route)) and r.methods:
            path = r.path.replace("{name}", "x")
            out += [(m, path) for m in sorted(r.methods) if m != "HEAD"]
    return out


def test_api_key_on_every_route_but_health_and_page(checkpoint):
    app = create_app(checkpoint, api_keys=["k1"], model_name="tiny")
    routes = _routes(app)
    paths = {p for _, p in routes}
    assert {"/v1/completions", "/tokenize", "/metrics", "/openapi.json", "/health"} <= paths

    async def run(c: httpx.AsyncClient) -> None:
        for method, path in routes:
            r = await c.request(method, path)
            if is_public(path):
                assert r.status_code != 401, (method, path)
                continue
            assert r.status_code == 401, (method, path, r.status_code)
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
            for headers in ({"Authorization": "Bearer k1"}, {"X-API-Key": "k1"}):
                ok = await c.request(method, path, headers=headers)
                assert ok.status_code != 401, (method, path)
        assert (await c.get("/static/app.js")).status_code == 200  # the page's script: open
        # the schema declares the keys, and 401 on exactly the protected operations
        schema = (await c.get("/openapi.json", headers={"X-API-Key": "k1"})).json()
        assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        for path, ops in schema["paths"].items():
            for op in ops.values():
                assert ("security" in op) == (not is_public(path)), path
                assert ("401" in op["responses"]) == (not is_public(path)), path

    _serve(app, run)


def test_body_limit_413(checkpoint):
    app = create_app(checkpoint, max_body_bytes=4096, model_name="tiny")

    async def chunks():
        for _ in range(10):
            yield b" " * 1000

    async def run(c: httpx.AsyncClient) -> None:
        big = {"prompt": "x" * 5000, "max_tokens": 1}
        for r in (
            await c.post("/tokenize", json=big),  # Content-Length over the limit
            await c.post(
                "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
            ),  # chunked: counted while read
        ):
            assert r.status_code == 413, r.text
            err = r.json()["error"]
            assert err["code"] == "request_too_large" and "4096 bytes" in err["message"]
        ok = await c.post("/tokenize", json={"prompt": "x" * 1000})
        assert ok.status_code == 200

    _serve(app, run)


def test_405_has_allow_and_every_code_is_a_string(server):
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    codes = [r.json()["error"]["code"]]
    for path, body in (
        ("/v1/completions", {"prompt": "x", "temperature": -1}),
        ("/v1/completions", {"prompt": "x", "model": "nope"}),
        ("/v1/models/nope", None),
        ("/v1/nothing", None),
        ("/detokenize", {"tokens": [False]}),  # a bool is not a token id
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}),
    ):
        r = httpx.post(server.url + path, json=body) if body else httpx.get(server.url + path)
        assert r.status_code in (400, 404), (path, r.text)
        codes.append(r.json()["error"]["code"])
    assert all(isinstance(c, str) and c for c in codes), codes
    assert codes[-1] == "invalid_messages"


def _check_offsets(tok, choice: dict, skip: set[int] = frozenset()) -> None:
    """text_offset[i] is where token i's text starts in the returned text, for every token."""
    text, lp = choice["text"], choice["logprobs"]
    offs, toks = lp["text_offset"], lp["tokens"]
    assert len(offs) == len(toks) and offs == sorted(offs)
    assert all(0 <= o <= len(text) for o in offs)
    specials = set(tok.special_ids)  # left out of completions' text (not of echoed ids)
    checked = 0
    for i, (o, s) in enumerate(zip(offs, toks, strict=True)):
        if i in skip or "\ufffd" in s or s in specials:  # the <bos> the server added; a
            continue  # partial character; a special token in the completion
        assert text.startswith(s, o), (i, s, o, text[o : o + len(s) + 5])
        checked += 1
    assert checked >= len(toks) // 2


@pytest.mark.parametrize("stream", [False, True])
def test_text_offset_indexes_the_returned_text(server, stream):
    tok = server.state.tokenizer
    prompts = ["the quick brown fox", "héllo wörld ☃ 42", tok.encode("lazy dog jumps")]
    for prompt in prompts:
        for echo in [False] if stream else [False, True]:
            body = {"prompt": prompt, "max_tokens": 12, "logprobs": 1, "echo": echo, "seed": 3}
            if not stream:
                choice = httpx.post(server.url + "/v1/completions", json=body).json()
                choice = choice["choices"][0]
            else:  # one chunk per token: the offsets continue across chunks
                text, offs, toks = "", [], []
                with httpx.stream(
                    "POST", server.url + "/v1/completions", json={**body, "stream": True}
                ) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            c = json.loads(line[6:])["choices"][0]
                            text += c["text"]
                            offs += (c.get("logprobs") or {}).get("text_offset", [])
                            toks += (c.get("logprobs") or {}).get("tokens", [])
                choice = {"text": text, "logprobs": {"text_offset": offs, "tokens": toks}}
            skip = {0} if echo and isinstance(prompt, str) else set()
            _check_offsets(tok, choice, skip)
            if echo and isinstance(prompt, str):
                assert choice["text"].startswith(prompt)


def test_serve_exits_nonzero_on_a_corrupt_checkpoint(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "geode", "serve", str(bad), "--port", str(free_port())]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert p.returncode != 0, p.stderr[-2000:]
    assert "the model failed to load" in p.stderr and weights.name in p.stderr, p.stderr[-2000:]


def test_serve_dtype_and_quant(checkpoint, monkeypatch):
    """`geode serve --dtype --quant` reach create_app, which holds the weights that way."""
    import uvicorn

    import geode.serve.app as app_mod
    from geode.cli import build_parser
    from geode.cli.serve import run_serve

    seen = []
    monkeypatch.setattr(app_mod, "create_app", lambda *a, **kw: seen.append(kw) or "app")
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **kw: None)
    args = build_parser().parse_args(
        ["serve", str(checkpoint), "--dtype", "bfloat16", "--quant", "int8"]
    )
    assert run_serve(args) == 0 and (seen[-1]["dtype"], seen[-1]["quant"]) == ("bfloat16", "int8")
    monkeypatch.undo()

    app = create_app(checkpoint, dtype="bfloat16", quant="int4", model_name="tiny")

    async def run(c: httpx.AsyncClient) -> None:
        model = app.state.geode.engine.model
        assert model.dtype == torch.bfloat16 and model.quantization["mode"] == "int4"
        r = await c.post("/v1/completions", json={"prompt": "the", "max_tokens": 3})
        assert r.status_code == 200, r.text

    _serve(app, run)


def test_chat_dtype_and_quant(checkpoint):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "geode", "chat", str(checkpoint), "--max-tokens", "3"]
    cmd += ["--dtype", "bfloat16", "--quant", "int8", "--seed", "0"]
    p = subprocess.run(
        cmd, input="hello\n/quit\n", capture_output=True, text=True, timeout=120, env=env
    )
    assert p.returncode == 0 and "model> " in p.stdout, p.stderr[-2000:]
