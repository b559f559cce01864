"""What every agent environment has beyond geode.post.env.Env's reset / step.

An agent env is an `Env` (reset -> first messages; step(model message) -> (next messages,
reward, done)) that also keeps the episode's outcome in `info` and may declare tools and
render frames:

    env.tools      # OpenAI-shaped tool declarations rendered into the prompt (None: none)
    env.max_turns  # model turns at most (geode.post.rollout caps the episode with it)
    env.info       # {"success": bool, "steps": int, "tool_calls": int, "error": str | None}
    env.frames()   # RGB frames (H, W, 3) uint8 of the episode so far (image envs), else []

`reset` starts a new episode and resets `info`; environments keep per-episode state in
attributes they reassign in reset / step, so `geode.post.env.spawn` (a shallow copy) gives
each sample of a group its own episode.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def new_info() -> dict[str, Any]:
    """A fresh episode outcome."""
    return {"success": False, "steps": 0, "tool_calls": 0, "error": None}


class AgentEnv:
    """Base of agent environments: `tools`, `max_turns`, `info` and `frames` (module doc)."""

    tools: list[dict[str, Any]] | None = None
    max_turns: int = 8

    def __init__(self) -> None:
        self.info: dict[str, Any] = new_info()
        self.meta: dict[str, Any] = {}

    def frames(self) -> list[np.ndarray]:
        """RGB frames of the episode so far (none for text environments)."""
        return []
