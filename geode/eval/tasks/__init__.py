"""Evaluation tasks, one module each; `get_task(name, config)` builds one by name."""

from __future__ import annotations

import importlib

from .base import Task, TaskConfig, TaskError, read_jsonl

# name -> "module:Class", imported on first use (math-verify, sandbox, matplotlib stay lazy).
TASKS: dict[str, str] = {
    "gsm8k": "gsm8k:GSM8K",
    "math500": "math500:Math500",
    "humaneval": "humaneval:HumanEval",
    "mc": "mc:MultipleChoice",
    "niah": "longctx:NeedleInHaystack",
    "mrcr": "longctx:MRCR",
    "tasks": "synthetic:SyntheticTasks",
    "shapes": "shapes:Shapes",
    "agent-minigrid": "agents:MiniGridTask",
    "agent-textworld": "agents:TextWorldTask",
    "agent-math": "agents:MathToolTask",
    "agent-code": "agents:CodeToolTask",
}


def get_task(name: str, config: TaskConfig | None = None) -> Task:
    """The task called `name` with `config`."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(config)


__all__ = ["TASKS", "Task", "TaskConfig", "TaskError", "get_task", "read_jsonl"]
