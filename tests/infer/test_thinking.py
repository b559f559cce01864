"""Thinking budgets (issue #19, item 6): with budget b no output has more than b thinking tokens,
and every output reaches an answer; the engine (torch and native runners, n-gram speculation,
fork), the server's `thinking_budget` field and the CLI flag."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch

from geode.infer import Engine, Request, RequestError
from geode.infer.thinking import ThinkingBudget

from .conftest import FakeTokenizer
from .test_speculative import tiny  # a random 3-layer model with a short sliding window

V, EOS, BOS, START, END = 64, 1, 2, 60, 61
MAX_NEW = 24


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny(V)


@pytest.fixture(scope="module")
def tok() -> FakeTokenizer:
    t = FakeTokenizer([f"<{i}>" for i in range(V)], eos_id=EOS, bos_id=BOS)
    t.special_ids.update({"<start_of_thinking>": START, "<end_of_thinking>": END})
    return t


def _ban(*ids: int):
    def proc(out: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[list(ids)] = float("-inf")
        return logits

    return proc


def _sections(ids: list[int], inside: bool) -> tuple[int, int, bool]:
    """(thinking tokens, index after the last <end_of_thinking>, still inside) of an output."""
    n, after = 0, 0
    for i, t in enumerate(ids):
        if t == END:
            inside, after = False, i + 1
        elif inside:
            n += 1
        elif t == START:
            inside = True
    return n, after, inside


def _check(r, budget: int, inside: bool) -> None:
    """At most `budget` thinking tokens; the section closed with answer tokens after it."""
    n, after, still = _sections(r.token_ids, inside)
    assert n <= budget and r.metrics["thinking_tokens"] == n
    assert not still and after < len(r.token_ids), r.token_ids  # an answer follows the close
    assert len(r.token_ids) <= MAX_NEW  # the forced close takes one of max_new_tokens


@pytest.mark.parametrize("native", [False, True])
def test_budget_caps_thinking_in_a_mixed_batch(model, tok, native):
    """Prompt opens the section, the model never closes it (END / START / EOS banned): each
    budget ends it after exactly b thinking tokens with a forced close; no budget: no close."""
    engine = Engine(model, tok, native=native)
    budgets = [0, 1, 5, 17, None]
    reqs = [
        Request(
            [BOS, 7, 9, START],
            max_new_tokens=MAX_NEW,
            temperature=1.0,
            seed=s,
            logits_processors=(_ban(START, END, EOS),),
            thinking_budget=b,
        )  # fmt: skip
        for b in budgets
        for s in (0, 1)
    ]
    results = engine.generate(reqs)
    for req, r in zip(reqs, results, strict=True):
        b = req.params.thinking_budget
        if b is None:  # the engine leaves a sequence without a budget alone
            assert END not in r.token_ids and "thinking_tokens" not in r.metrics
            assert len(r.token_ids) == MAX_NEW
            continue
        _check(r, b, inside=True)
        assert r.token_ids.index(END) == b and r.sampled_mask[b] == 0  # forced at b exactly
        assert sum(r.sampled_mask) == len(r.token_ids) - 1 and len(r.token_ids) == MAX_NEW
        assert r.finish_reason == "length"


def test_model_opened_sections_share_one_budget(model, tok):
    """The model opens a section itself, and again after the first close: both count against
    one budget (the second, opened with the budget spent, is closed at once)."""

    def steer(out: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not out or (out[-1] == END and out.count(END) == 1):
            keep = torch.full_like(logits, float("-inf"))
            keep[START] = 0.0
            return logits + keep
        logits[[START, END, EOS]] = float("-inf")
        return logits

    engine = Engine(model, tok)
    for b in (0, 1, 5):
        r = engine.generate(
            Request(
                [BOS, 7, 9],
                max_new_tokens=MAX_NEW,
                temperature=1.0,
                seed=b,
                logits_processors=(steer,),
                thinking_budget=b,
            )  # fmt: skip
        )[0]
        _check(r, b, inside=False)
        assert r.token_ids[0] == START and r.token_ids.index(END) == b + 1
        assert r.token_ids[b + 2 : b + 4] == [START, END]  # reopened, closed at once
        assert r.sampled_mask.count(0) == 2


def test_speculative_ngram_keeps_the_forced_close(model, tok):
    """Greedy n-gram speculation: drafts accepted past the budget are dropped (cache rolled
    back); the output equals plain greedy decoding's token for token."""
    prompt = [BOS, 5, 9, 5, 9, 5, 9, START]
    plain, spec = Engine(model, tok), Engine(model, tok, draft="ngram:2")
    for b in range(9):
        want, got = (
            e.generate(
                Request(
                    prompt,
                    max_new_tokens=MAX_NEW,
                    temperature=0,
                    ignore_eos=True,
                    thinking_budget=b,
                )
            )[0]  # fmt: skip
            for e in (plain, spec)
        )
        _check(got, b, inside=True)
        assert got.token_ids == want.token_ids and got.sampled_mask == want.sampled_mask
    assert spec.speculator.stats["accepted_tokens"] > 0


def test_fork_copies_the_budget_state(model, tok):
    """Forked copies keep the thinking tokens already counted and each obeys the budget."""
    engine = Engine(model, tok)
    rid = engine.add_request(
        Request(
            [BOS, 7, START],
            max_new_tokens=MAX_NEW,
            temperature=1.0,
            seed=3,
            logits_processors=(_ban(START, END, EOS),),
            thinking_budget=4,
        )  # fmt: skip
    )
    while not engine.running or not engine.running[0].ready:
        engine.step()
    engine.step()  # two thinking tokens out
    ids = [rid, *engine.fork(rid, 2)]
    done = {}
    while engine.has_unfinished():
        done.update({d.request_id: d.result for d in engine.step() if d.finished})
    for i in ids:
        _check(done[i], 4, inside=True)
        assert done[i].token_ids.index(END) == 4
    assert done[ids[1]].token_ids[:2] == done[ids[0]].token_ids[:2]


