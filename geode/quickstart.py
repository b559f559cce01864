"""`geode quickstart`: the Gemini/Gemma lifecycle in miniature, one function per stage.

nanochat-speedrun style: every stage reads the previous stages' outputs from OUT/<stage>/,
writes its own and records OUT/<stage>/done.json (metrics, wall seconds), so `--resume` skips
finished stages. Stages (issue #20): data (task family + stdlib corpus, dedup, decontamination
against the held-out split) -> tokenizer -> pretrain (teacher) -> distill (student with sampled
top-K teacher logits, Gemma 3 §2.2, plus the from-scratch control) -> sft -> reward (WARM) ->
dpo -> rl (GRPO with a thinking budget) -> score (SCoRe) -> report (REPORT.md, PNG plots,
OUT/final in the HF layout). Every stage calls the library (geode.data, geode.tokenizer,
geode.train, geode.post); nothing here re-implements them.

The budget (minutes) is split by fixed fractions (`FRACTIONS`); training steps come from a
measured step time of each model so the whole run fits. `base` (a checkpoint directory) skips
pretraining and distillation, gives their share to the other stages, and post-trains that model
(LoRA adapters, merged on export, when it has more than `plan.lora_above` parameters; such a
model also gets smaller post-training batches and fewer evaluation prompts: its steps cost
seconds, not milliseconds). Paths are resolved when the run starts, so `--resume` works from
any directory.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .fileio import atomic_write_bytes, swap_dir_into_place

TASK = {"min_steps": 1, "max_steps": 1, "max_value": 20}  # problems a nano model learns in minutes
STAGES = ("data", "tokenizer", "pretrain", "distill", "sft", "reward", "dpo", "rl", "score",
          "report")  # fmt: skip
FRACTIONS = {"data": 0.02, "tokenizer": 0.02, "pretrain": 0.22, "distill": 0.16, "sft": 0.22,
             "reward": 0.03, "dpo": 0.03, "rl": 0.16, "score": 0.12, "report": 0.02}  # fmt: skip
# (hidden, layers, heads, head_dim) of the nano models, smallest first: the teacher is the
# largest that trains plan.min_steps steps within its budget, the student the largest smaller one
SHAPES = ((32, 2, 2, 16), (64, 2, 2, 32), (96, 3, 2, 48), (128, 4, 2, 64), (192, 4, 4, 48),
          (256, 6, 4, 64))  # fmt: skip
LORA_ABOVE = 50_000_000  # --base models with more parameters are post-trained with LoRA
# LoRA learning rates per stage (the full fine-tuning ones are for nano models)
LORA_LR = {"sft": 2e-3, "reward": 1e-3, "dpo": 5e-4, "rl": 5e-4, "score": 2e-4}
SEQ_LEN = 128
BATCH = 16
SEED = 0


class QuickstartError(RuntimeError):
    """A stage failed (its name and the reason), or the output directory is not usable."""


@dataclass
class Plan:
    """Sizes and counts of one run, derived from the budget (saved in OUT/plan.json)."""

    budget_minutes: float
    base: str = ""
    tiny: bool = False  # under 3 minutes: models and data of a smoke test
    vocab_size: int = 1024
    stdlib_bytes: int = 2_000_000
    tasks_train: int = 3000
    tasks_heldout: int = 200
    max_shape: int = len(SHAPES) - 1  # the largest SHAPES entry the teacher may use
    min_steps: int = 60  # a model is chosen only if this many steps fit its stage's budget
    eval_prompts: int = 100
    max_new_tokens: int = 48
    lora_above: int = LORA_ABOVE  # a --base model with more parameters is trained with LoRA
    lora: bool = False  # post-training uses LoRA (--base larger than lora_above)
    post_rows: int = BATCH  # rows per optimizer step of SFT, reward models and DPO
    rl_group: int = 8  # GRPO samples per prompt
    rl_rows: int = 64  # GRPO rows (samples) per optimizer step
    score_rows: int = 32  # SCoRe rows per optimizer step
    micro_rows: int = 32  # the largest micro-batch (a 262k vocabulary's logits are 1 GiB a row)

    def stages(self) -> list[str]:
        """The stages this run has (--base skips pretraining and distillation)."""
        return [s for s in STAGES if not (self.base and s in ("pretrain", "distill"))]

    def seconds(self, stage: str) -> float:
        """The stage's share of the budget, in seconds (skipped stages' shares spread over the
        others in proportion)."""
        share = FRACTIONS[stage] / sum(FRACTIONS[s] for s in self.stages())
        return share * self.budget_minutes * 60.0


def make_plan(budget_minutes: float, base: str = "", lora_above: int = LORA_ABOVE) -> Plan:
    """Model sizes and data counts for `budget_minutes` (tiny under 3 minutes); with `base`
    (a checkpoint directory) LoRA and small batches when it has more than `lora_above`
    parameters."""
    if budget_minutes <= 0:
        raise QuickstartError(f"--budget-minutes must be > 0, got {budget_minutes}")
    tiny = budget_minutes < 3
    if tiny:
        plan = Plan(budget_minutes, base, True, 512, 100_000, 300, 32, 1, 0, 8, 16,
                    rl_rows=16, score_rows=8)  # fmt: skip
    else:
        plan = Plan(budget_minutes, base, False, 1024, 500_000, 1700, 190,
                    len(SHAPES) - 1 if budget_minutes >= 30 else len(SHAPES) - 2)  # fmt: skip
    plan.lora_above = lora_above
    if base:
        plan.lora = _parameters(base) > lora_above
    if plan.lora and not tiny:  # seconds per step: few rows, few evaluation prompts
        plan.eval_prompts, plan.post_rows, plan.rl_group, plan.rl_rows, plan.score_rows = (
            32, 4, 4, 8, 8)  # fmt: skip
    if plan.lora:
        plan.micro_rows = 2
    return plan


def _parameters(checkpoint: str) -> int:
    """Parameters of a checkpoint directory's model (its config.json, nothing loaded)."""
    from .checkpoint import read_config
    from .family import parameter_counts

    try:
        config = read_config(checkpoint)
    except (OSError, ValueError) as e:
        raise QuickstartError(f"--base {checkpoint}: not a checkpoint directory ({e})") from e
    return parameter_counts(config)["total"]


