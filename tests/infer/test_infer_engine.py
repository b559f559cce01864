"""The engine against transformers and against itself: greedy parity, batching, logprobs,
streaming, stop conditions, joining a running batch, bad input."""

from __future__ import annotations

import pytest
import torch

from geode.infer import Engine, Request, RequestError
from geode.infer.cache import kv_cache_bytes

from .conftest import FakeTokenizer, forced


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = ref.generate(
        ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
        eos_token_id=None, attention_mask=torch.ones_like(ids),
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


# Window 5: prompts shorter and longer than it, outputs crossing it (ring-buffer wraparound),
# and prefill chunks smaller than the window and the prompt.
@pytest.mark.parametrize(
    "plen,new,chunk", [(3, 14, 512), (4, 30, 512), (12, 10, 512), (17, 9, 4), (9, 12, 2)]
)
@pytest.mark.parametrize("native", [True, False])  # the native C step and the torch fallback
def test_greedy_token_identical_to_transformers(pair, plen, new, chunk, native):
    ref, model = pair
    prompt = _prompt(plen, plen)
    expected = _hf_greedy(ref, prompt, new)
    eng = Engine(model, prefill_chunk=chunk, native=native)
    got = eng.generate(Request(prompt, temperature=0, max_new_tokens=new, ignore_eos=True))
    assert got[0].token_ids == expected
    assert got[0].finish_reason == "length"


def test_batched_equals_one_at_a_time(model):
    """Different prompt lengths, different stopping steps, more requests than rows."""
    reqs = [
        Request(_prompt(n, n), temperature=0, max_new_tokens=m, ignore_eos=True)
        for n, m in [(3, 9), (11, 4), (6, 13), (1, 7), (15, 2)]
    ]
    alone = [Engine(model).generate(r)[0].token_ids for r in reqs]
    batched = Engine(model, max_batch=3).generate(reqs)
    assert [r.token_ids for r in batched] == alone
    fallback = Engine(model, max_batch=3, native=False).generate(reqs)
    assert [r.token_ids for r in fallback] == alone
    assert [len(r.token_ids) for r in batched] == [9, 4, 13, 7, 2]


def test_join_a_running_batch_and_abort(model):
    eng = Engine(model, max_batch=4)
    a = Request(_prompt(4, 1), temperature=0, max_new_tokens=12, ignore_eos=True)
    b = Request(_prompt(9, 2), temperature=0, max_new_tokens=6, ignore_eos=True)
    c = Request(_prompt(5, 3), temperature=0, max_new_tokens=20, ignore_eos=True)
    want = {k: Engine(model).generate(r)[0].token_ids for k, r in zip("ab", [a, b], strict=True)}
    ida = eng.add_request(a)
    idc = eng.add_request(c)
    got: dict[str, list[int]] = {ida: [], idc: []}
    for _ in range(3):
        for d in eng.step():
            got[d.request_id] += d.token_ids
    idb = eng.add_request(b)  # joins while a and c are mid-generation
    got[idb] = []
    assert eng.abort(idc)  # c leaves early; its row is reused
    assert not eng.abort("nope")
    done = {}
    while eng.has_unfinished():
        for d in eng.step():
            got[d.request_id] += d.token_ids
            if d.finished:
                done[d.request_id] = d.result
    assert got[ida] == want["a"] and done[ida].token_ids == want["a"]
    assert got[idb] == want["b"] and done[idb].token_ids == want["b"]
    assert idc not in done and len(eng.running) == 0


def test_generated_logprobs_equal_full_forward(model):
    prompt = _prompt(7, 5)
    res = Engine(model).generate(
        Request(prompt, temperature=0, max_new_tokens=9, ignore_eos=True, logprobs=3)
    )[0]
    seq = torch.tensor([prompt + res.token_ids])
    with torch.no_grad():
        logp = model(seq)[0].float().log_softmax(-1)  # (T, V)
    n = len(prompt)
    for i, (t, lp, top) in enumerate(
        zip(res.token_ids, res.logprobs, res.top_logprobs, strict=True)
    ):
        row = logp[n - 1 + i]
        assert abs(lp - row[t].item()) < 1e-4
        vals, idx = row.topk(3)
        assert list(top) == idx.tolist()
        assert max(abs(a - b) for a, b in zip(top.values(), vals.tolist(), strict=True)) < 1e-4
        assert t == idx[0].item()  # greedy picks the top alternative


@pytest.mark.parametrize("chunk", [512, 3])
def test_prompt_logprobs_equal_log_softmax_of_full_forward(model, chunk):
    prompt = _prompt(13, 6)
    res = Engine(model, prefill_chunk=chunk).generate(
        Request(prompt, temperature=0, max_new_tokens=1, prompt_logprobs=2)
    )[0]
    with torch.no_grad():
        logp = model(torch.tensor([prompt]))[0].float().log_softmax(-1)
    assert res.prompt_logprobs[0] is None and res.prompt_top_logprobs[0] is None
    expected = logp[torch.arange(12), torch.tensor(prompt[1:])]
    got = torch.tensor(res.prompt_logprobs[1:])
    assert (got - expected).abs().max().item() < 1e-4
    for i, top in enumerate(res.prompt_top_logprobs[1:]):
        assert list(top) == logp[i].topk(2).indices.tolist()


def test_seeded_sampling_reproducible_and_batch_independent(model):
    def req(seed):
        return Request(_prompt(6, 9), temperature=1.3, top_k=50, top_p=0.9, seed=seed,
                       max_new_tokens=12, ignore_eos=True)  # fmt: skip

    alone = Engine(model).generate(req(7))[0].token_ids
    again = Engine(model, seed=123).generate(req(7))[0].token_ids
    others = [Request(_prompt(n, n), temperature=0.8, max_new_tokens=5) for n in (3, 10)]
    mixed = Engine(model).generate([others[0], req(7), others[1]])[1].token_ids
    assert alone == again == mixed
    different = Engine(model).generate(req(8))[0].token_ids
    assert different != alone


def test_streaming_deltas_add_up(model):
    tok = FakeTokenizer([f"<{i}>" for i in range(300)])
    eng = Engine(model, tok)
    req = Request(_prompt(5, 4), temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=0)
    deltas = list(eng.stream(req))
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert sum((d.token_ids for d in deltas), []) == deltas[-1].result.token_ids
    assert "".join(d.text for d in deltas) == deltas[-1].result.text
    assert deltas[-1].result.text == tok.decode(deltas[-1].result.token_ids)
    # closing a stream early aborts the request and frees its row
    it = eng.stream(Request(_prompt(5, 4), max_new_tokens=50, ignore_eos=True))
    next(it)
    it.close()
    assert not eng.has_unfinished()


def test_stop_string_across_token_boundaries(model):
    pieces = [f"<{i}>" for i in range(300)]
    pieces[10], pieces[11], pieces[12], pieces[13] = "Hello wo", "rld, ST", "OP! and", " more"
    tok = FakeTokenizer(pieces)
    eng = Engine(model, tok)
    proc = forced([10, 11, 12, 13, 13])
    req = Request([2, 5], max_new_tokens=5, stop=["STOP!"], logits_processors=[proc])
    deltas = list(eng.stream(req))
    res = deltas[-1].result
    assert res.finish_reason == "stop" and res.stop_reason == "STOP!"
    assert res.text == "Hello world, "
    assert res.token_ids == [10, 11, 12]  # the id completing the stop string is kept
    streamed = "".join(d.text for d in deltas)
    assert streamed == res.text and "ST" not in streamed  # a partial stop string is held back
    keep = Request([2, 5], max_new_tokens=5, stop=["STOP!"], include_stop_str_in_output=True,
                   logits_processors=[proc])  # fmt: skip
    assert eng.generate(keep)[0].text == "Hello world, STOP!"
    # a held-back prefix that never completes is flushed at the end
    pieces[12] = "OPEN"
    res = Engine(model, FakeTokenizer(pieces)).generate(
        Request([2, 5], max_new_tokens=3, stop=["STOP!"], logits_processors=[proc])
    )[0]
    assert res.text == "Hello world, STOPEN" and res.finish_reason == "length"


def test_eos_stop_ids_min_tokens_ignore_eos(model):
    eos = model.config.eos_token_id
    proc = forced([7, eos, 9, 9, 9, 9])
    eng = Engine(model)
    r = eng.generate(Request([2, 5], max_new_tokens=6, logits_processors=[proc]))[0]
    assert r.token_ids == [7, eos] and r.finish_reason == "stop" and r.stop_reason == eos
    r = eng.generate(Request([2, 5], max_new_tokens=6, ignore_eos=True, logits_processors=[proc]))[
        0
    ]
    assert r.token_ids == [7, eos, 9, 9, 9, 9] and r.finish_reason == "length"
    r = eng.generate(Request([2, 5], max_new_tokens=6, stop_token_ids=[9], logits_processors=[proc], ignore_eos=True))[0]  # fmt: skip
    assert r.token_ids == [7, eos, 9] and r.stop_reason == 9

    # min_new_tokens masks eos until enough tokens exist, even when eos is by far the likeliest
    def boost(out, logits):
        logits[eos] += 1000.0
        return logits

    r = eng.generate(Request([2, 5], temperature=0, max_new_tokens=6, min_new_tokens=3,
                             logits_processors=[boost]))[0]  # fmt: skip
    assert len(r.token_ids) == 4 and eos not in r.token_ids[:3] and r.token_ids[3] == eos


def test_text_prompt_and_text_output(model):
    pieces = [f"<{i}>" for i in range(300)]
    pieces[40], pieces[41] = "Once", " upon"
    tok = FakeTokenizer(pieces)
    res = Engine(model, tok).generate(Request("Once upon", temperature=0, max_new_tokens=4))[0]
    assert res.prompt_token_ids == [2, 40, 41]  # <bos> prepended
    assert res.text == tok.decode(res.token_ids, skip_special=True)


def test_penalties_change_greedy_choice(model):
    prompt = _prompt(6, 3)
    base = Engine(model).generate(Request(prompt, temperature=0, max_new_tokens=12, ignore_eos=True))[0]  # fmt: skip
    pen = Engine(model).generate(Request(prompt, temperature=0, max_new_tokens=12, ignore_eos=True,
                                         frequency_penalty=2.0, presence_penalty=2.0))[0]  # fmt: skip
    assert len(set(pen.token_ids)) >= len(set(base.token_ids))


@pytest.mark.parametrize(
    "prompt,kwargs,field",
    [
        ([], {}, "prompt"),
        ([5] * 100, {"max_new_tokens": 29}, "max_new_tokens"),
        ([5, 6], {"temperature": -0.5}, "temperature"),
        ([5, 6], {"top_p": 0.0}, "top_p"),
        ([5, 6], {"top_p": 1.5}, "top_p"),
        ([5, 6], {"top_k": -1}, "top_k"),
        ([5, 6], {"min_p": 1.5}, "min_p"),
        ([5, 6], {"max_new_tokens": 0}, "max_new_tokens"),
        ([5, 6], {"repetition_penalty": 0.0}, "repetition_penalty"),
        ([5, 6], {"presence_penalty": 3.0}, "presence_penalty"),
        ([5, 6], {"logprobs": -1}, "logprobs"),
        ([5, 6], {"stop": ["x"]}, "stop"),
        ([5, 300], {}, "300"),
        ("text", {}, "tokenizer"),
    ],
)
def test_bad_input_raises_and_generates_nothing(model, prompt, kwargs, field):
    eng = Engine(model)
    good = Request([5, 6, 7], max_new_tokens=3)
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(RequestError, match=field):
        eng.generate([good, Request(prompt, **kwargs)])
    assert not eng.has_unfinished() and eng.cache is None  # nothing ran
    with pytest.raises(RequestError):
        eng.add_request(Request(prompt, **kwargs))
    assert not eng.has_unfinished()


def test_unknown_sampling_field_is_an_error():
    with pytest.raises(RequestError, match="tempurature"):
        Request([1, 2], tempurature=0.5)


def test_single_sequence_cache_equals_formula(model):
    cfg = model.config
    eng = Engine(model)
    eng.generate(Request([5, 6, 7], max_new_tokens=20, ignore_eos=True))
    assert eng.cache.nbytes == kv_cache_bytes(cfg, 23, torch.float32)
    eng = Engine(model)
    eng.generate(Request([5], max_new_tokens=2, ignore_eos=True))
    assert eng.cache.nbytes == kv_cache_bytes(cfg, 3, torch.float32)  # shorter than the window


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_cuda_graph_decode_matches_eager(model):
    import copy

    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    reqs = [Request(_prompt(n, n), temperature=0, max_new_tokens=12, ignore_eos=True)
            for n in (3, 9, 14)]  # fmt: skip
    eager = Engine(gpu, cuda_graphs=False).generate(reqs)
    graphs = Engine(gpu, cuda_graphs=True).generate(reqs)
    assert [r.token_ids for r in graphs] == [r.token_ids for r in eager]
    f32 = Engine(copy.deepcopy(model).to("cuda")).generate(reqs)
    cpu = Engine(model).generate(reqs)
    assert [r.token_ids for r in f32] == [r.token_ids for r in cpu]