def test_budget_policy_and_request_errors(model, tok):
    p = ThinkingBudget(2, START, END, inside=False)
    assert [p.observe(t) for t in (7, START, 8, 9, END, START)] == [[], [], [], [END], [], [END]]
    assert p.used == 2 and p.inside
    engine = Engine(model, tok)
    for bad in (-1, True, 1.5):
        with pytest.raises(RequestError, match="thinking_budget"):
            engine.generate(Request([BOS, 7], max_new_tokens=4, thinking_budget=bad))
    with pytest.raises(RequestError, match=r"thinking_budget=3 .*no tokenizer"):
        Engine(model).generate(Request([BOS, 7], max_new_tokens=4, thinking_budget=3))
    with pytest.raises(RequestError, match="<start_of_thinking>"):
        plain = FakeTokenizer([f"<{i}>" for i in range(V)])
        Engine(model, plain).generate(Request([BOS, 7], max_new_tokens=4, thinking_budget=3))
    for n in (1, 2):  # the close takes one of max_new_tokens (with 1: it is the whole output)
        r = engine.generate(Request([BOS, START], max_new_tokens=n, thinking_budget=0))[0]
        assert r.token_ids[0] == END and len(r.token_ids) == n and r.finish_reason == "length"
        assert r.sampled_mask == [0, 1][:n]
    r = engine.generate(  # b = 3 of max_new_tokens 4: the close is the last token (seeded, and
        Request([BOS, START], max_new_tokens=4, thinking_budget=3, seed=0, ignore_eos=True,
                logits_processors=(_ban(END),))  # no <eos>: a sampled one ended it early)
    )[0]  # fmt: skip
    assert r.token_ids[3:] == [END] and r.sampled_mask == [1, 1, 1, 0]
    assert r.finish_reason == "length"


# ---------------------------------------------------------------------- server and CLI
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live server on a random model with a trained tokenizer (thinking tokens included);
    default thinking budget 2."""
    from geode.serve.app import create_app
    from geode.tokenizer import train_tokenizer
    from tests.serve.helpers import LiveServer

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog 0 1 2 3 4 5 6 7 8 9".split()
    texts = [" ".join(rng.choice(words) for _ in range(20)) for _ in range(200)]
    t = train_tokenizer(texts=texts, vocab_size=360, out=tmp_path_factory.mktemp("tok"))
    live = LiveServer(create_app((tiny(t.vocab_size), t), max_batch=4, thinking_budget=2))
    yield live.start()
    live.stop()


def _post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json=body, timeout=60)


def test_server_thinking_budget_field(server):
    """Chat: the prompt opens a section, <end_of_thinking> comes after at most b tokens (the
    request's b, else the server's 2), the reasoning goes to reasoning_content; completions
    take the field too; bad values are 400s naming it."""
    msgs = [{"role": "user", "content": "the quick fox"}]
    for body_budget, b in ((None, 2), (0, 0), (5, 5)):
        body = {"messages": msgs, "max_tokens": 12, "ignore_eos": True, "seed": 1,
                "logprobs": True}  # fmt: skip
        if body_budget is not None:
            body["thinking_budget"] = body_budget
        r = _post(server, "chat/completions", body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        pieces = [x["token"] for x in choice["logprobs"]["content"]]
        assert "<end_of_thinking>" in pieces[: b + 1], pieces
        assert len(pieces) > pieces.index("<end_of_thinking>") + 1  # the answer follows
        assert bool(choice["message"].get("reasoning_content")) == (b > 0)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={**body, "stream": True}) as r:  # fmt: skip
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    last = chunks[-1]["choices"][0]["delta"]
    assert last["reasoning_content"] == choice["message"]["reasoning_content"]
    assert last["content"] == choice["message"]["content"]  # same seed: the same reply
    prompt = server.state.tokenizer.encode("the quick", add_bos=True) + [
        server.state.tokenizer.special_ids["<start_of_thinking>"]
    ]
    r = _post(server, "completions", {"prompt": prompt, "max_tokens": 6, "ignore_eos": True,
                                       "thinking_budget": 0, "logprobs": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"]["tokens"][0] == "<end_of_thinking>"
    for bad in (-1, "2", 1.5):
        for route, body in (
            ("chat/completions", {"messages": msgs}),
            ("completions", {"prompt": "a"}),
        ):
            r = _post(server, route, {**body, "max_tokens": 4, "thinking_budget": bad})
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["param"] == "thinking_budget"


def test_cli_thinking_budget_flag(monkeypatch):
    from geode.cli import CLIError, build_parser
    from geode.cli.generate import sampling_params

    parser = build_parser()
    args = parser.parse_args(["generate", "nano-1m", "--ids", "2,5", "--thinking-budget", "7"])
    assert sampling_params(args).thinking_budget == 7
    assert (
        sampling_params(parser.parse_args(["generate", "m", "--ids", "2"])).thinking_budget is None
    )
    assert parser.parse_args(["chat", "m", "--thinking-budget", "3"]).thinking_budget == 3
    assert parser.parse_args(["serve", "m", "--thinking-budget", "0"]).thinking_budget == 0
    with pytest.raises(CLIError, match="--thinking-budget must be >= 0"):
        sampling_params(
            parser.parse_args(["generate", "m", "--ids", "2", "--thinking-budget", "-1"])
        )
