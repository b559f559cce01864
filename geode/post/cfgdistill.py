"""Diversity-rewarded CFG distillation (Cideron et al. 2024, arXiv:2410.06084).

The teacher is the model with classifier-free guidance at inference (the engine's
`guidance_scale` γ + `Request(guidance_prompt=)`: two forward passes per token, conditional and
unconditional). The student, initialised from the teacher, samples groups of completions per
prompt (on-policy; or the guided teacher samples them, `cfg.samples`) and learns the guided
distribution (objective "cfg_distill", geode/train/objectives/cfg.py) while a policy-gradient
term rewards diversity within each group:

    r_i = 1 - mean_{j != i, same prompt} cos(e_i, e_j)       (the paper's diversity reward, sec. 3.2)

with e the mean-pooled final hidden states of a geode model (the embedder; default the
teacher) over the sample's tokens, advantages by RLOO within the group. Two runs give the
paper's pair of models: the quality model (β = 0, distillation only) and the diversity model
(β = `cfg.diversity_weight`); their linear interpolation θ(t) = (1 - t) θ_q + t θ_d
(geode.post.merge.lerp, the paper's sec. 3.3) at `cfg.etas` is measured for quality and
diversity: OUT/front.json and OUT/front.png.

The generated conditional task ("topic"): the user asks "Write a word problem about
{items}." and the model writes the question of one of geode.data.tasks' problems; the
unconditional prompt drops the topic ("Write a word problem."). Quality = adherence: the
sample names the requested items and no other item of the family (it does not depend on the
student). With `task = "arithmetic"` the prompts are the task family's problems and quality
is verified accuracy.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geode.data import tasks as synth
from geode.fileio import atomic_write_bytes, save_figure, sha256_file
from geode.recipe import RecipeError

from .oaif import Prompt, read_prompts, task_prompts
from .pairs import prompt_text, sequences_batch
from .prefdata import write_jsonl
from .rewards import RewardSpec, Sample, Term, build_rewards, register_reward

TOPICS: tuple[str, ...] = tuple(items for items, _ in synth._ITEMS)
UNCONDITIONAL = "Write a word problem."
TASKS = ("topic", "arithmetic")


# ---------------------------------------------------------------------- the conditional task
def topic_instruction(topic: str) -> str:
    """The conditional prompt's user message for `topic` (a plural item, e.g. "apples")."""
    return f"Write a word problem about {topic}."


def topics_in(text: str) -> set[str]:
    """The item words of the task family that `text` names."""
    return {t for t in TOPICS if re.search(rf"\b{t}\b", text)}


def adherence(topic: str, text: str) -> bool:
    """The sample names the requested items and no other item of the family."""
    return topics_in(text) == {topic}


def topic_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """`n` prompts cycling through the topics in a seeded order (answer = the topic)."""
    order = list(TOPICS)
    random.Random(f"geode-cfg-topics:{seed}").shuffle(order)
    return [
        Prompt([{"role": "user", "content": topic_instruction(t)}], t)
        for t in (order[i % len(order)] for i in range(n))
    ]


def topic_examples(
    n: int, seed: int = 0, drop: float = 0.3, **difficulty: int
) -> list[dict[str, Any]]:
    """SFT conversations of the topic task: the question of a generated problem answers its
    topic's instruction, or (probability `drop`, CFG's condition dropout) the unconditional one."""
    rng = random.Random(f"geode-cfg-sft:{seed}")
    out = []
    for p in synth.generate(n, seed=seed, split="train", **difficulty):
        (topic,) = topics_in(p.question)
        user = UNCONDITIONAL if rng.random() < drop else topic_instruction(topic)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": p.question},
                ]
            }
        )
    return out


def unconditional_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of the unconditional prompt: `text` as the user's message, rendered like a prompt."""
    return list(tokenizer.encode(prompt_text([{"role": "user", "content": text}])))


def quality_fn(task: str) -> Callable[[Prompt, str], bool]:
    """The student-independent quality of a sample: topic adherence or verified accuracy."""
    if task == "topic":
        return lambda p, text: adherence(p.answer, text)
    return lambda p, text: p.answer is not None and synth.verify(p.answer, text)


