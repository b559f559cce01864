"""Run tasks against a backend; write per-sample JSONL, results JSON, a markdown table, plots.

Layout of `out_dir`:
  <task>/samples.jsonl  one line per sample: id, sample index, prompt, output, extracted
                        answer, gold, verdict (+ both turns in self-correction mode)
  <task>/run.json       the task configuration the samples belong to
  <task>/*.png          task plots (the NIAH heat map)
  results.json          metrics of every task, the backend, timings
  results.md            a markdown table of the primary metrics
  results.png           primary metric per task with its confidence interval

Samples are appended as each batch finishes, so an interrupted run (endpoint down, Ctrl-C)
keeps its work: the same command resumes from what is in samples.jsonl.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .backends import Backend, Gen
from .selfcorrect import second_turn, self_correction_metrics
from .tasks import Task, TaskConfig, TaskError, get_task


class EvalError(RuntimeError):
    """A run stopped early; the message says what failed and that a rerun resumes."""


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from ..progress import progress

    return progress(total, desc, "sample", initial=initial, enabled=enabled)


def _load_done(path: Path) -> dict[str, dict]:
    """Samples already on disk, by key (a torn last line from a crash is ignored)."""
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                s = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[s["key"]] = s
    return done


def run_task(
    task: Task,
    backend: Backend,
    out_dir: Path,
    *,
    self_correct: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate one task (resuming from out_dir/<task>/samples.jsonl); its metrics."""
    task_dir = out_dir / task.name
    task_dir.mkdir(parents=True, exist_ok=True)
    if self_correct and not task.verifiable:
        raise TaskError(f"{task.name}: self-correction needs a right/wrong verdict; it has none")
    task.bind(backend)
    t0 = time.perf_counter()
    docs = task.load()
    if task.config.limit is not None and not task.generates_limit:
        docs = docs[: task.config.limit]
    if not docs:
        raise TaskError(f"{task.name}: no documents to evaluate")
    ids = [d["id"] for d in docs]
    if len(set(ids)) != len(ids):
        raise TaskError(f"{task.name}: document ids are not unique")
    meta = {**task.describe(), "self_correct": self_correct, "backend": backend.identity}
    run_file, samples_file = task_dir / "run.json", task_dir / "samples.jsonl"
    if samples_file.exists() and run_file.exists():
        old = json.loads(run_file.read_text())
        if old != _jsonable(meta):
            changed = sorted(
                k for k in set(old) | set(meta) if old.get(k) != _jsonable(meta).get(k)
            )
            raise TaskError(
                f"{task.name}: {task_dir} holds samples of a different configuration "
                f"(differs in {changed}); use another --out or delete that directory"
            )
    run_file.write_text(json.dumps(_jsonable(meta), indent=2))
    done = _load_done(samples_file)
    work = [(d, j) for d in docs for j in range(task.samples_per_doc)]
    pending = [(d, j) for d, j in work if f"{d['id']}#{j}" not in done]
    bar = _progress_bar(len(work), len(work) - len(pending), task.name, progress)
    try:
        with samples_file.open("a", encoding="utf-8") as f:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                records = _evaluate_chunk(task, backend, chunk, self_correct, bar.update)
                for r in records:
                    f.write(json.dumps(_jsonable(r), ensure_ascii=False) + "\n")
                    done[r["key"]] = r
                f.flush()
    except (KeyboardInterrupt, Exception) as e:
        if isinstance(e, TaskError):
            raise
        kept = sum(1 for d, j in work if f"{d['id']}#{j}" in done)
        raise EvalError(
            f"{task.name}: stopped after {kept} of {len(work)} samples ({type(e).__name__}: {e}); "
            f"they are kept in {samples_file}: rerun the same command to resume"
        ) from e
    finally:
        bar.close()
    samples = [done[f"{d['id']}#{j}"] for d, j in work]
    metrics = task.aggregate(samples)
    if self_correct:
        by_doc: dict[str, list[tuple[bool, bool]]] = {}
        for s in samples:
            by_doc.setdefault(s["id"], []).append(
                (bool(s["turns"][0]["correct"]), bool(s["turns"][1]["correct"]))
            )
        metrics["self_correction"] = self_correction_metrics(
            [p for pairs in by_doc.values() for p in pairs]
        )
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics["samples_per_second"] = round(len(pending) / max(1e-9, metrics["seconds"]), 3)
    metrics["plots"] = [str(p) for p in task.plots(samples, metrics, task_dir)]
    return metrics


