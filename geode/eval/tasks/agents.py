"""Agent tasks (issue #21, item 5): whole episodes of agent environments, scored by success.

    geode eval agent-minigrid,agent-math --model runs/agent --limit 20 --out eval_out
    geode eval agent-minigrid --endpoint http://localhost:8000 --option observation=image

Each document is one episode of an environment. In process (`--model`: EngineBackend) the
episodes run batched on the engine with `geode.agents.loop.run_agent` (the KV of earlier
turns reused, env messages and tool results appended as forced tokens); through an endpoint
(`--endpoint`: EndpointBackend, e.g. `geode serve`) with the client-side OpenAI tool-call loop
of `geode.agents.remote.run_remote` (tools sent as `tools`, the calls executed by the env's
own Toolbox, results sent back as role "tool" messages). With greedy decoding both give the
same episodes (tests/agents/test_agent_eval.py).

Tasks (`--option KEY=VALUE` for the options):
- agent-minigrid: BabyAI / MiniGrid missions (`geode.agents.envs.minigrid`): family
  ("goto-obj-s4"; see `FAMILIES`), split ("heldout" or "train"), observation ("text",
  "image", "both"), max_turns (the env's default); a GIF per episode when the observation has
  images (or gif=true).
- agent-textworld: TextWorld games (`geode.agents.envs.textworld`), compiled once per seed.
- agent-math, agent-code: the project's tool-use task families (`geode.agents.tasks`):
  arithmetic that needs the calculator, code checked by unit tests in the sandbox.

`--max-tokens` is per model turn. Outputs: OUT/<task>/samples.jsonl holds one episode per
line (success, reward, steps, tool_calls, tokens, turns, truncated, error and the whole
transcript: messages, tool calls, tool results; image parts as {"type": "image"}), GIFs in
OUT/<task>/gifs/. Metrics: success_rate (Wilson 95% interval) and the mean and standard error
of steps, tool calls and tokens (model-sampled, per episode); `errors` counts episodes that
an environment or endpoint failure ended (they count as failures).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..backends import BackendError, EndpointBackend, EngineBackend
from ..metrics import mean_with_ci
from .base import Task, TaskError


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean: sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def plain_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for JSON: image parts become {"type": "image"} (the frames go to the GIF)."""
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            c = [
                {"type": "image"}
                if isinstance(p, dict) and p.get("type") in ("image", "image_url")
                else p
                for p in c
            ]
        out.append({**m, "content": c})
    return out


def episode_record(result: Any) -> dict[str, Any]:
    """The numbers of one finished episode, from run_agent's AgentResult (engine) or
    run_remote's RemoteResult (endpoint)."""
    info = dict(result.info or {})
    ep = getattr(result, "episode", None)  # in process: the engine's Episode
    turns = len(ep.turns) if ep is not None else result.turns
    truncated = bool(ep.truncated if ep is not None else result.truncated)
    transcript = plain_messages(result.transcript)
    final = [m for m in transcript if m.get("role") == "assistant"]
    return {
        "output": final[-1].get("content") if final else None,
        "correct": bool(result.success),
        "success": bool(result.success),
        "reward": float(result.reward),
        "steps": int(info.get("steps", turns)),
        "tool_calls": int(info.get("tool_calls", 0)),
        "tokens": int(info.get("tokens", 0)),
        "turns": int(turns),
        "truncated": truncated,
        "error": info.get("error"),
        "transcript": transcript,
    }


class _Own:
    """An env whose episode runs on itself (`spawn` returns it): the task keeps its frames."""

    def __init__(self, env: Any):
        self.env = env

    def spawn(self) -> Any:
        return self.env


