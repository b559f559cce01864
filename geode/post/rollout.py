"""Rollouts on geode's own engine: episodes of environments, and the RL batch source.

`rollout(engine, envs, group_size, sampling)` runs `group_size` episodes of each env on the
engine, which holds the weights being trained (same process, no copy: the engine follows
in-place updates). The samples of a group have the same prompt and are admitted together, so
the scheduler prefills it once and copies the row (engine.stats["prefill_tokens"] counts one
prefill per group). A model turn ends at an end-of-turn / end-of-sequence id (the engine runs
with `ignore_eos` so that the row stays alive) or at `max_new_tokens` sampled tokens in the
turn (the episode is then truncated). When the env answers, its messages are rendered in the
chat format and appended as forced tokens (engine.append): the next turn continues on the
same KV cache, and those tokens carry sampled-mask 0.

`Rollouts` is the trainer's BatchSource of an RL run (geode.post.rl): prompts -> groups of
episodes -> rewards (geode.post.rewards) -> advantages (geode.post.policy.group_advantages)
-> a Batch whose `loss_mask` is the sampled mask, `advantages` per row (or per token) and,
with several updates per rollout batch, `old_logps` from a no-grad forward of the rollout
policy. Dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476, sec. 3.2) drops groups
whose rewards are all equal (zero advantage, no gradient) and samples more prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from geode.chat import render
from geode.tokenizer import END_OF_TURN

from .env import Env, Messages, spawn


@dataclass
class Episode:
    """One sampled episode: the prompt's ids, then every token after it (model and env)."""

    prompt_ids: list[int]
    token_ids: list[int]  # everything after the prompt
    sampled_mask: list[int]  # per token: 1 model-sampled, 0 forced (env messages)
    turns: list[tuple[int, int]]  # [start, end) of each model turn in token_ids
    logprobs: list[float]  # engine log p per token (0.0 for forced)
    rewards: list[float]  # per step of the env
    truncated: bool  # a model turn hit max_new_tokens
    group: int
    messages: list[dict[str, Any]]  # the conversation: prompt, model turns, env messages
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def completion(self) -> str:
        """The text of the model's last turn."""
        turns = [m for m in self.messages if m["role"] == "assistant"]
        return turns[-1]["content"] if turns else ""


@dataclass
class _Live:
    """Bookkeeping of one running episode."""

    env: Any
    episode: Episode
    turn_start: int | None = None  # index in token_ids of the open turn's first token
    turn_sampled: int = 0


def _prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """The rendered prompt (with <bos>, ending with the model's generation prompt) as ids."""
    return list(tokenizer.encode(render(messages, add_generation_prompt=True)))


def _env_ids(tokenizer: Any, history: Messages, new: Messages, ended_with_eot: bool) -> list[int]:
    """Forced ids after a model turn: the rest of its turn, `new`, then the generation prompt."""
    head = render(history, add_generation_prompt=False)  # ends "<end_of_turn>\n"
    full = render([*history, *new], add_generation_prompt=True)
    text = full[len(head) - 1 :]  # from the "\n" after the model's <end_of_turn>
    return list(tokenizer.encode(("" if ended_with_eot else END_OF_TURN) + text))


def _params(sampling: Any, turns: int, seed: int | None, budget: int | None) -> Any:
    """The engine's parameters of one episode: the whole episode's token cap, eos kept alive,
    per-token logprobs, its seed and thinking budget."""
    kw: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens * turns,
        "ignore_eos": True,
        "logprobs": 0 if sampling.logprobs is None else sampling.logprobs,
        "seed": seed,
    }
    if budget is not None:
        if not hasattr(sampling, "thinking_budget"):
            raise ValueError("rollout: budgets need SamplingParams.thinking_budget (the engine's)")
        kw["thinking_budget"] = budget
    return dataclasses.replace(sampling, **kw)