def _shape(hidden: int, layers: int, heads: int, head_dim: int) -> dict[str, Any]:
    """Overrides of the nano-1m preset: a Gemma 3 shape (5:1 local/global when deep enough)."""
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    if layers >= 6:
        types = (["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6)
        types += ["sliding_attention"] * (layers - len(types))
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 1,
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": 64,
        "layer_types": types,
        "max_position_embeddings": 512,
    }


# ------------------------------------------------------------------ the driver
@dataclass
class Context:
    """What every stage sees: the output root, the plan, finished stages' metrics."""

    out: Path
    plan: Plan
    progress: bool | None
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    step_s: float | None = None  # a LoRA step of the --base model, measured once per process

    def dir(self, stage: str) -> Path:
        """OUT/<stage>."""
        return self.out / stage

    def model(self, stage: str) -> str:
        """The model a finished stage left (its done.json's `model`)."""
        return self.done[stage]["model"]


def run(
    out: str | Path = "runs/quickstart",
    budget_minutes: float = 15.0,
    resume: bool = False,
    base: str = "",
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    lora_above: int = LORA_ABOVE,
) -> dict[str, Any]:
    """Run every stage not yet done; returns {stage: done record}. A failing stage raises
    QuickstartError naming it (earlier stages stay done for `--resume`). `out` and `base` are
    made absolute first: the records' model paths hold from any working directory."""
    out = Path(out).resolve()
    plan_file = out / "plan.json"
    if plan_file.exists() and not resume:
        raise QuickstartError(f"{out} holds a quickstart run: pass --resume or another --out")
    if resume and plan_file.exists():
        plan = Plan(**json.loads(plan_file.read_text()))
    else:
        if base and not Path(base).is_dir():
            raise QuickstartError(f"--base {base}: not a checkpoint directory")
        plan = make_plan(budget_minutes, str(Path(base).resolve()) if base else "", lora_above)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(plan_file, asdict(plan))
    ctx = Context(out, plan, progress)
    log(f"   {_set_threads()}")
    if plan.lora:
        log(f"   --base {plan.base}: more than {plan.lora_above:,} parameters, LoRA post-training")
    stages = plan.stages()
    t_all = time.perf_counter()
    for i, name in enumerate(stages, 1):
        done = ctx.dir(name) / "done.json"
        if done.exists():
            ctx.done[name] = json.loads(done.read_text())
            log(f"== [{i}/{len(stages)}] {name}: done already ({ctx.done[name]['seconds']:.0f}s)")
            continue
        log(f"== [{i}/{len(stages)}] {name} (budget {plan.seconds(name):.0f}s)")
        shutil.rmtree(ctx.dir(name), ignore_errors=True)  # a failed attempt's leftovers
        ctx.dir(name).mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            metrics = STAGE_FUNCS[name](ctx)
        except Exception as e:
            raise QuickstartError(f"stage {name!r} failed: {type(e).__name__}: {e}") from e
        record = {"stage": name, "seconds": time.perf_counter() - t0, **metrics}
        _write_json(done, record)
        ctx.done[name] = record
        log(f"   {name} done in {record['seconds']:.0f}s: " + _brief(metrics))
    log(
        f"== quickstart finished in {time.perf_counter() - t_all:.0f}s; report: {out / 'REPORT.md'}"
    )
    return ctx.done


def _set_threads() -> str:
    """One torch thread when the machine is already busy (load average >= its cores): two
    threads contending with other processes ran 5x slower than one on a loaded 2-core host."""
    import os

    import torch

    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cores:
        torch.set_num_threads(1)
    return f"load average {load:.1f} on {cores} cores: {torch.get_num_threads()} torch thread(s)"


def _brief(metrics: dict[str, Any]) -> str:
    """The scalar metrics of a record, compactly."""
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]  # fmt: skip
    return ", ".join(items) or "ok"


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


