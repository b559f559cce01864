"""Self-improvement (SIMA 2's loop, issue #21 item 4): a task setter proposes goals, the agent
attempts them, a judge scores the episodes, the agent trains on its judged successes.

    setter = TaskSetter(model, tokenizer)                 # goals inside the mission grammar
    judge = LLMJudge(judge_model, judge_tokenizer)        # or VLMJudge (geode.agents.judge)
    summary = self_improve(agent, tokenizer, judge, setter, SelfImproveConfig(), out="runs/si")

One round: scenes of the family's TRAINING seeds (new ones every round) -> the setter proposes
one goal per scene -> `samples` episodes per goal (`GoalEnv`: the scene with the proposed
mission; MiniGrid's own verifier scores it) -> the judge's P(yes) per episode (the transcript
plus the final view for an LLM judge, the final frame for a VLM judge) -> filtered behaviour
cloning: next-token loss on the model's own tokens of the episodes with P(yes) >= threshold
(expert iteration / rejection-sampling fine-tuning on judged successes) -> held-out success:
greedy episodes on the family's HELD-OUT seeds with MiniGrid's own missions and reward.
The environment's reward is never used for training; it measures the judge (precision /
recall per round) and the agent. OUT/selfimprove.json holds the rounds, OUT/selfimprove.png
the curve.

The task setter samples inside a grammar (llguidance, as `geode serve`'s constrained
decoding): "go to the <colour> <object>" over the objects present in the scene, so every
goal is a valid, achievable and checkable BabyAI mission (`set_goal` installs it with BabyAI's
own `GoToInstr` verifier).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from geode.fileio import atomic_write_bytes, save_figure

from .envs.minigrid import MiniGridEnv, describe, mission_family
from .judge import Attempt, agreement

GOAL = re.compile(r"go to the (\w+) (\w+)")
SETTER_PROMPT = "Objects in the room: {objects}.\nPropose a goal for the agent."
FINAL_VIEW = "Final view:\n{view}"


def scene_objects(env: MiniGridEnv) -> list[tuple[str, str]]:
    """(colour, type) of the balls, boxes and keys in the env's current grid, in grid order,
    without repeats."""
    seen: list[tuple[str, str]] = []
    for o in env.unwrapped.grid.grid:
        if o is not None and o.type in ("ball", "box", "key") and (o.color, o.type) not in seen:
            seen.append((o.color, o.type))
    return seen


def scene_goals(env: MiniGridEnv) -> list[str]:
    """Every "go to the <colour> <object>" mission the scene can check."""
    return [f"go to the {c} {t}" for c, t in scene_objects(env)]


def mission_grammar(goals: Sequence[str]) -> str:
    """A Lark grammar (llguidance) whose language is exactly `goals`."""
    if not goals:
        raise ValueError("mission_grammar: no goals")
    return "start: " + " | ".join(json.dumps(g) for g in goals) + "\n"


def set_goal(env: MiniGridEnv, goal: str) -> None:
    """Make `goal` the env's mission (after reset), verified by BabyAI's GoToInstr; a
    ValueError when it does not parse or names no object of the scene."""
    from minigrid.envs.babyai.core.verifier import GoToInstr, ObjDesc

    m = GOAL.fullmatch(goal.strip())
    if m is None:
        raise ValueError(f"set_goal: {goal!r} is not 'go to the <colour> <object>'")
    if (m.group(1), m.group(2)) not in scene_objects(env):
        raise ValueError(f"set_goal: {goal!r}: no such object in {env.env_id} seed {env.seed}")
    u = env.unwrapped
    instrs = GoToInstr(ObjDesc(m.group(2), m.group(1)))
    instrs.reset_verifier(u)
    u.instrs, u.mission = instrs, goal.strip()


class GoalEnv(MiniGridEnv):
    """A BabyAI scene (env_id, seed) with a proposed mission instead of its own."""

    def __init__(self, env_id: str, seed: int, goal: str, **kw: Any):
        super().__init__(env_id, seed, **kw)
        self.goal = goal
        self.meta["goal"] = goal

    def spawn(self) -> GoalEnv:
        """A new env of the same scene and goal."""
        kw = dict(observation=self.observation, max_turns=self.max_turns, record=self.record,
                  tile_size=self.tile_size, invalid_penalty=self.invalid_penalty)  # fmt: skip
        return GoalEnv(self.env_id, self.seed, self.goal, **kw)

    def reset(self) -> list[dict[str, Any]]:
        """The scene's episode with the goal as its mission: the first user message."""
        super().reset()
        set_goal(self, self.goal)
        self._frames = []
        self.info["mission"] = self.mission
        return [self._message(first=True)]


