"""Thinking budgets in RL (issue #19, item 6): the "thinking" reward term, budgets drawn per
rollout group, and rollouts under budgets (no episode thinks past its group's budget)."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
import torch

from geode.post.rewards import Sample, build_rewards
from geode.post.thinking import sample_budget
from geode.recipe import RecipeError

START, END = 60, 61


class CharTokenizer:
    """Characters -> ids (ord - 32), the two thinking markers as single ids."""

    special_ids = {"<start_of_thinking>": START, "<end_of_thinking>": END}

    def encode(self, text: str) -> list[int]:
        text = text.replace("<start_of_thinking>", "\x00s").replace("<end_of_thinking>", "\x00e")
        out, i = [], 0
        while i < len(text):
            if text[i] == "\x00":
                out.append(START if text[i + 1] == "s" else END)
                i += 2
            else:
                out.append(ord(text[i]) - 32)
                i += 1
        return out


def _terms(options: dict, samples: list[Sample]) -> list[float]:
    scored = build_rewards([{"kind": "thinking", "options": options}], tokenizer=CharTokenizer())(
        samples
    )
    assert not scored.failed.any()
    return scored.terms["thinking"].tolist()


def test_thinking_reward_values():
    """-per_token * max(0, n - free), n counted between the markers (all sections; from the
    prompt's open section with meta in_thinking; from the encoded text without token ids)."""
    samples = [
        Sample([], "", token_ids=[5, 6]),  # no thinking
        Sample([], "", token_ids=[START, 5, 6, 7, END, 8]),  # 3
        Sample([], "", token_ids=[START, 5, END, 9, START, 6, 7, END, 8]),  # 1 + 2
        Sample([], "", token_ids=[5, 6, 7, 8, END, 9], meta={"in_thinking": True}),  # 4
        Sample([], "", token_ids=[START, 5, 6, 7, 8, 9, 10]),  # 6, never closed
        Sample([], "<start_of_thinking>abcde<end_of_thinking>42"),  # 5, from the text
    ]
    n = [0, 3, 3, 4, 6, 5]
    assert _terms({}, samples) == pytest.approx([-0.001 * k for k in n])
    assert _terms({"per_token": 0.5, "free": 3}, samples) == pytest.approx(
        [-0.5 * max(0, k - 3) for k in n]
    )
    total = build_rewards(
        [{"kind": "thinking", "weight": 2.0, "options": {"per_token": 0.25}}],
        tokenizer=CharTokenizer(),
    )(samples[:2]).rewards
    assert total.tolist() == [0.0, -1.5]


def test_thinking_reward_errors():
    for options, match in (
        ({"per_token": -1.0}, "must be >= 0"),
        ({"free": -2}, "must be >= 0"),
        ({"per_tokens": 1.0}, "unknown option"),
        ({"free": 1.5}, "expected a int"),
    ):
        with pytest.raises(RecipeError, match=match):
            build_rewards([{"kind": "thinking", "options": options}], tokenizer=CharTokenizer())
    with pytest.raises(RecipeError, match="tokenizer"):
        build_rewards([{"kind": "thinking"}])

    class NoThinking:
        special_ids = {"<eos>": 1}

    with pytest.raises(RecipeError, match="<start_of_thinking>"):
        build_rewards([{"kind": "thinking"}], tokenizer=NoThinking())


def test_sample_budget():
    rng = random.Random(0)
    draws = Counter(sample_budget(rng, [0, 4, 16, None]) for _ in range(400))
    assert set(draws) == {0, 4, 16, None} and min(draws.values()) > 70  # uniform: ~100 each
    a, b = random.Random(3), random.Random(3)
    assert [sample_budget(a, [1, 2, 3]) for _ in range(8)] == [
        sample_budget(b, [1, 2, 3]) for _ in range(8)
    ]
    assert sample_budget(rng, []) is None
    for bad in ([-1], [2, "3"], [True]):
        with pytest.raises(ValueError, match="thinking budgets"):
            sample_budget(rng, bad)


def test_rollouts_obey_each_groups_budget(task_dir):
    """R3's rollout with a budget per group (drawn by sample_budget) on a random model steered
    to open a section and never close it: every episode thinks exactly its group's budget,
    the close is forced, an answer follows, and the reward term charges what it thought."""
    import geode
    from geode.config import get_preset
    from geode.infer import Engine, SamplingParams
    from geode.post.env import TaskEnv
    from geode.post.rollout import rollout
    from geode.tokenizer import load_tokenizer

    tok = load_tokenizer(task_dir / "tokenizer.model")
    start, end = tok.special_ids["<start_of_thinking>"], tok.special_ids["<end_of_thinking>"]
    cfg = dataclasses.replace(
        get_preset("nano-1m"), vocab_size=tok.vocab_size, num_hidden_layers=2, hidden_size=64,
        intermediate_size=96, max_position_embeddings=256, layer_types=None,
    )  # fmt: skip
    engine = Engine(geode.build_model(cfg, seed=0), tok, max_batch=8)

    def steer(out: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not out:  # open a section first, then think on (the engine must close it)
            keep = torch.full_like(logits, float("-inf"))
            keep[start] = 0.0
            return logits + keep
        logits[[start, end, *engine.eos_token_ids]] = float("-inf")
        return logits

    rng = random.Random(1)
    budgets = [sample_budget(rng, [0, 2, 7]) for _ in range(4)]
    assert len(set(budgets)) > 1  # groups of different budgets in one batch
    envs = [TaskEnv(f"what is {i} + 1?", answer=str(i + 1)) for i in range(4)]
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, seed=5,
                              logits_processors=(steer,))  # fmt: skip
    episodes = rollout(engine, envs, 2, sampling, budgets=budgets)
    assert len(episodes) == 8
    samples = []
    for ep in episodes:
        b = budgets[ep.group]
        ids = ep.token_ids
        assert ep.meta["thinking_budget"] == b and ids[0] == start
        assert ids.index(end) == b + 1 and ep.sampled_mask[b + 1] == 0  # forced close
        assert end not in ids[b + 2 :] and len(ids) > b + 2  # closed once, then the answer
        samples.append(Sample([], "", token_ids=ids, meta=ep.meta))
    rewards = build_rewards([{"kind": "thinking", "options": {"per_token": 0.1}}], tokenizer=tok)
    got = rewards(samples).terms["thinking"].tolist()
    assert got == pytest.approx([-0.1 * budgets[ep.group] for ep in episodes])
