"""Recipes of the preference stages: a TrainRecipe plus `[pairs]`, `[warm]` and `[online]`.

    geode reward RECIPE   [objective] kind = "reward"   (+ [warm] or --warm M: WARM)
    geode dpo RECIPE      [objective] kind = "dpo"      (+ [online]: OAIF)
    geode rl RECIPE       [objective] kind = "rl"       + [rl] (rollouts, rewards, advantages)

`data.path` is the training pairs JSONL and `data.eval_path` the held-out one (one pair per
line, geode.post.prefdata); with `[pairs] generate = N` the files are written from the
generated task when missing. `data.tokenizer` (default: `model.init`'s tokenizer.model) encodes
them; `batch.global_batch_size` counts sequences, two per pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geode.fileio import sha256_file
from geode.recipe import RecipeError, load_recipe
from geode.train.recipe import TrainRecipe, apply_overrides, check_recipe, read_recipe_source
from geode.train.sft import tokenizer_path

from .pairs import EncodedPair, encode_pair
from .prefdata import PairError, flip_labels, make_pairs, read_pairs, write_jsonl


@dataclass
class PairsSection:
    """The pair data: generated task settings, label noise, length limit."""

    generate: int = 0  # write this many generated training pairs to data.path when missing
    generate_heldout: int = 200  # and this many held-out pairs to data.eval_path
    seed: int = 0  # seed of the generated task and of the flipped labels
    noise: float = 0.0  # fraction of training labels flipped (known label noise)
    min_steps: int = 1  # difficulty of the generated task (geode.data.tasks)
    max_steps: int = 2
    max_value: int = 20
    max_len: int = 256  # tokens per sequence at most (prompt tail + response head kept)


@dataclass
class WarmSection:
    """WARM (Rame et al. 2024, arXiv:2401.12187): M reward models from one init, averaged."""

    members: int = 0  # M (0: one reward model, no WARM); `geode reward --warm M` sets it
    lrs: list[float] = field(default_factory=list)  # per member, cycled (default optim.lr)
    dropouts: list[float] = field(default_factory=lambda: [0.0, 0.1])  # per member, cycled
    inits: list[str] = field(default_factory=list)  # "Baklava": SFT checkpoints, cycled
    noise_levels: list[float] = field(default_factory=lambda: [0.0])  # flipped-label rates


@dataclass
class OnlineSection:
    """OAIF: sample two responses per prompt each step, judge them, train on the verdicts."""

    prompts: str = ""  # JSONL with `prompt` (+ `answer`); empty: the prompts of data.path
    prompts_per_step: int = 0  # 0: global_batch_size / 2
    temperature: float = 1.0
    max_new_tokens: int = 64
    judge: str = "verifier"  # "verifier" | "llm" | "reward"
    judge_model: list[str] = field(default_factory=list)  # llm: a geode checkpoint; reward: RM dirs
    judge_url: str = ""  # llm: an OpenAI-compatible endpoint instead of judge_model
    judge_api_key_env: str = ""  # environment variable holding the endpoint's API key
    judge_timeout: float = 30.0  # seconds per judge request (then the pair is skipped)
    instruction: str = ""  # extra judge instruction, e.g. "Prefer the shorter answer."
    both_orders: bool = False  # judge both orders, skip on disagreement
    eval_prompts: int = 64  # held-out prompts for win rate / verified accuracy
    eval_max_new_tokens: int = 64


@dataclass
class CfgSection:
    """CFG distillation with a diversity reward (geode.post.cfgdistill; arXiv:2410.06084)."""

    guidance_scale: float = 3.0  # the teacher's γ: uncond + γ (cond - uncond)
    unconditional: str = "Write a word problem."  # the unconditional prompt's user message
    task: str = "topic"  # "topic" (quality: adherence) | "arithmetic" (verified accuracy); the
    # prompts of data.path / data.eval_path (JSONL: prompt, answer), generated when missing
    teacher: str = ""  # the guided teacher; empty: model.init (the student starts from model.init)
    samples: str = "student"  # rollouts from the "student" (on-policy) or the guided "teacher"
    group_size: int = 4  # samples per prompt (the diversity reward compares them)
    max_new_tokens: int = 48
    temperature: float = 1.0
    diversity_weight: float = 0.0  # β of the diversity model; 0: only the quality model
    embedder: str = ""  # geode model whose mean-pooled hidden states embed samples; "": teacher
    etas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # front's t
    eval_prompts: int = 14  # prompts of the quality / diversity measurement
    eval_samples: int = 4  # samples per evaluation prompt
    seed: int = 0
    train_prompts: int = 256  # generated training prompts when data.path is missing
    min_steps: int = 1  # task = "arithmetic": difficulty (geode.data.tasks)
    max_steps: int = 1
    max_value: int = 20


@dataclass
class ScoreSection:
    """SCoRe (geode.post.score; Kumar et al. 2024, arXiv:2409.12917, sec. 5) and its baselines."""

    method: str = "score"  # "score" | "star" | "pair_sft" (same sampled budget and steps)
    stage1_steps: int = 10  # Stage I optimizer steps (0: SCoRe without Stage I)
    stage2_steps: int = 20  # Stage II optimizer steps
    alpha: float = 10.0  # shaping bonus alpha (r2 - r1) on attempt 2 (Stage II)
    beta1: float = 0.01  # KL weight on both attempts (Stage II)
    beta2: float = 0.1  # KL weight on attempt 1 (Stage I)
    instruction: str = ""  # the correction instruction; empty: geode.post.env's
    loss_type: str = "grpo"  # "grpo" (per-sequence token mean) | "dapo" (per token)


@dataclass
class WarpSection:
    """WARP (geode.post.warp; Rame et al. 2024, arXiv:2406.16768): M RL runs per iteration
    with an EMA anchor, SLERP-merged, interpolated towards the init (LITI), I iterations."""

    policies: int = 2  # M RL runs per iteration, from one init with different seeds
    iterations: int = 1  # I
    steps: int = 0  # optimizer steps per run; 0: train.max_steps
    ema_rate: float = 0.01  # mu of the EMA anchor (objective anchor = "ema")
    eta: float = 0.3  # LITI: the next iteration's init (1 - eta) init + eta slerp
    etas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # the front
    eval_samples: int = 4  # sampled completions per held-out prompt (reward, KL to the init)


@dataclass
class RLSection:
    """`geode rl`: rollouts on the engine, rewards, advantages (geode.post.rl; issue #19).

    Prompts: `prompts` (JSONL with `prompt` and optional `answer`), else data.path when it is a
    file, else `generate` problems of the task family with [pairs]'s difficulty and seed.
    """

    prompts: str = ""  # JSONL prompts (`prompt`: messages or text, `answer`)
    generate: int = 1000  # generated training problems when there is no prompts file
    group_size: int = 8  # samples per prompt (a group shares one prefill)
    prompts_per_step: int = 0  # groups per rollout batch; 0: global_batch_size / group_size
    max_new_tokens: int = 64  # sampled tokens per model turn at most (then: truncated)
    temperature: float = 1.0
    top_p: float = 1.0
    estimator: str = "grpo"  # advantages: "grpo" | "rloo" | "reinforce" (geode.post.policy)
    scale: str = "group"  # divide by the reward std of the "group" | "batch" | "none"
    num_iterations: int = 1  # optimizer steps per rollout batch (ratio vs the rollout policy)
    dynamic_sampling: bool = False  # drop groups with all-equal rewards, sample more prompts
    max_resample: int = 4  # extra rollout rounds per batch at most (dynamic sampling)
    mask_truncated: bool = False  # no loss on episodes cut at max_new_tokens
    rewards: list[dict[str, Any]] = field(default_factory=lambda: [{"kind": "synth"}])
    failed_reward: float = 0.0  # the reward of a sample whose reward failed
    thinking_budgets: list[int] = field(default_factory=list)  # one drawn per group; []: none
    eval_prompts: int = 64  # held-out prompts of the accuracy before / after
    eval_max_new_tokens: int = 64


@dataclass
class PostRecipe(TrainRecipe):
    """A reward-model or preference-optimisation run."""

    pairs: PairsSection = field(default_factory=PairsSection)
    warm: WarmSection = field(default_factory=WarmSection)
    online: OnlineSection | None = None  # present: OAIF (geode dpo)
    rl: RLSection | None = None  # present: RL (geode rl)
    warp: WarpSection | None = None  # present: WARP (geode rl)
    cfg: CfgSection | None = None  # present: CFG distillation (geode rl)
    score: ScoreSection | None = None  # present: SCoRe self-correction (geode rl)


def load_post_recipe(
    source: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> PostRecipe:
    """Read a post-training recipe (TOML or dict), apply `a.b=v` overrides, validate."""
    data, where = read_recipe_source(source)
    try:
        recipe = load_recipe(PostRecipe, apply_overrides(data, overrides or []))
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    if recipe.rl is not None and not recipe.data.path:  # prompts come from [rl]
        recipe.data.path = recipe.rl.prompts or "generated"
    check_recipe(recipe, where=where)
    if recipe.rl is not None:
        check_rl(recipe.rl, recipe.batch.global_batch_size, where)
    elif recipe.batch.global_batch_size % 2 or (recipe.batch.micro_batch_size or 2) % 2:
        raise RecipeError(f"{where}: batch sizes count sequences, two per pair: use even sizes")
    if not 0.0 <= recipe.pairs.noise <= 1.0:
        raise RecipeError(f"{where}: pairs.noise = {recipe.pairs.noise}: must be in [0, 1]")
    return recipe


def check_rl(rl: RLSection, global_batch_size: int, where: str) -> None:
    """Ranges and combinations of [rl] (a RecipeError naming the field)."""
    for name in ("group_size", "max_new_tokens", "num_iterations", "eval_max_new_tokens"):
        if getattr(rl, name) < 1:
            raise RecipeError(f"{where}: rl.{name} = {getattr(rl, name)}: must be >= 1")
    for name in ("prompts_per_step", "max_resample", "eval_prompts", "generate"):
        if getattr(rl, name) < 0:
            raise RecipeError(f"{where}: rl.{name} = {getattr(rl, name)}: must be >= 0")
    if not rl.prompts_per_step and global_batch_size % rl.group_size:
        raise RecipeError(
            f"{where}: batch.global_batch_size = {global_batch_size} is not a multiple of "
            f"rl.group_size = {rl.group_size} (rows are groups of samples)"
        )
    if not rl.temperature > 0 or not 0 < rl.top_p <= 1:
        raise RecipeError(f"{where}: rl.temperature must be > 0 and rl.top_p in (0, 1]")
    from .policy import ESTIMATORS, SCALES

    if rl.estimator not in ESTIMATORS:
        raise RecipeError(f"{where}: rl.estimator = {rl.estimator!r}: use one of {ESTIMATORS}")
    if rl.scale not in SCALES:
        raise RecipeError(f"{where}: rl.scale = {rl.scale!r}: use one of {SCALES}")
    if rl.estimator == "rloo" and rl.group_size < 2:
        raise RecipeError(f"{where}: rl.estimator = 'rloo' needs rl.group_size >= 2")
    if any(b < 1 for b in rl.thinking_budgets):
        raise RecipeError(f"{where}: rl.thinking_budgets = {rl.thinking_budgets}: each >= 1")


@dataclass
class PairData:
    """A recipe's pairs, validated and encoded, with the tokenizer that encoded them."""

    tokenizer: Any
    tokenizer_path: Path
    tokenizer_sha256: str
    train: list[dict[str, Any]]  # validated pairs, label noise applied
    heldout: list[dict[str, Any]]
    train_ids: list[EncodedPair]
    heldout_ids: list[EncodedPair]


def ensure_generated(recipe: PostRecipe) -> None:
    """Write the generated task's pairs to data.path / data.eval_path when asked and missing."""
    p = recipe.pairs
    if not p.generate:
        return
    kw = {"min_steps": p.min_steps, "max_steps": p.max_steps, "max_value": p.max_value}
    train, held = Path(recipe.data.path), Path(recipe.data.eval_path or "")
    if not train.is_file():
        write_jsonl(make_pairs(p.generate, seed=p.seed, **kw), train)
    if recipe.data.eval_path and not held.is_file():
        write_jsonl(make_pairs(p.generate_heldout, seed=p.seed, split="heldout", **kw), held)


def load_pair_data(recipe: PostRecipe, noise: float | None = None) -> PairData:
    """Read, flip (`noise`, default pairs.noise) and encode the recipe's pairs."""
    from geode.tokenizer import load_tokenizer

    ensure_generated(recipe)
    train = read_pairs(recipe.data.path)
    rate = recipe.pairs.noise if noise is None else noise
    if rate:
        train = flip_labels(train, rate, recipe.pairs.seed)
    held = read_pairs(recipe.data.eval_path) if recipe.data.eval_path else []
    tok_path = tokenizer_path(recipe)
    tok = load_tokenizer(tok_path)
    enc = [encode_pair(tok, p) for p in train]
    for i, e in enumerate(enc):
        if not e.chosen or not e.rejected:
            raise PairError(
                f"{recipe.data.path}: pair {i + 1} has an empty response after tokenization"
            )
    return PairData(
        tokenizer=tok,
        tokenizer_path=tok_path,
        tokenizer_sha256=sha256_file(tok_path),
        train=train,
        heldout=held,
        train_ids=enc,
        heldout_ids=[encode_pair(tok, p) for p in held],
    )
