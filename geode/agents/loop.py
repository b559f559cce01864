"""The agent loop on the engine: tool calls executed between model turns, plan-act-verify.

    box = Toolbox([calculator_tool(), python_tool()])
    env = ToolEnv("What is 123456 * 654321?", box, verify=answer_check, mode="act")
    [result] = run_agent(engine, [env], sampling=SamplingParams(max_new_tokens=256))
    result.success, result.reward, result.info, result.transcript

`ToolEnv` is an `Env` (geode.post.env) and an `AgentEnv` (geode.agents.base): `reset` gives
the task (with a short instruction for the mode) and `tools` the toolbox's declarations, which
`geode.post.rollout.rollout` renders into the prompt. Each model turn comes to `step` with its
tool-call markers: its calls run through the `Toolbox` and come back as role "tool" messages,
which the rollout appends as forced tokens on the same KV cache (one driver for inference and
RL: `run_agent` is `rollout` plus the episode outcome). A turn without calls is the final
answer: `verify(answer)` gives the reward (`info["success"]` = reward >= 1), done.

plan-act-verify (the loop Kimi k1.5/k2 and SCoRe-style self-correction train): the first turn
is a plan (its tool calls, if any, run as usual), then the model acts; after a final answer
the verifier runs and, while it fails and turns are left, its feedback goes back and the model
revises. Budgets end the episode with `info["error"]` naming them: turns (`max_turns`), tool
wall time (`tool_seconds` over the episode; each call's timeout is capped by what is left),
tokens (`SamplingParams.max_new_tokens` per turn; the engine caps the episode at that times
max_turns). An env that raises ends only its own episode (rollout records the error).

`ScriptedPolicy` drives the real engine with a fixed policy (a list of turns, or a function of
the conversation so far): a logits processor that leaves only the script's next token, so
tests and demonstrations exercise the same loop, KV reuse and forced tokens as a model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from geode.chat import parse, render_parts
from geode.post.env import Env, spawn
from geode.post.rollout import Episode, rollout
from geode.tokenizer import END_OF_TURN, START_OF_TURN

from .base import AgentEnv, new_info
from .tools import Toolbox

MODES = ("act", "plan-act-verify")
INSTRUCTIONS = {
    "act": "Use the tools when they help. When you are done, give the final answer as a "
    "message without tool calls.",
    "plan-act-verify": "First write a short plan without tool calls. Then carry it out with "
    "the tools and give the final answer as a message without tool calls. A verifier checks "
    "the answer; if it fails, revise.",
}
ACT_AFTER_PLAN = "Now carry out your plan."
CALL_FORMAT = (
    'write a tool call as <start_of_tool_call>{"name": "TOOL", "arguments": {...}}'
    "<end_of_tool_call>"
)
Verifier = Callable[[str], Any]  # final answer -> reward, or (reward, feedback text)


class ToolEnv(AgentEnv):
    """An episode of tool use on one task (module doc): the model's message -> tool calls
    executed -> role "tool" messages; a final answer -> verify -> reward, done.

    info: success, steps, tool_calls, error (base.py), tool_errors, tool_seconds, answer, and
    in plan-act-verify plan and revisions. The samples of a group (`spawn`, a shallow copy)
    share the toolbox, so file tools of a group share one workspace.
    """

    def __init__(
        self,
        task: str | list[dict],
        toolbox: Toolbox,
        verify: Verifier | None = None,
        *,
        mode: str = "act",
        max_turns: int = 8,
        tool_seconds: float = 60.0,
        meta: dict | None = None,
        instructions: str | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"ToolEnv: mode must be one of {MODES}, got {mode!r}")
        if max_turns < 1 or (mode == "plan-act-verify" and max_turns < 2):
            raise ValueError(f"ToolEnv: max_turns={max_turns} is too few for mode {mode!r}")
        if not tool_seconds > 0:
            raise ValueError(f"ToolEnv: tool_seconds must be > 0, got {tool_seconds}")
        if not isinstance(toolbox, Toolbox):
            raise ValueError(f"ToolEnv: toolbox must be a Toolbox, got {type(toolbox).__name__}")
        self.task = [{"role": "user", "content": task}] if isinstance(task, str) else list(task)
        self.toolbox = toolbox
        self.tools = toolbox.declarations() or None
        self.verify = verify
        self.mode = mode
        self.max_turns = max_turns
        self.tool_seconds = tool_seconds
        self.meta = dict(meta or {})
        self.instructions = INSTRUCTIONS[mode] if instructions is None else instructions
        self._reset_state()

    def _reset_state(self) -> None:
        self.info = {**new_info(), "tool_errors": 0, "tool_seconds": 0.0, "answer": None}
        if self.mode == "plan-act-verify":
            self.info.update(plan=None, revisions=0)
        self.phase = "plan" if self.mode == "plan-act-verify" else "act"

    def reset(self) -> list[dict[str, Any]]:
        """The task's messages, the mode's instruction first (as the system prompt)."""
        self._reset_state()
        msgs = list(self.task)
        if self.instructions:
            if msgs and msgs[0].get("role") == "system":
                msgs[0] = {**msgs[0], "content": f"{self.instructions}\n\n{msgs[0]['content']}"}
            else:
                msgs.insert(0, {"role": "system", "content": self.instructions})
        return msgs

    def _end(self, reward: float, error: str | None = None) -> tuple[None, float, bool]:
        if error is not None:
            self.info["error"] = error
        return None, reward, True

    def _score(self, answer: str) -> tuple[float, str]:
        """(reward, feedback) of a final answer; 0.0 without a verifier."""
        if self.verify is None:
            return 0.0, ""
        got = self.verify(answer)
        if isinstance(got, tuple):
            return float(got[0]), str(got[1])
        return float(got), ""

    def step(self, message: str) -> tuple[list[dict] | None, float, bool]:
        """One model turn (raw text with tool-call markers) -> (messages, reward, done)."""
        info = self.info
        info["steps"] += 1
        turns_left = info["steps"] < self.max_turns
        parsed = parse(message)
        if parsed.tool_calls:
            out = []
            for call in parsed.tool_calls:
                left = self.tool_seconds - info["tool_seconds"]
                if left <= 0:
                    return self._end(0.0, f"tool-time budget: {self.tool_seconds:g} s of tool "
                                     "time used (tool_seconds)")  # fmt: skip
                r = self.toolbox.call(call, timeout=left)
                info["tool_calls"] += 1
                info["tool_errors"] += int(r.error)
                info["tool_seconds"] += r.seconds
                out.append(r.message(call.id))
            if info["tool_seconds"] >= self.tool_seconds:
                return self._end(0.0, f"tool-time budget: {self.tool_seconds:g} s of tool time "
                                 "used (tool_seconds)")  # fmt: skip
            if not turns_left:
                return self._end(0.0, f"turn budget: {self.max_turns} model turns used "
                                 "(max_turns) before a final answer")  # fmt: skip
            if self.phase == "plan":
                info["plan"], self.phase = parsed.content, "act"
            return out, 0.0, False
        bad = [e for e in parsed.errors if e.startswith("tool call")]
        if bad:
            info["tool_errors"] += len(bad)
            if not turns_left:
                return self._end(0.0, f"turn budget: {self.max_turns} model turns used "
                                 "(max_turns); the last had a malformed tool call")  # fmt: skip
            text = "error: " + "; ".join(bad) + f". To use a tool, {CALL_FORMAT}."
            return [{"role": "user", "content": text}], 0.0, False
        if self.phase == "plan":
            info["plan"], self.phase = parsed.content, "act"
            if not turns_left:
                return self._end(0.0, f"turn budget: max_turns={self.max_turns} ended at the plan")
            return [{"role": "user", "content": ACT_AFTER_PLAN}], 0.0, False
        info["answer"] = parsed.content
        try:
            reward, feedback = self._score(parsed.content)
        except Exception as e:  # noqa: BLE001 - a verifier fault fails the episode, not the run
            return self._end(0.0, f"verifier raised {type(e).__name__}: {e}")
        success = reward >= 1.0
        if self.mode == "plan-act-verify" and not success and self.verify is not None:
            if turns_left:
                info["revisions"] += 1
                text = f"The verifier rejected the answer (reward {reward:.2f})"
                text += f": {feedback}" if feedback else "."
                return [{"role": "user", "content": text + " Revise it."}], 0.0, False
        info["success"] = success
        return self._end(reward)


@dataclass
class AgentResult:
    """One episode's outcome: the engine's episode, success, reward, info and transcript."""

    episode: Episode
    success: bool
    reward: float
    info: dict
    transcript: list[dict]  # the chat messages, tool calls and results parsed


class _Recorder:
    """Stands for an env in `rollout`: records the copy each sample runs on (for its info)."""

    def __init__(self, env: Env):
        self.env = env
        self.spawned: list[Any] = []

    def spawn(self) -> Any:
        e = spawn(self.env)
        self.spawned.append(e)
        return e


def run_agent(
    engine: Any, envs: Sequence[Env], *, sampling: Any, group_size: int = 1
) -> list[AgentResult]:
    """`group_size` episodes of each env on the engine (group-major, as `rollout`), with their
    outcomes; a model turn cut at `sampling.max_new_tokens` ends the episode with a
    token-budget error."""
    recs = [_Recorder(e) for e in envs]
    t0 = time.perf_counter()
    episodes = rollout(engine, recs, group_size, sampling)
    seconds = time.perf_counter() - t0
    copies = [e for r in recs for e in r.spawned]
    out = []
    for ep, env in zip(episodes, copies, strict=True):
        info = dict(getattr(env, "info", None) or new_info())
        if ep.meta.get("error"):
            info["error"] = ep.meta["error"]
        elif ep.truncated and not info.get("error"):
            info["error"] = (f"token budget: a model turn reached max_new_tokens="
                             f"{sampling.max_new_tokens}")  # fmt: skip
        info["tokens"] = sum(ep.sampled_mask)
        info["episode_tokens"] = len(ep.prompt_ids) + len(ep.token_ids)
        info["rollout_seconds"] = seconds  # the whole batch's wall time
        reward = float(sum(ep.rewards))
        out.append(AgentResult(ep, bool(info.get("success")), reward, info, list(ep.messages)))
    return out


# ---------------------------------------------------------------------- scripted policies
def turn_text(message: dict[str, Any]) -> str:
    """What the model writes for an assistant message (thinking, content, tool calls), as the
    chat format renders it, without the closing <end_of_turn>."""
    spans = render_parts([{"role": "user", "content": "."}, message], bos=False)
    text = "".join(t for kind, t in spans if kind in ("assistant", "tool_call"))
    return text.removesuffix(END_OF_TURN)


class ScriptedPolicy:
    """A fixed policy run by the real engine: a logits processor that allows only the
    script's next token (module doc). `policy`: the turns in order (text, or messages of
    which the assistant ones are the turns, e.g. `geode.agents.tasks.expert(task)`), or a
    function (the conversation after the prompt, special tokens included, i.e. the tool
    results) -> the next turn's text."""

    def __init__(self, tokenizer: Any, policy: Sequence[str | dict] | Callable[[str], str]):
        ids = getattr(tokenizer, "special_ids", {}) or {}
        if START_OF_TURN not in ids or END_OF_TURN not in ids:
            raise ValueError("ScriptedPolicy: the tokenizer needs <start_of_turn>/<end_of_turn>")
        self.tok = tokenizer
        self.sot, self.eot = ids[START_OF_TURN], ids[END_OF_TURN]
        self.header = list(tokenizer.encode("model\n"))
        if not callable(policy):  # a conversation's other messages (tool results) are skipped
            policy = [m for m in policy if isinstance(m, str) or m.get("role") == "assistant"]
        self.policy = policy
        self._targets: dict[tuple[int, ...], list[int]] = {}

    def _next_turn(self, history: list[int]) -> list[int]:
        key = tuple(history)
        if key not in self._targets:
            if callable(self.policy):
                text = self.policy(self.tok.decode(history, skip_special=False))
            else:
                k = history.count(self.sot) // 2
                if k >= len(self.policy):
                    raise RuntimeError(f"ScriptedPolicy: the script has {len(self.policy)} "
                                       f"turns; turn {k + 1} was asked for")  # fmt: skip
                item = self.policy[k]
                text = turn_text(item) if isinstance(item, dict) else item
            self._targets[key] = [*self.tok.encode(text), self.eot]
        return self._targets[key]

    def __call__(self, out: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Logits (V,) with every token but the script's next one at -inf."""
        last = max((i for i, t in enumerate(out) if t == self.sot), default=None)
        start = 0 if last is None else last + 1 + len(self.header)
        target = self._next_turn(out[:start])
        p = len(out) - start
        if out[start:] != target[:p]:
            raise RuntimeError("ScriptedPolicy: the sequence left the script")
        z = torch.full_like(logits, float("-inf"))
        z[target[p] if p < len(target) else self.eot] = 0.0
        return z

    def sampling(self, sampling: Any = None, **kw: Any) -> Any:
        """SamplingParams (greedy, this processor) from `sampling` or the engine's defaults."""
        from geode.infer import SamplingParams

        base = sampling or SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 256))
        return dataclasses.replace(base, temperature=0.0, logits_processors=(self,), **kw)


__all__ = [
    "INSTRUCTIONS",
    "MODES",
    "AgentResult",
    "ScriptedPolicy",
    "ToolEnv",
    "run_agent",
    "turn_text",
]
