"""`geode rl`: RL with verifiable rewards on geode's own engine (issue #19).

One optimizer step: the engine samples `group_size` episodes for each of `prompts_per_step`
prompts on the live weights (geode.post.rollout.Rollouts; the groups share one prefill), the
rewards of [rl] score them (geode.post.rewards: the task verifier, math-verify, unit tests,
reward models, format / length / thinking terms, weighted), advantages are taken per group
(GRPO / RLOO / REINFORCE, geode.post.policy.group_advantages), and the policy-gradient
objective (kind "rl", geode/train/objectives/policy.py) updates the weights through the
trainer's seam. Logged per step: generation_s / scoring_s / update_s, rollout tokens/s,
reward mean / std, sample accuracy, failed rewards, dropped groups, completion length,
thinking tokens. The run ends with held-out accuracy before and after in OUT/summary.json:
greedy, and avg@k (k = group_size samples per prompt at the rollout temperature).

A recipe with [warp], [score] or [cfg] runs WARP (geode.post.warp), SCoRe (geode.post.score)
or CFG distillation (geode.post.cfgdistill) instead; they reuse `train_policy`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from geode.data import tasks as synth
from geode.fileio import atomic_write_bytes, sha256_file
from geode.recipe import RecipeError
from geode.train.batches import TrainData
from geode.train.loop import Trainer
from geode.train.sft import tokenizer_path

from .dpo import heldout_prompts
from .oaif import Prompt, greedy_answers, read_prompts, responses, task_prompts
from .recipe import PostRecipe, RLSection
from .rollout import Rollouts

STEP_SERIES = ("reward_mean", "accuracy", "generation_s", "scoring_s", "update_s",
               "rollout_tokens_per_s", "completion_length", "dropped_groups")  # fmt: skip


def rl_prompts(recipe: PostRecipe) -> list[Prompt]:
    """Training prompts: rl.prompts, else data.path when it is a file, else generated."""
    rl = recipe.rl or RLSection()
    path = rl.prompts or (recipe.data.path if Path(recipe.data.path).is_file() else "")
    if path:
        return read_prompts(path)
    p = recipe.pairs
    return task_prompts(rl.generate, seed=p.seed, min_steps=p.min_steps, max_steps=p.max_steps,
                        max_value=p.max_value)  # fmt: skip


def build_source(recipe: PostRecipe, tokenizer: Any) -> Rollouts:
    """The Rollouts batch source of an [rl] section, with its rewards."""
    from geode.infer import SamplingParams

    from .rewards import build_rewards

    rl = recipe.rl or RLSection()
    per_step = rl.prompts_per_step or recipe.batch.global_batch_size // rl.group_size
    sampling = SamplingParams(
        max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p
    )
    return Rollouts(
        tokenizer,
        rl_prompts(recipe),
        build_rewards(rl.rewards, tokenizer, failed_reward=rl.failed_reward),
        sampling=sampling,
        group_size=rl.group_size,
        prompts_per_step=per_step,
        estimator=rl.estimator,
        scale=rl.scale,
        num_iterations=rl.num_iterations,
        dynamic_sampling=rl.dynamic_sampling,
        max_resample=rl.max_resample,
        mask_truncated=rl.mask_truncated,
        thinking_budgets=rl.thinking_budgets,
        seed=recipe.data.seed,
    )


def heldout_scores(
    engine: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    max_new: int,
    *,
    samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict:
    """Held-out answers under the task verifier, over the prompts with answers (empty without
    any): greedy `accuracy` and `answered` (share with a final `#### N`); with `samples` = k > 0
    also `avg_at_k`, the mean accuracy of k samples per prompt at `temperature` (sampled
    pass@1 averaged over k, the metric RL papers report beside greedy, e.g. DeepSeek-R1's
    pass@1 over k samples)."""
    checked = [p for p in prompts if p.answer is not None]
    if not checked:
        return {}
    answers = greedy_answers(engine, tokenizer, checked, max_new)
    n = len(checked)
    out = {
        "accuracy": sum(synth.verify(p.answer, a) for p, a in zip(checked, answers)) / n,
        "answered": sum(synth.parse_answer(a) is not None for a in answers) / n,
    }
    if samples > 0:
        texts = responses(engine, tokenizer, checked, max_new, k=samples, temperature=temperature,
                        seed=seed)  # fmt: skip
        hits = [synth.verify(checked[i // samples].answer, a) for i, a in enumerate(texts)]
        out["avg_at_k"] = sum(hits) / len(hits)
    return out


def policy_trainer(
    recipe: PostRecipe,
    out: str | Path | None = None,
    *,
    source: Any = None,
    reference: Any = None,
    progress: bool | None = None,
    resume: bool = False,
) -> tuple[Trainer, Any, Any]:
    """(trainer, rollout source, tokenizer) of an RL run, wired: the objective reads the
    source's statistics and sampling temperature, and the source samples on the trainer's
    model (train_policy's arguments)."""
    from geode.tokenizer import load_tokenizer

    tok_path = tokenizer_path(recipe)
    tok = load_tokenizer(tok_path)
    source = source if source is not None else build_source(recipe, tok)
    data = TrainData(
        batches=source,
        vocab_size=len(tok),
        tokenizer=str(tok_path),
        tokenizer_sha256=sha256_file(tok_path),
        describe="RL rollouts",
    )
    trainer = Trainer(recipe, out, resume, progress, data=data)
    objective = trainer.objective
    if reference is not None:
        objective.set_reference(reference)
    objective.source = source
    objective.temperature = getattr(getattr(source, "sampling", None), "temperature", 1.0)
    source.attach(trainer)
    return trainer, source, tok


def train_policy(
    recipe: PostRecipe,
    out: str | Path | None = None,
    *,
    source: Any = None,
    reference: Any = None,
    progress: bool | None = None,
    resume: bool = False,
) -> tuple[Trainer, dict[str, Any]]:
    """Train the recipe's policy on rollouts; (the trainer, the summary with held-out accuracy
    before / after, per-step series and timings). `source`: a BatchSource with
    `attach(trainer)` (default: the [rl] Rollouts); `reference`: the objective's KL anchor
    (a geode.train.reference.Reference) instead of the one it loads."""
    trainer, source, tok = policy_trainer(
        recipe, out, source=source, reference=reference, progress=progress, resume=resume
    )
    rl = recipe.rl or RLSection()
    held = heldout_prompts(recipe, rl.eval_prompts) if rl.eval_prompts else []
    t0 = time.perf_counter()
    k = rl.group_size  # avg@k: k = group_size samples per held-out prompt at rl.temperature
    score = dict(samples=k, temperature=rl.temperature, seed=recipe.data.seed)
    before = heldout_scores(source.engine, tok, held, rl.eval_max_new_tokens, **score)
    trainer.raw_model.train()
    eval_s = time.perf_counter() - t0
    try:
        summary = trainer.fit()
    finally:
        close = getattr(getattr(source, "rewards", None), "close", None)
        if callable(close):
            close()
    t0 = time.perf_counter()
    after = heldout_scores(source.engine, tok, held, rl.eval_max_new_tokens, **score)
    summary.update(_series(Path(trainer.out) / "metrics.jsonl"))
    summary.update(
        heldout_accuracy_before=before.get("accuracy"),
        heldout_accuracy_after=after.get("accuracy"),
        heldout_answered_before=before.get("answered"),
        heldout_answered_after=after.get("answered"),
        heldout_avg_at_k_before=before.get("avg_at_k"),
        heldout_avg_at_k_after=after.get("avg_at_k"),
        heldout_k=k,
        heldout_prompts=len(held),
        eval_s=eval_s + time.perf_counter() - t0,
        dropped_groups_total=getattr(source, "dropped_total", 0),
    )
    rewards = getattr(source, "rewards", None)
    if rewards is not None and hasattr(rewards, "stats"):
        summary["reward_failures"] = dict(rewards.stats)
    if trainer.info.is_main:
        text = json.dumps(summary, indent=1) + "\n"
        atomic_write_bytes(Path(trainer.out) / "summary.json", text.encode())
    return trainer, summary


def _series(metrics: Path) -> dict[str, Any]:
    """Per-step series of the train records (reward curve, timings) and their means."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r for r in recs if r.get("kind") == "train"]
    out: dict[str, Any] = {"reward_curve": [r.get("reward_mean") for r in steps]}
    for key in STEP_SERIES:
        vals = [r[key] for r in steps if isinstance(r.get(key), (int, float))]
        if vals:
            out[f"mean_{key}"] = sum(vals) / len(vals)
    out["step_timings"] = [
        {k: r.get(k) for k in ("step", "generation_s", "scoring_s", "update_s", "step_s")}
        for r in steps
    ]
    return out


def rl(
    recipe: PostRecipe,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run `geode rl` on a recipe: RL on rollouts, or WARP / SCoRe / CFG distillation."""
    if getattr(recipe, "warp", None) is not None:
        from .warp import warp

        return warp(recipe, out, resume, progress)
    if getattr(recipe, "score", None) is not None:
        from .score import score

        return score(recipe, out, resume, progress)
    if getattr(recipe, "cfg", None) is not None:
        from .cfgdistill import cfg_distill

        return cfg_distill(recipe, out, resume, progress)
    if recipe.rl is None:
        raise RecipeError(
            "geode rl needs an [rl] section (or [warp], [score] or [cfg]); see "
            "recipes/post/rl-nano.toml"
        )
    if recipe.objective.kind != "rl":
        raise RecipeError(f"geode rl needs [objective] kind = 'rl', got {recipe.objective.kind!r}")
    return train_policy(recipe, out, progress=progress, resume=resume)[1]
