"""`geode dpo`: offline preference optimisation (DPO / IPO / SLiC) and, with `[online]`, OAIF.

Offline: the recipe's pairs, the frozen reference (model.init, the SFT model) scored once per
sequence before training and cached on disk (OUT/reference), then the preference objective
(geode/train/objectives/preference.py). Online (OAIF, geode.post.oaif): the pairs of each step
are sampled from the current policy by the engine and judged. Both end with the policy compared
to the starting one on held-out prompts: win rate under the run's judge and verified accuracy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from geode.eval.backends import EndpointBackend, EngineBackend
from geode.fileio import atomic_write_bytes
from geode.recipe import RecipeError
from geode.train.batches import TrainData
from geode.train.loop import Trainer

from .judges import Judge, LLMJudge, RewardModelJudge, VerifierJudge
from .oaif import OnlinePairs, Prompt, evaluate_policy, greedy_answers, read_prompts, task_prompts
from .pairs import fixed_batches
from .recipe import OnlineSection, PairData, PostRecipe, load_pair_data
from .warm import EVAL_PAIRS_PER_BATCH, _train_data


def build_judge(online: OnlineSection, tokenizer: Any, device: Any = None) -> Judge:
    """The annotator an [online] section names."""
    if online.judge == "verifier":
        return VerifierJudge()
    if online.judge == "reward":
        from .reward import load_reward_model

        if not online.judge_model:
            raise RecipeError(
                "online.judge = 'reward' needs online.judge_model (reward model dirs)"
            )
        models = [load_reward_model(p).to(device) for p in online.judge_model]
        return RewardModelJudge(models=models, tokenizer=tokenizer)
    if online.judge == "llm":
        if online.judge_url:
            key = os.environ.get(online.judge_api_key_env) if online.judge_api_key_env else None
            backend = EndpointBackend(
                online.judge_url, api_key=key, chat=True, timeout=online.judge_timeout, retries=0
            )
        elif online.judge_model:
            backend = EngineBackend.from_path(online.judge_model[0], chat=True)
        else:
            raise RecipeError("online.judge = 'llm' needs online.judge_url or online.judge_model")
        return LLMJudge(
            backend=backend, instruction=online.instruction, both_orders=online.both_orders
        )
    raise RecipeError(f"online.judge = {online.judge!r}: use 'verifier', 'llm' or 'reward'")


def _prompts(recipe: PostRecipe, data: PairData | None) -> list[Prompt]:
    """Training prompts of an OAIF run: online.prompts, else the prompts of data.path."""
    o = recipe.online
    if o.prompts:
        return read_prompts(o.prompts)
    return read_prompts(recipe.data.path)


def heldout_prompts(recipe: PostRecipe, n: int) -> list[Prompt]:
    """Held-out prompts for the policy comparison: those of data.eval_path, else generated."""
    if recipe.data.eval_path and Path(recipe.data.eval_path).is_file():
        return read_prompts(recipe.data.eval_path)[:n]
    p = recipe.pairs
    return task_prompts(
        n,
        seed=p.seed,
        split="heldout",
        min_steps=p.min_steps,
        max_steps=p.max_steps,
        max_value=p.max_value,
    )


def dpo(
    recipe: PostRecipe,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run offline DPO/IPO/SLiC (or OAIF with [online]); the summary with the comparison."""
    from geode.infer import Engine

    if recipe.objective.kind != "dpo":
        raise RecipeError(
            f"geode dpo needs [objective] kind = 'dpo', got {recipe.objective.kind!r}"
        )
    data = load_pair_data(recipe)
    online = recipe.online or OnlineSection()
    judge = build_judge(online, data.tokenizer) if recipe.online else VerifierJudge()
    if recipe.online:
        per_step = online.prompts_per_step or recipe.batch.global_batch_size // 2
        source = OnlinePairs(
            None,
            data.tokenizer,
            _prompts(recipe, data),
            judge,
            prompts_per_step=per_step,
            temperature=online.temperature,
            max_new_tokens=online.max_new_tokens,
            seed=recipe.data.seed,
            max_len=recipe.pairs.max_len,
        )
        pad = data.tokenizer.pad_id
        held = data.heldout_ids
        train_data = TrainData(
            batches=source,
            eval_batches=fixed_batches(held, EVAL_PAIRS_PER_BATCH, pad, recipe.pairs.max_len)
            if held
            else None,
            vocab_size=data.tokenizer.vocab_size,
            tokenizer=str(data.tokenizer_path),
            tokenizer_sha256=data.tokenizer_sha256,
            describe="OAIF samples",
        )
    else:
        train_data = _train_data(recipe, data, recipe.data.seed)
    trainer = Trainer(recipe, out, resume, progress, data=train_data)
    objective = trainer.objective
    # the starting policy's greedy answers (the reference is the SFT policy, frozen)
    eval_prompts = heldout_prompts(recipe, online.eval_prompts)
    ref_engine = Engine(
        objective.reference.model, data.tokenizer, max_batch=64, optimize=False, seed=0
    )
    t0 = time.perf_counter()
    baseline = greedy_answers(ref_engine, data.tokenizer, eval_prompts, online.eval_max_new_tokens)
    eval_s = time.perf_counter() - t0
    if recipe.online:
        source.engine = Engine(trainer.raw_model, data.tokenizer, max_batch=2 * source.prompts_per_step,
                               optimize=False, seed=recipe.data.seed)  # fmt: skip
        trainer.raw_model.train()  # the engine left it in eval mode
        objective.online = source
    else:
        precompute_reference(objective.reference, data, recipe)
    summary = trainer.fit()
    objective.reference.flush()
    t0 = time.perf_counter()
    engine = Engine(trainer.raw_model, data.tokenizer, max_batch=64, optimize=False, seed=0)
    answers = greedy_answers(engine, data.tokenizer, eval_prompts, online.eval_max_new_tokens)
    summary["policy_vs_start"] = evaluate_policy(answers, baseline, eval_prompts, judge)
    if not isinstance(judge, VerifierJudge) and all(p.answer is not None for p in eval_prompts):
        verified = evaluate_policy(answers, baseline, eval_prompts, VerifierJudge())
        summary["policy_vs_start_verifier"] = verified  # the same answers under the verifier
    if recipe.online:
        summary["judge"] = judge.stats()
    summary["compare_s"] = eval_s + time.perf_counter() - t0
    if trainer.info.is_main:
        text = json.dumps(summary, indent=1) + "\n"
        atomic_write_bytes(Path(trainer.out) / "summary.json", text.encode())
    return summary


def precompute_reference(reference: Any, data: PairData, recipe: PostRecipe) -> None:
    """Score every training pair under the reference once and write the on-disk cache."""
    if reference.cache is None:
        return
    make = fixed_batches(
        data.train_ids, EVAL_PAIRS_PER_BATCH, data.tokenizer.pad_id, recipe.pairs.max_len
    )
    for batch in make():
        reference.sequence_logprobs(batch)
    reference.flush()
