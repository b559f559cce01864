"""`geode reproduce NAME`: the seed papers' claims that need more than the quickstart, each
run at nano scale on the built-in data and written up as OUT/REPORT.md (claim, setup, the
measured table, a plain verdict), PNG plot(s) and OUT/results.json.

Names (REGISTRY): teacher-hacking (Tiapkin et al. 2025), local-global (Gemma 3's 5:1
local/global attention), distill-vs-scratch (Gemma 3's distillation). See docs/reproduce.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import distill_vs_scratch, local_global, teacher_hacking
from .common import ReproduceError, Setup, say

REGISTRY: dict[str, Callable[[Setup], dict[str, Any]]] = {
    "teacher-hacking": teacher_hacking.run,
    "local-global": local_global.run,
    "distill-vs-scratch": distill_vs_scratch.run,
}
DEFAULT_BUDGET_MINUTES = 5.0

__all__ = ["DEFAULT_BUDGET_MINUTES", "REGISTRY", "ReproduceError", "Setup", "reproduce"]


def reproduce(
    name: str,
    out: str | Path | None = None,
    budget_minutes: float = DEFAULT_BUDGET_MINUTES,
    seed: int = 0,
    progress: bool | None = None,
    log: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Run claim `name` into `out` (default runs/reproduce/NAME); returns its results.json
    record. Unknown names and bad budgets raise ReproduceError; a failed run names the claim."""
    if name not in REGISTRY:
        raise ReproduceError(f"unknown claim {name!r}; choose one of: {', '.join(REGISTRY)}")
    if not budget_minutes > 0:
        raise ReproduceError(f"--budget-minutes must be > 0, got {budget_minutes}")
    out = Path(out) if out is not None else Path("runs/reproduce") / name
    if out.exists() and not out.is_dir():
        raise ReproduceError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ReproduceError(f"--out {out}: not empty (it may hold an earlier run); choose another")
    out.mkdir(parents=True, exist_ok=True)
    setup = Setup(name, out, float(budget_minutes), int(seed), progress, log)
    from ..quickstart import _set_threads

    log(f"   {_set_threads()}")
    try:
        return REGISTRY[name](setup)
    except ReproduceError:
        raise
    except Exception as e:
        raise ReproduceError(f"{name} failed: {type(e).__name__}: {e}") from e