class AgentTask(Task):
    """Base of agent tasks: `load` lists episodes, `make_env(doc)` builds each one's env."""

    kind = "episodes"  # the runner calls run_episodes instead of generating text
    verifiable = False  # no self-correction (an episode is already multi-turn)
    primary = "success_rate"
    generates_limit = True
    default_limit = 20
    default_max_tokens = 64  # per model turn

    def make_env(self, doc: dict[str, Any]) -> Any:
        """The environment of one document's episode."""
        raise NotImplementedError

    def gif(self, doc: dict[str, Any]) -> bool:
        """Write this episode's frames as a GIF."""
        return False

    @property
    def limit(self) -> int:
        """Episodes to run."""
        return self.config.limit or self.default_limit

    def run_episodes(
        self,
        backend: Any,
        chunk: Sequence[tuple[dict[str, Any], int]],
        update: Callable[[int], None],
        out_dir: Path,
    ) -> list[dict[str, Any]]:
        """One episode per (doc, sample index) on `backend`; its records (GIFs in out_dir)."""
        envs = [self.make_env(d) for d, _ in chunk]
        keys = [f"{d['id']}#{j}" for d, j in chunk]
        seed = (
            None if self.temperature == 0 else zlib.crc32(f"{self.config.seed}:{keys[0]}".encode())
        )
        if isinstance(backend, EngineBackend):
            results = self._engine(backend, envs, seed)
        elif isinstance(backend, EndpointBackend):
            results = self._endpoint(backend, envs, seed)
        else:
            raise TaskError(
                f"{self.name}: agent episodes need the engine (--model) or an endpoint "
                f"(--endpoint), not a {type(backend).__name__}"
            )
        records = []
        for (d, j), key, env, res in zip(chunk, keys, envs, results, strict=True):
            first = next((i for i, m in enumerate(res.transcript) if m["role"] == "assistant"),
                         len(res.transcript))  # fmt: skip
            rec = {"task": self.name, "key": key, "id": d["id"], "sample": j,
                   "prompt": plain_messages(res.transcript[:first])}  # fmt: skip
            rec.update(episode_record(res))
            frames = env.frames() if hasattr(env, "frames") else []
            if frames and self.gif(d):
                from geode.agents.frames import save_gif

                name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".gif"
                save_gif(frames, out_dir / "gifs" / name, fps=self.config.options.get("fps", 2))
                rec["gif"] = f"gifs/{name}"
            records.append(rec)
            update(1)
        return records

    def _engine(self, backend: EngineBackend, envs: list[Any], seed: int | None) -> list[Any]:
        """The episodes batched on the in-process engine (KV reuse, forced tokens)."""
        from geode.agents.loop import run_agent
        from geode.infer import SamplingParams

        sampling = SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature,
                                  seed=seed)  # fmt: skip
        return run_agent(backend.engine, [_Own(e) for e in envs], sampling=sampling)

    def _endpoint(self, backend: EndpointBackend, envs: list[Any], seed: int | None) -> list:
        """The episodes through the endpoint (client-side tool-call loop); an endpoint that is
        down stops the run (a rerun resumes), a rejected request is a counted failure."""
        from geode.agents.remote import run_remote

        results = run_remote(
            backend.base, backend.model, envs, max_tokens=self.max_tokens,
            temperature=self.temperature, seed=seed, api_key=backend.api_key,
            concurrency=backend.concurrency, retries=backend.retries, timeout=backend.timeout,
        )  # fmt: skip
        down = [r for r in results if r.retryable]
        if down:
            raise BackendError(f"{self.name}: {down[0].info['error']}", retryable=True)
        return results

    def aggregate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Success rate (Wilson interval), mean and standard error of steps, tool calls and
        tokens per episode, errors and truncations counted."""
        ci = mean_with_ci([bool(s["success"]) for s in samples])
        out: dict[str, Any] = {
            "success_rate": ci["mean"],
            "success_rate_ci": [ci["ci_low"], ci["ci_high"]],
            "success_rate_se": mean_se([float(s["success"]) for s in samples])[1],
            "n": ci["n"],
        }
        for k in ("steps", "tool_calls", "tokens", "reward"):
            out[k], out[f"{k}_se"] = mean_se([float(s[k]) for s in samples])
        out["errors"] = sum(1 for s in samples if s.get("error"))
        out["truncated"] = sum(1 for s in samples if s.get("truncated"))
        return out

    def describe(self) -> dict[str, Any]:
        """The run's configuration (options included: they choose the episodes; a larger
        --limit extends a run, the episodes of a smaller one being its first)."""
        return {**super().describe(), "options": self.config.options}


class MiniGridTask(AgentTask):
    """BabyAI / MiniGrid missions of one family (module doc)."""

    name = "agent-minigrid"
    default_max_tokens = 16

    def _opt(self, key: str, default: Any) -> Any:
        return self.config.options.get(key, default)

    def load(self) -> list[dict[str, Any]]:
        """`limit` episodes (env id, seed) of the family's split."""
        from geode.agents.envs.minigrid import mission_family

        family, split = self._opt("family", "goto-obj-s4"), self._opt("split", "heldout")
        try:
            episodes = mission_family(family, split, self.limit)
        except ValueError as e:
            raise TaskError(f"{self.name}: {e}") from None
        return [{"id": f"{e}:{s}", "env_id": e, "seed": s} for e, s in episodes]

    def make_env(self, doc: dict[str, Any]) -> Any:
        """A MiniGridEnv of the document's mission and seed."""
        from geode.agents.envs.minigrid import MiniGridEnv

        kw = {"observation": self._opt("observation", "text")}
        if "max_turns" in self.config.options:
            kw["max_turns"] = int(self.config.options["max_turns"])
        kw["record"] = bool(self._opt("gif", kw["observation"] != "text"))
        try:
            return MiniGridEnv(doc["env_id"], doc["seed"], **kw)
        except ValueError as e:
            raise TaskError(f"{self.name}: {e}") from None

    def gif(self, doc: dict[str, Any]) -> bool:
        """GIFs when the observation has images (or option gif=true)."""
        return bool(self._opt("gif", self._opt("observation", "text") != "text"))


