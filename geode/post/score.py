"""SCoRe: self-correction by multi-turn RL (Kumar et al. 2024, arXiv:2409.12917), with the
STaR and Pair-SFT baselines it is compared with, on one budget.

    geode rl RECIPE        a recipe with a [score] section runs `score(recipe, out)`

Episodes are two attempts (geode.post.env.SelfCorrectionEnv): problem -> attempt 1 -> the
correction instruction -> attempt 2, sampled by geode's engine on the live weights
(geode.post.rollout; the instruction is appended as forced tokens, so attempt 2 continues on
attempt 1's KV). `[score] method` picks what trains on them:

  score     Stage I for `stage1_steps` (eq. 3: reward of attempt 2, β2 KL holding attempt 1
            at the base), then Stage II for `stage2_steps` (eq. 4: both attempts, β1 KL, the
            bonus α (r2 - r1) on attempt 2); the objective is geode/train/objectives/score.py.
            `stage1_steps = 0` is "SCoRe without Stage I".
  star      STaR (Zelikman et al. 2022) as SCoRe's sec. 4 uses it: sample as many episodes
            from the base model as SCoRe samples in its run, keep the successful revisions
            (attempt 1 wrong, attempt 2 right) and fine-tune on attempt 2 (SFT, same steps).
  pair_sft  Pair-SFT (Welleck et al. 2023): from the same kind of base-model samples, pair
            each wrong attempt with a right one to the same problem and fine-tune on
            (problem, wrong attempt, instruction) -> right attempt (SFT, same steps).

Both baselines train through geode/train/sft.py (conversations packed into rows, loss on the
revision only) with the "sft" objective. The self-correction metrics (Accuracy@t1, @t2, Δ,
Δi→c, Δc→i: geode/eval/selfcorrect.py) are measured with greedy two-attempt episodes on
held-out problems of the task family, before and after; `compare` runs every method over
seeds and writes the table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from geode.data.loader import Batch
from geode.eval.selfcorrect import self_correction_metrics
from geode.fileio import atomic_write_bytes, sha256_file
from geode.recipe import RecipeError
from geode.train.batches import TrainData

from .env import DEFAULT_INSTRUCTION, SelfCorrectionEnv
from .oaif import Prompt
from .rollout import Episode, episodes_batch, next_prompts, rollout

METHODS = ("score", "star", "pair_sft")
ROWS = ("base", "STaR", "Pair-SFT", "SCoRe w/o Stage I", "SCoRe")  # the table, in order
METRICS = ("accuracy@t1", "accuracy@t2", "delta", "delta_i_to_c", "delta_c_to_i")


def correction_instruction(recipe: Any) -> str:
    """The correction instruction: `[score] instruction`, else geode.post.env's default."""
    return recipe.score.instruction or DEFAULT_INSTRUCTION