class TaskSetter:
    """Proposes one goal per scene: the model samples inside `mission_grammar` of the scene's
    goals (llguidance logits processor), so every proposal is a valid mission."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, temperature: float = 1.0,
                 seed: int = 0):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.seed = temperature, seed
        self.grammars: Any = None  # geode.serve.constrain.Grammars, built on first use

    def prompt(self, env: MiniGridEnv) -> list[dict[str, Any]]:
        """The setter's question about a scene (its objects listed)."""
        objects = ", ".join(f"{c} {t}" for c, t in scene_objects(env))
        return [{"role": "user", "content": SETTER_PROMPT.format(objects=objects)}]

    @torch.no_grad()
    def propose(self, envs: Sequence[MiniGridEnv], seed: int | None = None) -> list[str]:
        """One goal per env (reset here), sampled within the scene's grammar."""
        import llguidance

        from geode.chat import render
        from geode.infer import Engine, Request, SamplingParams
        from geode.serve.constrain import Grammars

        engine = Engine(self.model, self.tokenizer, max_batch=max(1, len(envs)),
                        optimize=False)  # fmt: skip
        if self.grammars is None:
            self.grammars = Grammars(self.tokenizer, engine.eos_token_ids)
        base = self.seed if seed is None else seed
        requests = []
        for i, env in enumerate(envs):
            env.reset()
            goals = scene_goals(env)
            grammar = llguidance.LLMatcher.grammar_from_lark(mission_grammar(goals))
            params = SamplingParams(
                max_new_tokens=48, temperature=self.temperature, seed=base + i,
                logits_processors=(self.grammars.processor(grammar),),
            )  # fmt: skip
            ids = self.tokenizer.encode(render(self.prompt(env)))
            requests.append(Request(list(ids), params=params))
        was = self.model.training
        try:
            outs = engine.generate(requests)
        finally:
            self.model.train(was)
        goals = [o.text.strip() for o in outs]
        for env, g in zip(envs, goals, strict=True):
            if g not in scene_goals(env):  # the grammar makes this impossible
                raise RuntimeError(f"TaskSetter: proposal {g!r} outside the scene's goals")
        return goals


class _Own:
    """Stands for an env in `rollout` with one sample: the sample runs on the env itself, so
    its frames and final state stay readable."""

    def __init__(self, env: Any):
        self.env = env

    def spawn(self) -> Any:
        return self.env


def attempts(
    engine: Any, envs: Sequence[MiniGridEnv], sampling: Any
) -> tuple[list[Any], list[Attempt]]:
    """One episode per env on the engine: (rollout episodes, their `Attempt`s with the goal,
    the transcript plus the final view, the last frame and MiniGrid's success)."""
    from geode.post.rollout import rollout

    episodes = rollout(engine, [_Own(e) for e in envs], 1, sampling)
    out = []
    for ep, env in zip(episodes, envs, strict=True):
        view = {"role": "user", "content": FINAL_VIEW.format(view=describe(env.unwrapped))}
        frames = env.frames()
        frame = frames[-1] if frames else np.asarray(env.gym.render(), dtype=np.uint8)
        out.append(Attempt(env.mission, [*ep.messages, view], frame, bool(env.info["success"])))
    return episodes, out