class ToolUseTask(AgentTask):
    """The project's tool-use family `family` (`geode.agents.tasks`), held-out split."""

    family = "calc"

    def load(self) -> list[dict[str, Any]]:
        """`limit` held-out tasks of the family (option split="train" for training ones)."""
        from geode.agents import tasks

        split = self.config.options.get("split", "heldout")
        try:
            found = tasks.generate(self.family, self.limit, seed=self.config.seed, split=split)
        except ValueError as e:
            raise TaskError(f"{self.name}: {e}") from None
        return [{"id": t.uid, "task": t} for t in found]

    def make_env(self, doc: dict[str, Any]) -> Any:
        """A ToolEnv of the task (options: mode "act" / "plan-act-verify", max_turns)."""
        from geode.agents import tasks

        o = self.config.options
        try:
            return tasks.make_env(doc["task"], mode=o.get("mode", "act"),
                                  max_turns=int(o.get("max_turns", 4)))  # fmt: skip
        except ValueError as e:
            raise TaskError(f"{self.name}: {e}") from None


class MathToolTask(ToolUseTask):
    """Arithmetic on large numbers that needs the calculator (family "calc")."""

    name = "agent-math"
    family = "calc"
    default_max_tokens = 128


class CodeToolTask(ToolUseTask):
    """Python functions checked by unit tests in the sandbox, with the python tool ("code")."""

    name = "agent-code"
    family = "code"
    default_max_tokens = 384


class TextWorldTask(AgentTask):
    """Generated TextWorld games (held-out seeds), compiled once into a games directory."""

    name = "agent-textworld"
    default_max_tokens = 32
    default_limit = 10

    def games_dir(self) -> Path:
        """`--data DIR` or option games=DIR, else ~/.cache/geode/textworld (reused)."""
        where = self.config.data or self.config.options.get("games")
        return Path(where) if where else Path.home() / ".cache" / "geode" / "textworld"

    def load(self) -> list[dict[str, Any]]:
        """`limit` games (options: nb_rooms 2, nb_objects 4, quest_length 3, split)."""
        from geode.agents.envs.textworld import make_games

        o = self.config.options
        kw = {k: int(o[k]) for k in ("nb_rooms", "nb_objects", "quest_length") if k in o}
        try:
            paths = make_games(self.limit, self.config.seed, self.games_dir(),
                               split=o.get("split", "heldout"), **kw)  # fmt: skip
        except ValueError as e:
            raise TaskError(f"{self.name}: {e}") from None
        return [{"id": p.stem, "game": str(p)} for p in paths]

    def make_env(self, doc: dict[str, Any]) -> Any:
        """A TextWorldEnv of the game (option max_turns, default 20)."""
        from geode.agents.envs.textworld import TextWorldEnv

        return TextWorldEnv(doc["game"], max_turns=int(self.config.options.get("max_turns", 20)))
