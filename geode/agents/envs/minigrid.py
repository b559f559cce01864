"""MiniGrid / BabyAI episodes as agent environments (Gymnasium + minigrid; issue #21, item 2).

    env = MiniGridEnv("BabyAI-GoToObjS4-v0", seed=3, observation="text")
    messages = env.reset()            # one user message: mission, observation, action words
    messages, reward, done = env.step("forward")

The model answers with an action word — left, right, forward, pickup, drop, toggle, done —
and the first one in its text is taken ("I turn left." -> left; "pick up" -> pickup). Text
without one is an invalid action: counted in `info["invalid_actions"]`, the world does not
move (a no-op; `invalid_penalty` is subtracted from the step's reward), and the next message
says so. The reward is MiniGrid's: 1 - 0.9 * step_count / max_steps on success, else 0.
An episode ends on success, on MiniGrid's termination / truncation, or after `max_turns`
model turns. `info` has "success", "steps" (model turns), "invalid_actions", "mission".

Observations (`observation=`):
- "text": a compact, egocentric, deterministic description of the agent's 7x7 view (what
  the agent sees, walls block sight), e.g.

      Mission: go to the blue key
      You see: blue key 1 ahead 1 left; grey door (closed) 3 ahead
      Ahead: 1 free, then wall
      Carrying: nothing
      Actions: left, right, forward, pickup, drop, toggle, done. Answer with one action.

  (the mission and the action line only in the first message);
- "image": the rendered RGB frame of the whole grid (`env.render()`, `render_mode=
  "rgb_array"`) as an image part `{"type": "image", "image": PIL.Image}` of the user message,
  with the mission and the action words as text in the first message (a VLM acts on the
  picture; later messages are the frame alone, with a note after an invalid action);
- "both": the text and the image.
Every frame is kept when the observation has an image, or with `record=True`: `frames()`
returns them ((H, W, 3) uint8; geode.agents.frames.save_gif writes a GIF).

`expert_action(env)` is the next action of a scripted expert: BabyAI's bot
(`minigrid.utils.baby_ai_bot.BabyAIBot`, kept per episode) on BabyAI levels, a breadth-first
search over (cell, direction) on plain MiniGrid grids with a goal square (opening doors and
fetching the key of a locked door on the way). It drives scripted policies, SFT
demonstrations and the tests.

Mission families with disjoint train / held-out seeds: `mission_family(name, split, n)` ->
[(env_id, seed)]; `FAMILIES` lists them. "goto-obj-s4" (BabyAI-GoToObjS4-v0: "go to the
<color> <object>" in a 4x4 room — 2x2 free cells, one object, 16 steps at most; the expert
needs 1-3 actions) is the small easy family a nano model learns in CPU minutes (the agentic-RL
runs use it); "goto-obj", "goto-local", "pickup", "open" (BabyAI GoTo / Pickup / Open) and
"empty", "doorkey" (plain MiniGrid) are harder. Seeds: train 0, 1, 2, ...; held-out
1_000_000, 1_000_001, ... (disjoint seeds; but GoToObjS4 has only a few hundred distinct
layouts (mission, agent, object): 98% of 200 held-out layouts occur among 1000 training
seeds' — its held-out success measures the policy, not generalisation to unseen rooms;
GoToObj's 8x8 room: 1.5%).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import numpy as np

from geode.agents.base import AgentEnv

ACTIONS = ("left", "right", "forward", "pickup", "drop", "toggle", "done")  # MiniGrid's order
ACTION_LINE = f"Actions: {', '.join(ACTIONS)}. Answer with one action."
_ACTION_RE = re.compile(r"\b(left|right|forward|pick ?up|drop|toggle|done)\b", re.IGNORECASE)
OBSERVATIONS = ("text", "image", "both")

FAMILIES: dict[str, tuple[str, ...]] = {
    "goto-obj-s4": ("BabyAI-GoToObjS4-v0",),
    "goto-obj": ("BabyAI-GoToObj-v0",),
    "goto-local": ("BabyAI-GoToLocalS6N2-v0",),
    "pickup": ("BabyAI-PickupDist-v0",),
    "open": ("BabyAI-OpenDoorColor-v0",),
    "empty": ("MiniGrid-Empty-Random-5x5-v0",),
    "doorkey": ("MiniGrid-DoorKey-5x5-v0",),
}
SPLITS = {"train": 0, "heldout": 1_000_000}  # first seed of each split (disjoint ranges)


def mission_family(name: str, split: str, n: int) -> list[tuple[str, int]]:
    """`n` episodes (env_id, seed) of the family's `split` ("train" | "heldout"); the two
    splits' seeds are disjoint; several env ids alternate."""
    if name not in FAMILIES:
        raise ValueError(f"mission_family: unknown family {name!r} (known: {sorted(FAMILIES)})")
    if split not in SPLITS:
        raise ValueError(
            f"mission_family: unknown split {split!r} (expected one of {list(SPLITS)})"
        )
    if n < 0 or n > SPLITS["heldout"]:
        raise ValueError(f"mission_family: n must be in [0, {SPLITS['heldout']}], got {n}")
    ids = FAMILIES[name]
    return [(ids[i % len(ids)], SPLITS[split] + i) for i in range(n)]