def check_score(recipe: Any) -> None:
    """Raise a RecipeError naming the `[score]` / `[rl]` field of a bad value."""
    from geode.train.objectives.score import LOSS_TYPES

    s = recipe.score
    if s is None:
        raise RecipeError("the recipe has no [score] section")
    if s.method not in METHODS:
        raise RecipeError(f"score.method = {s.method!r}: use one of {METHODS}")
    for name in ("stage1_steps", "stage2_steps"):
        v = getattr(s, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise RecipeError(f"score.{name} = {v!r}: must be an integer >= 0")
    if s.stage1_steps + s.stage2_steps < 1:
        raise RecipeError("score.stage1_steps + score.stage2_steps must be >= 1 (the budget)")
    for name in ("alpha", "beta1", "beta2"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise RecipeError(f"score.{name} = {v!r}: must be a finite number >= 0")
    if not isinstance(s.instruction, str) or (s.instruction and not s.instruction.strip()):
        raise RecipeError("score.instruction is blank: give the correction instruction or leave "
                          "it empty for the default")  # fmt: skip
    if s.loss_type not in LOSS_TYPES:
        raise RecipeError(f"score.loss_type = {s.loss_type!r}: use one of {LOSS_TYPES}")
    if not recipe.model.init:
        raise RecipeError("[score] needs model.init: the base model (an SFT'd policy)")
    if recipe.rl is None:
        raise RecipeError("[score] needs an [rl] section (group size, sampling, estimator)")
    if recipe.rl.eval_prompts < 1:
        raise RecipeError("rl.eval_prompts = 0: [score] measures held-out self-correction")


# ------------------------------------------------------------------ episodes -> batches
def episode_rewards(episodes: Sequence[Episode]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1, r2) (N,) float: each attempt's verifier reward (0 for a missing attempt 2)."""
    r1 = [e.rewards[0] if e.rewards else 0.0 for e in episodes]
    r2 = [e.rewards[1] if len(e.rewards) > 1 else 0.0 for e in episodes]
    return torch.tensor(r1), torch.tensor(r2)


def score_batch(
    episodes: Sequence[Episode],
    pad_id: int,
    a1: torch.Tensor,
    a2: torch.Tensor,
    mask_truncated: bool,
) -> Batch:
    """The episodes as a Batch (geode.post.rollout.episodes_batch: rows, sampled mask, turns)
    with per-token advantages: a1[b] on attempt 1's targets, a2[b] on attempt 2's."""
    from geode.train.objectives.score import token_advantages

    batch = episodes_batch(episodes, torch.zeros(len(episodes)), pad_id, mask_truncated)
    batch.turns = batch.turns.masked_fill(batch.turns > 2, 0)  # two attempts
    batch.loss_mask &= batch.turns > 0
    batch.advantages = token_advantages(batch.turns, a1, a2)  # (B, T)
    return batch


def groups_per_step(recipe: Any) -> int:
    """Prompts per step: rl.prompts_per_step, else global_batch_size / group_size."""
    rl = recipe.rl
    return rl.prompts_per_step or max(1, recipe.batch.global_batch_size // rl.group_size)


def _sampling(recipe: Any, seed: int | None, greedy: bool = False) -> Any:
    """[rl]'s sampling of training episodes; `greedy`: the evaluation's (eval_max_new_tokens)."""
    from geode.infer import SamplingParams

    rl = recipe.rl
    return SamplingParams(
        max_new_tokens=rl.eval_max_new_tokens if greedy else rl.max_new_tokens,
        temperature=0.0 if greedy else rl.temperature,
        top_p=1.0 if greedy else rl.top_p,
        seed=seed,
    )


def two_attempts(
    engine: Any, prompts: Sequence[Prompt], instruction: str, group_size: int, sampling: Any
) -> list[Episode]:
    """`group_size` two-attempt episodes per prompt (group-major)."""
    envs = [SelfCorrectionEnv(p.messages, p.answer, instruction=instruction) for p in prompts]
    return rollout(engine, envs, group_size, sampling)


def transitions(episodes: Sequence[Episode]) -> dict[str, float]:
    """Mean rewards of both attempts and the i->c / c->i fractions of sampled episodes."""
    r1, r2 = episode_rewards(episodes)
    ok1, ok2 = r1 > 0.5, r2 > 0.5
    return {
        "reward_attempt1": float(r1.mean()),
        "reward_attempt2": float(r2.mean()),
        "i_to_c": float((~ok1 & ok2).float().mean()),
        "c_to_i": float((ok1 & ~ok2).float().mean()),
        "truncated": float(sum(e.truncated for e in episodes) / max(len(episodes), 1)),
    }


class ScoreEpisodes:
    """A BatchSource: each `next_batch()` samples one step's two-attempt episodes on the live
    weights and returns them with SCoRe's per-attempt advantages for `stage`."""

    def __init__(self, engine: Any, tokenizer: Any, prompts: Sequence[Prompt], recipe: Any,
                 stage: int, seed: int = 0):  # fmt: skip
        if not prompts:
            raise ValueError("ScoreEpisodes: no prompts")
        self.engine, self.tokenizer, self.prompts = engine, tokenizer, list(prompts)
        self.recipe, self.stage, self.seed = recipe, stage, seed
        self.draws = 0  # prompts drawn so far (the order and the sampling seeds follow it)
        self.last: dict[str, float] = {}

    def _next_prompts(self) -> list[Prompt]:
        n = groups_per_step(self.recipe)
        out = next_prompts(self.prompts, self.draws, n, self.seed)
        self.draws += n
        return out

    def attach(self, trainer: Any) -> None:
        """Sample with an engine on the trainer's model (same weights, no copy)."""
        from geode.infer import Engine

        rows = groups_per_step(self.recipe) * self.recipe.rl.group_size
        self.engine = Engine(trainer.raw_model, self.tokenizer, max_batch=rows, optimize=False,
                             seed=self.seed)  # fmt: skip
        trainer.raw_model.train()  # the engine left it in eval mode

    def sample(self) -> list[Episode]:
        """One step's episodes: `groups_per_step` prompts x rl.group_size two-attempt episodes."""
        rl = self.recipe.rl
        sampling = _sampling(self.recipe, (self.seed * 1_000_003 + self.draws * 65_537) % 2**31)
        prompts = self._next_prompts()
        return two_attempts(
            self.engine, prompts, correction_instruction(self.recipe), rl.group_size, sampling
        )

    def next_batch(self) -> Batch:
        """Sample, score and batch one step's episodes."""
        from geode.train.objectives.score import score_advantages

        s, rl = self.recipe.score, self.recipe.rl

        t0 = time.perf_counter()
        episodes = self.sample()
        r1, r2 = episode_rewards(episodes)
        a1, a2 = score_advantages(
            r1, r2, rl.group_size, stage=self.stage, alpha=s.alpha,
            estimator=rl.estimator, scale=rl.scale,
        )  # fmt: skip
        batch = score_batch(episodes, self.tokenizer.pad_id, a1, a2, rl.mask_truncated)
        self.last = {**transitions(episodes), "rollout_s": time.perf_counter() - t0}
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Prompts drawn so far."""
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the prompt order after `draws` prompts."""
        self.draws = int(state["draws"])


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_self_correction(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], recipe: Any
) -> dict[str, float]:
    """SCoRe's metrics (geode.eval.selfcorrect) of greedy two-attempt episodes on `prompts`."""
    from geode.infer import Engine

    engine = Engine(model, tokenizer, max_batch=max(1, min(64, len(prompts))), optimize=False,
                    seed=0)  # fmt: skip
    was_training = model.training
    try:
        eps = two_attempts(
            engine, prompts, correction_instruction(recipe), 1, _sampling(recipe, 0, True)
        )
    finally:
        model.train(was_training)
    r1, r2 = episode_rewards(eps)
    return self_correction_metrics([(a > 0.5, b > 0.5) for a, b in zip(r1.tolist(), r2.tolist())])


# ------------------------------------------------------------------ data of a run
@dataclass
class RunData:
    """The tokenizer and problems of a [score] run."""

    tokenizer: Any
    tokenizer_path: Path
    tokenizer_sha256: str
    train: list[Prompt]
    heldout: list[Prompt]


def run_data(recipe: Any) -> RunData:
    """Training problems (geode.post.rl.rl_prompts: rl.prompts, data.path or the generated
    task family) and held-out ones (geode.post.dpo.heldout_prompts, rl.eval_prompts)."""
    from geode.tokenizer import load_tokenizer
    from geode.train.sft import tokenizer_path

    from .dpo import heldout_prompts
    from .rl import rl_prompts

    train = rl_prompts(recipe)
    held = heldout_prompts(recipe, recipe.rl.eval_prompts)
    for name, prompts in (("training", train), ("held-out", held)):
        if any(x.answer is None for x in prompts):
            raise RecipeError(f"[score]: every {name} problem needs an `answer` (the verifier)")
    path = tokenizer_path(recipe)
    return RunData(load_tokenizer(path), path, sha256_file(path), train, held)


def _sub_recipe(recipe: Any, *, kind: str, steps: int, init: str, options: dict[str, Any]) -> Any:
    """The recipe of one training phase: objective, steps and starting weights replaced."""
    r = dataclasses.replace
    return r(
        recipe,
        model=r(recipe.model, init=init),
        train=r(recipe.train, max_steps=steps),
        objective=r(recipe.objective, kind=kind, options=options),
        checkpoint=r(recipe.checkpoint, export=True),
    )


def train_stage(recipe: Any, data: RunData, out: Path, *, stage: int, steps: int, init: str,
                base: str, seed: int, resume: bool, progress: bool | None) -> dict[str, Any]:  # fmt: skip
    """One SCoRe stage: `steps` updates from `init`, the base model as reference, through
    geode.post.rl.train_policy with the two-attempt episode source."""
    from .rl import train_policy

    s = recipe.score
    opts = {"stage": stage, "beta1": s.beta1, "beta2": s.beta2, "reference": base,
            "loss_type": s.loss_type}  # fmt: skip
    sub = _sub_recipe(recipe, kind="score", steps=steps, init=init, options=opts)
    source = ScoreEpisodes(None, data.tokenizer, data.train, recipe, stage, seed)
    return train_policy(sub, out, source=source, progress=progress, resume=resume)[1]


# ------------------------------------------------------------------ SFT baselines
def star_conversations(episodes: Sequence[Episode], instruction: str = "") -> list[dict[str, Any]]:
    """STaR's data: the successful revisions (attempt 1 wrong, attempt 2 right) as
    conversations problem -> attempt 1 -> instruction -> attempt 2 (the episode's own
    messages: `instruction` is not needed, it is there for `pair_sft_conversations`' shape)."""
    out = []
    for e in episodes:
        if len(e.rewards) == 2 and e.rewards[0] < 0.5 <= e.rewards[1] and not e.truncated:
            out.append({"messages": e.messages[:4]})
    return out


def pair_sft_conversations(
    episodes: Sequence[Episode], instruction: str, seed: int = 0
) -> list[dict[str, Any]]:
    """Pair-SFT's data: each wrong attempt paired with a right attempt to the same problem
    (either attempt of any episode of its group), as problem -> wrong -> instruction -> right."""
    rng = random.Random(f"pair-sft:{seed}")
    groups: dict[int, list[Episode]] = {}
    for e in episodes:
        groups.setdefault(e.group, []).append(e)
    out = []
    for eps in groups.values():
        prompt = eps[0].messages[:1] if eps[0].messages else []
        attempts = [
            (e.messages[2 * i + 1]["content"], e.rewards[i])
            for e in eps
            for i in range(len(e.rewards))
            if 2 * i + 1 < len(e.messages) and not (e.truncated and i == len(e.rewards) - 1)
        ]
        right = [a for a, r in attempts if r >= 0.5]
        wrong = [a for a, r in attempts if r < 0.5]
        if not right:
            continue
        for w in wrong:
            msgs = [*prompt, {"role": "assistant", "content": w},
                    {"role": "user", "content": instruction},
                    {"role": "assistant", "content": rng.choice(right)}]  # fmt: skip
            out.append({"messages": msgs})
    return out


def last_turn_only(enc: Any) -> Any:
    """An encoded conversation trained on its last assistant span only (the revision)."""
    tr = list(enc.trained)
    end = len(tr)
    while end and not tr[end - 1]:
        end -= 1
    start = end
    while start and tr[start - 1]:
        start -= 1
    enc.trained = [start <= i < end for i in range(len(tr))]
    return enc


def sft_baseline(recipe: Any, data: RunData, out: Path, conversations: list[dict[str, Any]],
                 *, init: str, steps: int, seed: int, resume: bool,
                 progress: bool | None) -> dict[str, Any]:  # fmt: skip
    """Fine-tune `init` on the conversations' last assistant turns (geode.train.sft packing,
    objective "sft") for `steps`; no data: the base model is the result."""
    from geode.train.loop import Trainer
    from geode.train.sft import PackedRows, encode_conversation, pack

    if not conversations:
        return {"steps": 0, "model": init, "examples": 0}
    docs = [last_turn_only(encode_conversation(data.tokenizer, c)) for c in conversations]
    row_len = max(recipe.data.seq_len + 1, max(len(d.ids) for d in docs))  # whole episodes
    arrays, st = pack(docs, row_len, data.tokenizer.pad_id)
    sub = _sub_recipe(recipe, kind="sft", steps=steps, init=init, options={})
    sub = dataclasses.replace(sub, data=dataclasses.replace(sub.data, seq_len=row_len - 1))
    td = TrainData(batches=PackedRows(arrays, recipe.batch.global_batch_size, seed),
                   vocab_size=data.tokenizer.vocab_size, tokenizer=str(data.tokenizer_path),
                   tokenizer_sha256=data.tokenizer_sha256, describe="self-generated revisions")  # fmt: skip
    summary = Trainer(sub, out, resume, progress, data=td, allow_fresh=resume).fit()
    return {**summary, "examples": len(conversations), "rows": st.rows,
            "truncated": st.truncated}  # fmt: skip


_SAMPLED: dict[str, list[Episode]] = {}  # the latest base samples (STaR and Pair-SFT share them)


def base_samples(recipe: Any, data: RunData, seed: int) -> list[Episode]:
    """The baselines' self-generated data: as many two-attempt episodes from the base model as
    a SCoRe run of the same steps samples (same prompts order, group size and sampling)."""
    from geode.checkpoint import load_model
    from geode.infer import Engine

    rl, s = recipe.rl, recipe.score
    key = json.dumps([str(recipe.model.init), seed, dataclasses.asdict(rl),
                      dataclasses.asdict(recipe.pairs), s.stage1_steps + s.stage2_steps,
                      correction_instruction(recipe)], default=str)  # fmt: skip
    if key in _SAMPLED:
        return _SAMPLED[key]
    model = load_model(recipe.model.init)
    engine = Engine(model, data.tokenizer, max_batch=groups_per_step(recipe) * rl.group_size,
                    optimize=False, seed=seed)  # fmt: skip
    source = ScoreEpisodes(engine, data.tokenizer, data.train, recipe, 2, seed)
    episodes: list[Episode] = []
    for _ in range(s.stage1_steps + s.stage2_steps):
        got = source.sample()
        for e in got:  # groups numbered over the whole run
            e.group += len(episodes) // rl.group_size
        episodes += got
    _SAMPLED.clear()
    _SAMPLED[key] = episodes
    return episodes


# ------------------------------------------------------------------ the driver
def score(
    recipe: Any,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run `[score] method` (SCoRe's two stages, STaR or Pair-SFT) from model.init; the
    summary (OUT/summary.json) holds the self-correction metrics before and after."""
    from geode.checkpoint import load_model

    check_score(recipe)
    out = Path(out if out is not None else recipe.out)
    s = recipe.score
    seed = recipe.data.seed
    data = run_data(recipe)
    base = str(recipe.model.init)
    t0 = time.perf_counter()
    before = evaluate_self_correction(load_model(base), data.tokenizer, data.heldout, recipe)
    summary: dict[str, Any] = {"method": s.method, "score": dataclasses.asdict(s),
                               "heldout_problems": len(data.heldout), "before": before}  # fmt: skip
    steps = s.stage1_steps + s.stage2_steps
    if s.method == "score":
        init = base
        if s.stage1_steps:
            summary["stage1"] = train_stage(recipe, data, out / "stage1", stage=1,
                                            steps=s.stage1_steps, init=init, base=base,
                                            seed=seed, resume=resume, progress=progress)  # fmt: skip
            init = str(out / "stage1" / "model")
        if s.stage2_steps:
            summary["stage2"] = train_stage(recipe, data, out / "stage2", stage=2,
                                            steps=s.stage2_steps, init=init, base=base,
                                            seed=seed + 1, resume=resume, progress=progress)  # fmt: skip
            init = str(out / "stage2" / "model")
        final = init
    else:
        episodes = base_samples(recipe, data, seed)
        make = star_conversations if s.method == "star" else pair_sft_conversations
        convs = make(episodes, correction_instruction(recipe))
        summary["sampled_episodes"] = len(episodes)
        summary["sft"] = sft_baseline(recipe, data, out / s.method, convs, init=base,
                                      steps=steps, seed=seed, resume=resume, progress=progress)  # fmt: skip
        final = summary["sft"]["model"]
    summary["model"] = final
    summary["after"] = evaluate_self_correction(load_model(final), data.tokenizer, data.heldout,
                                                recipe)  # fmt: skip
    # the `geode rl` summary keys: greedy held-out accuracy (of the first attempt)
    summary["heldout_accuracy_before"] = before["accuracy@t1"]
    summary["heldout_accuracy_after"] = summary["after"]["accuracy@t1"]
    summary["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


# ------------------------------------------------------------------ the comparison table
def variants(recipe: Any) -> dict[str, Any]:
    """The recipes of the table's trained rows (same budget: stage1 + stage2 steps each)."""
    s = recipe.score
    total = s.stage1_steps + s.stage2_steps
    r = dataclasses.replace
    return {
        "STaR": r(recipe, score=r(s, method="star")),
        "Pair-SFT": r(recipe, score=r(s, method="pair_sft")),
        "SCoRe w/o Stage I": r(
            recipe, score=r(s, method="score", stage1_steps=0, stage2_steps=total)
        ),  # fmt: skip
        "SCoRe": r(recipe, score=r(s, method="score")),
    }


def compare(recipe: Any, out: str | Path, seeds: Sequence[int] = (0, 1),
            progress: bool | None = False) -> dict[str, Any]:  # fmt: skip
    """Base, STaR, Pair-SFT, SCoRe w/o Stage I and SCoRe over `seeds` (data.seed), same
    budget; writes OUT/table.json and OUT/table.md; returns {row: [metrics per seed]}."""
    check_score(recipe)
    out = Path(out)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in ROWS}
    for seed in seeds:
        r = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, seed=seed))
        for name, v in variants(r).items():
            summary = score(v, out / f"seed{seed}" / name.replace(" ", "_").replace("/", ""),
                            progress=progress)  # fmt: skip
            rows[name].append(summary["after"])
        rows["base"].append(summary["before"])  # the same held-out problems for every row
    table = format_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "table.json", (json.dumps(rows, indent=1) + "\n").encode())
    atomic_write_bytes(out / "table.md", table.encode())
    return rows


