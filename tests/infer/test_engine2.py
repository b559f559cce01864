"""Engine II: batched and chunked prefill, shared prefill of identical prompts, fork, forced tokens,
free_cache and encode_prompt (issue #13), on the tiny random Gemma 3 of conftest.py."""

from __future__ import annotations

import copy

import pytest
import torch

from geode.infer import Engine, Request, RequestError
from geode.infer.engine import encode_prompt

from .conftest import FakeTokenizer


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _greedy(prompt: list[int], n: int, **kw) -> Request:
    return Request(prompt, temperature=0, max_new_tokens=n, ignore_eos=True, **kw)


@pytest.mark.parametrize("native", [True, False])
def test_sixteen_prompts_prefilled_in_one_step_equal_one_at_a_time(model, native):
    """16 prompts of 3..18 tokens (shorter and longer than the window) prefill in ONE step (one
    runner call natively, length groups in torch); tokens equal and (prompt) logprobs close to
    running each prompt alone."""
    reqs = [_greedy(_prompt(n, n), 3, logprobs=0, prompt_logprobs=0) for n in range(3, 19)]
    alone_eng = Engine(model, native=native)
    alone = [alone_eng.generate(r)[0] for r in reqs]
    eng = Engine(model, native=native, max_batch=16)
    batched = eng.generate(reqs)
    assert eng.stats["steps"] == 3  # one prefill step (first tokens) + 2 decode steps
    assert eng.stats["prefill_tokens"] == sum(range(3, 19))
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    for a, b in zip(alone, batched, strict=True):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
        pa, pb = a.prompt_logprobs[1:], b.prompt_logprobs[1:]
        assert b.prompt_logprobs[0] is None and len(pb) == len(b.prompt_token_ids) - 1
        assert max(abs(x - y) for x, y in zip(pa, pb, strict=True)) < 1e-4
        assert b.sampled_mask == [1] * 3


def test_long_prompt_is_chunked_while_a_stream_keeps_decoding(model):
    """Chunked-prefill scheduling: while a 20-token prompt prefills in chunks (budget 6 per
    step), the running stream gets a token in every step; both outputs equal solo runs."""
    a_req, b_req = _greedy(_prompt(3, 1), 12), _greedy(_prompt(20, 2), 3)
    eng = Engine(model, prefill_chunk=4, prefill_budget=6)
    a = eng.add_request(a_req)
    out = {a: [], "b": []}
    for d in eng.step():
        out[d.request_id] += d.token_ids
    b = eng.add_request(b_req)
    out[b] = out.pop("b")
    steps_before_b = 0
    while not out[b]:
        ids = {}
        for d in eng.step():
            ids[d.request_id] = d.token_ids
            out[d.request_id] += d.token_ids
        assert ids.get(a) and len(ids[a]) == 1  # the stream never stalls
        steps_before_b += 1
    assert steps_before_b == 5  # 20 prompt tokens in chunks of min(4, 6 - 1)
    while eng.has_unfinished():
        for d in eng.step():
            out[d.request_id] += d.token_ids
    solo = Engine(model)
    assert out[a] == solo.generate(a_req)[0].token_ids
    assert out[b] == solo.generate(b_req)[0].token_ids


def test_eight_samples_of_one_prompt_prefill_it_once(model):
    """n = 8 requests with one prompt (GRPO's samples): the prompt runs through the model once
    (positions_run = prompt + decode tokens); each sample keeps its own seed: the same tokens
    as that seed gives alone, and the samples differ."""
    prompt = _prompt(9, 3)
    reqs = [Request(prompt, max_new_tokens=5, ignore_eos=True, seed=s) for s in range(8)]
    eng = Engine(model)
    got = eng.generate(reqs)
    assert eng.stats["prefill_tokens"] == 9
    assert eng.stats["positions_run"] == 9 + 8 * 4  # the 5th token of each is never fed
    solo = Engine(model)
    assert [r.token_ids for r in got] == [solo.generate(r)[0].token_ids for r in reqs]
    assert len({tuple(r.token_ids) for r in got}) > 1


