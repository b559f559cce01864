"""Embedding padding rows (ids past the tokenizer's pieces) are never sampled, by any caller."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest
import torch

import geode
from geode.config import get_preset
from geode.infer import Engine, Request, RequestError


@pytest.fixture(scope="module")
def padded(checkpoint):
    """(model, tokenizer): 2x as many embedding rows as tokenizer pieces, padding rows loud.

    Padding row V + j is 10x row j (tied head), so its logit is 10x token j's: without the
    mask, greedy decoding and sampling would pick padding ids almost every step.
    """
    tok = geode.load_tokenizer(checkpoint)
    V = tok.vocab_size
    cfg = dataclasses.replace(
        get_preset("nano-1m"),
        vocab_size=2 * V,
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=256,
        layer_types=None,
    )
    model = geode.build_model(cfg, seed=0)
    with torch.no_grad():
        emb = model.embed_tokens.weight  # (2V, hidden), tied head
        emb[V:] = 10 * emb[:V]
    return model, tok


def test_padding_rows_would_win_without_the_mask(padded):
    model, tok = padded
    logits = model(torch.tensor([[tok.bos_id, 5, 6]]))[0, -1]  # (2V,)
    assert int(logits.argmax()) >= tok.vocab_size  # the test's premise


def test_engine_never_samples_padding_rows(padded):
    model, tok = padded
    V = tok.vocab_size
    engine = Engine(model, tok, max_batch=4, seed=0)
    assert engine.vocab_size == 2 * V and engine.token_vocab_size == V
    reqs = [
        Request("the quick", max_new_tokens=24, temperature=0, logprobs=5),
        Request("hello", max_new_tokens=24, temperature=1.0, seed=1, logprobs=5),
        Request([2, 7, 9], max_new_tokens=24, temperature=1.5, seed=2, presence_penalty=0.5),
        Request("x", max_new_tokens=8, temperature=1.0, prompt_logprobs=3, logprobs=0),
    ]
    for r in engine.generate(reqs):
        assert r.token_ids and all(0 <= t < V for t in r.token_ids)
        tok.decode(r.token_ids)  # every id has a piece
        for top in (r.top_logprobs or []) + (r.prompt_top_logprobs or [])[1:]:
            assert top and all(t < V for t in top)
    # a prompt id without a piece is refused, naming the padding rows
    with pytest.raises(RequestError, match="no tokenizer piece"):
        engine.generate(Request([2, V + 3], max_new_tokens=2))


def test_server_on_padded_model_never_500s(padded):
    from geode.serve.app import create_app

    app = create_app(padded, model_name="padded")

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await app.state.load_task
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                body = {"prompt": "the", "max_tokens": 16, "logprobs": 3, "seed": 0}
                for temperature in (0, 1.0):
                    r = await c.post("/v1/completions", json={**body, "temperature": temperature})
                    assert r.status_code == 200, r.text
                    lp = r.json()["choices"][0]["logprobs"]
                    assert len(lp["tokens"]) == 16
                chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
                r = await c.post("/v1/chat/completions", json={**chat, "logprobs": True})
                assert r.status_code == 200, r.text
                V = padded[1].vocab_size  # ids V.. are padding rows
                r = await c.post("/v1/completions", json={"prompt": [2, V + 3], "max_tokens": 1})
                assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
                r = await c.post("/v1/completions", json={"prompt": "x", "stop_token_ids": [V + 3]})
                assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"
                # the schema says so too: token ids below the tokenizer's piece count
                props = (await c.get("/openapi.json")).json()["components"]["schemas"]
                ids = props["DetokenizeRequest"]["properties"]["tokens"]["items"]
                assert ids["maximum"] == V - 1

    asyncio.run(run())
