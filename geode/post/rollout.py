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
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from geode.chat import parse, render
from geode.data import tasks as synth
from geode.data.loader import Batch
from geode.tokenizer import END_OF_TURN

from .env import Env, Messages, TaskEnv, spawn
from .thinking import sample_budget


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


def _prompt_ids(tokenizer: Any, messages: Messages, tools: Any = None) -> list[int]:
    """The rendered prompt (with <bos>, the env's tool declarations, ending with the model's
    generation prompt) as ids."""
    return list(tokenizer.encode(render(messages, add_generation_prompt=True, tools=tools)))


def _env_ids(
    tokenizer: Any, history: Messages, new: Messages, ended_with_eot: bool, tools: Any = None
) -> list[int]:
    """Forced ids after a model turn: the rest of its turn, `new`, then the generation prompt."""
    head = render(history, add_generation_prompt=False, tools=tools)  # ends "<end_of_turn>\n"
    full = render([*history, *new], add_generation_prompt=True, tools=tools)
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
                ids = (
                    _prompt_ids(tok, messages, getattr(e, "tools", None))
                    if first is None
                    else first
                )
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
                    engine,
                    tok,
                    st,
                    d.request_id,
                    truncated=cut and not end_turn,
                    eot=eot,
                    final=d.finished,
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
    engine: Any,
    tok: Any,
    st: _Live,
    rid: str,
    *,
    truncated: bool,
    eot: int | None,
    final: bool = False,
) -> bool:
    """Close the open model turn: the env scores it; True when the episode is over (else the
    env's messages are appended as forced tokens)."""
    ep = st.episode
    start, end = st.turn_start, len(ep.token_ids)
    ep.turns.append((start, end))
    st.turn_start = None
    tools = getattr(st.env, "tools", None)
    # with tools, the env sees the raw turn (tool-call markers kept) and the turn is stored
    # parsed (content, thinking, tool calls); otherwise the plain text
    text = tok.decode(ep.token_ids[start:end], skip_special=not tools)
    ep.messages.append(
        parse(text).to_message() if tools else {"role": "assistant", "content": text}
    )
    try:
        new, reward, done = st.env.step(text)
    except Exception as e:  # a crashing env ends its own episode (reward 0); the rest go on
        ep.rewards.append(0.0)
        return _failed(st, f"{type(st.env).__name__}.step raised {type(e).__name__}: {e}")
    ep.rewards.append(float(reward))
    if truncated:
        ep.truncated = True
        return True
    if done or not new or final:  # final: the engine ended the sequence (e.g. a stop string)
        return True
    history = ep.messages
    forced = _env_ids(tok, history, list(new), ep.token_ids[end - 1] == eot, tools)
    ep.messages = [*history, *new]
    from geode.infer import RequestError

    try:
        engine.append(rid, forced)
    except RequestError as e:  # e.g. the env's messages do not fit the context: this episode ends
        return _failed(st, f"{type(st.env).__name__}'s messages cannot be appended: {e}")
    return False


def _failed(st: _Live, why: str) -> bool:
    """End an episode on an env failure: `why` in its meta and the env's info; True (done)."""
    st.episode.meta["error"] = why
    if isinstance(getattr(st.env, "info", None), dict):
        st.env.info["error"] = why
    return True


# ---------------------------------------------------------------------- the RL batch source
def thinking_tokens(
    prompt_ids: Sequence[int], token_ids: Sequence[int], start: int, end: int
) -> int:
    """Tokens inside thinking sections of an episode (the prompt may end inside one)."""
    inside = False
    for t in prompt_ids:
        inside = True if t == start else False if t == end else inside
    n = 0
    for t in token_ids:
        if t == start or t == end:
            inside = t == start
        elif inside:
            n += 1
    return n


def episodes_batch(
    episodes: Sequence[Episode], advantages: torch.Tensor, pad_id: int, mask_truncated: bool
) -> Batch:
    """Episodes -> a right-padded Batch: rows prompt + episode tokens, `loss_mask` the sampled
    tokens (none of a truncated episode's with `mask_truncated`), `advantages` (B,) or (B, T),
    `turns` the model turn (from 1) of each trained target."""
    from .pairs import sequences_batch

    batch = sequences_batch([(e.prompt_ids, e.token_ids) for e in episodes], pad_id)
    sampled = torch.zeros_like(batch.loss_mask)  # (B, T)
    turns = torch.zeros(batch.loss_mask.shape, dtype=torch.long)  # (B, T)
    for i, e in enumerate(episodes):
        if mask_truncated and e.truncated:
            continue
        p = len(e.prompt_ids) - 1  # target index of token_ids[0]
        sampled[i, p : p + len(e.token_ids)] = torch.tensor(e.sampled_mask, dtype=torch.bool)
        for k, (a, b) in enumerate(e.turns, start=1):
            turns[i, p + a : p + b] = k
    batch.loss_mask = batch.loss_mask & sampled
    batch.turns = turns * batch.loss_mask
    batch.advantages = advantages.float()
    return batch