# ---------------------------------------------------------------------- diversity
@torch.no_grad()
def embed(
    model: nn.Module, token_ids: Sequence[Sequence[int]], bos: int, batch_size: int = 64
) -> torch.Tensor:
    """(N, H) mean of the final-norm hidden states over each sample's tokens (after <bos>)."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(token_ids), batch_size):
        rows = [[bos, *t] for t in token_ids[i : i + batch_size]]
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), bos, dtype=torch.long)  # (B, T), right-padded
        keep = torch.zeros(len(rows), T, dtype=torch.bool)  # (B, T) the samples' own tokens
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            keep[b, 1 : len(r)] = True
            keep[b, 0] = len(r) == 1  # an empty sample: the <bos> state
        h = model.hidden(ids.to(device)).float().cpu()  # (B, T, H)
        w = keep.unsqueeze(-1).float()  # (B, T, 1)
        out.append((h * w).sum(1) / w.sum(1))  # (B, H)
    return torch.cat(out) if out else torch.zeros(0, 0)


def diversity_scores(emb: torch.Tensor, groups: Sequence[int]) -> list[float]:
    """Per sample 1 - mean cosine similarity to the other samples of its group (0 if alone)."""
    e = torch.nn.functional.normalize(emb.float(), dim=-1)  # (N, H)
    cos = e @ e.T  # (N, N)
    g = torch.tensor(list(groups))
    same = (g[:, None] == g[None, :]) & ~torch.eye(len(g), dtype=torch.bool)  # (N, N)
    n = same.sum(1)  # (N,)
    mean_cos = (cos * same).sum(1) / n.clamp(min=1)
    return torch.where(n > 0, 1.0 - mean_cos, torch.zeros_like(mean_cos)).tolist()


@register_reward("diversity")
class DiversityReward(Term):
    """Group-level diversity: 1 - mean cosine similarity of a sample's embedding to the other
    samples of its group (`Sample.group`). Options: embedder (a geode model path), batch_size."""

    name = "diversity"

    def __init__(self, options: Mapping[str, Any], tokenizer: Any = None):
        from geode.checkpoint import load_model

        super().__init__(options, tokenizer)
        path = self.opt("embedder", "")
        if not path:
            raise ValueError("option 'embedder' (a geode model path) is required")
        self.batch_size = self.opt("batch_size", 64)
        self.model = load_model(path).eval()
        self.bos = self.model.config.bos_token_id

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        """Each sample's diversity within its group."""
        if any(not s.token_ids for s in samples) and self.tokenizer is None:
            raise ValueError("diversity: samples without token_ids need a tokenizer")
        ids = [
            list(s.token_ids) if s.token_ids else list(self.tokenizer.encode(s.completion))
            for s in samples
        ]
        emb = embed(self.model, ids, self.bos, self.batch_size)
        return diversity_scores(emb, [s.group for s in samples])


# ---------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_groups(
    engine: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    guidance: tuple[float, list[int]] | None = None,
) -> list[tuple[list[int], list[Any]]]:
    """(prompt ids, `group_size` results) per prompt; `guidance` = (γ, unconditional ids)."""
    from geode.infer import Request

    extra = {}
    if guidance is not None:
        extra = {"guidance_scale": guidance[0], "guidance_prompt": guidance[1]}
    model = engine.model
    was_training = model.training
    ids = [list(tokenizer.encode(prompt_text(p.messages))) for p in prompts]
    reqs = [
        Request(x, max_new_tokens=max_new_tokens, temperature=temperature,
                seed=seed * 1_000_003 + i * group_size + j, **extra)
        for i, x in enumerate(ids) for j in range(group_size)
    ]  # fmt: skip
    try:
        results = engine.generate(reqs)
    finally:
        model.train(was_training)
    return [(x, results[i * group_size : (i + 1) * group_size]) for i, x in enumerate(ids)]


