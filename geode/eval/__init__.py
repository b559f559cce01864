"""Evaluation harness: tasks, backends (in-process engine or OpenAI endpoint), metrics, runner.

from geode.eval import EngineBackend, TaskConfig, evaluate
evaluate(["gsm8k"], EngineBackend.from_path("ckpt"), "eval_out",
         TaskConfig(limit=100, data="gsm8k/test.jsonl"))
"""

from .backends import Backend, BackendError, EndpointBackend, EngineBackend, FunctionBackend, Gen
from .runner import EvalError, evaluate, run_task
from .selfcorrect import self_correction_metrics
from .tasks import TASKS, Task, TaskConfig, TaskError, get_task

__all__ = [
    "TASKS",
    "Backend",
    "BackendError",
    "EndpointBackend",
    "EngineBackend",
    "EvalError",
    "FunctionBackend",
    "Gen",
    "Task",
    "TaskConfig",
    "TaskError",
    "evaluate",
    "get_task",
    "run_task",
    "self_correction_metrics",
]
