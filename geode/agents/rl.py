"""Agentic RL (issue #21, item 3): multi-turn GRPO / RLOO over agent environments.

Nothing here samples or computes advantages by itself: an RL step is post-training II's
`geode.post.rollout.Rollouts` with `make_env` over agent envs (MiniGrid missions, tool-use
tasks), so the episodes are the engine's multi-turn rollouts (the model's turns sampled,
observations and tool results appended as forced tokens on the same KV cache) and the loss
falls on the sampled tokens only (`episodes_batch`: loss_mask = sampled_mask, 0 on every
forced token). What this module adds:

- `Shaped`: an env wrapper whose step reward is the env's reward (MiniGrid's success reward,
  the tool task's verifier at the episode's end) plus optional per-step shaping,

      r_t = r_t^env - turn_penalty - invalid_penalty * (invalid actions in step t)

  and a hard stop at the env's `max_turns`; it records its spawned episodes so that each
  episode's outcome (`env.info`: success, steps, tool calls, error) reaches the statistics.
- `AgentRollouts`: the Rollouts source over task specs; logs `success`, `steps`,
  `tool_calls`, `invalid`, `env_errors` and `env_s` (seconds inside the envs' steps: actions,
  tool calls, verifiers; part of `generation_s`) beside the reward every step.
- `heldout_success(model, envs, ...)`: greedy success and avg@k (mean success of k sampled
  episodes per env) on held-out tasks (`heldout_tasks`: other seeds whose layout / task is
  not among the training ones).
- Families (`FAMILIES`): how to build an env from a task spec, the train / held-out splits,
  and the scripted expert; `demonstrations` plays the expert with noise (a random action with
  probability `demo_noise`, the episode goes on), which the demonstration-SFT step clones.
- `agent_rl(recipe, out)`, `geode agent-rl RECIPE`: [optional] a tokenizer trained on the
  family's own episode text, a nano model SFT'd from scratch on the noisy demonstrations
  (behaviour cloning), then RL with held-out success before / after in OUT/summary.json and the
  curves in OUT/curves.png.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geode.fileio import atomic_write_bytes, save_figure
from geode.post.env import spawn
from geode.post.recipe import PostRecipe, check_rl
from geode.post.rollout import Episode, Rollouts, rollout
from geode.recipe import RecipeError, load_recipe
from geode.train.recipe import apply_overrides, check_recipe, read_recipe_source

Messages = list[dict[str, Any]]


# ---------------------------------------------------------------------- shaping and outcomes
class Shaped:
    """An agent env with per-step reward shaping and a record of its spawned episodes (module
    doc); every other attribute (tools, max_turns, info, meta, frames) is the env's."""

    def __init__(self, env: Any, turn_penalty: float = 0.0, invalid_penalty: float = 0.0):
        self.env = env
        self.turn_penalty, self.invalid_penalty = turn_penalty, invalid_penalty
        self.spawned: list[Shaped] = []
        self.turns = 0
        self._invalid = 0
        self.seconds = 0.0  # wall time inside the env's step (actions, tools, verifier)

    def __getattr__(self, name: str) -> Any:
        if name == "env":  # not yet set (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.env, name)

    def spawn(self) -> Shaped:
        """A fresh episode on a copy of the env (geode.post.env.spawn), recorded in `spawned`."""
        child = Shaped(spawn(self.env), self.turn_penalty, self.invalid_penalty)
        self.spawned.append(child)
        return child

    def reset(self) -> Messages:
        """The env's first messages (a new episode)."""
        self.turns, self._invalid = 0, 0
        return self.env.reset()

    def step(self, message: str) -> tuple[Messages | None, float, bool]:
        """The env's step with the shaping terms; done at the env's max_turns."""
        t0 = time.perf_counter()
        try:
            new, reward, done = self.env.step(message)
        finally:
            self.seconds += time.perf_counter() - t0
        self.turns += 1
        invalid = invalid_count(getattr(self.env, "info", {}) or {})
        reward = float(reward) - self.turn_penalty
        reward -= self.invalid_penalty * max(invalid - self._invalid, 0)
        self._invalid = invalid
        if self.turns >= int(getattr(self.env, "max_turns", self.turns + 1)):
            done = True
        return new, reward, bool(done)