def test_fork_continues_like_the_original_and_rejects_bad_calls(model):
    prompt = _prompt(7, 5)
    expected = Engine(model).generate(_greedy(prompt, 10))[0].token_ids
    eng = Engine(model, max_batch=4)
    rid = eng.add_request(_greedy(prompt, 10))
    with pytest.raises(RequestError, match="waiting"):
        eng.fork(rid, 2)  # not admitted yet
    eng.step()
    eng.step()
    for bad, n, what in [(rid, 0, "n=0"), (rid, 4, "free rows"), ("nope", 1, "no running")]:
        with pytest.raises(RequestError, match=what):
            eng.fork(bad, n)
    assert len(eng.running) == 1  # unchanged by the errors
    kids = eng.fork(rid, 3)
    assert len(kids) == 3 and len(set(kids + [rid])) == 4
    results = {}
    while eng.has_unfinished():
        for d in eng.step():
            if d.finished:
                results[d.request_id] = d.result.token_ids
    assert all(results[i] == expected for i in [rid, *kids])
    with pytest.raises(RequestError, match="finished"):
        eng.fork(rid, 1)


@pytest.mark.parametrize("native", [True, False])
def test_forced_tokens_continue_like_a_prompt_that_held_them(model, native):
    """append(): the forced tokens (more than the window) join the output with sampled-mask 0
    and logprobs of the full forward; the continuation equals a run whose prompt held them."""
    prompt, forced = _prompt(6, 4), [17, 18, 19, 20, 21, 22, 23]
    eng = Engine(model, native=native)
    rid = eng.add_request(_greedy(prompt, 8, logprobs=0))
    deltas = eng.step() + eng.step()
    with pytest.raises(RequestError, match="vocabulary"):
        eng.append(rid, [model.config.vocab_size])
    with pytest.raises(RequestError, match="no running"):
        eng.append("nope", [5])
    eng.append(rid, forced)
    while eng.has_unfinished():
        deltas += eng.step()
    res = deltas[-1].result
    first = res.token_ids[:2]
    assert res.token_ids[2:9] == forced
    assert res.sampled_mask == [1, 1] + [0] * 7 + [1] * 6
    assert sum((d.token_ids for d in deltas), []) == res.token_ids
    assert sum((d.sampled_mask for d in deltas), []) == res.sampled_mask
    again = Engine(model, native=native).generate(_greedy(prompt + first + forced, 6))[0]
    assert res.token_ids[9:] == again.token_ids
    full = torch.tensor([prompt + res.token_ids])
    with torch.no_grad():
        logp = model(full)[0].float().log_softmax(-1)  # (T, V)
    n = len(prompt)
    want = [logp[n + i - 1, t].item() for i, t in enumerate(res.token_ids)]
    assert max(abs(a - b) for a, b in zip(res.logprobs, want, strict=True)) < 1e-4


def test_append_during_prefill_is_an_error(model):
    eng = Engine(model, prefill_chunk=2, prefill_budget=2)
    rid = eng.add_request(_greedy(_prompt(9, 6), 3))
    eng.step()
    with pytest.raises(RequestError, match="prefilling"):
        eng.append(rid, [5])
    while eng.has_unfinished():
        eng.step()


def test_free_cache_and_encode_prompt(model):
    eng = Engine(model)
    rid = eng.add_request(_greedy([5, 6, 7], 3))
    with pytest.raises(RuntimeError, match="in flight"):
        eng.free_cache()
    eng.abort(rid)
    eng.generate(_greedy([5, 6, 7], 3))
    assert eng.cache is not None
    eng.free_cache()
    assert eng.cache is None
    assert len(eng.generate(_greedy([5, 6, 7], 3))[0].token_ids) == 3
    tok = FakeTokenizer(["", "<eos>", "<bos>", "a", "b"])
    assert encode_prompt(tok, "ab") == [2, 3, 4]
    assert encode_prompt(tok, "ab", add_bos=False) == [3, 4]
    assert encode_prompt(tok, "<bos>ab") == [2, 3, 4]  # never twice


