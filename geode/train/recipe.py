"""TrainRecipe: everything a pretraining or distillation run needs, as dataclasses read from TOML.

A recipe is loaded strictly by `geode.recipe.load_recipe` (unknown keys and ill-typed values
are errors naming the key). `check_recipe` then validates values that depend on each other
(batch sizes against the world size, schedule lengths, paths) before any model is built, so
a bad recipe fails in a second, not after a model load or a first step.

The same recipe runs on 1 or N processes: `batch.global_batch_size` sequences enter every
optimizer step whatever the world size; each rank runs `micro_batch_size` sequences per
forward pass and accumulates `global / (micro * world)` of them.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data.mixture import MixtureConfig
from ..recipe import RecipeError, load_recipe, recipe_to_dict


@dataclass
class ModelSection:
    """Which model to train: a preset (with field overrides) or an existing checkpoint."""

    preset: str = "nano-1m"  # a name from geode.config.PRESETS (ignored when `init` is set)
    init: str = ""  # HF-layout checkpoint directory to start from instead of random weights
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to change
    seed: int = 0  # initialisation seed of a preset model
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter (master weight) dtype


@dataclass
class DataSection:
    """Where the training and held-out tokens come from (prepared by `geode data prepare`)."""

    path: str = ""  # prepared dataset directory (required)
    seq_len: int = 128  # tokens per training sequence (each row holds seq_len + 1 tokens)
    sources: list[str] = field(default_factory=list)  # streams to train on (default: all but eval)
    mixture: MixtureConfig | None = None  # per-stage weights over `sources` (default: natural)
    seed: int = 0  # shuffling seed of the loader
    eval_path: str = ""  # prepared dataset holding the held-out stream (default: `path`)
    eval_source: str = ""  # held-out stream name; empty: no held-out evaluation
    tokenizer: str = ""  # tokenizer.model for text data (chat JSONL, pairs); default: model.init's


@dataclass
class BatchSection:
    """Sequences per optimizer step (all ranks) and per forward pass (one rank)."""

    global_batch_size: int = 16  # sequences per optimizer step, summed over ranks
    micro_batch_size: int = 0  # sequences per forward pass per rank; 0: global / world size


@dataclass
class OptimSection:
    """AdamW (Loshchilov & Hutter, arXiv:1711.05101) and its learning-rate schedule."""

    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of `lr`
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to the minimum
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not norms or embeddings)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"  # AdamW kernel


@dataclass
class LoopSection:
    """The training loop: length, numerics, parallelism and logging."""

    max_steps: int = 100  # optimizer steps
    z_loss: float = 0.0  # PaLM's auxiliary z-loss coefficient (1e-4 in arXiv:2204.02311)
    precision: Literal["float32", "bfloat16"] = "float32"  # autocast dtype of the forward pass
    activation_checkpointing: bool = False  # recompute every decoder layer in the backward pass
    compile: bool = False  # torch.compile each decoder layer
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise-repeatable runs)
    threads: int = 0  # torch.set_num_threads per process (0: leave torch's default)
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # auto: DDP when world size > 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1  # steps between metric lines
    progress: bool = True  # tqdm progress bar on rank 0
    memory_fraction: float = 0.9  # refuse settings whose estimate exceeds this share of memory


@dataclass
class EvalSection:
    """Periodic held-out evaluation (needs data.eval_source)."""

    every: int = 0  # steps between evaluations (0: only at the end)
    batches: int = 4  # batches per evaluation (the same windows every time)
    batch_size: int = 0  # sequences per eval batch, all ranks (0: batch.global_batch_size)


@dataclass
class CheckpointSection:
    """Training-state checkpoints (for resume) and the final model export."""

    every: int = 0  # steps between checkpoints (0: only at the end)
    keep: int = 2  # newest checkpoints kept; older ones are deleted
    verify: bool = True  # check SHA-256 of every file before resuming from a checkpoint
    export: bool = True  # write the final model to OUT/model in the Hugging Face layout


@dataclass
class FaultSection:
    """Fault tolerance (Gemini report): in-memory replicas and silent-data-corruption checks."""

    sdc_every: int = 0  # steps between cross-replica checksum comparisons (0: off; DDP only)
    replica_every: int = 0  # steps between in-memory state replicas for fast restart (0: off)
    # host-memory directory in which the run's private replica directory (0700, random name,
    # recorded in OUT/.replicas.json) is made; default /dev/shm
    replica_dir: str = ""


@dataclass
class DistillSection:
    """Gemma 3 distillation (arXiv:2503.19786 §2.2): cross-entropy to sampled teacher logits."""

    teacher: str = ""  # teacher checkpoint directory (HF layout, same tokenizer)
    mode: Literal["online", "offline"] = "online"  # teacher in-process, or a precomputed cache
    cache: str = ""  # offline: top-k target cache directory (built from `teacher` if absent)
    top_k: int = 256  # teacher logits sampled per token
    sampling: Literal["sample", "top"] = "sample"  # sample K by teacher probability, or top-K
    temperature: float = 1.0  # teacher softmax temperature
    hard_weight: float = 0.0  # weight of the plain next-token loss added to the distillation loss
    control: bool = True  # `geode distill`: also train the same student from scratch
    # On-policy (online mode): the student samples the last `on_policy_tokens` tokens of every
    # row itself and the teacher scores them (GKD, Agarwal et al. 2024, arXiv:2306.13649); the
    # plain next-token loss only sees real data. 0: teacher targets on data only.
    on_policy_tokens: int = 0
    on_policy_temperature: float = 1.0  # student sampling temperature for those tokens


@dataclass
class ObjectiveSection:
    """Which objective trains the model (geode.train.objectives); its own options table."""

    kind: str = ""  # a registered kind ("ntp", "sft", "distill", ...); empty: distill or ntp
    options: dict[str, Any] = field(default_factory=dict)  # checked by the objective's Options
    # MoE models: weight of the Switch load-balancing loss added to every objective (transformers'
    # name); unset: the checkpoint config's value, else 0.01 (objectives/router.py)
    router_aux_loss_coef: float | None = None


@dataclass
class LoraSection:
    """LoRA adapters through `peft` (Hu et al. 2021, arXiv:2106.09685): W + (alpha/r) B A."""

    r: int = 16  # adapter rank
    alpha: float = 32.0  # scale numerator: the update is (alpha / r) * B @ A
    dropout: float = 0.0  # dropout on the adapter's input
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"]
    )  # fmt: skip  # Hugging Face module names (geode's own names are mapped)


@dataclass
class TrainRecipe:
    """A pretraining (or distillation) run."""

    name: str = "run"
    out: str = "runs/train"  # output directory (metrics, checkpoints, model, curves)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: LoopSection = field(default_factory=LoopSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    fault: FaultSection = field(default_factory=FaultSection)
    distill: DistillSection | None = None  # present: distillation run
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    lora: LoraSection | None = None  # present: train LoRA adapters, base weights frozen


def read_recipe_source(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(recipe dict, where it came from) of a TOML file or a dict; a RecipeError naming the file."""
    if isinstance(source, dict):
        return source, "recipe"
    path = Path(source)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), str(path)
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from e