def invalid_count(info: dict[str, Any]) -> int:
    """Invalid actions so far in an env's info (`invalid` or `invalid_actions`; 0 if absent)."""
    return int(info.get("invalid_actions", info.get("invalid", 0)) or 0)


def outcome(info: dict[str, Any]) -> dict[str, Any]:
    """The episode outcome kept on `Episode.meta["info"]`."""
    return {
        "success": bool(info.get("success", False)),
        "steps": int(info.get("steps", 0) or 0),
        "tool_calls": int(info.get("tool_calls", 0) or 0),
        "invalid": invalid_count(info),
        "error": info.get("error"),
    }


def outcome_stats(episodes: Sequence[Episode]) -> dict[str, float]:
    """Mean success, steps, tool calls, invalid actions, model turns and env errors."""
    infos = [e.meta.get("info") or outcome({}) for e in episodes]
    n = max(len(infos), 1)
    return {
        "success": sum(i["success"] for i in infos) / n,
        "steps": sum(i["steps"] for i in infos) / n,
        "tool_calls": sum(i["tool_calls"] for i in infos) / n,
        "invalid": sum(i["invalid"] for i in infos) / n,
        "turns": sum(len(e.turns) for e in episodes) / n,
        "env_errors": float(sum(i["error"] is not None for i in infos)),
    }


def _record(shaped: Sequence[Shaped], episodes: Sequence[Episode]) -> None:
    """Each episode's outcome from its spawned env (rollout spawns group-major, in order)."""
    children = [c for s in shaped for c in s.spawned]
    if len(children) != len(episodes):
        raise RuntimeError(f"agent rollouts: {len(children)} spawned envs for "
                           f"{len(episodes)} episodes")  # fmt: skip
    for e, c in zip(episodes, children, strict=True):
        e.meta["info"] = outcome(getattr(c, "info", {}) or {})


class AgentRollouts(Rollouts):
    """Rollouts over agent envs: `tasks` are task specs, `make_env(task)` builds the env; the
    reward is the env's (summed over the episode) with Shaped's terms (module doc)."""

    def __init__(
        self,
        tokenizer: Any,
        tasks: Sequence[Any],
        make_env: Callable[[Any], Any],
        *,
        turn_penalty: float = 0.0,
        invalid_penalty: float = 0.0,
        **kw: Any,
    ):
        self._made: list[Shaped] = []
        self._env_s = 0.0

        def make(task: Any) -> Shaped:
            env = Shaped(make_env(task), turn_penalty, invalid_penalty)
            self._made.append(env)
            return env

        super().__init__(tokenizer, tasks, None, make_env=make, **kw)

    def _round(self, n: int) -> tuple[list[Episode], Any, dict[str, float]]:
        self._made = []
        eps, rewards, stats = super()._round(n)
        _record(self._made, eps)
        self._env_s += sum(c.seconds for s in self._made for c in s.spawned)
        return eps, rewards, stats

    def _stats(self, kept, eps, rewards, agg, dropped, rounds) -> dict[str, float]:  # type: ignore[override]
        out = super()._stats(kept, eps, rewards, agg, dropped, rounds)
        out.pop("accuracy", None)  # the arithmetic task's `#### N` check: not an agent metric
        env_s, self._env_s = self._env_s, 0.0  # inside generation_s: the envs' own steps
        return {**out, **outcome_stats(eps), "env_s": env_s}


