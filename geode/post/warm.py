"""Reward-model training (`geode reward`) and WARM (`geode reward --warm M`).

WARM (Rame et al. 2024, "WARM: On the Benefits of Weight Averaged Reward Models",
arXiv:2401.12187): M reward models fine-tuned from one shared initialisation, made diverse by
their data order, learning rate and dropout, and by starting from different checkpoints of
the SFT run ("Baklava", §3.3), are averaged in weight space, phi_WARM = 1/M sum_i phi_i
(eq. 2). Linear mode connectivity makes the average a good model; the paper finds it as
accurate as the prediction ensemble 1/M sum_i r_phi_i (eq. 3) at the cost of one model, and
more robust to label noise. `warm` reports, under each flipped-label rate, every member's
held-out pair accuracy, their mean, the weight average's and the prediction ensemble's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from geode.fileio import atomic_write_bytes
from geode.recipe import RecipeError
from geode.train.batches import TrainData
from geode.train.loop import Trainer
from geode.train.sft_lora import merged_copy

from .pairs import fixed_batches, pair_batches
from .recipe import PairData, PostRecipe, load_pair_data
from .reward import average_models, pair_accuracy, save_reward_model

EVAL_PAIRS_PER_BATCH = 32


def _train_data(recipe: PostRecipe, data: PairData, seed: int) -> TrainData:
    pad = data.tokenizer.pad_id
    per_step = recipe.batch.global_batch_size // 2
    held = data.heldout_ids
    return TrainData(
        batches=pair_batches(data.train_ids, per_step, pad, seed, recipe.pairs.max_len),
        eval_batches=fixed_batches(held, EVAL_PAIRS_PER_BATCH, pad, recipe.pairs.max_len)
        if held
        else None,
        vocab_size=data.tokenizer.vocab_size,
        tokenizer=str(data.tokenizer_path),
        tokenizer_sha256=data.tokenizer_sha256,
        describe=f"pairs {recipe.data.path}",
    )


def train_reward(
    recipe: PostRecipe,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    data: PairData | None = None,
) -> tuple[dict[str, Any], Any]:
    """Train one reward model; (the trainer's summary + held-out accuracy, the model)."""
    if recipe.objective.kind != "reward":
        raise RecipeError(
            f"geode reward needs [objective] kind = 'reward', got {recipe.objective.kind!r}"
        )
    data = data or load_pair_data(recipe)
    trainer = Trainer(
        recipe, out, resume, progress, data=_train_data(recipe, data, recipe.data.seed)
    )
    summary = trainer.fit()
    rm = trainer.raw_model
    if data.heldout_ids:
        held = fixed_batches(
            data.heldout_ids, EVAL_PAIRS_PER_BATCH, data.tokenizer.pad_id, recipe.pairs.max_len
        )
        summary["heldout_accuracy"] = pair_accuracy([rm], held())
    return summary, rm


def member_recipe(recipe: PostRecipe, i: int, out: Path) -> PostRecipe:
    """Member i of a WARM run: its data order, learning rate, dropout and init (cycled lists)."""
    w = recipe.warm
    r = copy.deepcopy(recipe)
    r.name, r.out = f"{recipe.name}-m{i}", str(out)
    r.data.seed = recipe.data.seed + i  # data order
    if w.lrs:
        r.optim.lr = w.lrs[i % len(w.lrs)]
    if w.dropouts:
        r.objective.options = {**r.objective.options, "dropout": w.dropouts[i % len(w.dropouts)]}
    if w.inits:
        r.model.init = w.inits[i % len(w.inits)]
    r.checkpoint.export = False
    return r


def warm(
    recipe: PostRecipe,
    out: str | Path | None = None,
    members: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train M members per noise level; accuracies of members, weight average and ensemble.

    Writes OUT/warm.json and OUT/noise-<rate>/model (the averaged RM of each level)."""
    m = members if members is not None else recipe.warm.members
    if m < 2:
        raise RecipeError(f"WARM needs at least 2 members, got {m} (warm.members or --warm M)")
    root = Path(out if out is not None else recipe.out)
    levels = recipe.warm.noise_levels or [recipe.pairs.noise]
    report: dict[str, Any] = {"members": m, "levels": []}
    for rate in levels:
        data = load_pair_data(recipe, noise=rate)
        pad, max_len = data.tokenizer.pad_id, recipe.pairs.max_len
        held = fixed_batches(data.heldout_ids, EVAL_PAIRS_PER_BATCH, pad, max_len)
        if not data.heldout_ids:
            raise RecipeError("WARM needs held-out pairs: set data.eval_path")
        level_dir = root / f"noise-{rate:g}"
        rms, rows = [], []
        for i in range(m):
            r = member_recipe(recipe, i, level_dir / f"member-{i}")
            summary, rm = train_reward(r, r.out, False, progress, data=data)
            rms.append(rm if r.lora is None else merged_copy(rm))  # WARM averages full weights
            rows.append(
                {
                    "member": i,
                    "lr": r.optim.lr,
                    "dropout": r.objective.options.get("dropout", 0.0),
                    "init": r.model.init,
                    "data_seed": r.data.seed,
                    "accuracy": summary["heldout_accuracy"],
                }
            )
        avg = average_models(rms)
        save_reward_model(
            avg, level_dir / "model", files={"tokenizer.model": str(data.tokenizer_path)}
        )
        accs = [row["accuracy"] for row in rows]
        report["levels"].append(
            {
                "noise": rate,
                "members": rows,
                "member_mean": sum(accs) / len(accs),
                "member_best": max(accs),
                "warm": pair_accuracy([avg], held()),
                "ensemble": pair_accuracy(rms, held()),
                "model": str(level_dir / "model"),
            }
        )
        _write(root / "warm.json", report)
    return report


def _write(path: Path, report: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode())


def warm_table(report: dict[str, Any]) -> str:
    """The WARM report as a markdown table (one row per noise level)."""
    lines = [
        "| flipped labels | members (held-out pair accuracy) | member mean | WARM (weight avg) | ensemble |",
        "| --- | --- | --- | --- | --- |",
    ]
    for lv in report["levels"]:
        ms = ", ".join(f"{r['accuracy']:.3f}" for r in lv["members"])
        lines.append(
            f"| {lv['noise']:.0%} | {ms} | {lv['member_mean']:.3f} | {lv['warm']:.3f} | {lv['ensemble']:.3f} |"
        )
    return "\n".join(lines)