def format_table(rows: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: mean ± spread (half the range over seeds) of each metric, per row."""
    head = "| method | Acc@t1 | Acc@t2 | Δ(t1,t2) | Δi→c | Δc→i | seeds |\n|---|---|---|---|---|---|---|\n"
    lines = []
    for name, runs in rows.items():
        cells = []
        for m in METRICS:
            vals = [r[m] for r in runs]
            mean = statistics.fmean(vals) if vals else float("nan")
            spread = (max(vals) - min(vals)) / 2 if vals else float("nan")
            cells.append(f"{mean:+.3f} ± {spread:.3f}" if m == "delta" else
                         f"{mean:.3f} ± {spread:.3f}")  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    deltas = {n: statistics.fmean(r["delta"] for r in runs) for n, runs in rows.items() if runs}
    verdict = ""
    if deltas:
        top = max(deltas.values())
        best = [n for n, d in deltas.items() if abs(d - top) < 1e-12]
        if best == ["SCoRe"]:
            said = "the largest"
        elif "SCoRe" in best:
            said = "tied for the largest (with " + ", ".join(n for n in best if n != "SCoRe") + ")"
        else:
            said = "not the largest"
        verdict = f"\nLargest mean Δ(t1,t2): {', '.join(best)} ({top:+.3f}); SCoRe's Δ is {said}.\n"
    return head + "\n".join(lines) + "\n" + verdict