def _evaluate_chunk(task: Task, backend: Backend, chunk, self_correct: bool, update) -> list[dict]:
    """Generate (or score log-likelihoods) for one chunk of (doc, sample index)."""
    docs = [d for d, _ in chunk]
    base = [
        {"task": task.name, "key": f"{d['id']}#{j}", "id": d["id"], "sample": j} for d, j in chunk
    ]
    if task.kind == "loglikelihood":
        pairs = [task.loglikelihood_requests(d) for d in docs]
        flat = [p for ps in pairs for p in ps]
        lls = backend.loglikelihood(flat)
        out, at = [], 0
        for b, d, ps in zip(base, docs, pairs, strict=True):
            res = lls[at : at + len(ps)]
            at += len(ps)
            out.append(
                {**b, "prompt": task.prompt(d), "output": None, **task.score_loglikelihood(d, res)}
            )
            update(1)
        return out

    def gens(prompts):
        return [
            Gen(
                p,
                max_tokens=task.max_tokens,
                temperature=task.temperature,
                stop=task.gen_stop,
                seed=None
                if task.temperature == 0
                else zlib.crc32(f"{task.config.seed}:{b['key']}".encode()),
            )
            for p, b in zip(prompts, base, strict=True)
        ]

    prompts = [task.prompt(d) for d in docs]
    if self_correct:  # both attempts are chat conversations
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    outputs = backend.generate(gens(prompts), progress=None if self_correct else update)
    scores = task.score_many(docs, outputs)
    records = [
        {**b, "prompt": p, "output": o, **s}
        for b, p, o, s in zip(base, prompts, outputs, scores, strict=True)
    ]
    if not self_correct:
        return records
    prompts2 = [
        second_turn(p, o, task.correction_instruction)
        for p, o in zip(prompts, outputs, strict=True)
    ]
    outputs2 = backend.generate(gens(prompts2), progress=update)
    scores2 = task.score_many(docs, outputs2)
    final = []
    for r, p2, o2, s2 in zip(records, prompts2, outputs2, scores2, strict=True):
        turns = [
            {"output": r["output"], "extracted": r.get("extracted"), "correct": r["correct"]},
            {"output": o2, "extracted": s2.get("extracted"), "correct": s2["correct"]},
        ]
        final.append({**r, **s2, "prompt": p2, "output": o2, "turns": turns})
    return final


def _primary(task_name: str) -> str:
    """The headline metric name of a registered task."""
    import importlib

    from .tasks import TASKS

    if task_name not in TASKS:
        return "accuracy"
    module, cls = TASKS[task_name].split(":")
    return getattr(importlib.import_module(f"geode.eval.tasks.{module}"), cls).primary


def write_report(out_dir: Path, results: dict[str, Any]) -> None:
    """results.json, results.md and results.png under out_dir (every task in `results`)."""
    (out_dir / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    lines = ["| task | metric | value | 95% CI | n | samples/s |", "|---|---|---|---|---|---|"]
    rows = []
    for task_name, m in results["tasks"].items():
        name = _primary(task_name)
        value, ci = m.get(name), m.get(f"{name}_ci")
        ci_s = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "-"
        val_s = f"{value:.3f}" if isinstance(value, int | float) else "-"
        n = m.get("n", m.get("problems", "-"))
        sps = m.get("samples_per_second")
        lines.append(f"| {task_name} | {name} | {val_s} | {ci_s} | {n} | {sps} |")
        rows.append((f"{task_name}\n{name}", value, ci))
        sc = m.get("self_correction")
        if sc:
            for k in ("accuracy@t1", "accuracy@t2", "delta", "delta_i_to_c", "delta_c_to_i"):
                lines.append(f"| {task_name} | {k} | {sc[k]:.3f} | - | {sc['n']} | |")
    (out_dir / "results.md").write_text(
        f"Backend: {results['backend']}\n\n" + "\n".join(lines) + "\n"
    )
    _bar_plot(out_dir / "results.png", rows)


def _bar_plot(path: Path, rows: list[tuple[str, float | None, list | None]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r[1], int | float)]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(3, 1.4 * len(rows) + 1), 3.5))
    vals = [r[1] for r in rows]
    lo = [min(v, ci[0]) if ci and ci[0] is not None else v for _, v, ci in rows]
    hi = [max(v, ci[1]) if ci and ci[1] is not None else v for _, v, ci in rows]
    err = [
        [v - x for v, x in zip(vals, lo, strict=True)],
        [x - v for v, x in zip(vals, hi, strict=True)],
    ]
    ax.bar(range(len(rows)), vals, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("geode eval")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(
    tasks: Sequence[str | Task],
    backend: Backend,
    out_dir: str | Path,
    config: TaskConfig | None = None,
    *,
    self_correct: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every task, write the report files, return {'backend', 'tasks': {name: metrics}}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config or TaskConfig()
    if self_correct:
        config.chat = True  # the second attempt is a conversation
    objs = [t if isinstance(t, Task) else get_task(t, config) for t in tasks]
    results: dict[str, Any] = {"backend": backend.identity, "tasks": {}}
    prev = out / "results.json"
    if prev.is_file():
        try:
            results["tasks"].update(json.loads(prev.read_text()).get("tasks", {}))
        except json.JSONDecodeError:
            pass
    for t in objs:
        results["tasks"][t.name] = run_task(
            t, backend, out, self_correct=self_correct, progress=progress
        )
        write_report(out, results)
    return results