def parse_action(text: str) -> str | None:
    """The first action word in `text` ("pick up" counts as pickup), or None."""
    m = _ACTION_RE.search(text or "")
    return None if m is None else m.group(1).lower().replace(" ", "")


def _check_env_id(env_id: str) -> None:
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the MiniGrid / BabyAI ids)

    if env_id not in gym.registry or not env_id.startswith(("MiniGrid-", "BabyAI-")):
        raise ValueError(f"MiniGridEnv: unknown MiniGrid/BabyAI env id {env_id!r}")


def _name(obj: Any) -> str:
    """A world object as words: "blue key", "grey door (locked)", "goal", "lava"."""
    if obj.type in ("goal", "lava", "floor", "wall"):
        return obj.type
    if obj.type == "door":
        state = "open" if obj.is_open else "locked" if obj.is_locked else "closed"
        return f"{obj.color} door ({state})"
    return f"{obj.color} {obj.type}"


def _where(ahead: int, right: int) -> str:
    parts = [f"{ahead} ahead"] if ahead else []
    if right:
        parts.append(f"{abs(right)} {'right' if right > 0 else 'left'}")
    return " ".join(parts)


def describe(u: Any) -> str:
    """The text observation of an unwrapped MiniGrid env (module doc): what is in view with
    relative positions, the cells straight ahead, the carried object."""
    grid, vis = u.gen_obs_grid()  # agent at (v // 2, v - 1) facing -j
    v = u.agent_view_size
    seen = []
    for j in range(v):
        for i in range(v):
            obj = grid.get(i, j)
            ahead, right = v - 1 - j, i - v // 2
            if (
                not vis[i, j]
                or obj is None
                or obj.type in ("wall", "floor")
                or (ahead, right) == (0, 0)
            ):
                continue
            seen.append((ahead + abs(right), ahead, right, f"{_name(obj)} {_where(ahead, right)}"))
    seen.sort()
    free, blocker = 0, None
    for j in range(v - 2, -1, -1):  # the cells straight ahead, nearest first
        obj = grid.get(v // 2, j)
        if not vis[v // 2, j]:
            break
        if obj is not None and not (obj.type == "door" and obj.is_open):
            blocker = _name(obj)
            break
        free += 1
    if blocker is None:
        ahead = f"{free} free"
    else:
        ahead = blocker if free == 0 else f"{free} free, then {blocker}"
    carrying = _name(u.carrying) if u.carrying is not None else "nothing"
    return (
        f"You see: {'; '.join(s[-1] for s in seen) or 'nothing'}\n"
        f"Ahead: {ahead}\nCarrying: {carrying}"
    )


class MiniGridEnv(AgentEnv):
    """A MiniGrid / BabyAI episode as an agent env (module doc)."""

    def __init__(
        self,
        env_id: str = "BabyAI-GoToObj-v0",
        seed: int = 0,
        *,
        observation: str = "text",
        max_turns: int = 16,
        tile_size: int = 16,
        record: bool | None = None,
        invalid_penalty: float = 0.0,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        _check_env_id(env_id)
        if observation not in OBSERVATIONS:
            raise ValueError(
                f"MiniGridEnv: observation must be one of {OBSERVATIONS}, got {observation!r}"
            )
        if max_turns < 1:
            raise ValueError(f"MiniGridEnv: max_turns must be >= 1, got {max_turns}")
        self.env_id, self.seed, self.observation = env_id, int(seed), observation
        self.max_turns, self.tile_size = int(max_turns), int(tile_size)
        self.record = observation != "text" if record is None else bool(record)
        self.invalid_penalty = float(invalid_penalty)
        self.meta = {"env_id": env_id, "seed": self.seed, **(meta or {})}
        self.gym: Any = None  # the gymnasium env, made at the first reset
        self._frames: list[np.ndarray] = []
        self._bot: Any = None
        self._bot_turn = -1  # the turn at which the expert was last asked
        self._suggested: str | None = None
        self.last_action: str | None = None
        self.done = False

    def spawn(self) -> MiniGridEnv:
        """A new env with the same episode and options (its own gymnasium env)."""
        return MiniGridEnv(
            self.env_id, self.seed, observation=self.observation, max_turns=self.max_turns,
            tile_size=self.tile_size, record=self.record, invalid_penalty=self.invalid_penalty,
            meta=self.meta,
        )  # fmt: skip

    @property
    def unwrapped(self) -> Any:
        """The MiniGrid env itself (agent_pos, grid, carrying, mission ...)."""
        if self.gym is None:
            raise RuntimeError(f"MiniGridEnv {self.env_id}: reset() first")
        return self.gym.unwrapped

    @property
    def mission(self) -> str:
        """The episode's mission text."""
        return str(self.unwrapped.mission)

    def reset(self) -> list[dict[str, Any]]:
        """A new episode (the same one for the same seed): the first user message."""
        import gymnasium as gym
        import minigrid  # noqa: F401

        if self.gym is None:
            self.gym = gym.make(self.env_id, render_mode="rgb_array", tile_size=self.tile_size)
        try:
            self.gym.reset(seed=self.seed)
        except Exception as e:
            raise RuntimeError(
                f"MiniGridEnv {self.env_id} (seed {self.seed}): reset failed: {type(e).__name__}: {e}"
            ) from e
        self.info = {**self.info, "success": False, "steps": 0, "tool_calls": 0, "error": None,
                     "invalid_actions": 0, "mission": self.mission, "reward": 0.0}  # fmt: skip
        self._frames, self._bot, self._bot_turn, self._suggested = [], None, -1, None
        self.last_action, self.done = None, False
        return [self._message(first=True)]

    def step(self, message: str) -> tuple[list[dict[str, Any]] | None, float, bool]:
        """Act on the first action word of the model's message (module doc)."""
        if self.gym is None or self.done:
            raise RuntimeError(
                f"MiniGridEnv {self.env_id}: step() without a running episode (reset first)"
            )
        action = parse_action(message)
        turns = self.info["steps"] + 1
        self.info = {**self.info, "steps": turns}
        self.last_action = action
        if action is None:
            self.info["invalid_actions"] += 1
            reward, ended = -self.invalid_penalty, False
        else:
            try:
                _, r, terminated, truncated, _ = self.gym.step(ACTIONS.index(action))
            except Exception as e:
                raise RuntimeError(
                    f"MiniGridEnv {self.env_id} (seed {self.seed}): step {action!r} failed: "
                    f"{type(e).__name__}: {e}"
                ) from e
            reward, ended = float(r), bool(terminated or truncated)
            if r > 0:
                self.info["success"] = True
        self.info["reward"] += reward
        self.done = ended or turns >= self.max_turns
        message_out = None if self.done else [self._message(first=False, invalid=action is None)]
        if self.done and self.record:
            self._frames.append(self._render())
        return message_out, reward, self.done

    def frames(self) -> list[np.ndarray]:
        """The episode's rendered frames, (H, W, 3) uint8 (when recording; module doc)."""
        return list(self._frames)

    def _render(self) -> np.ndarray:
        return np.asarray(self.gym.render(), dtype=np.uint8)

    def _message(self, first: bool, invalid: bool = False) -> dict[str, Any]:
        """The user message of the current state."""
        lines = []
        if invalid:
            lines.append(f"Invalid action. Answer with one of: {', '.join(ACTIONS)}.")
        if first:
            lines.append(f"Mission: {self.mission}")
        if self.observation != "image":
            lines.append(describe(self.unwrapped))
        if first:
            lines.append(ACTION_LINE)
        text = "\n".join(lines)
        frame = self._render() if self.record or self.observation != "text" else None
        if frame is not None:
            self._frames.append(frame)
        if self.observation == "text":
            return {"role": "user", "content": text}
        from PIL import Image

        parts: list[dict[str, Any]] = [{"type": "image", "image": Image.fromarray(frame)}]
        return {
            "role": "user",
            "content": parts + ([{"type": "text", "text": text}] if text else []),
        }


# ---------------------------------------------------------------------------- the expert
def expert_action(env: MiniGridEnv) -> str:
    """The scripted expert's next action word for the env's current state (module doc)."""
    u = env.unwrapped
    if env.done:
        raise RuntimeError(f"expert_action: the {env.env_id} episode is over")
    if hasattr(u, "instrs"):
        return _bot_action(env)
    return _bfs_action(u, env.env_id)


def _bot_action(env: MiniGridEnv) -> str:
    """BabyAI's bot, kept for the episode; rebuilt when it was not asked at the last turn."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    turn = env.info["steps"]
    taken = None
    if env._bot is None or env._bot_turn != turn - 1:
        env._bot = BabyAIBot(env.gym)
    elif env.last_action is not None and env.last_action != env._suggested:
        taken = env.unwrapped.actions(ACTIONS.index(env.last_action))
    action = ACTIONS[int(env._bot.replan(taken))]
    env._bot_turn, env._suggested = turn, action
    return action


_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # MiniGrid's agent_dir 0..3: right, down, left, up


def _search(u: Any, accept: Any) -> list[str] | None:
    """The shortest action list (left/right/forward) from the agent's state to facing a cell
    with accept(cell) true; None when unreachable."""
    start = (int(u.agent_pos[0]), int(u.agent_pos[1]), int(u.agent_dir))
    prev: dict[tuple[int, int, int], tuple[Any, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        x, y, d = state = queue.popleft()
        fx, fy = x + _DIRS[d][0], y + _DIRS[d][1]
        front = u.grid.get(fx, fy) if 0 <= fx < u.width and 0 <= fy < u.height else None
        if front is not None and accept(front):
            path = []
            while prev[state] is not None:
                state, a = prev[state]
                path.append(a)
            return path[::-1]
        moves = [((x, y, (d - 1) % 4), "left"), ((x, y, (d + 1) % 4), "right")]
        if (
            0 <= fx < u.width
            and 0 <= fy < u.height
            and (front is None or (front.can_overlap() and front.type != "lava"))
        ):
            moves.append(((fx, fy, d), "forward"))
        for nxt, a in moves:
            if nxt not in prev:
                prev[nxt] = (state, a)
                queue.append(nxt)
    return None


def _bfs_action(u: Any, env_id: str) -> str:
    """Plain grids: walk to the goal square; else open a reachable door (toggle); else pick up
    the key of a locked door; else drop what is carried to free the hands."""
    if not any(o is not None and o.type == "goal" for o in u.grid.grid):
        raise ValueError(
            f"expert_action: no expert for {env_id} (no goal square; BabyAI levels use the bot)"
        )
    goal = _search(u, lambda c: c.type == "goal")
    if goal is not None:
        return goal[0] if goal else "forward"
    key = u.carrying if u.carrying is not None and u.carrying.type == "key" else None
    door = _search(u, lambda c: c.type == "door" and not c.is_open
                   and (not c.is_locked or (key is not None and key.color == c.color)))  # fmt: skip
    if door is not None:
        return door[0] if door else "toggle"
    if u.carrying is None:
        locked = {
            o.color for o in u.grid.grid if o is not None and o.type == "door" and o.is_locked
        }
        fetch = _search(u, lambda c: c.type == "key" and c.color in locked)
        if fetch is not None:
            return fetch[0] if fetch else "pickup"
    raise ValueError(f"expert_action: {env_id}: no plan reaches the goal from this state")
