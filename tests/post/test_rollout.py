"""Rollouts on the engine: groups share one prefill, env messages are forced tokens (mask 0)
on the KV of the earlier turns, truncation is flagged, thinking budgets reach the engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from geode.chat import render
from geode.data import tasks as synth
from geode.post.env import DEFAULT_INSTRUCTION, SelfCorrectionEnv, TaskEnv, verifier
from geode.post.rollout import rollout

TASK = {"min_steps": 1, "max_steps": 1, "max_value": 20}


@pytest.fixture(scope="module")
def engine(sft_policy):
    import geode
    from geode.infer import Engine
    from geode.tokenizer import load_tokenizer

    tok = load_tokenizer(sft_policy / "tokenizer.model")
    return Engine(geode.load_model(sft_policy), tok, max_batch=32, optimize=False, seed=0)


def _sampling(**kw):
    from geode.infer import SamplingParams

    return SamplingParams(**{"max_new_tokens": 40, "temperature": 1.0, "seed": 0, **kw})


def _problems(n: int, seed: int = 1):
    return synth.generate(n, seed=seed, **TASK)


def test_group_shares_one_prefill_and_episodes_are_group_major(engine):
    probs = _problems(3)
    envs = [TaskEnv(p.question, p.answer, score=verifier(p.answer)) for p in probs]
    before = dict(engine.stats)
    eps = rollout(engine, envs, 4, _sampling())
    prefill = engine.stats["prefill_tokens"] - before["prefill_tokens"]
    assert [e.group for e in eps] == [0] * 4 + [1] * 4 + [2] * 4
    lens = [len(eps[4 * g].prompt_ids) for g in range(3)]
    assert prefill == sum(lens)  # one prefill per group, not per sample
    for e in eps:
        p = probs[e.group]
        assert e.prompt_ids == list(engine.tokenizer.encode(render(
            [{"role": "user", "content": p.question}], add_generation_prompt=True)))  # fmt: skip
        assert e.sampled_mask == [1] * len(e.token_ids)  # one turn: all sampled
        assert e.turns == [(0, len(e.token_ids))] and len(e.logprobs) == len(e.token_ids)
        assert e.rewards == [float(synth.verify(p.answer, e.completion))]
    assert len({tuple(e.token_ids) for e in eps[:4]}) > 1  # samples differ inside a group
    # the same seed reproduces the same episodes
    again = rollout(engine, envs, 4, _sampling())
    assert [e.token_ids for e in again] == [e.token_ids for e in eps]


def test_self_correction_episode_forces_env_tokens_on_the_same_cache(engine):
    tok = engine.tokenizer
    probs = _problems(2, seed=2)
    envs = [SelfCorrectionEnv(p.question, p.answer) for p in probs]
    eps = rollout(engine, envs, 2, _sampling(max_new_tokens=48))
    two = [e for e in eps if len(e.turns) == 2]
    assert two, "no episode reached its second attempt"
    model = engine.model
    for e in two:
        (a0, a1), (b0, b1) = e.turns
        assert a0 == 0 and a1 < b0 < b1 == len(e.token_ids)
        assert e.sampled_mask == [1] * a1 + [0] * (b0 - a1) + [1] * (b1 - b0)
        forced = tok.decode(e.token_ids[a1:b0])
        assert DEFAULT_INSTRUCTION in forced and forced.endswith("<start_of_turn>model\n")
        assert len(e.rewards) == 2 and e.messages[-2]["content"] == DEFAULT_INSTRUCTION
        assert e.rewards[1] == float(synth.verify(probs[e.group].answer, e.completion))
        assert all(lp == 0.0 for lp, m in zip(e.logprobs, e.sampled_mask) if not m)
        # the engine's log-probs of attempt 2 (decoded on the cache of attempt 1 + forced
        # tokens) equal a fresh forward of the whole episode
        ids = torch.tensor([e.prompt_ids + e.token_ids])
        with torch.no_grad():
            logp = model(ids).float().log_softmax(-1)[0]  # (T, V)
        P = len(e.prompt_ids)
        fresh = [float(logp[P + k - 1, e.token_ids[k]]) for k in range(b0, b1)]
        assert fresh == pytest.approx(e.logprobs[b0:b1], abs=1e-4)
    assert not engine.has_unfinished()


def test_truncated_turn_is_flagged(engine):
    p = _problems(1, seed=3)[0]
    eps = rollout(engine, [SelfCorrectionEnv(p.question, p.answer)], 2, _sampling(max_new_tokens=3))
    for e in eps:  # 3 tokens never finish an answer: the episode ends after its first turn
        assert e.truncated and e.turns == [(0, 3)] and len(e.rewards) == 1
    assert not engine.has_unfinished()


def test_thinking_budgets_reach_the_engine(engine, monkeypatch):
    from geode.infer import SamplingParams

    p = _problems(2, seed=4)
    envs = [TaskEnv(x.question, x.answer) for x in p]
    seen = []
    add = engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda r: seen.append(r.params) or add(r))
    has_field = "thinking_budget" in {f.name for f in dataclasses.fields(SamplingParams)}
    if not has_field:  # the engine has no budget yet: refused by name, nothing queued
        with pytest.raises(ValueError, match="thinking_budget"):
            rollout(engine, envs, 2, _sampling(max_new_tokens=8), budgets=[4, None])
        assert not engine.has_unfinished()
        return
    eps = rollout(engine, envs, 2, _sampling(max_new_tokens=8), budgets=[4, None])
    assert [q.thinking_budget for q in seen] == [4, 4, None, None]
    assert [e.meta.get("thinking_budget") for e in eps] == [4, 4, None, None]
    with pytest.raises(ValueError, match="budgets"):
        rollout(engine, envs, 2, _sampling(), budgets=[4])


def test_a_turn_the_engine_ends_ends_the_episode(engine):
    p = _problems(1, seed=5)[0]  # a stop string finishes the sequence: no second turn forced
    eps = rollout(engine, [SelfCorrectionEnv(p.question, p.answer)], 2, _sampling(stop=["\n"]))
    for e in eps:
        assert len(e.turns) == 1 and len(e.rewards) == 1 and not e.truncated
        assert e.completion.count("\n") == 1  # the stop string ends the turn (its token kept)
    assert not engine.has_unfinished()
