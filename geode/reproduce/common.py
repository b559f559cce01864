"""What every `geode reproduce` claim shares: its settings, the built-in corpus (the
quickstart's data, tokenizer and packing stages), small training helpers, and the report
writer (REPORT.md + results.json, written atomically; plots through fileio.save_figure)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes

TINY_BELOW = 1.0  # --budget-minutes under this: a smoke test (tiny models, a few steps)


def say(message: str) -> None:
    """Print a progress line now (flushed, so logs show it while the run goes on)."""
    print(message, flush=True)


class ReproduceError(RuntimeError):
    """A claim's run cannot start or failed (its name and why)."""


@dataclass
class Setup:
    """One `geode reproduce NAME` run: output directory, budget, seed and how to show progress."""

    name: str
    out: Path
    budget_minutes: float
    seed: int = 0
    progress: bool | None = None
    log: Callable[[str], None] = say
    t0: float = field(default_factory=time.perf_counter)

    @property
    def tiny(self) -> bool:
        """Under TINY_BELOW minutes: models and data of a smoke test."""
        return self.budget_minutes < TINY_BELOW

    def seconds(self, fraction: float) -> float:
        """`fraction` of the budget, in seconds."""
        return fraction * self.budget_minutes * 60.0

    def stage(self, i: int, n: int, what: str) -> None:
        """Print a progress line `== [i/n] what (elapsed)`."""
        self.log(f"== [{i}/{n}] {what} ({time.perf_counter() - self.t0:.0f}s elapsed)")


def corpus(setup: Setup) -> Any:
    """The quickstart's data + tokenizer stages and its packing into OUT/work (a
    geode.quickstart.Context whose done['tokenizer'] holds the vocabulary size): the task
    family and the local stdlib, deduplicated and decontaminated; nothing is downloaded."""
    from .. import quickstart as q

    plan = q.make_plan(1.0 if setup.tiny else 5.0)  # the data sizes of a tiny / small run
    ctx = q.Context(setup.out / "work", plan, setup.progress)
    for stage in ("data", "tokenizer"):
        ctx.dir(stage).mkdir(parents=True, exist_ok=True)
        ctx.done[stage] = q.STAGE_FUNCS[stage](ctx)
    q._pack(ctx, ctx.dir("pretrain") / "data")
    return ctx


def lm_recipe(
    ctx: Any, setup: Setup, name: str, shape: dict[str, Any], steps: int, out: Path,
    evals: int | None = None, seed: int | None = None, lr: float = 3e-3,
) -> dict[str, Any]:  # fmt: skip
    """The quickstart's pretraining recipe on the packed corpus, with this run's seed (model
    init and data order) and `evals` held-out evaluations spread over the run."""
    from .. import quickstart as q

    r = q._lm_recipe(ctx, name, shape, steps, out, lr)
    seed = setup.seed if seed is None else seed
    r["model"]["seed"] = seed
    r["data"]["seed"] = seed
    r["train"]["progress"] = setup.progress is not False
    evals = evals or (1 if setup.tiny else 4)
    r["eval"]["every"] = max(1, steps // evals) if steps >= evals else 0
    return r


def step_count(setup: Setup, fraction: float, shape: dict[str, Any], vocab: int,
               runs: int = 1, lo: int = 2, hi: int = 3000, extra_s: float = 0.0) -> int:  # fmt: skip
    """Optimizer steps of `runs` runs of `shape` that fit `fraction` of the budget (measured)."""
    from .. import quickstart as q

    step_s = q._measure_step(shape, vocab) + extra_s
    return q._steps(setup.seconds(fraction) / runs, step_s, lo, hi)


def heldout_curve(run_dir: Path) -> dict[int, float]:
    """{step: held-out loss} of a finished training run (its metrics.jsonl)."""
    from ..train.metrics import curve, read_metrics

    return curve(read_metrics(Path(run_dir) / "metrics.jsonl"), "eval", "eval_loss")


# ------------------------------------------------------------------ the report
def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A markdown table; floats rounded to `digits` decimals, None as '-'."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def all_finite(obj: Any) -> bool:
    """Whether every float nested in `obj` (dicts, lists) is finite."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def write_report(setup: Setup, title: str, claim: str, setup_text: str, tables: str,
                 verdict: str, holds: bool, plots: Sequence[Path],
                 results: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """OUT/results.json (the measured numbers plus name, claim, verdict, holds, seconds) and
    OUT/REPORT.md (claim, setup, tables, verdict, plots); both atomic. Returns the results."""
    out = setup.out
    seconds = time.perf_counter() - setup.t0
    record = {"name": setup.name, "claim": claim, "budget_minutes": setup.budget_minutes,
              "seed": setup.seed, "seconds": seconds, "holds": holds, "verdict": verdict,
              "plots": [p.name for p in plots], **results}  # fmt: skip
    atomic_write_bytes(out / "results.json", (json.dumps(record, indent=1) + "\n").encode())
    lines = [
        f"# geode reproduce {setup.name}: {title}",
        "",
        f"**Claim.** {claim}",
        "",
        f"**Setup.** {setup_text} Budget {setup.budget_minutes:g} min, seed {setup.seed}, "
        f"wall {seconds:.0f} s. Data: the project's own (the synthetic task family and this "
        "machine's Python standard library, as `geode quickstart` builds it); nothing downloaded.",
        "",
        "## Measured",
        "",
        tables,
        "",
        "## Verdict",
        "",
        f"**{'Yes' if holds else 'No'}: the claim {'shows' if holds else 'does not show'} at "
        f"this scale.** {verdict}",
        "",
        "## Plots",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    atomic_write_bytes(out / "REPORT.md", "\n".join(lines).encode())
    return record
