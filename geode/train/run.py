"""Entry points: `train(recipe)` and `distill(recipe)` (student, from-scratch control, comparison)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..recipe import RecipeError
from .distributed import barrier
from .loop import Trainer
from .metrics import curve, plot_curves, read_metrics
from .recipe import TrainRecipe, load_train_recipe, replace


def _as_recipe(recipe: TrainRecipe | str | Path, overrides: list[str] | None) -> TrainRecipe:
    if isinstance(recipe, TrainRecipe):
        if overrides:
            raise RecipeError("overrides apply to a recipe file; edit the TrainRecipe instead")
        return recipe
    return load_train_recipe(recipe, overrides)


def train(
    recipe: TrainRecipe | str | Path,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    overrides: list[str] | None = None,
    allow_fresh: bool = False,
) -> dict[str, Any]:
    """Pretrain (or distill, if the recipe has [distill]) to OUT; returns the run summary.
    A resume that finds no valid state fails (naming the bad files) unless `allow_fresh`."""
    recipe = _as_recipe(recipe, overrides)
    return Trainer(recipe, out, resume, progress, allow_fresh=allow_fresh).fit()


def distill(
    recipe: TrainRecipe | str | Path,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    control: bool | None = None,
    overrides: list[str] | None = None,
    allow_fresh: bool = False,
) -> dict[str, Any]:
    """Distil a student into OUT/student and, with `control`, train it from scratch into
    OUT/control on the same tokens; writes OUT/comparison.json and OUT/comparison.png."""
    recipe = _as_recipe(recipe, overrides)
    if recipe.distill is None:
        raise RecipeError("geode distill needs a [distill] section (teacher, top_k, ...)")
    out = Path(out if out is not None else recipe.out)
    control = recipe.distill.control if control is None else control
    student = Trainer(recipe, out / "student", resume, progress, allow_fresh=allow_fresh)
    info = student.info
    s = student.fit()
    result: dict[str, Any] = {"student": s}
    if control:
        ctrl_recipe = replace(recipe, distill=None, name=f"{recipe.name}-control")
        result["control"] = Trainer(
            ctrl_recipe, out / "control", resume, progress, allow_fresh=allow_fresh
        ).fit()
    if info.is_main:
        result["comparison"] = _compare(out, control)
        (out / "comparison.json").write_text(json.dumps(result, indent=1) + "\n")
    barrier(info)
    return result


def _compare(out: Path, control: bool) -> dict[str, Any]:
    """Held-out curves of student and control side by side; prints a table."""
    runs = {"student": read_metrics(out / "student" / "metrics.jsonl")}
    if control:
        runs["control"] = read_metrics(out / "control" / "metrics.jsonl")
    evals = {name: curve(recs, "eval", "eval_loss") for name, recs in runs.items()}
    kl = curve(runs["student"], "eval", "eval_kl")
    steps = sorted(set().union(*[set(c) for c in evals.values()]))
    rows = []
    print(f"\n{'step':>6} {'student held-out':>17} {'KL(t||s)':>9} {'control held-out':>17}")
    for st in steps:
        row = {
            "step": st,
            "student_eval_loss": evals["student"].get(st),
            "student_eval_kl": kl.get(st),
            "control_eval_loss": evals.get("control", {}).get(st),
        }
        rows.append(row)
        fmt = [f"{v:17.4f}" if v is not None else f"{'-':>17}" for v in
               (row["student_eval_loss"], row["control_eval_loss"])]  # fmt: skip
        k = f"{row['student_eval_kl']:9.4f}" if row["student_eval_kl"] is not None else f"{'-':>9}"
        print(f"{st:>6} {fmt[0]} {k} {fmt[1]}")
    final = {name: (list(c.values())[-1] if c else None) for name, c in evals.items()}
    others = {"control": runs["control"]} if control else None
    plot_curves(runs["student"], out / "comparison.png", "distilled student vs control", others)
    return {"curves": rows, "final_eval_loss": final}