def to_samples(
    prompts: Sequence[Prompt], groups: Sequence[tuple[list[int], list[Any]]]
) -> list[Sample]:
    """Reward samples of sampled groups (group id = prompt index)."""
    return [
        Sample(prompt=p.messages, completion=r.text or "", group=i, token_ids=list(r.token_ids))
        for i, (p, (_, rs)) in enumerate(zip(prompts, groups, strict=True))
        for r in rs
    ]


class CfgRollouts:
    """A BatchSource: each step samples groups of completions, scores their diversity, and
    batches them (rows = prompt + completion, `advantages` = RLOO of the diversity reward)."""

    def __init__(
        self,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        *,
        rows: int,
        group_size: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        quality: Callable[[Prompt, str], bool],
        rewards: Any = None,
        guidance: tuple[float, list[int]] | None = None,
    ):
        if rows % group_size:
            raise RecipeError(
                f"batch.global_batch_size = {rows} must be a multiple of cfg.group_size = "
                f"{group_size}"
            )
        self.engine: Any = None  # set once the trainer holds the weights (student or teacher)
        self.tokenizer, self.prompts, self.group_size = tokenizer, list(prompts), group_size
        self.per_step = rows // group_size
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.quality, self.rewards, self.guidance = quality, rewards, guidance
        self.step = 0
        self.last: dict[str, float] = {}

    def next_batch(self):
        """One step's groups as a Batch (advantages set when a reward is configured)."""
        from .policy import group_advantages

        rng = random.Random(f"geode-cfg-rollouts:{self.seed}:{self.step}")
        prompts = [rng.choice(self.prompts) for _ in range(self.per_step)]
        t0 = time.perf_counter()
        groups = sample_groups(
            self.engine, self.tokenizer, prompts, self.group_size,
            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            seed=self.seed * 7919 + self.step, guidance=self.guidance,
        )  # fmt: skip
        t1 = time.perf_counter()
        samples = to_samples(prompts, groups)
        good = [self.quality(p, r.text or "") for p, (_, rs) in zip(prompts, groups) for r in rs]
        stats = {"sample_s": t1 - t0, "sample_quality": sum(good) / len(good)}
        advantages = None
        if self.rewards is not None:
            scored = self.rewards(samples)
            advantages = group_advantages(
                scored.rewards.float(), self.group_size, estimator="rloo", scale="none"
            )  # (B,)
            stats["reward"] = float(scored.rewards.mean())
            stats["failed"] = float(scored.failed.sum())
            stats["score_s"] = time.perf_counter() - t1
        self.step += 1
        rows = [(x, list(r.token_ids)) for x, rs in groups for r in rs]
        stats["completion_tokens"] = sum(len(c) for _, c in rows) / len(rows)
        self.last = stats
        batch = sequences_batch(rows, self.tokenizer.pad_id)
        batch.advantages = advantages
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Steps drawn so far (the prompt draws and sampling seeds follow it)."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after `step` steps."""
        self.step = int(state["step"])