@torch.no_grad()
def rollout(
    engine: Any,
    envs: Sequence[Env],
    group_size: int,
    sampling: Any,
    *,
    budgets: Sequence[int | None] | None = None,
) -> list[Episode]:
    """`group_size` episodes of each env, group-major (episode i belongs to group i // K).

    sampling: SamplingParams; `max_new_tokens` is per model turn. budgets: a thinking budget
    per group (None: none). Each sample runs on `spawn(env)` (env.py).
    """
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("rollout: the engine needs a tokenizer (chat messages are rendered)")
    if group_size < 1:
        raise ValueError(f"rollout: group_size must be >= 1, got {group_size}")
    if budgets is not None and len(budgets) != len(envs):
        raise ValueError(f"rollout: {len(budgets)} budgets for {len(envs)} envs (one per group)")
    from geode.infer import Request

    eos = engine.eos_token_ids
    eot = (getattr(tok, "special_ids", {}) or {}).get(END_OF_TURN)
    live: dict[str, _Live] = {}
    order: list[_Live] = []
    model = engine.model
    was_training = model.training
    model.eval()
    try:
        for g, env in enumerate(envs):
            first = None
            for j in range(group_size):
                e = spawn(env)
                messages = e.reset()
                ids = _prompt_ids(tok, messages) if first is None else first
                first = ids
                turns = int(getattr(e, "max_turns", 1))
                seed = None if sampling.seed is None else sampling.seed + g * group_size + j
                budget = budgets[g] if budgets is not None else None
                ep = Episode(list(ids), [], [], [], [], [], False, g, list(messages),
                             dict(getattr(e, "meta", {}) or {}))  # fmt: skip
                if budget is not None:
                    ep.meta["thinking_budget"] = budget
                st = _Live(e, ep)
                rid = engine.add_request(
                    Request(ids, params=_params(sampling, turns, seed, budget))
                )
                live[rid] = st
                order.append(st)
        while engine.has_unfinished():
            for d in engine.step():
                st = live.get(d.request_id)
                if st is None:
                    continue
                ep = st.episode
                lps = d.logprobs or [0.0] * len(d.token_ids)
                end_turn = False
                for t, m, lp in zip(d.token_ids, d.sampled_mask, lps, strict=True):
                    if st.turn_start is None and m:
                        st.turn_start, st.turn_sampled = len(ep.token_ids), 0
                    ep.token_ids.append(int(t))
                    ep.sampled_mask.append(int(m))
                    ep.logprobs.append(float(lp) if m and lp is not None else 0.0)
                    if m:
                        st.turn_sampled += 1
                        end_turn = end_turn or int(t) in eos
                cut = st.turn_sampled >= sampling.max_new_tokens or d.finish_reason == "length"
                if st.turn_start is None or not (end_turn or cut or d.finished):
                    continue
                done = _end_turn(
                    engine, tok, st, d.request_id, truncated=cut and not end_turn, eot=eot
                )
                if done and not d.finished:
                    engine.abort(d.request_id)
                if done:
                    del live[d.request_id]
    finally:
        for rid in list(live):
            engine.abort(rid)
        model.train(was_training)
    return [st.episode for st in order]


def _end_turn(
    engine: Any, tok: Any, st: _Live, rid: str, *, truncated: bool, eot: int | None
) -> bool:
    """Close the open model turn: the env scores it; True when the episode is over (else the
    env's messages are appended as forced tokens)."""
    ep = st.episode
    start, end = st.turn_start, len(ep.token_ids)
    ep.turns.append((start, end))
    st.turn_start = None
    text = tok.decode(ep.token_ids[start:end], skip_special=True)
    ep.messages.append({"role": "assistant", "content": text})
    new, reward, done = st.env.step(text)
    ep.rewards.append(float(reward))
    if truncated:
        ep.truncated = True
        return True
    if done or not new:
        return True
    history = ep.messages
    forced = _env_ids(tok, history, list(new), ep.token_ids[end - 1] == eot)
    ep.messages = [*history, *new]
    engine.append(rid, forced)
    return False