def load_train_recipe(
    source: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> TrainRecipe:
    """Read a recipe from TOML (or a dict), apply `section.key=value` overrides, validate."""
    data, where = read_recipe_source(source)
    data = apply_overrides(data, overrides or [])
    try:
        recipe = load_recipe(TrainRecipe, data)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    check_recipe(recipe, where=where)
    return recipe


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `data` with `a.b.c=VALUE` items set; VALUE is a TOML value or a bare string."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare string such as a path
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def check_recipe(recipe: TrainRecipe, where: str = "recipe", world_size: int | None = None) -> None:
    """Validate values that the type check cannot (ranges, combinations, required paths)."""

    def fail(field_name: str, msg: str) -> None:
        value = _get(recipe, field_name)
        raise RecipeError(f"{where}: {field_name} = {value!r}: {msg}")

    if not recipe.data.path:
        raise RecipeError(
            f"{where}: data.path is required (a prepared dataset directory from "
            "`geode data prepare`)"
        )
    positive = [
        "data.seq_len",
        "batch.global_batch_size",
        "train.max_steps",
        "train.log_every",
        "eval.batches",
        "checkpoint.keep",
    ]
    for name in positive:
        if _get(recipe, name) < 1:
            fail(name, "must be >= 1")
    for name in [
        "batch.micro_batch_size",
        "optim.warmup_steps",
        "eval.every",
        "eval.batch_size",
        "checkpoint.every",
        "fault.sdc_every",
        "fault.replica_every",
        "train.threads",
        "optim.weight_decay",
        "optim.grad_clip",
        "train.z_loss",
        "objective.router_aux_loss_coef",
    ]:
        value = _get(recipe, name)
        if value is not None and value < 0:
            fail(name, "must be >= 0")
    o = recipe.optim
    if not o.lr > 0:
        fail("optim.lr", "must be > 0")
    if not 0 <= o.min_lr_ratio <= 1:
        fail("optim.min_lr_ratio", "must be in [0, 1]")
    if not 0 < o.decay_fraction <= 1:
        fail("optim.decay_fraction", "must be in (0, 1]")
    if not all(0 <= b < 1 for b in o.betas):
        fail("optim.betas", "each beta must be in [0, 1)")
    if o.warmup_steps and o.warmup_steps >= recipe.train.max_steps:
        fail(
            "optim.warmup_steps",
            f"must be <= train.max_steps - 1 ({recipe.train.max_steps - 1}): a warmup as long "
            f"as the run leaves the {o.schedule} schedule no step "
            f"{'at the peak rate' if o.schedule == 'constant' else 'to decay'}; use fewer "
            "warmup steps or more steps",
        )
    if not 0 < recipe.train.memory_fraction <= 1:
        fail("train.memory_fraction", "must be in (0, 1]")
    if recipe.model.overrides and recipe.model.init:
        fail("model.overrides", "cannot change the shape of an `init` checkpoint")
    if world_size is not None:
        micro_batch_and_accumulation(recipe, world_size, where)
    _check_objective(recipe, where)
    d = recipe.distill
    if d is not None:
        if not d.teacher and not (d.mode == "offline" and d.cache):
            fail("distill.teacher", "a teacher checkpoint is required (or an offline cache)")
        if d.top_k < 1:
            fail("distill.top_k", "must be >= 1")
        if not d.temperature > 0:
            fail("distill.temperature", "must be > 0")
        if d.hard_weight < 0:
            fail("distill.hard_weight", "must be >= 0")
        if d.mode == "offline" and not d.cache:
            fail("distill.cache", "offline mode needs a cache directory")
        if d.on_policy_tokens:
            if not 0 < d.on_policy_tokens < recipe.data.seq_len:
                fail("distill.on_policy_tokens", f"must be in [0, data.seq_len) = "
                     f"[0, {recipe.data.seq_len}), got {d.on_policy_tokens}")  # fmt: skip
            if d.mode != "online":
                fail("distill.on_policy_tokens", "student samples need the teacher in-process "
                     "(mode = 'online')")  # fmt: skip
            if recipe.train.parallel == "fsdp":
                fail("distill.on_policy_tokens", "student sampling needs whole weights on each "
                     "rank; use parallel = 'ddp' or 'none'")  # fmt: skip
        if not d.on_policy_temperature > 0:
            fail("distill.on_policy_temperature", "must be > 0")


def _check_objective(recipe: TrainRecipe, where: str) -> None:
    """The objective kind is registered and its options parse; LoRA settings are sane."""
    from .objectives.base import objective_class, objective_kind, parse_options

    try:
        cls = objective_class(objective_kind(recipe))
        parse_options(cls, recipe.objective.options)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    lo = recipe.lora
    if lo is not None:
        if lo.r < 1:
            raise RecipeError(f"{where}: lora.r = {lo.r}: must be >= 1")
        if not 0 <= lo.dropout < 1:
            raise RecipeError(f"{where}: lora.dropout = {lo.dropout}: must be in [0, 1)")
        if not lo.target_modules:
            raise RecipeError(f"{where}: lora.target_modules is empty")
        if recipe.train.parallel == "fsdp":
            raise RecipeError(f"{where}: [lora] runs with train.parallel 'none' or 'ddp', not fsdp")


def micro_batch_and_accumulation(
    recipe: TrainRecipe, world_size: int, where: str = "recipe"
) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) so micro * accum * world == global batch."""
    g, m = recipe.batch.global_batch_size, recipe.batch.micro_batch_size
    if g % world_size:
        raise RecipeError(
            f"{where}: batch.global_batch_size = {g} is not divisible by the world size "
            f"{world_size}"
        )
    per_rank = g // world_size
    m = m or per_rank
    if per_rank % m:
        raise RecipeError(
            f"{where}: batch.micro_batch_size = {m} must divide the per-rank batch "
            f"global_batch_size / world_size = {per_rank}"
        )
    return m, per_rank // m


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def recipe_dict(recipe: TrainRecipe) -> dict[str, Any]:
    """The recipe as plain data (for recipe.toml in the output and the checkpoint)."""
    return recipe_to_dict(recipe)


def replace(recipe: TrainRecipe, **sections: Any) -> TrainRecipe:
    """A copy with whole sections replaced (e.g. distill=None for the control run)."""
    return dataclasses.replace(recipe, **sections)
