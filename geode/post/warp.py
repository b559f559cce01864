"""WARP: weight-averaged rewarded policies (Rame et al. 2024, arXiv:2406.16768), `geode rl` with [warp].

Each of I iterations starts from an init theta_init^i (the recipe's model.init first) and
  1. trains M RL policies from it with different seeds (data order and rollout samples), each
     with the EMA of itself as the KL anchor (objective anchor = "ema", ema_rate = mu, eq. 3);
  2. merges them by SLERP of their task vectors theta_m - theta_init^i, per tensor, iteratively
     for M > 2 with lambda = 1/m (eq. 4; geode.post.merge);
  3. interpolates towards the init, LITI (eq. 5): theta_init^{i+1} = (1 - eta) theta_init^i +
     eta theta_slerp^i.
The KL-reward front: for every iteration, the models (1 - eta') theta_init^i + eta' theta_slerp^i
for eta' in `etas` (the last iteration's written to OUT/front/eta-<eta'>/model) and every single
run are measured on the held-out prompts: the mean reward under the run's rewards of
`eval_samples` completions per prompt sampled at temperature 1, the KL to the starting model
(model.init) as the mean per-token k1 = log pi(y_t) - log pi_init(y_t) on those completions,
and the greedy accuracy. OUT/front.json holds the points, OUT/front.png plots them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from geode.fileio import atomic_write_bytes, save_figure
from geode.recipe import RecipeError
from geode.train.objectives.base import token_logprobs
from geode.train.sft import tokenizer_path

from .merge import liti, slerp_merge
from .recipe import PostRecipe, RLSection, WarpSection

KL_ROWS = 64  # rows per forward pass of the KL measurement
EVAL_SEED = 12_345  # sampling seed of the front's measurement (the same for every model)


def check_warp(recipe: PostRecipe) -> WarpSection:
    """The [warp] section, validated with the recipe fields WARP needs (RecipeError names them)."""
    w = recipe.warp
    if w is None:
        raise RecipeError("WARP needs a [warp] section")
    if not recipe.model.init:
        raise RecipeError("WARP needs model.init: the policy every run starts from")
    if recipe.objective.kind != "rl":
        raise RecipeError(f"WARP needs [objective] kind = 'rl', got {recipe.objective.kind!r}")
    if not float(recipe.objective.options.get("beta", 0.0)) > 0:
        raise RecipeError("WARP needs objective.options.beta > 0 (the KL to the EMA anchor)")
    for name in ("policies", "iterations", "eval_samples"):
        if getattr(w, name) < 1:
            raise RecipeError(f"warp.{name} = {getattr(w, name)}: must be >= 1")
    if w.steps < 0:
        raise RecipeError(f"warp.steps = {w.steps}: must be >= 0 (0: train.max_steps)")
    if not 0.0 <= w.ema_rate <= 1.0:
        raise RecipeError(f"warp.ema_rate = {w.ema_rate}: must be in [0, 1]")
    if not 0.0 <= w.eta <= 1.0:
        raise RecipeError(f"warp.eta = {w.eta}: must be in [0, 1]")
    if not w.etas or any(not 0.0 <= e <= 1.0 for e in w.etas):
        raise RecipeError(f"warp.etas = {w.etas}: a non-empty list of values in [0, 1]")
    rl = recipe.rl or RLSection()
    if not rl.eval_prompts:
        raise RecipeError("WARP measures its front on held-out prompts: set rl.eval_prompts > 0")
    return w


def run_recipe(recipe: PostRecipe, iteration: int, member: int, out: Path, init: str) -> PostRecipe:
    """Run `member` of `iteration`: its init, seed, steps, EMA anchor; no held-out eval of its own."""
    w = recipe.warp
    r = copy.deepcopy(recipe)
    r.warp = None
    r.name, r.out = f"{recipe.name}-i{iteration}-m{member}", str(out)
    r.model.init = init
    r.data.seed = recipe.data.seed + iteration * w.policies + member  # prompts and samples
    if w.steps:
        r.train.max_steps = w.steps
    r.objective.options = {**r.objective.options, "anchor": "ema", "ema_rate": w.ema_rate}
    r.rl = copy.deepcopy(recipe.rl or RLSection())
    r.rl.eval_prompts = 0  # the front measures every model on the same held-out samples
    r.checkpoint.export = True  # OUT/model: a resumed WARP reads finished runs back
    return r


class FrontProbe:
    """Measures a model on the held-out prompts: reward, KL to the starting model, accuracy."""

    def __init__(self, recipe: PostRecipe, tokenizer: Any, start: torch.nn.Module):
        from .dpo import heldout_prompts
        from .rewards import build_rewards

        self.rl = recipe.rl or RLSection()
        self.samples = recipe.warp.eval_samples
        self.tokenizer = tokenizer
        self.prompts = heldout_prompts(recipe, self.rl.eval_prompts)
        self.rewards = build_rewards(
            self.rl.rewards, tokenizer, failed_reward=self.rl.failed_reward
        )
        self.start = start.eval()

    @torch.no_grad()
    def measure(self, model: torch.nn.Module) -> dict[str, float | None]:
        """{reward, kl, accuracy, answered, sample_accuracy, completion_length} of `model`."""
        from geode.infer import Engine, SamplingParams

        from .rl import heldout_scores
        from .rollout import Rollouts

        rl = self.rl
        params = SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=1.0, top_p=1.0)
        src = Rollouts(self.tokenizer, self.prompts, self.rewards, sampling=params,
                       group_size=self.samples, prompts_per_step=len(self.prompts),
                       estimator="grpo", scale="none", seed=EVAL_SEED)  # fmt: skip
        rows = len(self.prompts) * self.samples
        src.engine = Engine(model, self.tokenizer, max_batch=min(rows, 64), optimize=False,
                            seed=EVAL_SEED)  # fmt: skip
        src.policy = model
        batch = src.next_batch()
        greedy = heldout_scores(src.engine, self.tokenizer, self.prompts, rl.eval_max_new_tokens)
        return {
            "reward": src.last["reward_mean"],
            "kl": self.kl(model, batch),
            "accuracy": greedy.get("accuracy"),  # greedy, under the task verifier
            "answered": greedy.get("answered"),  # greedy answers with a final `#### N`
            "sample_accuracy": src.last.get("accuracy"),
            "completion_length": src.last["completion_length"],
        }

    def kl(self, model: torch.nn.Module, batch: Any) -> float:
        """Mean per-token k1 = log pi(y_t) - log pi_start(y_t) over the sampled tokens."""
        model.eval()
        total, tokens = 0.0, 0
        for i in range(0, len(batch), KL_ROWS):
            b = batch.rows(slice(i, i + KL_ROWS))
            mask = b.loss_mask  # (b, T)
            if not bool(mask.any()):
                continue
            y = b.targets[mask][None]  # (1, N)
            lp = token_logprobs(model(**b.model_inputs(), rows=mask).float()[None], y)  # (1, N)
            lp0 = token_logprobs(self.start(**b.model_inputs(), rows=mask).float()[None], y)
            total += float((lp - lp0).sum())
            tokens += int(mask.sum())
        return total / max(tokens, 1)

    def close(self) -> None:
        """Stop the rewards' workers."""
        close = getattr(self.rewards, "close", None)
        if callable(close):
            close()