def heldout_success(
    model: Any,
    envs: Sequence[Any],
    *,
    tokenizer: Any = None,
    k: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    logits_processors: Sequence[Any] = (),
) -> dict[str, float]:
    """Held-out success of a policy on `envs`: greedy `success` (one episode per env at
    temperature 0) with its mean `steps` and `reward`, and `avg_at_k` (mean success of k
    episodes per env at `temperature`, fixed seeds). model: an Engine, or a model + tokenizer;
    logits_processors: passed to the sampling (e.g. a geode.agents.loop.ScriptedPolicy)."""
    import torch

    from geode.infer import Engine, SamplingParams

    if not envs:
        raise ValueError("heldout_success: no envs")
    engine = model
    if not hasattr(model, "add_request"):
        if tokenizer is None:
            raise ValueError("heldout_success: a model needs its tokenizer")
        engine = Engine(model, tokenizer, max_batch=len(envs) * max(k, 1), optimize=False,
                        seed=seed)  # fmt: skip
    was_training = engine.model.training

    def run(group: int, temp: float) -> list[Episode]:
        shaped = [Shaped(e) for e in envs]
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temp, seed=seed,
                                  logits_processors=tuple(logits_processors))  # fmt: skip
        eps = rollout(engine, shaped, group, sampling)
        _record(shaped, eps)
        return eps

    with torch.no_grad():
        greedy = run(1, 0.0)
        out = {
            **{k_: v for k_, v in outcome_stats(greedy).items() if k_ != "env_errors"},
            "reward": sum(sum(e.rewards) for e in greedy) / len(greedy),
            "envs": float(len(envs)),
        }
        if k > 0:
            out["avg_at_k"] = outcome_stats(run(k, temperature))["success"]
            out["k"] = float(k)
    engine.model.train(was_training)
    return out


# ---------------------------------------------------------------------- families
@dataclass
class Family:
    """An env family for agentic RL: task specs per split, the env of a spec, the expert.

    tasks(split, n, seed, options) -> specs (train and held-out never overlap);
    make_env(spec, options) -> an AgentEnv; expert(env, spec, messages) -> the expert's next
    model message (raw text, tool-call markers included); noise(env, spec, messages, rng) -> a
    plausible wrong message, for noisy demonstrations.
    """

    name: str
    tasks: Callable[[str, int, int, dict[str, Any]], list[Any]]
    make_env: Callable[[Any, dict[str, Any]], Any]
    expert: Callable[[Any, Any, Messages], str]
    noise: Callable[[Any, Any, Messages, random.Random], str]
    key: Callable[[Any, dict[str, Any]], Any] = lambda spec, options: repr(spec)


FAMILIES: dict[str, Callable[[], Family]] = {}


def register_family(name: str) -> Callable[[Callable[[], Family]], Callable[[], Family]]:
    """Register a family factory under `name` (factories import their env modules lazily)."""

    def wrap(factory: Callable[[], Family]) -> Callable[[], Family]:
        FAMILIES[name] = factory
        return factory

    return wrap


def get_family(name: str) -> Family:
    """The family registered as `name` (a RecipeError listing the known ones)."""
    if name not in FAMILIES:
        raise RecipeError(f"agent.family = {name!r}: use one of {sorted(FAMILIES)}")
    return FAMILIES[name]()


def heldout_tasks(
    family: Family, n: int, train: Sequence[Any], seed: int, options: dict[str, Any]
) -> list[Any]:
    """`n` held-out tasks none of which equals a training task (by `family.key`) nor another
    (small worlds repeat layouts across seeds); a ValueError when fewer exist."""
    train_keys = {family.key(t, options) for t in train}
    out: list[Any] = []
    for m in (n, 2 * n, 4 * n, 8 * n):  # more candidates while too many repeat training
        try:
            candidates = family.tasks("heldout", m, seed, options)
        except ValueError:  # the family has fewer held-out tasks than m
            break
        seen, out = set(train_keys), []
        for spec in candidates:
            k = family.key(spec, options)
            if k not in seen:
                seen.add(k)
                out.append(spec)
                if len(out) == n:
                    return out
    raise ValueError(f"only {len(out)} held-out {family.name} tasks differ from the "
                     f"{len(train)} training tasks; ask for fewer")  # fmt: skip