# ------------------------------------------------------------------ 1. data
def stage_data(ctx: Context) -> dict[str, Any]:
    """Task family (train / held-out) + stdlib corpus; exact/near dedup; 13-gram decontamination
    of the training documents against the held-out problems. Writes corpus.jsonl (training
    documents), heldout.jsonl (held-out problem documents), sft/ and prefs/ chat data."""
    from .data import tasks as synth
    from .data.decontam import Decontaminator
    from .data.dedup import ExactDedup, NearDedup
    from .data.sources import SourceConfig, read_source
    from .post.prefdata import make_pairs, sft_examples, write_jsonl

    p, d = ctx.plan, ctx.dir("data")
    task = {"kind": "tasks", **TASK, "seed": SEED}
    held_cfg = SourceConfig(name="heldout", split="heldout", n=p.tasks_heldout, **task)
    held = list(read_source(held_cfg))
    decon = Decontaminator(13)
    decon.add_all((doc.id, doc.text) for doc in held)
    exact, near = ExactDedup(), NearDedup(0.8)
    sources = [SourceConfig(name="tasks", split="train", n=p.tasks_train, **task),
               SourceConfig(name="stdlib", kind="stdlib", max_bytes=p.stdlib_bytes)]  # fmt: skip
    kept: list[dict[str, str]] = []
    dropped = {"exact_dup": 0, "near_dup": 0, "decontam": 0}
    for cfg in sources:
        for doc in read_source(cfg):
            if exact.check(doc.id, doc.text) is not None:
                dropped["exact_dup"] += 1
            elif cfg.kind == "stdlib" and near.check(doc.id, doc.text) is not None:
                dropped["near_dup"] += 1  # generated problems are unique by construction
            elif decon.check(doc.text) is not None:
                dropped["decontam"] += 1
            else:
                kept.append({"text": doc.text, "source": cfg.name})
    write_jsonl(kept, d / "corpus.jsonl")
    write_jsonl([{"text": doc.text} for doc in held], d / "heldout.jsonl")
    write_jsonl(_with_second_turns(sft_examples(p.tasks_train, seed=SEED, rambling_fraction=0.0,
                                                **TASK)), d / "sft" / "train.jsonl")  # fmt: skip
    held_chats = [{"messages": [{"role": "user", "content": q.question},
                                {"role": "assistant", "content": q.solution}]}
                  for q in synth.generate(p.tasks_heldout, seed=SEED, split="heldout", **TASK)]  # fmt: skip
    write_jsonl(held_chats, d / "sft" / "heldout.jsonl")
    write_jsonl(make_pairs(p.tasks_train // 2, seed=SEED, **TASK), d / "prefs" / "train.jsonl")
    held_pairs = min(p.tasks_heldout // 2, p.eval_prompts)  # scored by every reward model
    write_jsonl(make_pairs(held_pairs, seed=SEED, split="heldout", **TASK),
                d / "prefs" / "heldout.jsonl")  # fmt: skip
    counts = {s.name: sum(1 for k in kept if k["source"] == s.name) for s in sources}
    import os

    return {"load_average": os.getloadavg()[0], "task_docs": counts["tasks"], "stdlib_docs": counts["stdlib"],
            "heldout_docs": len(held), **dropped}  # fmt: skip


def _with_second_turns(convs: list[dict[str, Any]], every: int = 4) -> list[dict[str, Any]]:
    """Every `every`-th conversation gets SCoRe's correction instruction and the (correct)
    answer again as a second turn: the base model learns to answer after the instruction, so
    SCoRe's attempt 2 starts from a usable policy (both assistant turns are correct)."""
    from .post.env import DEFAULT_INSTRUCTION

    out = []
    for i, c in enumerate(convs):
        m = c["messages"]
        if i % every == every - 1:
            m = [*m, {"role": "user", "content": DEFAULT_INSTRUCTION}, m[-1]]
        out.append({**c, "messages": m})
    return out


def _read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line]


# ------------------------------------------------------------------ 2. tokenizer
def stage_tokenizer(ctx: Context) -> dict[str, Any]:
    """A Gemma-style SentencePiece BPE tokenizer on the corpus plus the chat-rendered SFT data;
    with --base the base model's own tokenizer, copied."""
    from .chat import render
    from .post.prefdata import read_jsonl
    from .tokenizer import find_tokenizer, load_tokenizer, train_tokenizer

    if ctx.plan.base:
        src = find_tokenizer(ctx.plan.base)
        if src is None:
            raise QuickstartError(f"--base {ctx.plan.base}: no tokenizer.model or tokenizer.json")
        shutil.copy(src, ctx.dir("tokenizer") / src.name)
        return {"vocab_size": len(load_tokenizer(src)), "source": str(src)}
    d = ctx.dir("data")
    texts = _read_texts(d / "corpus.jsonl")
    chats = [render(obj["messages"], add_generation_prompt=False)
             for _, obj in read_jsonl(d / "sft" / "train.jsonl", "conversations")]  # fmt: skip
    tok = train_tokenizer(texts=texts + chats, vocab_size=ctx.plan.vocab_size,
                          out=ctx.dir("tokenizer"), max_input_bytes=8_000_000)  # fmt: skip
    sample = texts[0]
    return {"vocab_size": len(tok), "chars_per_token": len(sample) / len(tok.encode(sample))}


# ------------------------------------------------------------------ 3. pretraining
def _measure_step(overrides: dict[str, Any], vocab: int, forward_only: bool = False,
                  rows: int = BATCH) -> float:  # fmt: skip
    """Seconds of one forward+backward pass of rows x SEQ_LEN tokens (best of 2, after one)."""
    import dataclasses

    import torch

    from .config import get_preset
    from .model.transformer import Transformer

    cfg = dataclasses.replace(get_preset("nano-1m"), **{**overrides, "vocab_size": vocab})
    model = Transformer(cfg)
    ids = torch.randint(0, vocab, (rows, SEQ_LEN))  # [B, T]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(not forward_only):
            logits = model(ids)  # [B, T, V]
            if not forward_only:
                logits.float().logsumexp(-1).mean().backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _steps(seconds: float, step_s: float, lo: int, hi: int) -> int:
    """Optimizer steps that fit `seconds` (twice the forward+backward: optimizer, evals, saves)."""
    return max(lo, min(hi, int(seconds / (2.0 * step_s))))


def _lm_recipe(ctx: Context, name: str, shape: dict[str, Any], steps: int, out: Path,
               lr: float) -> dict[str, Any]:  # fmt: skip
    """A pretraining recipe dict on the packed corpus, evaluated on the held-out stream."""
    data = ctx.dir("pretrain") / "data"
    return {
        "name": name,
        "out": str(out),
        "model": {"preset": "nano-1m", "overrides": {**shape, "vocab_size": ctx.done["tokenizer"]["vocab_size"]}, "seed": SEED},
        "data": {"path": str(data / "train"), "eval_path": str(data / "heldout"), "seq_len": SEQ_LEN, "eval_source": "heldout"},
        "batch": {"global_batch_size": BATCH, "micro_batch_size": BATCH},
        "optim": {"lr": lr, "warmup_steps": max(1, steps // 10), "schedule": "cosine"},
        "train": {"max_steps": steps, "z_loss": 1e-4, "progress": ctx.progress is not False},
        "eval": {"every": steps // 4 if steps >= 8 else 0, "batches": 2 if ctx.plan.tiny else 4},
        "checkpoint": {"every": 0, "export": True},
    }  # fmt: skip


def _pack(ctx: Context, out: Path) -> None:
    """Tokenize and pack corpus.jsonl (streams tasks, stdlib) and heldout.jsonl (stream
    heldout) with geode.data.prepare; dedup and decontamination ran in the data stage."""
    from .data.prepare import DataRecipe, prepare
    from .recipe import load_recipe

    d = ctx.dir("data")
    tok = str(ctx.dir("tokenizer") / "tokenizer.model")
    no_dedup = {"exact": False, "near": False}
    train = {"sources": [{"name": "corpus", "kind": "jsonl", "paths": [str(d / "corpus.jsonl")]}],
             "dedup": no_dedup, "tokenizer": tok}  # fmt: skip
    held = {"sources": [{"name": "heldout", "kind": "jsonl", "paths": [str(d / "heldout.jsonl")]}],
            "dedup": no_dedup, "tokenizer": tok}  # fmt: skip
    for name, spec in (("train", train), ("heldout", held)):
        prepare(load_recipe(DataRecipe, spec), out / name, progress=False)


def stage_pretrain(ctx: Context) -> dict[str, Any]:
    """The teacher: next-token pretraining on the packed corpus, steps from a measured step."""
    from .train.run import train

    _pack(ctx, ctx.dir("pretrain") / "data")
    idx, steps = _fit_shape(ctx, "pretrain", range(1, ctx.plan.max_shape + 1), 1)
    shape = _shape(*SHAPES[idx])
    out = ctx.dir("pretrain") / "teacher"
    recipe = _lm_recipe(ctx, "teacher", shape, steps, out, 3e-3)
    s = train(_load_train(recipe), out, progress=ctx.progress)
    return {"model": s["model"], "shape": idx, "hidden_size": shape["hidden_size"],
            "layers": shape["num_hidden_layers"], "steps": steps,
            "heldout_loss": s.get("eval_loss"), "train_loss": s["final_train_loss"]}  # fmt: skip


def _fit_shape(ctx: Context, stage: str, candidates: range, runs: int,
               extra_s: float = 0.0) -> tuple[int, int]:  # fmt: skip
    """(SHAPES index, steps): the largest candidate of which plan.min_steps steps (`runs` runs,
    each step plus `extra_s`) fit the stage's budget, measured smallest first; else the smallest."""
    vocab = ctx.done["tokenizer"]["vocab_size"]
    best = None
    for idx in candidates:
        step_s = _measure_step(_shape(*SHAPES[idx]), vocab) + extra_s
        steps = _steps(ctx.plan.seconds(stage) / runs, step_s, 2, 3000)
        print(f"   {SHAPES[idx][0]}x{SHAPES[idx][1]}: {step_s * 1000:.0f} ms/step -> {steps} steps",
              flush=True)  # fmt: skip
        if best is not None and steps < ctx.plan.min_steps:
            break
        best = (idx, steps)
        if steps < ctx.plan.min_steps:
            break
    assert best is not None, "no candidate shapes"
    return best


def _load_train(recipe: dict[str, Any]) -> Any:
    from .train.recipe import load_train_recipe

    return load_train_recipe(recipe)


# ------------------------------------------------------------------ 4. distillation
def stage_distill(ctx: Context) -> dict[str, Any]:
    """Student distilled from the teacher with sampled top-K logits (Gemma 3 §2.2) and the same
    student from scratch on the same tokens (the control); geode.train.run.distill."""
    from .train.run import distill

    vocab = ctx.done["tokenizer"]["vocab_size"]
    t = ctx.done["pretrain"]["shape"]
    teacher_s = _measure_step(_shape(*SHAPES[t]), vocab, forward_only=True)
    idx, steps = _fit_shape(ctx, "distill", range(t), 2, teacher_s)
    steps = min(steps, max(2, ctx.done["pretrain"]["steps"] // 2))  # the teacher saw 2x the tokens
    out = ctx.dir("distill")
    recipe = _lm_recipe(ctx, "student", _shape(*SHAPES[idx]), steps, out, 3e-3)
    recipe["distill"] = {"teacher": ctx.model("pretrain"), "top_k": min(128, vocab),
                         "sampling": "sample", "control": True}  # fmt: skip
    result = distill(_load_train(recipe), out, progress=ctx.progress)
    final = result["comparison"]["final_eval_loss"]
    return {"model": result["student"]["model"], "control_model": result["control"]["model"],
            "steps": steps, "hidden_size": SHAPES[idx][0], "layers": SHAPES[idx][1],
            "student_heldout_loss": final["student"],
            "control_heldout_loss": final["control"],
            "distilled_below_control": final["student"] < final["control"]}  # fmt: skip


# ------------------------------------------------------------------ 5.-8. post-training
def _base_model(ctx: Context) -> str:
    """The model post-training starts from: --base, else the distilled student."""
    return ctx.plan.base or ctx.model("distill")


def _post(ctx: Context, name: str, init: str, steps: int, lr: float, **sections: Any) -> dict:
    """A post-training recipe dict on the generated task (TASK difficulty); LoRA adapters
    (with the stage's LORA_LR) when the plan says so."""
    d, rows = ctx.dir("data"), ctx.plan.post_rows
    if ctx.plan.lora:
        lr = LORA_LR[name]
    recipe: dict[str, Any] = {
        "name": name,
        "out": str(ctx.dir(name)),
        "model": {"init": init},
        "data": {"path": "", "seq_len": 256},
        "batch": {"global_batch_size": rows, "micro_batch_size": min(rows, ctx.plan.micro_rows)},
        "optim": {"lr": lr, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"max_steps": steps, "progress": ctx.progress is not False},
        "eval": {"batches": 2},
        "checkpoint": {"export": True},
        "pairs": {**TASK, "max_len": 256},
    }
    if sections.pop("pairs_data", False):
        recipe["data"] = {"path": str(d / "prefs" / "train.jsonl"),
                          "eval_path": str(d / "prefs" / "heldout.jsonl"), "seq_len": 256}  # fmt: skip
    if ctx.plan.lora:
        recipe["lora"] = {"r": 16, "alpha": 32.0}
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(recipe.get(key), dict) else value
    return recipe


def _post_steps(ctx: Context, stage: str, init: str, factor: float, lo: int, hi: int) -> int:
    """Steps of a post-training stage: its budget over `factor` measured training steps (of
    plan.post_rows rows). A LoRA step is measured once as twice a forward pass: the frozen
    weights need no gradient, so the backward pass costs about one forward."""
    from .checkpoint import read_config

    cfg = read_config(init)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
            "layer_types", "max_position_embeddings")  # fmt: skip
    shape, rows = {k: getattr(cfg, k) for k in keys}, ctx.plan.post_rows
    if not ctx.plan.lora:
        step_s = _measure_step(shape, cfg.vocab_size, rows=rows)
    elif ctx.step_s is None:
        ctx.step_s = step_s = 2.0 * _measure_step(shape, cfg.vocab_size, True, rows)
        print(f"   LoRA step of {rows} rows: {step_s:.1f} s (measured)", flush=True)
    else:
        step_s = ctx.step_s
    return _steps(ctx.plan.seconds(stage), factor * step_s, lo, hi)


def stage_sft(ctx: Context) -> dict[str, Any]:
    """Supervised fine-tuning on chat-formatted problems (loss on assistant tokens)."""
    from .post.recipe import load_post_recipe
    from .train.sft import sft

    init, d = _base_model(ctx), ctx.dir("data")
    steps = _post_steps(ctx, "sft", init, 0.5, 4, 2000)  # measured: ~0.5x on a quiet host
    recipe = _post(ctx, "sft", init, steps, 1e-2, objective={"kind": "sft"},
                   data={"path": str(d / "sft" / "train.jsonl"),
                         "eval_path": str(d / "sft" / "heldout.jsonl"), "seq_len": 256},
                   optim={"schedule": "cosine", "warmup_steps": max(1, steps // 10)})  # fmt: skip
    s = sft(load_post_recipe(recipe), ctx.dir("sft"), progress=ctx.progress)
    before = evaluate(ctx, init) if ctx.plan.base else {}  # --base: the model before
    return {"model": s["model"], "steps": steps, "heldout_loss": s.get("eval_loss"),
            "eval_prompts": ctx.plan.eval_prompts, **{"base_" + k: v for k, v in before.items()},
            **evaluate(ctx, s["model"])}  # fmt: skip


def stage_reward(ctx: Context) -> dict[str, Any]:
    """Two reward models on the generated preference pairs and their weight average (WARM)."""
    from .post.recipe import load_post_recipe
    from .post.warm import warm

    init = ctx.model("sft")
    steps = _post_steps(ctx, "reward", init, 2 * 4.0, 2, 300)  # 2 members, 2 rows per pair
    recipe = _post(ctx, "reward", init, steps, 1e-3, objective={"kind": "reward"},
                   pairs_data=True, warm={"members": 2, "noise_levels": [0.0]})  # fmt: skip
    report = warm(load_post_recipe(recipe), ctx.dir("reward"), 2, ctx.progress)
    level = report["levels"][0]
    return {"model": level["model"], "steps": steps, "member_mean": level["member_mean"],
            "member_best": level["member_best"], "warm": level["warm"],
            "ensemble": level["ensemble"]}  # fmt: skip


def stage_dpo(ctx: Context) -> dict[str, Any]:
    """One short OAIF stage (Guo et al. 2024): each step the policy samples two answers per
    training prompt, the task verifier picks one, DPO's loss against the SFT model."""
    from .post.dpo import dpo
    from .post.recipe import load_post_recipe

    init, p = ctx.model("sft"), ctx.plan
    steps = _post_steps(ctx, "dpo", init, 4.0, 2, 300)  # sampling + 4 sequences per pair
    online = {"judge": "verifier", "max_new_tokens": p.max_new_tokens, "prompts_per_step": 8,
              "eval_prompts": p.eval_prompts, "eval_max_new_tokens": p.max_new_tokens}  # fmt: skip
    recipe = _post(ctx, "dpo", init, steps, 1e-4, objective={"kind": "dpo", "options": {"beta": 0.1}},
                   pairs_data=True, online=online)  # fmt: skip
    s = dpo(load_post_recipe(recipe), ctx.dir("dpo"), progress=ctx.progress)
    win = s["policy_vs_start"]
    return {"model": s["model"], "steps": steps, **{f"vs_sft_{k}": v for k, v in win.items()
            if isinstance(v, (int, float))}, **evaluate(ctx, s["model"])}  # fmt: skip


def _rl_sections(ctx: Context, group: int, max_new: int) -> dict[str, Any]:
    return {"objective": {"kind": "rl", "options": {"loss_type": "grpo", "beta": 0.0}},
            "rl": {"group_size": group, "max_new_tokens": max_new, "generate": 1000,
                   "eval_prompts": ctx.plan.eval_prompts,
                   "eval_max_new_tokens": ctx.plan.max_new_tokens}}  # fmt: skip


def stage_rl(ctx: Context) -> dict[str, Any]:
    """GRPO with the task verifier's reward and a thinking budget drawn per group."""
    from .post.recipe import load_post_recipe
    from .post.rl import rl
    from .tokenizer import START_OF_THINKING, load_tokenizer

    init = ctx.model("dpo")
    steps = _post_steps(ctx, "rl", init, 5.0, 2, 200)  # sampling dominates an RL step
    sec = _rl_sections(ctx, ctx.plan.rl_group, ctx.plan.max_new_tokens)
    thinking = START_OF_THINKING in load_tokenizer(init).special_ids  # Gemma 3's has none
    if thinking:
        sec["rl"]["thinking_budgets"] = [16, 32]
    rows = ctx.plan.rl_rows
    recipe = _post(ctx, "rl", init, steps, 2e-4, **sec, batch={"global_batch_size": rows,
                   "micro_batch_size": min(rows, ctx.plan.micro_rows)})  # fmt: skip
    s = rl(load_post_recipe(recipe), ctx.dir("rl"), progress=ctx.progress)
    curve = [r for r in s.get("reward_curve", []) if r is not None]
    return {"model": s["model"], "steps": steps, "reward_first": curve[0] if curve else None,
            "reward_last": curve[-1] if curve else None, "reward_curve": curve,
            "heldout_before": s["heldout_accuracy_before"],
            "heldout_after": s["heldout_accuracy_after"], "heldout_prompts": s["heldout_prompts"],
            "thinking_budgets": thinking,
            **evaluate(ctx, s["model"])}  # fmt: skip


def stage_score(ctx: Context) -> dict[str, Any]:
    """SCoRe (Kumar et al. 2024): Stage I then Stage II of two-attempt self-correction RL."""
    from .post.recipe import load_post_recipe
    from .post.score import score

    init = ctx.model("rl")
    steps = _post_steps(ctx, "score", init, 12.0, 2, 100)
    s1 = max(1, steps // 2)  # Stage I first teaches attempt 2 to answer after the instruction
    sec = _rl_sections(ctx, 4, ctx.plan.max_new_tokens)
    sec["rl"].update(estimator="rloo", scale="none", mask_truncated=True)
    rows = ctx.plan.score_rows
    recipe = _post(ctx, "score", init, steps, 1e-4, **sec,
                   score={"stage1_steps": s1, "stage2_steps": max(1, steps - s1)},
                   batch={"global_batch_size": rows,
                          "micro_batch_size": min(rows, 16, ctx.plan.micro_rows)})  # fmt: skip
    s = score(load_post_recipe(recipe), ctx.dir("score"), progress=ctx.progress)
    b, a = s["before"], s["after"]
    return {"model": s["model"], "steps": steps, "before": b, "after": a,
            "delta_before": b.get("delta"), "delta_after": a.get("delta"),
            **evaluate(ctx, s["model"])}  # fmt: skip


# ------------------------------------------------------------------ evaluation
def heldout_prompts(ctx: Context) -> list[Any]:
    """The held-out problems every post-training stage is scored on (greedy pass@1)."""
    from .post.oaif import task_prompts

    return task_prompts(ctx.plan.eval_prompts, seed=SEED, split="heldout", **TASK)


def evaluate(ctx: Context, model_dir: str) -> dict[str, float]:
    """Greedy pass@1 and answered share on held-out problems; held-out perplexity of the gold
    solutions given the chat-rendered question (EngineBackend.loglikelihood)."""
    from .checkpoint import load_model
    from .eval.backends import EngineBackend
    from .post.rl import heldout_scores
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)  # its tokenizer.model (or tokenizer.json)
    backend = EngineBackend(load_model(model_dir), tok, chat=True, batch_size=64)
    prompts = heldout_prompts(ctx)
    scores = heldout_scores(backend.engine, tok, prompts, ctx.plan.max_new_tokens)
    from .data import tasks as synth

    golds = synth.generate(ctx.plan.eval_prompts, seed=SEED, split="heldout", **TASK)
    pairs = [(p.messages, g.solution) for p, g in zip(prompts, golds)]
    lls = backend.loglikelihood(pairs)
    n_tok = sum(len(tok.encode(g.solution)) for g in golds)
    ppl = math.exp(-sum(ll for ll, _ in lls) / n_tok)
    return {"accuracy": scores["accuracy"], "answered": scores["answered"], "heldout_ppl": ppl}


# ------------------------------------------------------------------ 10. report
def stage_report(ctx: Context) -> dict[str, Any]:
    """REPORT.md (stage table, verdicts, plots) and OUT/final (the last model, HF layout)."""
    from .quickstart_report import write_report

    last = next(s for s in ("score", "rl", "dpo", "sft") if s in ctx.done)
    final = ctx.out / "final"
    staging = ctx.out / ".final.staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(ctx.model(last), staging)
    swap_dir_into_place(staging, final)
    verdicts = write_report(ctx.out, ctx.done, asdict(ctx.plan), str(final))
    return {"model": str(final), "from_stage": last, "verdicts": verdicts}


def next_commands(out: str | Path) -> str:
    """What to run with the final model."""
    final = Path(out) / "final"
    return (f"  geode chat {final}\n  geode serve {final}\n"
            f"  geode eval tasks --model {final} --chat --limit 100 --option min_steps=1 "
            f"--option max_steps=1 --option max_value=20\n")  # fmt: skip


STAGE_FUNCS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "data": stage_data, "tokenizer": stage_tokenizer, "pretrain": stage_pretrain,
    "distill": stage_distill, "sft": stage_sft, "reward": stage_reward, "dpo": stage_dpo,
    "rl": stage_rl, "score": stage_score, "report": stage_report,
}  # fmt: skip


def main_exit(error: QuickstartError) -> int:
    """Print a failed stage's message (exit code 1); --resume continues from it."""
    print(f"geode quickstart: error: {error}\n  fix it and rerun with --resume", file=sys.stderr)
    return 1