@pytest.mark.parametrize("native", [True, False])
def test_runner_run_takes_rows_ids_positions(model, native):
    """Issue #13's runner entry: run(rows, ids[B,T], positions[B,T]) -> logits[B,T,V], into the
    engine's cache when none is passed; the same as passing a twin cache explicitly."""
    eng = Engine(model, native=native)
    eng.generate(_greedy([5, 6, 7], 2))  # the engine now holds a cache (inference tensors)
    ids, pos = torch.tensor([[2, 9, 4, 11]]), torch.arange(4)[None]
    with torch.inference_mode():
        twin = copy.deepcopy(eng.cache)
        eng.cache.reset_rows(0)
        twin.reset_rows(0)
        bound = eng.runner.run([0], ids, pos)  # (1, 4, V)
        assert bound.shape == (1, 4, model.config.vocab_size)
        assert eng.cache.length(0) == 4
        explicit = eng.runner.run([0], ids, pos, twin)
        torch.testing.assert_close(bound, explicit, atol=1e-5, rtol=0)
        eng.free_cache()
        with pytest.raises(ValueError, match="no cache"):
            eng.runner.run([0], ids, pos)


@pytest.mark.parametrize("native", [True, False])
def test_classifier_free_guidance_equals_both_forwards_by_hand(model, native):
    """guidance_scale g: each token is argmax(u + g (c - u)) with c the model's logits after the
    prompt + output and u after the unconditional prompt + output (default [<bos>]); a plain
    request batched beside the guided ones is unchanged, and guidance rows are never reported."""
    prompt, plain = _prompt(8, 7), _greedy(_prompt(5, 8), 6)

    def by_hand(uncond: list[int], g: float) -> list[int]:
        out = []
        with torch.no_grad():
            for _ in range(6):
                c = model(torch.tensor([prompt + out]))[0, -1].float()
                u = model(torch.tensor([uncond + out]))[0, -1].float()
                out.append(int((u + g * (c - u)).argmax()))
        return out

    reqs = [
        _greedy(prompt, 6, guidance_scale=3.0),
        plain,
        Request(prompt, temperature=0, max_new_tokens=6, ignore_eos=True, guidance_scale=0.5,
                guidance_prompt=[2, 40, 41, 42, 43, 44, 45]),
    ]  # fmt: skip
    eng = Engine(model, native=native)
    got = eng.generate(reqs)
    assert got[0].token_ids == by_hand([2], 3.0)
    assert got[2].token_ids == by_hand([2, 40, 41, 42, 43, 44, 45], 0.5)
    assert got[1].token_ids == Engine(model, native=native).generate(plain)[0].token_ids
    unguided = Engine(model, native=native).generate(_greedy(prompt, 6))[0].token_ids
    assert got[0].token_ids != unguided and not eng.running  # guidance changed the output
    with pytest.raises(RequestError, match="guidance_scale"):
        eng.add_request(_greedy(prompt, 2, guidance_scale=float("nan")))


@pytest.mark.parametrize("native", [True, False])
def test_guidance_after_forced_tokens_sees_them_in_both_rows(model, native):
    """append() on a guided sequence: its unconditional row gets the forced tokens in the same
    step, so every sampled token (before and after them) is argmax(u + g (c - u)) with both rows
    past the whole output so far (g = -3: the unconditional row dominates, so a row that has not
    seen the forced tokens changes the argmax — it did before the fix)."""
    prompt, uncond, g = _prompt(8, 7), [2, 40, 41], -3.0

    def guided_next(out: list[int]) -> int:
        with torch.no_grad():
            c = model(torch.tensor([prompt + out]))[0, -1].float()
            u = model(torch.tensor([uncond + out]))[0, -1].float()
        return int((u + g * (c - u)).argmax())

    eng = Engine(model, native=native)
    req = _greedy(prompt, 8, guidance_scale=g, guidance_prompt=uncond)
    rid = eng.add_request(req)
    out, mask = [], []
    while eng.has_unfinished():
        for d in eng.step():
            out, mask = out + d.token_ids, mask + d.sampled_mask
        if len(out) == 2:
            eng.append(rid, [50, 51, 52, 53, 54])
    assert mask.count(0) == 5 and out[2:7] == [50, 51, 52, 53, 54]
    assert [t for t, m in zip(out, mask, strict=True) if m] == [
        guided_next(out[:i]) for i, m in enumerate(mask) if m
    ]