# ---------------------------------------------------------------------- measurement
def measure(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    embedder: nn.Module,
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    quality: Callable[[Prompt, str], bool],
    seed: int = 0,
    guidance: tuple[float, list[int]] | None = None,
) -> dict[str, float]:
    """Quality (mean over samples) and diversity (mean over samples of their group score) of
    `samples` completions per prompt, and the forward passes per generated token."""
    from geode.infer import Engine

    rows = len(prompts) * samples * (2 if guidance else 1)
    engine = Engine(model, tokenizer, max_batch=rows, optimize=False, seed=seed)
    t0 = time.perf_counter()
    groups = sample_groups(engine, tokenizer, prompts, samples, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, guidance=guidance)  # fmt: skip
    seconds = time.perf_counter() - t0
    texts = [(p, r) for p, (_, rs) in zip(prompts, groups) for r in rs]
    ids = [list(r.token_ids) for _, r in texts]
    emb = embed(embedder, ids, embedder.config.bos_token_id)
    div = diversity_scores(emb, [i // samples for i in range(len(ids))])
    return {
        "quality": sum(quality(p, r.text or "") for p, r in texts) / len(texts),
        "diversity": sum(div) / len(div),
        "forwards_per_token": 2 if guidance else 1,
        "tokens": sum(map(len, ids)) / len(ids),
        "seconds": seconds,
    }


# ---------------------------------------------------------------------- the driver
def _prompts(recipe: Any) -> tuple[list[Prompt], list[Prompt]]:
    """(training, evaluation) prompts: data.path / data.eval_path (JSONL of `prompt` +
    `answer`), written from the generated [cfg] task when missing; no eval_path: the first
    cfg.eval_prompts training prompts."""
    c = recipe.cfg
    kw = {"min_steps": c.min_steps, "max_steps": c.max_steps, "max_value": c.max_value}

    def generated(n: int, split: str) -> list[Prompt]:
        if c.task == "topic":
            return topic_prompts(n, c.seed + (split == "heldout"))
        return task_prompts(n, seed=c.seed, split=split, **kw)

    files = [(recipe.data.path, c.train_prompts, "train")]
    if recipe.data.eval_path:
        files.append((recipe.data.eval_path, c.eval_prompts, "heldout"))
    for path, n, split in files:
        if not Path(path).is_file():
            rows = [{"prompt": p.messages, "answer": p.answer} for p in generated(n, split)]
            write_jsonl(rows, path)
    train = read_prompts(recipe.data.path)
    held = read_prompts(recipe.data.eval_path) if recipe.data.eval_path else train
    return train, held[: c.eval_prompts]


def _train(recipe: Any, out: Path, beta: float, resume: bool, progress: bool | None,
           prompts: list[Prompt], tok: Any, tok_path: Path) -> dict[str, Any]:  # fmt: skip
    """One student run (β = `beta`) into `out`; its trainer summary."""
    from geode.infer import Engine
    from geode.train.batches import TrainData
    from geode.train.loop import Trainer
    from geode.train.objectives import cfg as _  # noqa: F401  (registers "cfg_distill")

    c = replace(recipe.cfg, diversity_weight=beta)
    sub = replace(recipe, cfg=c, out=str(out))
    guided = (c.guidance_scale, unconditional_ids(tok, c.unconditional))
    rewards = None
    if beta:
        spec = RewardSpec(
            "diversity", 1.0, {"embedder": c.embedder or c.teacher or recipe.model.init}
        )
        rewards = build_rewards([spec], tokenizer=tok)
    source = CfgRollouts(
        tok, prompts, rows=recipe.batch.global_batch_size, group_size=c.group_size,
        max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=recipe.data.seed,
        quality=quality_fn(c.task), rewards=rewards,
        guidance=guided if c.samples == "teacher" else None,
    )  # fmt: skip
    data = TrainData(batches=source, vocab_size=len(tok), tokenizer=str(tok_path),
                     tokenizer_sha256=sha256_file(tok_path), describe="CFG rollouts")  # fmt: skip
    trainer = Trainer(sub, out, resume, progress, data=data)
    objective = trainer.objective
    objective.source = source
    sampler = objective.teacher.model if c.samples == "teacher" else trainer.raw_model
    rows = recipe.batch.global_batch_size * (2 if c.samples == "teacher" else 1)
    source.engine = Engine(sampler, tok, max_batch=rows, optimize=False, seed=recipe.data.seed)
    trainer.raw_model.train()
    summary = trainer.fit()
    objective.source = None
    return summary


def check_cfg(recipe: Any) -> None:
    """Validate the [cfg] section (and that the objective is cfg_distill)."""
    c = recipe.cfg
    if c is None:
        raise RecipeError("CFG distillation needs a [cfg] section")
    if recipe.objective.kind != "cfg_distill":
        raise RecipeError(
            f"[cfg] needs [objective] kind = 'cfg_distill', got {recipe.objective.kind!r}"
        )
    if c.task not in TASKS:
        raise RecipeError(f"cfg.task = {c.task!r}: use one of {TASKS}")
    if c.samples not in ("student", "teacher"):
        raise RecipeError(f"cfg.samples = {c.samples!r}: use 'student' or 'teacher'")
    if c.diversity_weight < 0:
        raise RecipeError(f"cfg.diversity_weight = {c.diversity_weight}: must be >= 0")
    if c.diversity_weight and c.samples != "student":
        raise RecipeError("cfg.diversity_weight > 0 needs cfg.samples = 'student' (on-policy RL)")
    if c.group_size < 2:
        raise RecipeError(f"cfg.group_size = {c.group_size}: diversity needs groups of >= 2")
    if any(not 0.0 <= t <= 1.0 for t in c.etas):
        raise RecipeError(f"cfg.etas = {c.etas}: interpolation weights must be in [0, 1]")
    if not (c.teacher or recipe.model.init):
        raise RecipeError("[cfg] needs a teacher: set model.init (the student starts from it)")


def cfg_distill(
    recipe: Any, out: str | Path | None = None, resume: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Quality model (β = 0), diversity model (β > 0), their interpolation front; the summary."""
    from geode.checkpoint import load_model
    from geode.tokenizer import load_tokenizer
    from geode.train.sft import tokenizer_path

    from .merge import lerp

    check_cfg(recipe)
    c = recipe.cfg
    root = Path(out or recipe.out)
    tok_path = tokenizer_path(recipe)
    tok = load_tokenizer(tok_path)
    train_prompts, eval_prompts = _prompts(recipe)
    teacher_path = c.teacher or recipe.model.init
    teacher = load_model(teacher_path).eval()
    embedder = teacher if not c.embedder else load_model(c.embedder).eval()
    guidance = (c.guidance_scale, unconditional_ids(tok, c.unconditional))
    kw = {"samples": c.eval_samples, "max_new_tokens": c.max_new_tokens,
          "temperature": c.temperature, "quality": quality_fn(c.task), "seed": c.seed}  # fmt: skip

    def run(model: nn.Module, guided: bool = False) -> dict[str, float]:
        return measure(
            model, tok, eval_prompts, embedder, guidance=guidance if guided else None, **kw
        )

    summary: dict[str, Any] = {
        "guidance_scale": c.guidance_scale,
        "teacher_guided": run(teacher, guided=True),
        "teacher_unguided": run(teacher),
    }
    runs = {"quality": 0.0} | ({"diversity": c.diversity_weight} if c.diversity_weight else {})
    models = {}
    for name, beta in runs.items():
        t0 = time.perf_counter()
        train = _train(recipe, root / name, beta, resume, progress, train_prompts, tok, tok_path)
        models[name] = load_model(root / name / "model").eval()
        summary[name] = {
            "diversity_weight": beta,
            "train_s": time.perf_counter() - t0,
            "final_loss": train.get("final_train_loss"),
            **run(models[name]),
        }
    if "diversity" in models:
        a, b = models["quality"].state_dict(), models["diversity"].state_dict()
        work = load_model(root / "quality" / "model").eval()
        front = []
        for t in c.etas:
            work.load_state_dict(lerp(a, b, t))
            front.append({"t": t, **run(work)})
        summary["front"] = front
        text = json.dumps({"front": front, "teacher_guided": summary["teacher_guided"],
                           "teacher_unguided": summary["teacher_unguided"]}, indent=1)  # fmt: skip
        atomic_write_bytes(root / "front.json", (text + "\n").encode())
        plot_front(summary, root / "front.png")
    atomic_write_bytes(root / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def plot_front(summary: dict[str, Any], path: Path) -> None:
    """Quality-diversity plot: the interpolated family (labelled by t) and the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = summary["front"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([r["quality"] for r in front], [r["diversity"] for r in front], "o-",
            label="student: lerp(quality, diversity, t)")  # fmt: skip
    for r in front:
        ax.annotate(f"t={r['t']:g}", (r["quality"], r["diversity"]), fontsize=8)
    for key, marker, label in (("teacher_guided", "s", "teacher + CFG (2 forwards/token)"),
                               ("teacher_unguided", "^", "teacher, no CFG")):  # fmt: skip
        r = summary[key]
        ax.plot([r["quality"]], [r["diversity"]], marker, label=label)
    ax.set_xlabel("quality")
    ax.set_ylabel("diversity (1 - mean pairwise cosine)")
    ax.set_title(f"CFG distillation front (γ = {summary['guidance_scale']:g})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