def assistant_message(text: str) -> dict[str, Any]:
    """The assistant message of a model's raw text (content + parsed tool calls)."""
    from geode.chat import parse

    parsed = parse(text)
    msg: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        msg["tool_calls"] = [
            {"type": "function", "id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
            if c.id is not None
            else {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in parsed.tool_calls
        ]
    return msg


def demonstrations(
    family: Family,
    tasks: Sequence[Any],
    options: dict[str, Any],
    *,
    noise: float = 0.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One scripted-expert episode per task as a chat conversation (`messages`, `tools`,
    `success`): at each turn the expert's message, or with probability `noise` a random one
    (the episode goes on from there, so the demonstrations also show recoveries)."""
    rng = random.Random(f"demos:{seed}")
    out = []
    for task in tasks:
        env = family.make_env(task, options)
        messages = list(env.reset())
        turns = int(getattr(env, "max_turns", 8))
        for _ in range(turns):
            if rng.random() < noise:
                text = family.noise(env, task, messages, rng)
            else:
                text = family.expert(env, task, messages)
            new, _, done = env.step(text)
            messages.append(assistant_message(text))
            if done or not new:
                break
            messages += list(new)
        conv = {"messages": messages, "success": bool(env.info.get("success"))}
        if getattr(env, "tools", None):
            conv["tools"] = list(env.tools)
        out.append(conv)
    return out


# ---------------------------------------------------------------------- the recipe
@dataclass
class AgentSection:
    """`[agent]`: the env family, shaping, held-out evaluation, the demonstration-SFT step."""

    family: str = "minigrid"  # a registered family (FAMILIES)
    options: dict[str, Any] = field(default_factory=dict)  # the family's env options
    train_tasks: int = 256  # training env seeds / tasks (the RL prompts)
    heldout_tasks: int = 64  # held-out tasks: other seeds, and no layout / task in training
    seed: int = 0  # seed of the task splits and the demonstrations' noise
    turn_penalty: float = 0.0  # shaping: reward -= this per model turn
    invalid_penalty: float = 0.0  # shaping: reward -= this per invalid action
    eval_samples: int = 8  # k of held-out avg@k (0: greedy only)
    eval_temperature: float = 1.0
    # demonstration SFT (behaviour cloning of the scripted expert, from scratch); demos = 0:
    # no SFT, model.init is the policy
    demos: int = 0  # expert episodes (on training tasks)
    demo_noise: float = 0.2  # probability of a random action at each demonstrated turn
    vocab_size: int = 384  # the tokenizer trained on the demonstrations' text
    sft_steps: int = 200
    sft_batch: int = 16
    sft_lr: float = 3e-3
    sft_seq_len: int = 512


@dataclass
class AgentRecipe(PostRecipe):
    """`geode agent-rl`: a post-training recipe with [rl] (rollouts, advantages) and [agent]."""

    agent: AgentSection = field(default_factory=AgentSection)


def load_agent_recipe(
    source: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> AgentRecipe:
    """Read an agent-RL recipe (TOML or dict), apply `a.b=v` overrides, validate."""
    data, where = read_recipe_source(source)
    try:
        recipe = load_recipe(AgentRecipe, apply_overrides(data, overrides or []))
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    if recipe.rl is None:
        raise RecipeError(f"{where}: geode agent-rl needs an [rl] section (group_size, ...)")
    if recipe.objective.kind != "rl":
        raise RecipeError(f"{where}: geode agent-rl needs [objective] kind = 'rl', got "
                          f"{recipe.objective.kind!r}")  # fmt: skip
    if not recipe.data.path:
        recipe.data.path = "generated"  # the tasks come from [agent]
    if not recipe.model.init and not recipe.agent.demos:
        raise RecipeError(f"{where}: set model.init (a policy) or agent.demos > 0 (an SFT'd "
                          "policy from scratch)")  # fmt: skip
    check_recipe(recipe, where=where)
    check_rl(recipe.rl, recipe.batch.global_batch_size, where)
    a = recipe.agent
    get_family(a.family)
    for name in ("train_tasks", "heldout_tasks"):
        if getattr(a, name) < 1:
            raise RecipeError(f"{where}: agent.{name} = {getattr(a, name)}: must be >= 1")
    for name in ("eval_samples", "demos", "sft_steps", "turn_penalty", "invalid_penalty"):
        if getattr(a, name) < 0:
            raise RecipeError(f"{where}: agent.{name} = {getattr(a, name)}: must be >= 0")
    if not 0.0 <= a.demo_noise <= 1.0:
        raise RecipeError(f"{where}: agent.demo_noise = {a.demo_noise}: must be in [0, 1]")
    if not a.eval_temperature > 0:
        raise RecipeError(f"{where}: agent.eval_temperature must be > 0")
    return recipe


# ---------------------------------------------------------------------- the driver
def demonstration_sft(recipe: AgentRecipe, out: str | Path, progress: bool | None = None) -> Path:
    """Behaviour cloning from scratch: noisy expert episodes (OUT/demos.jsonl), a tokenizer
    trained on their text (OUT/tokenizer.model), and the recipe's [model] SFT'd on the
    model's turns (tool calls included); returns OUT/model (kept when it already exists)."""
    from geode.chat import render
    from geode.tokenizer import train_tokenizer
    from geode.train.recipe import load_train_recipe
    from geode.train.sft import sft

    out = Path(out)
    if (out / "model" / "config.json").is_file():
        return out / "model"
    a = recipe.agent
    fam = get_family(a.family)
    tasks = fam.tasks("train", a.train_tasks, a.seed, a.options)
    demos = demonstrations(fam, [tasks[i % len(tasks)] for i in range(a.demos)], a.options,
                           noise=a.demo_noise, seed=a.seed)  # fmt: skip
    text = "".join(json.dumps(d) + "\n" for d in demos)
    atomic_write_bytes(out / "demos.jsonl", text.encode())
    texts = [render(d["messages"], add_generation_prompt=False, tools=d.get("tools"))
             for d in demos]  # fmt: skip
    train_tokenizer(texts=texts, vocab_size=a.vocab_size, out=out, num_threads=1)
    from geode.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer.model")
    model = dataclasses.asdict(recipe.model)
    model["overrides"] = {**model["overrides"], "vocab_size": len(tok)}
    model["init"] = ""
    sft_recipe = load_train_recipe({
        "name": f"{recipe.name}-sft", "out": str(out), "model": model,
        "data": {"path": str(out / "demos.jsonl"), "tokenizer": str(out / "tokenizer.model"),
                 "seq_len": a.sft_seq_len, "seed": a.seed},
        "batch": {"global_batch_size": a.sft_batch},
        "optim": {"lr": a.sft_lr, "warmup_steps": min(10, a.sft_steps // 10),
                  "weight_decay": 0.0, "schedule": "cosine"},
        "train": {"max_steps": a.sft_steps, "threads": recipe.train.threads,
                  "progress": recipe.train.progress},
        "objective": {"kind": "sft", "options": {"tool_calls": True}},
        "checkpoint": {"export": True},
    })  # fmt: skip
    sft(sft_recipe, out, progress=progress)
    return out / "model"


def agent_source(recipe: AgentRecipe, tokenizer: Any, tasks: Sequence[Any]) -> AgentRollouts:
    """The RL batch source of a recipe: [rl]'s sampling and advantages over [agent]'s envs."""
    from geode.infer import SamplingParams

    a, r = recipe.agent, recipe.rl
    if r is None:
        raise RecipeError("geode agent-rl needs an [rl] section")
    fam = get_family(a.family)
    per_step = r.prompts_per_step or recipe.batch.global_batch_size // r.group_size
    return AgentRollouts(
        tokenizer, tasks, lambda t: fam.make_env(t, a.options),
        turn_penalty=a.turn_penalty, invalid_penalty=a.invalid_penalty,
        sampling=SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                top_p=r.top_p),
        group_size=r.group_size, prompts_per_step=per_step, estimator=r.estimator,
        scale=r.scale, num_iterations=r.num_iterations, dynamic_sampling=r.dynamic_sampling,
        max_resample=r.max_resample, mask_truncated=r.mask_truncated, seed=recipe.data.seed,
    )  # fmt: skip


def agent_rl(
    recipe: AgentRecipe,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """`geode agent-rl`: [demonstration SFT], then RL over the family's training tasks with
    held-out success before / after (OUT/summary.json, OUT/curves.png); returns the summary."""
    from geode.post.rl import policy_trainer

    out = Path(out or recipe.out)
    a, r = recipe.agent, recipe.rl
    assert r is not None  # load_agent_recipe checked it
    fam = get_family(a.family)
    t0 = time.perf_counter()
    sft_summary: dict[str, Any] = {}
    if a.demos:
        init = demonstration_sft(recipe, out / "sft", progress)
        model = dataclasses.replace(recipe.model, init=str(init), overrides={})
        recipe = dataclasses.replace(recipe, model=model,
                                     data=dataclasses.replace(recipe.data, tokenizer=""))  # fmt: skip
        demos = [json.loads(x) for x in (out / "sft" / "demos.jsonl").read_text().splitlines()]
        sft_summary = {"demos": len(demos), "demo_noise": a.demo_noise,
                       "demo_success": sum(d["success"] for d in demos) / len(demos),
                       "sft_s": time.perf_counter() - t0}  # fmt: skip
    train_tasks = fam.tasks("train", a.train_tasks, a.seed, a.options)
    held_tasks = heldout_tasks(fam, a.heldout_tasks, train_tasks, a.seed, a.options)
    from geode.tokenizer import load_tokenizer
    from geode.train.sft import tokenizer_path

    tok = load_tokenizer(tokenizer_path(recipe))
    source = agent_source(recipe, tok, train_tasks)
    trainer, source, tok = policy_trainer(recipe, out / "rl", source=source, progress=progress,
                                          resume=resume)  # fmt: skip

    def held() -> dict[str, float]:
        envs = [fam.make_env(t, a.options) for t in held_tasks]
        return heldout_success(source.engine, envs, k=a.eval_samples,
                               temperature=a.eval_temperature,
                               max_new_tokens=r.eval_max_new_tokens, seed=recipe.data.seed)  # fmt: skip

    t1 = time.perf_counter()
    before = held()
    trainer.raw_model.train()
    eval_s = time.perf_counter() - t1
    summary = trainer.fit()
    t1 = time.perf_counter()
    after = held()
    eval_s += time.perf_counter() - t1
    summary.update(step_series(Path(trainer.out) / "metrics.jsonl"))
    summary.update(
        family=a.family, heldout_tasks=len(held_tasks), train_tasks=len(train_tasks),
        heldout_success_before=before["success"], heldout_success_after=after["success"],
        heldout_avg_at_k_before=before.get("avg_at_k"),
        heldout_avg_at_k_after=after.get("avg_at_k"), heldout_k=a.eval_samples,
        heldout_before=before, heldout_after=after, eval_s=eval_s, **sft_summary,
        wall_s=time.perf_counter() - t0,
    )  # fmt: skip
    if trainer.info.is_main:
        summary["curves"] = str(plot_curves(summary, out / "curves.png"))
        atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


SERIES = ("reward_mean", "success", "steps", "invalid", "generation_s", "env_s", "scoring_s",
          "update_s", "rollout_tokens_per_s", "completion_length", "truncated")  # fmt: skip


def step_series(metrics: Path) -> dict[str, Any]:
    """Per-step curves of the train records (reward, success, steps, timings) and means."""
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    steps = [r for r in map(json.loads, lines) if r.get("kind") == "train"]
    out: dict[str, Any] = {}
    for key in SERIES:
        vals = [r.get(key) for r in steps]
        out[f"{key}_curve"] = vals
        nums = [v for v in vals if isinstance(v, (int, float))]
        if nums:
            out[f"mean_{key}"] = sum(nums) / len(nums)
    return out


def plot_curves(summary: dict[str, Any], path: Path) -> Path:
    """Training reward and success per step, with held-out success before / after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    steps = list(range(1, len(summary.get("reward_mean_curve", [])) + 1))
    ax.plot(steps, summary.get("reward_mean_curve", []), label="train reward (mean)")
    ax.plot(steps, summary.get("success_curve", []), label="train success")
    last = max(len(steps), 1)
    for key, style in (("heldout_success", "o"), ("heldout_avg_at_k", "s")):
        b, a = summary.get(f"{key}_before"), summary.get(f"{key}_after")
        if b is not None and a is not None:
            ax.plot([0, last], [b, a], style + "--", label=f"{key.replace('_', ' ')}")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward / success")
    ax.set_title(f"agentic RL: {summary.get('family', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------- the built-in families
@register_family("minigrid")
def minigrid_family() -> Family:
    """MiniGrid / BabyAI missions (geode.agents.envs.minigrid): options `mission` (a mission
    family, default "goto-obj-s4"), `max_turns` (8); the BabyAI bot / BFS expert; noise is a
    random move (left, right, forward)."""
    from geode.agents.envs.minigrid import MiniGridEnv, expert_action, mission_family

    def tasks(split: str, n: int, seed: int, options: dict[str, Any]) -> list[Any]:
        return [list(t) for t in mission_family(options.get("mission", "goto-obj-s4"), split, n)]

    def make_env(task: Any, options: dict[str, Any]) -> Any:
        env_id, seed = task
        return MiniGridEnv(env_id, int(seed), observation="text",
                           max_turns=int(options.get("max_turns", 8)))  # fmt: skip

    def key(task: Any, options: dict[str, Any]) -> Any:
        env = make_env(task, options)
        env.reset()
        u = env.unwrapped
        cells = [(x, y, o.type, o.color) for y in range(u.height) for x in range(u.width)
                 if (o := u.grid.get(x, y)) is not None and o.type != "wall"]  # fmt: skip
        return (tuple(u.agent_pos), int(u.agent_dir), tuple(cells), str(u.mission))

    return Family("minigrid", tasks, make_env, lambda env, task, messages: expert_action(env),
                  lambda env, task, messages, rng: rng.choice(("left", "right", "forward")),
                  key)  # fmt: skip


@register_family("tools")
def tools_family() -> Family:
    """Tool-use tasks (geode.agents.tasks): options `task` ("calc", the default, or "code"),
    `digits` (calc: [low, high] digits of its numbers, default [4, 7]), `mode` ("act" |
    "plan-act-verify"), `max_turns` (4); the scripted expert's turns
    (geode.agents.tasks.expert), its final answer from the tool's actual result; noise changes
    one digit of the expert's message (a copy error: a wrong expression or answer)."""
    from geode.agents import tasks as tt
    from geode.agents.loop import turn_text

    def tasks(split: str, n: int, seed: int, options: dict[str, Any]) -> list[Any]:
        extra = {"digits": tuple(options["digits"])} if "digits" in options else {}
        return tt.generate(options.get("task", "calc"), n, seed=seed, split=split, **extra)

    def make_env(task: Any, options: dict[str, Any]) -> Any:
        return tt.make_env(task, mode=options.get("mode", "act"),
                           max_turns=int(options.get("max_turns", 4)))  # fmt: skip

    def expert(env: Any, task: Any, messages: Messages) -> str:
        turns = [m for m in tt.expert(task, options_mode(env)) if m["role"] == "assistant"]
        done = sum(m["role"] == "assistant" for m in messages)
        msg = turns[min(done, len(turns) - 1)]
        results = [m for m in messages if m["role"] == "tool"]
        if task.family == "calc" and not msg.get("tool_calls") and results:
            value = results[-1]["content"]  # the answer the tool actually gave
            msg = {**msg, "content": f"{task.solution} = {value}\n#### {value}"}
        return turn_text(msg)

    def noise(env: Any, task: Any, messages: Messages, rng: random.Random) -> str:
        text = expert(env, task, messages)
        digits = [i for i, ch in enumerate(text) if ch.isdigit()]
        if not digits:
            return text
        i = rng.choice(digits)
        return text[:i] + rng.choice([d for d in "0123456789" if d != text[i]]) + text[i + 1 :]

    def options_mode(env: Any) -> str:
        return getattr(env, "mode", "act")

    return Family("tools", tasks, make_env, expert, noise, lambda task, options: task.canonical)


@register_family("lookup")
def lookup_family() -> Family:
    """Tool-use lookups (geode.agents.tasks, task "lookup"): options `items` (rows per table, 4),
    `max_turns` (3); the expert calls lookup(asked name) and answers the tool's value; noise is
    a call with another name, or a guessed `#### V` (geode.agents.tasks.lookup_turn)."""
    from geode.agents import tasks as tt
    from geode.agents.loop import turn_text

    def tasks(split: str, n: int, seed: int, options: dict[str, Any]) -> list[Any]:
        return tt.generate("lookup", n, seed=seed, split=split, items=int(options.get("items", 4)))

    def make_env(task: Any, options: dict[str, Any]) -> Any:
        return tt.make_env(task, max_turns=int(options.get("max_turns", 3)))

    return Family("lookup", tasks, make_env,
                  lambda env, task, messages: turn_text(tt.lookup_turn(task, messages)),
                  lambda env, task, messages, rng: turn_text(tt.lookup_turn(task, messages, rng)),
                  lambda task, options: task.canonical)  # fmt: skip