def next_prompts(
    prompts: Sequence[Any], draws: int, n: int, seed: int, tag: str = "rollouts"
) -> list[Any]:
    """Prompts number draws .. draws + n of the endless stream (reshuffled every epoch, by an
    RNG seeded with tag, seed and epoch)."""
    out = []
    for d in range(draws, draws + n):
        epoch, i = divmod(d, len(prompts))
        order = list(range(len(prompts)))
        random.Random(f"{tag}:{seed}:{epoch}").shuffle(order)
        out.append(prompts[order[i]])
    return out


class Rollouts:
    """A BatchSource: each rollout batch samples groups of episodes on the live weights,
    scores them, and becomes the batch of `num_iterations` optimizer steps (module doc).

    prompts: `geode.post.oaif.Prompt`s (messages + answer). rewards: a `geode.post.rewards.
    Rewards` (None: the envs' own rewards, summed over the episode). make_env: prompt -> Env
    (default: a TaskEnv scored by `rewards`). `attach(trainer)` gives it the engine on the
    trainer's model (geode.post.rl.train_policy calls it).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompts: Sequence[Any],
        rewards: Any = None,
        *,
        sampling: Any,
        group_size: int = 8,
        prompts_per_step: int = 16,
        estimator: str = "grpo",
        scale: str = "group",
        num_iterations: int = 1,
        dynamic_sampling: bool = False,
        max_resample: int = 4,
        mask_truncated: bool = False,
        thinking_budgets: Sequence[int | None] = (),
        seed: int = 0,
        make_env: Any = None,
    ):
        if not prompts:
            raise ValueError("Rollouts: no prompts")
        if num_iterations < 1:
            raise ValueError(f"Rollouts: num_iterations must be >= 1, got {num_iterations}")
        self.tokenizer, self.prompts, self.rewards = tokenizer, list(prompts), rewards
        self.sampling, self.group_size, self.prompts_per_step = (
            sampling,
            group_size,
            prompts_per_step,
        )
        self.estimator, self.scale, self.num_iterations = estimator, scale, num_iterations
        self.dynamic_sampling, self.max_resample = dynamic_sampling, max_resample
        self.mask_truncated, self.thinking_budgets = mask_truncated, list(thinking_budgets)
        self.seed = seed
        self.make_env = make_env or (
            lambda p: TaskEnv(p.messages, p.answer, meta={"answer": p.answer})
        )
        self.max_completion_length = sampling.max_new_tokens  # dr_grpo's L (one turn)
        self.engine: Any = None
        self.objective: Any = None  # the trainer's objective (old_logps with its temperature)
        self.policy: Any = None
        self.draws = 0  # prompts drawn so far
        self.rounds = 0  # rollout rounds so far (the sampling seeds follow it)
        self.dropped_total = 0
        self._batch: Batch | None = None
        self._uses = 0
        self.last: dict[str, float] = {}
        self.t_ready: float | None = None

    def attach(self, trainer: Any, max_batch: int | None = None) -> None:
        """Sample with an engine on the trainer's model (same weights, no copy)."""
        from geode.infer import Engine

        self.policy = trainer.raw_model
        self.objective = trainer.objective
        rows = max_batch or self.prompts_per_step * self.group_size
        self.engine = Engine(self.policy, self.tokenizer, max_batch=rows, optimize=False,
                             seed=self.seed)  # fmt: skip
        self.policy.train()  # the engine left it in eval mode

    # ------------------------------------------------------------------ one rollout round
    def _round(self, n: int) -> tuple[list[Episode], torch.Tensor, dict[str, float]]:
        """n prompts x group_size episodes, their rewards (N,) and the round's statistics."""
        from .rewards import Sample

        prompts = next_prompts(self.prompts, self.draws, n, self.seed)
        self.draws += n
        rng = random.Random(f"rollouts-budget:{self.seed}:{self.rounds}")
        budgets = None
        if self.thinking_budgets:
            budgets = [sample_budget(rng, self.thinking_budgets) for _ in prompts]
        seed = (self.seed * 1_000_003 + self.rounds * 65_537) % 2**31
        self.rounds += 1
        envs = [self.make_env(p) for p in prompts]
        t0 = time.perf_counter()
        sampling = dataclasses.replace(self.sampling, seed=seed)
        eps = rollout(self.engine, envs, self.group_size, sampling, budgets=budgets)
        t1 = time.perf_counter()
        stats = {"generation_s": t1 - t0, "failed_rewards": 0.0}
        if self.rewards is None:
            rewards = torch.tensor([sum(e.rewards) for e in eps], dtype=torch.float32)
        else:
            samples = [
                Sample(
                    prompt=list(prompts[e.group].messages), completion=e.completion,
                    answer=None if prompts[e.group].answer is None
                    else str(prompts[e.group].answer),
                    group=self.draws - n + e.group, token_ids=e.token_ids[slice(*e.turns[-1])],
                    meta=e.meta,
                )
                for e in eps
            ]  # fmt: skip
            scored = self.rewards(samples)
            rewards = scored.rewards.float()
            stats["failed_rewards"] = float(scored.failed.sum())
        stats["scoring_s"] = time.perf_counter() - t1
        return eps, rewards, stats

    def _sample_batch(self) -> Batch:
        """Rollout rounds until prompts_per_step groups have unequal rewards (dynamic
        sampling, at most 1 + max_resample rounds) or one round; the batch of the kept groups."""
        K = self.group_size
        kept_eps: list[Episode] = []
        kept_r: list[torch.Tensor] = []
        agg = {"generation_s": 0.0, "scoring_s": 0.0, "failed_rewards": 0.0}
        dropped = rounds = 0
        all_eps: list[Episode] = []
        all_r: list[torch.Tensor] = []
        while True:
            need = self.prompts_per_step - len(kept_eps) // K
            eps, rewards, st = self._round(need)
            rounds += 1
            for k in agg:
                agg[k] += st[k]
            all_eps += eps
            all_r.append(rewards)
            groups = rewards.view(-1, K)  # (G, K)
            for g in range(groups.shape[0]):
                if self.dynamic_sampling and bool((groups[g] == groups[g, 0]).all()):
                    dropped += 1
                    continue
                kept_eps += eps[g * K : (g + 1) * K]
                kept_r.append(groups[g])
            full = len(kept_eps) // K >= self.prompts_per_step
            if not self.dynamic_sampling or full or rounds > self.max_resample:
                break
        if not kept_eps:  # every group had equal rewards: train on the first round (no signal)
            kept_eps, kept_r = all_eps[: self.prompts_per_step * K], [all_r[0]]
        rewards = torch.cat(kept_r)  # (N,)
        from .policy import group_advantages

        adv = group_advantages(rewards, K, estimator=self.estimator, scale=self.scale)
        batch = episodes_batch(kept_eps, adv, self.tokenizer.pad_id, self.mask_truncated)
        if self.num_iterations > 1:
            with (
                torch.no_grad()
            ):  # the rollout policy's log-probs (the importance ratio's denominator)
                batch.old_logps = self.objective.token_logps(self.policy, batch).detach()
        every = torch.cat(all_r)
        self.dropped_total += dropped
        self.last = self._stats(kept_eps, all_eps, every, agg, dropped, rounds)
        return batch

    def _stats(self, kept: list[Episode], eps: list[Episode], rewards: torch.Tensor,
               agg: dict[str, float], dropped: int, rounds: int) -> dict[str, float]:  # fmt: skip
        """The step's rollout statistics (over every episode sampled for it)."""
        from geode.tokenizer import END_OF_THINKING, START_OF_THINKING

        sampled = [sum(e.sampled_mask) for e in eps]
        ids = getattr(self.tokenizer, "special_ids", {}) or {}
        out = {
            **agg,
            "rollout_tokens_per_s": sum(sampled) / max(agg["generation_s"], 1e-9),
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "completion_length": sum(sampled) / len(eps),
            "truncated": sum(e.truncated for e in eps) / len(eps),
            "dropped_groups": float(dropped),
            "rollout_rounds": float(rounds),
            "episodes": float(len(kept)),
        }
        s, t = ids.get(START_OF_THINKING), ids.get(END_OF_THINKING)
        if s is not None and t is not None:
            out["thinking_tokens"] = sum(
                thinking_tokens(e.prompt_ids, e.token_ids, s, t) for e in eps
            ) / len(eps)
        checked = [e for e in eps if isinstance(e.meta.get("answer"), (int, float))]
        if checked:
            out["accuracy"] = sum(
                synth.verify(e.meta["answer"], e.completion) for e in checked
            ) / len(checked)
        return out

    # ------------------------------------------------------------------ BatchSource
    def next_batch(self) -> Batch:
        """A new rollout batch every num_iterations steps; the same one in between."""
        if self.engine is None:
            raise RuntimeError("Rollouts: call attach(trainer) before training")
        if self._batch is None or self._uses >= self.num_iterations:
            self._batch, self._uses = self._sample_batch(), 0
        else:
            self.last = {**self.last, "generation_s": 0.0, "scoring_s": 0.0}
        self._uses += 1
        self.t_ready = time.perf_counter()
        return self._batch

    def state_dict(self) -> dict[str, Any]:
        """Prompts drawn and rounds sampled (a resume continues with a fresh rollout batch)."""
        return {"draws": self.draws, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the prompt order and the sampling seeds."""
        self.draws, self.rounds = int(state["draws"]), int(state["rounds"])
        self._batch, self._uses = None, 0