def behaviour_clone(
    model: torch.nn.Module,
    episodes: Sequence[Any],
    pad_id: int,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
) -> list[float]:
    """Next-token loss on the model's own sampled tokens of `episodes` (forced observation
    tokens masked out; truncated episodes dropped), AdamW; the loss per step."""
    from geode.post.rollout import episodes_batch

    episodes = [e for e in episodes if not e.truncated]
    if not episodes or steps <= 0:
        return []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    dev = next(model.parameters()).device
    was = model.training
    model.train()
    losses = []
    try:
        for _ in range(steps):
            rows = [rng.choice(episodes) for _ in range(batch_size)]
            batch = episodes_batch(rows, torch.ones(len(rows)), pad_id, False).to(dev)
            mask = batch.loss_mask  # (B, T): the sampled tokens
            logits = model(**batch.model_inputs(), rows=mask)  # (N, V)
            loss = F.cross_entropy(logits.float(), batch.targets[mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was)
    return losses


@dataclass
class SelfImproveConfig:
    """The loop's sizes (module doc)."""

    family: str = "goto-local"  # a mission family of geode.agents.envs.minigrid
    rounds: int = 3
    goals: int = 32  # scenes (one proposed goal each) per round
    samples: int = 4  # episodes per goal
    heldout: int = 64  # held-out scenes (MiniGrid's own missions)
    max_turns: int = 8
    max_new_tokens: int = 6  # per model turn: an action word and <end_of_turn>
    temperature: float = 1.0  # the agent's sampling in rounds (held-out: greedy)
    threshold: float = 0.5  # P(yes) >= threshold: judged success
    bc_steps: int = 30
    bc_lr: float = 1e-3
    bc_batch: int = 16
    tile_size: int = 8  # rendered frame: tile_size px per grid cell
    seed: int = 0


def _envs(cfg: SelfImproveConfig, split: str, start: int, n: int) -> list[MiniGridEnv]:
    specs = mission_family(cfg.family, split, start + n)[start:]
    return [MiniGridEnv(env_id, seed, max_turns=cfg.max_turns, record=True,
                        tile_size=cfg.tile_size) for env_id, seed in specs]  # fmt: skip


def heldout(engine: Any, cfg: SelfImproveConfig) -> dict[str, float]:
    """Greedy success (MiniGrid's reward) on the family's first `cfg.heldout` held-out scenes
    (geode.agents.rl.heldout_success, the agents' one held-out evaluation)."""
    from .rl import heldout_success

    envs = _envs(cfg, "heldout", 0, cfg.heldout)
    s = heldout_success(engine, envs, k=0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    return {"success": s["success"], "episodes": len(envs)}


def self_improve(
    agent: torch.nn.Module,
    tokenizer: Any,
    judge: Any,
    setter: TaskSetter,
    cfg: SelfImproveConfig,
    out: str | Path,
    progress: bool = False,
) -> dict[str, Any]:
    """The rounds (module doc); writes OUT/selfimprove.json and OUT/selfimprove.png and
    returns the summary: held-out success per round (round 0: before), the judge's agreement
    with MiniGrid's reward per round, the episodes kept, the BC losses, timings."""
    from geode.infer import Engine, SamplingParams

    out = Path(out)
    engine = Engine(agent, tokenizer, max_batch=max(cfg.goals * cfg.samples, cfg.heldout),
                    optimize=False, seed=cfg.seed)  # fmt: skip
    summary: dict[str, Any] = {"config": dataclasses.asdict(cfg), "rounds": []}
    curve = [heldout(engine, cfg)["success"]]
    summary["heldout_success"] = curve
    if progress:
        print(f"round 0: held-out success {curve[0]:.3f}", flush=True)
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        scenes = _envs(cfg, "train", (r - 1) * cfg.goals, cfg.goals)
        goals = setter.propose(scenes, seed=cfg.seed * 7919 + r * 104_729)
        kw = dict(max_turns=cfg.max_turns, record=True, tile_size=cfg.tile_size)
        envs = [GoalEnv(s.env_id, s.seed, g, **kw) for s, g in zip(scenes, goals, strict=True)
                for _ in range(cfg.samples)]  # fmt: skip
        t1 = time.perf_counter()
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, seed=cfg.seed + 1000 * r)  # fmt: skip
        episodes, done = attempts(engine, envs, sampling)
        t2 = time.perf_counter()
        scores = judge(done)
        t3 = time.perf_counter()
        kept = [ep for ep, s in zip(episodes, scores, strict=True) if s >= cfg.threshold]
        losses = behaviour_clone(agent, kept, tokenizer.pad_id, steps=cfg.bc_steps,
                                 lr=cfg.bc_lr, batch_size=cfg.bc_batch, seed=cfg.seed + r)  # fmt: skip
        t4 = time.perf_counter()
        curve.append(heldout(engine, cfg)["success"])
        row = {
            "round": r,
            "goals": goals[:8],
            "distinct_goals": len(set(goals)),
            "episodes": len(done),
            "true_success": float(np.mean([a.success for a in done])),
            "judged_success": float(np.mean([s >= cfg.threshold for s in scores])),
            "kept": len(kept),
            "judge": agreement(scores, [bool(a.success) for a in done], cfg.threshold),
            "bc_loss_first": losses[0] if losses else None,
            "bc_loss_last": losses[-1] if losses else None,
            "heldout_success": curve[-1],
            "seconds": {"propose": t1 - t0, "rollout": t2 - t1, "judge": t3 - t2,
                        "train": t4 - t3, "heldout": time.perf_counter() - t4},
        }  # fmt: skip
        summary["rounds"].append(row)
        if progress:
            j = row["judge"]
            print(f"round {r}: true success {row['true_success']:.3f}, judged "
                  f"{row['judged_success']:.3f} (precision {j['precision']:.2f}, recall "
                  f"{j['recall']:.2f}), kept {len(kept)}, held-out {curve[-1]:.3f}",
                  flush=True)  # fmt: skip
    atomic_write_bytes(out / "selfimprove.json", json.dumps(summary, indent=1).encode())
    plot_rounds(summary, out / "selfimprove.png")
    return summary


def plot_rounds(summary: dict[str, Any], path: str | Path) -> Path:
    """Held-out success per round, with the judge's precision / recall per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    curve = summary["heldout_success"]
    ax.plot(range(len(curve)), curve, "o-", label="held-out success (env reward)")
    rounds = [r["round"] for r in summary["rounds"]]
    for key, style in (("precision", "s--"), ("recall", "^--")):
        ax.plot(rounds, [r["judge"][key] for r in summary["rounds"]], style, label=f"judge {key}")
    ax.plot(rounds, [r["true_success"] for r in summary["rounds"]], "x:",
            label="success on proposed goals")  # fmt: skip
    ax.set_xticks(range(len(curve)))
    ax.set_xlabel("round")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("self-improvement: " + summary["config"]["family"])
    fig.tight_layout()
    return save_figure(fig, path)