def warp(
    recipe: PostRecipe,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run WARP (module doc); the report also written to OUT/front.json (+ OUT/front.png)."""
    from geode.checkpoint import load_model
    from geode.tokenizer import load_tokenizer

    from .rl import train_policy

    w = check_warp(recipe)
    root = Path(out if out is not None else recipe.out)
    tok_path = tokenizer_path(recipe)
    tok = load_tokenizer(tok_path)
    files = {"tokenizer.json" if str(tok_path).endswith(".json") else "tokenizer.model": tok_path}
    start = load_model(recipe.model.init)
    scratch = copy.deepcopy(start)  # holds each merged model in turn
    probe = FrontProbe(recipe, tok, start)
    points: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "init": str(recipe.model.init),
        "policies": w.policies,
        "iterations": w.iterations,
        "ema_rate": w.ema_rate,
        "eta": w.eta,
        "etas": list(w.etas),
        "beta": float(recipe.objective.options.get("beta", 0.0)),
        "eval_prompts": len(probe.prompts),
        "eval_samples": w.eval_samples,
        "points": points,
    }
    try:
        points.append({"kind": "init", "iteration": 0, **probe.measure(start)})
        init_path, init_sd = str(recipe.model.init), _cloned(start.state_dict())
        for i in range(w.iterations):
            runs = []
            for m in range(w.policies):
                r = run_recipe(recipe, i, m, root / f"iter-{i}" / f"run-{m}", init_path)
                model, summary = _train_run(r, train_policy, resume, progress)
                runs.append(_cloned(model.state_dict()))
                points.append({"kind": "run", "iteration": i, "run": m, "seed": r.data.seed,
                               "steps": summary.get("steps"), **probe.measure(model)})  # fmt: skip
                del model
            merged = slerp_merge(init_sd, runs)
            last = i == w.iterations - 1
            for eta in w.etas:
                scratch.load_state_dict(liti(init_sd, merged, eta))
                point = {"kind": "liti", "iteration": i, "eta": eta, **probe.measure(scratch)}
                if last:
                    point["model"] = str(
                        _save(scratch, root / "front" / f"eta-{eta:g}" / "model", files)
                    )
                points.append(point)
            init_sd = liti(init_sd, merged, w.eta)
            scratch.load_state_dict(init_sd)
            init_path = str(_save(scratch, root / f"iter-{i}" / "model", files))
            _write(root, report)
    finally:
        probe.close()
    report["final_init"] = init_path
    report["comparison"] = compare(points, w.iterations - 1)
    _write(root, report)
    report["plot"] = str(plot_front(points, root / "front.png"))
    _write(root, report)
    return report


def compare(points: list[dict[str, Any]], iteration: int) -> dict[str, Any]:
    """Single runs of `iteration` vs its LITI family: the family's reward at each run's KL
    (linear between front points; beyond the front, its highest-KL point) and dominance."""
    runs = [p for p in points if p["kind"] == "run" and p["iteration"] == iteration]
    fam = sorted(
        (p for p in points if p["kind"] == "liti" and p["iteration"] == iteration),
        key=lambda p: p["kl"],
    )
    rows = []
    for r in runs:
        dominated = any(
            f["reward"] >= r["reward"]
            and f["kl"] <= r["kl"]
            and (f["reward"] > r["reward"] or f["kl"] < r["kl"])
            for f in fam
        )
        at_kl = _interp(r["kl"], [f["kl"] for f in fam], [f["reward"] for f in fam])
        rows.append({"run": r["run"], "reward": r["reward"], "kl": r["kl"],
                     "family_reward_at_kl": at_kl, "dominated": dominated})  # fmt: skip
    return {
        "iteration": iteration,
        "runs": rows,
        "merge_dominates": bool(rows) and all(x["dominated"] for x in rows),
        "best_run_reward": max((r["reward"] for r in runs), default=None),
        "best_family_reward": max((f["reward"] for f in fam), default=None),
    }


def _interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    """ys at x by linear interpolation over increasing xs; beyond the last: ys[-1]; before: None."""
    if not xs or x < xs[0]:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def plot_front(points: list[dict[str, Any]], path: Path) -> Path:
    """KL-reward plot: the start, single runs, and each iteration's LITI family (eta labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for p in points:
        if p["kind"] == "init":
            ax.plot(p["kl"], p["reward"], "k*", markersize=12, label="start (model.init)")
    iterations = sorted({p["iteration"] for p in points if p["kind"] != "init"})
    for i in iterations:
        color = f"C{i}"
        runs = [p for p in points if p["kind"] == "run" and p["iteration"] == i]
        ax.plot([p["kl"] for p in runs], [p["reward"] for p in runs], "x", color=color,
                markersize=9, label=f"iteration {i + 1}: single RL runs")  # fmt: skip
        fam = sorted((p for p in points if p["kind"] == "liti" and p["iteration"] == i),
                     key=lambda p: p["eta"])  # fmt: skip
        ax.plot([p["kl"] for p in fam], [p["reward"] for p in fam], "o-", color=color,
                label=f"iteration {i + 1}: LITI(init, SLERP) over eta")  # fmt: skip
        for p in fam:
            ax.annotate(f"{p['eta']:g}", (p["kl"], p["reward"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))  # fmt: skip
    ax.set_xlabel("KL to the start (mean per-token k1, held-out samples)")
    ax.set_ylabel("held-out reward (mean)")
    ax.set_title("WARP: KL-reward front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def _train_run(r: PostRecipe, train_policy: Any, resume: bool, progress: bool | None):
    """(trained model, summary) of one run; a resumed WARP reads a finished run back."""
    from geode.checkpoint import load_model

    out = Path(r.out)
    done = out / "summary.json"
    if resume and done.is_file() and (out / "model").is_dir():
        return load_model(out / "model"), json.loads(done.read_text())
    trainer, summary = train_policy(r, out, progress=progress, resume=resume)
    return trainer.raw_model, summary


def _cloned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _save(model: torch.nn.Module, path: Path, files: dict[str, Any]) -> Path:
    from geode.checkpoint import save_model

    save_model(model, path, files=files)
    return path


def _write(root: Path, report: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / "front.json", (json.dumps(report, indent=1) + "\n").encode())
