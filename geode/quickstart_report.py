"""REPORT.md of `geode quickstart`: the stage table, the paper claims checked on this run's
numbers (said plainly when one does not hold), and four PNG plots under OUT/plots."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from .fileio import atomic_write_bytes
from .train.metrics import curve, read_metrics

STAGE_WHAT = {
    "data": "task family (train/held-out) + stdlib corpus; exact/near dedup; 13-gram decontamination",
    "tokenizer": "SentencePiece BPE (Gemma options) on the corpus + chat data",
    "pretrain": "teacher: next-token pretraining",
    "distill": "student from sampled top-K teacher logits (Gemma 3) + from-scratch control",
    "sft": "SFT on chat-formatted problems",
    "reward": "2 reward models + their weight average (WARM)",
    "dpo": "OAIF: DPO on policy samples judged by the task verifier",
    "rl": "GRPO, task-verifier reward, thinking budgets (when the tokenizer has thinking tokens)",
    "score": "SCoRe two-attempt self-correction RL (Stage I + II)",
    "report": "REPORT.md, plots, OUT/final",
}  # fmt: skip


def _f(v: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, None as '-'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def stage_table(done: dict[str, dict[str, Any]]) -> str:
    """The stage-by-stage markdown table: seconds, steps, held-out loss/perplexity, accuracy."""
    rows = ["| stage | what | wall s | steps | held-out loss | held-out ppl | pass@1 | answered |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in STAGE_WHAT:
        if name not in done:
            note = "this report" if name == "report" else "skipped (--base)"
            rows.append(f"| {name} | {STAGE_WHAT[name]} | - | - | - | - | - | {note} |")
            continue
        rec = done[name]
        loss = rec.get("heldout_loss", rec.get("student_heldout_loss"))
        ppl = rec.get("heldout_ppl", math.exp(loss) if isinstance(loss, float) else None)
        rows.append(f"| {name} | {STAGE_WHAT.get(name, '')} | {rec.get('seconds', 0):.0f} | "
                    f"{_f(rec.get('steps'))} | {_f(loss)} | {_f(ppl, 2)} | "
                    f"{_f(rec.get('accuracy'))} | {_f(rec.get('answered'))} |")  # fmt: skip
    return "\n".join(rows)


POST_STAGES = ("sft", "dpo", "rl", "score")  # the stages evaluated on held-out problems


def base_comparison(done: dict[str, dict[str, Any]], base: str) -> str:
    """--base runs: the base model before post-training (evaluated in the SFT stage) against
    the model after each post-training stage, as a markdown table."""
    s = done.get("sft", {})
    rows = ["| model | held-out pass@1 | answered | held-out ppl |", "|---|---:|---:|---:|",
            f"| base `{base}` (before) | {_f(s.get('base_accuracy'))} | "
            f"{_f(s.get('base_answered'))} | {_f(s.get('base_heldout_ppl'), 2)} |"]  # fmt: skip
    for name in (n for n in POST_STAGES if n in done):
        rec = done[name]
        rows.append(f"| after {name} | {_f(rec.get('accuracy'))} | {_f(rec.get('answered'))} | "
                    f"{_f(rec.get('heldout_ppl'), 2)} |")  # fmt: skip
    return "\n".join(rows)


def verdicts(done: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each claim of issue #20 against this run's numbers: 'yes: ...' or 'NO: ...'."""
    out: dict[str, str] = {}
    d = done.get("distill")
    if d:
        ok = d["student_heldout_loss"] < d["control_heldout_loss"]
        out["distilled student below the from-scratch control (held-out loss)"] = (
            f"{'yes' if ok else 'NO'}: {d['student_heldout_loss']:.4f} vs "
            f"{d['control_heldout_loss']:.4f}"
        )
    s = done.get("sft")
    if s:
        ok = s["accuracy"] > 0.05
        out["SFT model has non-trivial held-out accuracy (> 5%)"] = (
            f"{'yes' if ok else 'NO'}: greedy pass@1 {s['accuracy']:.3f}"
        )
    r = done.get("rl")
    if r:
        start = r["heldout_before"]
        ok = r["heldout_after"] > start
        out["RL raises held-out accuracy"] = (
            f"{'yes' if ok else 'NO'}: {start:.3f} -> {r['heldout_after']:.3f}"
            f"{_noise(start, r['heldout_after'], r.get('heldout_prompts'))} "
            f"(reward {_f(r.get('reward_first'))} -> {_f(r.get('reward_last'))})"
        )
    last = next((done[n] for n in reversed(POST_STAGES) if n in done), None)
    if s and last and "base_accuracy" in s:
        start = s["base_accuracy"]
        ok = last["accuracy"] > start
        out["post-training raises the base model's held-out accuracy"] = (
            f"{'yes' if ok else 'NO'}: {start:.3f} -> {last['accuracy']:.3f}"
            f"{_noise(start, last['accuracy'], s.get('eval_prompts'))}; perplexity "
            f"{_f(s.get('base_heldout_ppl'), 2)} -> {_f(last.get('heldout_ppl'), 2)}"
        )
    c = done.get("score")
    if c:
        ok = (c["delta_after"] or 0) > 0
        out["SCoRe gives a positive delta(t1, t2)"] = (
            f"{'yes' if ok else 'NO'}: delta {_f(c['delta_before'])} before -> "
            f"{_f(c['delta_after'])} after{_noise(c['delta_before'], c['delta_after'], c['after'].get('n'))} (Acc@t1 {_f(c['after'].get('accuracy@t1'))}, "
            f"Acc@t2 {_f(c['after'].get('accuracy@t2'))})"
        )
    return out


