"""The server's prefix cache: on by default, hits counted in /metrics, output unchanged."""

from __future__ import annotations

import re

import httpx
import pytest

from geode.serve.app import DEFAULT_PREFIX_CACHE_BYTES, create_app
from tests.serve.helpers import LiveServer, wait_until

# a shared "system prompt" of ~60 tokens, then each request's own question
SYSTEM = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
QUESTIONS = [" hello world json name", " weather city paris true", " add number value false"]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _complete(live: LiveServer, prompt: str) -> list[int]:
    """Greedy completion's tokens (logprobs' token strings: the text alone could hide some)."""
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = httpx.post(live.url + "/v1/completions", json={**body, "logprobs": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


@pytest.fixture(scope="module")
def servers(checkpoint):
    """The default server (prefix cache on) and one with it off, same checkpoint."""
    on = LiveServer(create_app(checkpoint, max_batch=4)).start()
    off = LiveServer(create_app(checkpoint, max_batch=4, prefix_cache_bytes=0)).start()
    yield on, off
    on.stop()
    off.stop()


def test_prefix_cache_hits_are_counted_and_output_is_unchanged(servers):
    on, off = servers
    engine = on.state.engine
    assert DEFAULT_PREFIX_CACHE_BYTES > 0 and engine.prefix is not None  # on by default
    assert off.state.engine.prefix is None
    tok = on.state.tokenizer
    block = engine.prefix.block
    prompts = [[tok.bos_id, *tok.encode(SYSTEM + q)] for q in QUESTIONS]  # as the server sends

    def lcp(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))

    # request i reuses the longest block-aligned prefix held by the complete blocks of an
    # earlier prompt, leaving at least its last token to run
    expected = [
        max((min(lcp(p, q), len(q), len(p) - 1) // block * block for q in prompts[:i]), default=0)
        for i, p in enumerate(prompts)
    ]
    assert expected[0] == 0 and min(expected[1:]) >= 3 * block  # a few whole blocks shared

    before = _metric(httpx.get(on.url + "/metrics").text, "geode_prefix_cache_hit_tokens_total")
    assert before == 0
    outs_on = [_complete(on, SYSTEM + q) for q in QUESTIONS]
    outs_off = [_complete(off, SYSTEM + q) for q in QUESTIONS]
    assert outs_on == outs_off  # the cached keys and values give the same continuations

    text = httpx.get(on.url + "/metrics").text
    # the first request filled the cache; each later one found the shared blocks there
    assert _metric(text, "geode_prefix_cache_hits_total") == len(QUESTIONS) - 1
    assert _metric(text, "geode_prefix_cache_hit_tokens_total") == sum(expected)
    assert _metric(text, "geode_prefix_cache_bytes") > 0

    off_text = httpx.get(off.url + "/metrics").text
    assert _metric(off_text, "geode_prefix_cache_hits_total") == 0
    assert _metric(off_text, "geode_prefix_cache_bytes") == 0

    # idle: the KV cache is freed (engine.free_cache), the prefix cache keeps its blocks
    sched = on.state.scheduler
    assert wait_until(lambda: sched.cache_bytes == 0 and not engine.has_unfinished())
    assert _metric(httpx.get(on.url + "/metrics").text, "geode_prefix_cache_bytes") > 0
    assert _complete(on, SYSTEM + QUESTIONS[0]) == outs_off[0]


def test_negative_prefix_cache_size_is_refused(checkpoint):
    with pytest.raises(ValueError, match="prefix_cache_bytes must be >= 0, got -1"):
        create_app(checkpoint, prefix_cache_bytes=-1)


def test_cli_prefix_cache_mb_reaches_the_app(tmp_path, monkeypatch):
    """`geode serve --prefix-cache-mb N` sizes the prefix cache (default 256 MiB, 0 = off)."""
    import uvicorn

    import geode.serve.app as app_mod
    from geode.cli import CLIError, build_parser
    from geode.cli.serve import run_serve

    seen = []
    monkeypatch.setattr(app_mod, "create_app", lambda *a, **kw: seen.append(kw) or "app")
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **kw: None)
    parser = build_parser()
    for flags, expect in (([], DEFAULT_PREFIX_CACHE_BYTES), (["--prefix-cache-mb", "3"], 3 << 20)):
        assert run_serve(parser.parse_args(["serve", str(tmp_path), *flags])) == 0
        assert seen[-1]["prefix_cache_bytes"] == expect
    with pytest.raises(CLIError, match="--prefix-cache-mb must be >= 0, got -1"):
        run_serve(parser.parse_args(["serve", str(tmp_path), "--prefix-cache-mb", "-1"]))
