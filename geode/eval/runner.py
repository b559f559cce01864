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
keeps its work: the same command resumes from what is in samples.jsonl. An error that a rerun
cannot fix (a request the server rejects, bad data) says so instead (`EvalError.retryable`).
Prompts longer than the model's context get fewer shots or are skipped (`geode.eval.fit`);
the sample says which (`fit`, `skipped`), skipped samples are left out of the metrics and
counted (`skipped`, `fewer_shots`). Files appear with the first sample: a run that fails
before it leaves no empty directories.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import save_figure
from .backends import Backend, Gen
from .fit import fit_shots
from .selfcorrect import second_turn, self_correction_metrics
from .tasks import Task, TaskConfig, TaskError, get_task


class EvalError(RuntimeError):
    """A run stopped early; the message says what failed and, when `retryable` (endpoint down,
    timeout, interrupt), that a rerun of the same command resumes."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


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
    """Evaluate one task (resuming from out_dir/<task>/samples.jsonl); its metrics.

    Nothing is written before the first sample is: an error before that leaves no files."""
    task_dir = out_dir / task.name
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
    meta = _jsonable({**task.describe(), "self_correct": self_correct, "backend": backend.identity})
    run_file, samples_file = task_dir / "run.json", task_dir / "samples.jsonl"
    done = _load_done(samples_file)
    if done and run_file.exists():  # samples of another configuration must not be mixed in
        old = json.loads(run_file.read_text())
        if old != meta:
            changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise TaskError(
                f"{task.name}: {task_dir} holds {len(done)} samples of a different "
                f"configuration (differs in {changed}); use another --out or delete that directory"
            )
    work = [(d, j) for d in docs for j in range(task.samples_per_doc)]
    pending = [(d, j) for d, j in work if f"{d['id']}#{j}" not in done]
    bar = _progress_bar(len(work), len(work) - len(pending), task.name, progress)
    f = None
    try:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            if task.kind == "episodes":  # agent tasks run whole episodes (tasks/agents.py)
                records = task.run_episodes(backend, chunk, bar.update, task_dir)
            else:
                records = _evaluate_chunk(task, backend, chunk, self_correct, bar.update)
            if f is None:  # the first records: now the run's files exist
                task_dir.mkdir(parents=True, exist_ok=True)
                run_file.write_text(json.dumps(meta, indent=2))
                f = samples_file.open("a", encoding="utf-8")
            for r in records:
                f.write(json.dumps(_jsonable(r), ensure_ascii=False) + "\n")
                done[r["key"]] = r
            f.flush()
    except (KeyboardInterrupt, Exception) as e:
        if isinstance(e, TaskError):
            raise
        kept = sum(1 for d, j in work if f"{d['id']}#{j}" in done)
        retryable = isinstance(e, KeyboardInterrupt | ConnectionError | TimeoutError) or bool(
            getattr(e, "retryable", False)
        )
        what = f"{task.name}: stopped after {kept} of {len(work)} samples ({type(e).__name__}: {e})"
        if retryable:
            raise EvalError(
                f"{what}; they are kept in {samples_file}: rerun the same command to resume",
                retryable=True,
            ) from e
        kept_at = f"; the {kept} done are kept in {samples_file}" if kept else ""
        raise EvalError(
            f"{what}{kept_at}. This error is not transient: rerunning will fail the same way "
            "until its cause (the request, the data or the options) is fixed",
            retryable=False,
        ) from e
    finally:
        bar.close()
        if f is not None:
            f.close()
    samples = [done[f"{d['id']}#{j}"] for d, j in work]
    scored = [s for s in samples if not s.get("skipped")]
    metrics = task.aggregate(scored) if scored else {"n": 0}
    metrics["skipped"] = len(samples) - len(scored)
    metrics["fewer_shots"] = sum(1 for s in scored if "fit" in s)
    if self_correct:
        by_doc: dict[str, list[tuple[bool, bool]]] = {}
        for s in scored:
            by_doc.setdefault(s["id"], []).append(
                (bool(s["turns"][0]["correct"]), bool(s["turns"][1]["correct"]))
            )
        metrics["self_correction"] = self_correction_metrics(
            [p for pairs in by_doc.values() for p in pairs]
        )
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics["samples_per_second"] = round(len(pending) / max(1e-9, metrics["seconds"]), 3)
    plots = task.plots(scored, metrics, task_dir) if scored else []
    metrics["plots"] = [str(p) for p in plots]
    return metrics


def _skipped(base: dict, doc: dict, prompt: Any, fit: dict) -> dict:
    """The record of a sample whose prompt does not fit the context (nothing was sent)."""
    gold = {"gold": doc["gold"]} if "gold" in doc else {}
    return {
        **base,
        "prompt": prompt,
        "output": None,
        "extracted": None,
        **gold,
        "correct": None,
        **fit,
    }


def _evaluate_chunk(task: Task, backend: Backend, chunk, self_correct: bool, update) -> list[dict]:
    """Generate (or score log-likelihoods) for one chunk of (doc, sample index); prompts are
    fitted to the backend's context first (`geode.eval.fit`)."""
    docs = [d for d, _ in chunk]
    base = [
        {"task": task.name, "key": f"{d['id']}#{j}", "id": d["id"], "sample": j} for d, j in chunk
    ]
    ctx, shots = backend.max_context, len(task.shot_blocks)
    if task.kind == "loglikelihood":

        def longest(d: dict, k: int) -> int:
            pairs = task.loglikelihood_requests(d, k)
            return max(backend.prompt_tokens(c) + backend.count_tokens(x) for c, x in pairs)

        fits = [fit_shots(shots, lambda k, d=d: longest(d, k), 1, ctx) for d in docs]
        live = [i for i, (_, fit) in enumerate(fits) if "skipped" not in fit]
        pairs = {i: task.loglikelihood_requests(docs[i], fits[i][0]) for i in live}
        lls = backend.loglikelihood([p for i in live for p in pairs[i]])
        out, at = [], 0
        for i, (d, b, (k, fit)) in enumerate(zip(docs, base, fits, strict=True)):
            if i not in pairs:
                out.append(_skipped(b, d, task.prompt(d, k), fit))
            else:
                res = lls[at : at + len(pairs[i])]
                at += len(pairs[i])
                score = task.score_loglikelihood(d, res)
                out.append({**b, "prompt": task.prompt(d, k), "output": None, **score, **fit})
            update(1)
        return out

    def as_sent(p: Any) -> Any:  # both attempts of self-correction are conversations
        return [{"role": "user", "content": p}] if self_correct and isinstance(p, str) else p

    def gens(items: list[tuple[Any, dict]]) -> list[Gen]:
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
            for p, b in items
        ]

    def count(prompt: Any) -> int:
        return backend.prompt_tokens(prompt)

    records: list[dict] = [{} for _ in docs]
    prompts: list[Any] = [None] * len(docs)
    live = []
    for i, d in enumerate(docs):
        k, fit = fit_shots(
            shots, lambda k, d=d: count(as_sent(task.prompt(d, k))), task.max_tokens, ctx
        )
        prompts[i] = as_sent(task.prompt(d, k))
        if "skipped" in fit:
            records[i] = _skipped(base[i], d, prompts[i], fit)
            update(1)
        else:
            records[i] = fit
            live.append(i)
    outputs = backend.generate(
        gens([(prompts[i], base[i]) for i in live]), progress=None if self_correct else update
    )
    scores = task.score_many([docs[i] for i in live], outputs)
    for i, o, sc in zip(live, outputs, scores, strict=True):
        records[i] = {**base[i], "prompt": prompts[i], "output": o, **sc, **records[i]}
    if not self_correct:
        return records
    second = []
    for i in live:
        p2 = second_turn(prompts[i], records[i]["output"], task.correction_instruction)
        _, fit = fit_shots(0, lambda _k, p2=p2: count(p2), task.max_tokens, ctx, "second attempt")
        if "skipped" in fit:  # the first attempt stays in the record; the sample is not scored
            records[i] = {**records[i], "prompt": p2, "skipped": fit["skipped"]}
            update(1)
        else:
            second.append((i, p2))
    outputs2 = backend.generate(gens([(p2, base[i]) for i, p2 in second]), progress=update)
    scores2 = task.score_many([docs[i] for i, _ in second], outputs2)
    for (i, p2), o2, s2 in zip(second, outputs2, scores2, strict=True):
        r = records[i]
        turns = [
            {"output": r["output"], "extracted": r.get("extracted"), "correct": r["correct"]},
            {"output": o2, "extracted": s2.get("extracted"), "correct": s2["correct"]},
        ]
        records[i] = {**r, **s2, "prompt": p2, "output": o2, "turns": turns}
    return records


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
    notes = [
        f"- {task_name}: {m['fewer_shots']} samples with fewer shots than asked and "
        f"{m['skipped']} skipped (prompt longer than the model's context); see samples.jsonl"
        for task_name, m in results["tasks"].items()
        if m.get("skipped") or m.get("fewer_shots")
    ]
    (out_dir / "results.md").write_text(
        f"Backend: {results['backend']}\n\n"
        + "\n".join(lines)
        + "\n"
        + ("\n" + "\n".join(notes) + "\n" if notes else "")
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
    save_figure(fig, path)


def evaluate(
    tasks: Sequence[str | Task],
    backend: Backend,
    out_dir: str | Path,
    config: TaskConfig | None = None,
    *,
    self_correct: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every task, write the report files, return {'backend', 'tasks': {name: metrics}}.

    A failed run leaves no empty directories behind (OUT is removed if it was created for
    this run and holds nothing)."""
    out = Path(out_dir)
    created = not out.exists()
    try:
        return _evaluate(tasks, backend, out, config, self_correct, progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _evaluate(
    tasks: Sequence[str | Task],
    backend: Backend,
    out: Path,
    config: TaskConfig | None,
    self_correct: bool,
    progress: bool,
) -> dict[str, Any]:
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
        out.mkdir(parents=True, exist_ok=True)
        write_report(out, results)
    return results