def _noise(a: float | None, b: float | None, n: int | None) -> str:
    """', within noise (2 s.e. = x)' when |b - a| is under two standard errors of a difference
    of two proportions over n problems; empty otherwise."""
    if a is None or b is None or not n:
        return ""
    p = min(max((abs(a) + abs(b)) / 2, 1.0 / n), 1 - 1.0 / n)
    se2 = 2 * math.sqrt(2 * p * (1 - p) / n)
    return f", within noise (2 s.e. = {se2:.3f}, n = {n})" if abs(b - a) < se2 else ""


def plot_training_curves(out: Path, path: Path) -> Path | None:
    """Held-out loss of the LM runs, SFT loss, and the RL reward per step, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, rel in (("teacher", "pretrain/teacher"), ("student (distilled)", "distill/student"),
                      ("control (scratch)", "distill/control")):  # fmt: skip
        recs = _metrics(out / rel)
        for kind, key, style in (("train", "loss", "-"), ("eval", "eval_loss", "o-")):
            c = curve(recs, kind, key)
            if c:
                axes[0].plot(list(c), list(c.values()), style, label=f"{name} {kind}", alpha=0.8)
    sft = curve(_metrics(out / "sft"), "train", "loss")
    if sft:
        axes[1].plot(list(sft), list(sft.values()), label="SFT train loss")
    rl = curve(_metrics(out / "rl"), "train", "reward_mean")
    if rl:
        axes[2].plot(list(rl), list(rl.values()), "o-", label="GRPO reward mean")
    titles = ("pretraining / distillation (nats/token)", "SFT", "RL reward")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, path)


def _metrics(run: Path) -> list[dict[str, Any]]:
    f = run / "metrics.jsonl"
    return read_metrics(f) if f.exists() else []


def plot_accuracy(done: dict[str, dict[str, Any]], path: Path) -> Path:
    """Greedy held-out pass@1 after every post-training stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in POST_STAGES if n in done]
    accs = [done[n]["accuracy"] for n in names]
    if "base_accuracy" in done.get("sft", {}):  # --base: the model before post-training
        names, accs = ["base", *names], [done["sft"]["base_accuracy"], *accs]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(names, accs, color="tab:blue")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("held-out greedy pass@1")
    ax.set_ylim(0, 1)
    ax.set_title("accuracy by stage")
    return _save(fig, path)


def plot_transitions(done: dict[str, dict[str, Any]], path: Path) -> Path:
    """SCoRe's self-correction metrics before (the RL model) and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("accuracy@t1", "accuracy@t2", "delta", "delta_i_to_c", "delta_c_to_i")
    c = done.get("score", {})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for j, (label, m) in enumerate((("before SCoRe", c.get("before", {})),
                                    ("after SCoRe", c.get("after", {})))):  # fmt: skip
        vals = [float(m.get(k, float("nan"))) for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=label)
    ax.set_xticks([i + width / 2 for i in range(len(keys))], keys)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title("self-correction transitions (held-out, greedy)")
    ax.legend()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(out: Path, done: dict[str, dict[str, Any]], plan: dict[str, Any],
                 final: str) -> dict[str, str]:  # fmt: skip
    """Write OUT/REPORT.md and OUT/plots/*.png; returns the verdicts."""
    from .quickstart import next_commands

    plots = out / "plots"
    plot_training_curves(out, plots / "training_curves.png")
    plot_accuracy(done, plots / "accuracy_by_stage.png")
    plot_transitions(done, plots / "self_correction.png")
    comparison = out / "distill" / "comparison.png"
    if comparison.exists():  # geode.train.run.distill draws it
        shutil.copy(comparison, plots / "distill_vs_scratch.png")
    v = verdicts(done)
    total = sum(r.get("seconds", 0.0) for r in done.values())
    lines = [
        "# geode quickstart report",
        "",
        f"Budget {plan['budget_minutes']:g} min; stages so far {total:.0f} s"
        + (f"; base model {plan['base']}" if plan.get("base") else "")
        + ". Held-out: the task family's held-out split (disjoint by construction, decontaminated"
        " from the corpus); pass@1 is greedy; ppl is the gold solutions' per-token perplexity"
        " given the chat prompt (post-training rows) or exp(held-out LM loss) (pretraining rows).",
        "",
        stage_table(done),
        "",
        *(
            ["## The base model before and after", "", base_comparison(done, plan["base"]), ""]
            if plan.get("base") and "sft" in done
            else []
        ),  # fmt: skip
        "## Claims checked on this run",
        "",
        *[f"- {claim}: **{verdict}**" for claim, verdict in v.items()],
        "",
        "## Plots",
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in sorted(plots.glob("*.png"))],
        "",
        f"## Final model\n\n`{final}` (Hugging Face layout). Next:\n",
        "```",
        next_commands(out).rstrip(),
        "```",
        "",
    ]
    atomic_write_bytes(out / "REPORT.md", "\n".join(lines).encode())
    return v
