"""`geode reproduce teacher-hacking`: Tiapkin et al. 2025, "On Teacher Hacking in Language
Model Distillation" (arXiv:2502.02671), at nano scale.

The controlled setup of the paper (its Figure 1): an ORACLE stands for the true distribution;
a TEACHER is trained on the oracle's samples (an imperfect proxy of it); a STUDENT is distilled
from the teacher. Teacher hacking: the student gets closer to the teacher (the proxy distance
falls) while it moves away from the oracle (the golden distance rises). The paper finds it with
a fixed offline dataset reused for many epochs, not with online data generation, and proposes
an oracle-free diagnostic: the proxy curve departs from polynomial (power-law) convergence.

Here: oracle = a nano model pretrained on the built-in corpus; teacher = a smaller model
trained (next-token loss) on prompts + oracle completions; student = a smaller one again,
distilled with sampled top-K teacher logits (geode.train.distill, Gemma 3 §2.2) by the trainer,
in two regimes on the same prompts and steps:
  offline: one fixed teacher completion per prompt, reused every epoch;
  online:  the student samples a fresh completion every step (on-policy, GKD
           arXiv:2306.13649, `distill.on_policy_tokens`) and the teacher scores it.
Distances on held-out prompts with oracle completions (the true data), per completion token
over the whole vocabulary, averaged: proxy = KL(teacher || student), golden =
KL(oracle || student) (and the total variation of each).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .common import Setup, corpus, lm_recipe, md_table, step_count, write_report

CLAIM = ("Distilling from an imperfect teacher on a fixed offline dataset for many epochs "
         "leads to teacher hacking: the student's distance to the teacher (proxy) keeps "
         "falling while its distance to the oracle (golden) rises; with online data "
         "generation it does not. The proxy's departure from a power law fitted to its early "
         "curve signals it without the oracle (Tiapkin et al. 2025).")  # fmt: skip
RISE = 0.01  # golden counted as rising when it ends over 1% above its minimum
EARLY = 0.4  # the power law is fitted to eval points from step 2 up to this fraction of the steps


def _sizes(setup: Setup) -> dict[str, int]:
    if setup.tiny:
        return {"prompt": 8, "completion": 24, "teacher_docs": 96, "offline_prompts": 16,
                "eval_prompts": 16, "top_k": 64, "evals": 4}  # fmt: skip
    return {"prompt": 16, "completion": 48, "teacher_docs": 1024, "offline_prompts": 128,
            "eval_prompts": 64, "top_k": 128, "evals": 14}  # fmt: skip


def run(setup: Setup) -> dict[str, Any]:
    """Oracle -> teacher -> students (offline, online); curves, power-law fit, the report."""
    from .. import quickstart as q
    from ..train.recipe import load_train_recipe
    from ..train.run import train

    n = _sizes(setup)
    P, C = n["prompt"], n["completion"]
    T = P + C  # one document per row of the teacher's and students' data
    setup.stage(1, 7, "corpus (task family + stdlib), tokenizer, packing")
    ctx = corpus(setup)
    vocab = ctx.done["tokenizer"]["vocab_size"]
    tok_path = ctx.dir("tokenizer") / "tokenizer.model"
    # oracle > teacher > student. Tried and dropped: a student of the teacher's shape, and
    # teacher and students started from one base pretrained on the corpus (the students then
    # moved away from the teacher on held-out prompts in both regimes)
    o_idx, t_idx, s_idx = (1, 0, 0) if setup.tiny else (2, 1, 0)
    shape = {k: q._shape(*q.SHAPES[i]) for k, i in (("oracle", o_idx), ("teacher", t_idx),
                                                    ("student", s_idx))}  # fmt: skip
    if setup.tiny:
        o_steps, t_steps, s_steps = 4, 4, 6
    else:
        o_steps = step_count(setup, 0.25, shape["oracle"], vocab, lo=20)
        t_steps = step_count(setup, 0.1, shape["teacher"], vocab, lo=20)
        fwd = q._measure_step(shape["teacher"], vocab, forward_only=True)
        # rows of P + C = 64 tokens, half the measured 128: twice the steps; online counts 2x
        s_steps = 2 * step_count(setup, 0.4, shape["student"], vocab, runs=3, lo=10, extra_s=fwd)

    setup.stage(
        2, 7, f"oracle {q.SHAPES[o_idx][:2]} (hidden, layers): {o_steps} steps on the corpus"
    )
    o_dir = setup.out / "oracle"
    oracle = train(load_train_recipe(lm_recipe(ctx, setup, "oracle", shape["oracle"], o_steps, o_dir)),
                   o_dir, progress=setup.progress)["model"]  # fmt: skip

    setup.stage(
        3,
        7,
        f"teacher {q.SHAPES[t_idx][:2]}: {t_steps} steps on {n['teacher_docs']} oracle completions",
    )
    stream = ctx.dir("pretrain") / "data" / "train"
    n_prompts = n["teacher_docs"] + n["eval_prompts"]
    prompts = corpus_prompts(stream, n_prompts, P, setup.seed)
    train_prompts, eval_prompts = prompts[: n["teacher_docs"]], prompts[n["teacher_docs"] :]
    oracle_docs = complete(oracle, train_prompts, C, setup.seed)
    data_dir = setup.out / "data"
    write_docs(data_dir / "oracle", oracle_docs, vocab, tok_path)
    t_dir = setup.out / "teacher"
    r = _doc_recipe(lm_recipe(ctx, setup, "teacher", shape["teacher"], t_steps, t_dir),
                    data_dir / "oracle", T)  # fmt: skip
    teacher = train(load_train_recipe(r), t_dir, progress=setup.progress)["model"]

    setup.stage(4, 7, "held-out distances: oracle completions of held-out prompts")
    eval_docs = complete(oracle, eval_prompts, C, setup.seed + 1)
    judge = Distances(eval_docs, P, oracle, teacher)
    off_prompts = train_prompts[: n["offline_prompts"]]
    write_docs(
        data_dir / "offline", complete(teacher, off_prompts, C, setup.seed + 2), vocab, tok_path
    )
    at = eval_steps(s_steps, n["evals"])

    curves: dict[str, list[dict[str, float]]] = {}
    for i, regime in enumerate(("offline", "online")):
        setup.stage(5 + i, 7, f"student {q.SHAPES[s_idx][:2]}, {regime}: {s_steps} steps")
        s_dir = setup.out / f"student-{regime}"
        r = _doc_recipe(lm_recipe(ctx, setup, f"student-{regime}", shape["student"], s_steps, s_dir),
                        data_dir / "offline", T)  # fmt: skip
        r["optim"] = {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.1}
        r["distill"] = {"teacher": teacher, "top_k": min(n["top_k"], vocab), "sampling": "sample",
                        "control": False, "on_policy_tokens": C + 1 if regime == "online" else 0}  # fmt: skip
        curves[regime] = distill_curve(load_train_recipe(r), s_dir, judge, at, setup)

    setup.stage(7, 7, "power-law fit, verdict, report")
    summary = {regime: analyse(c) for regime, c in curves.items()}
    hacked = {regime: s["hacking"] for regime, s in summary.items()}
    holds = hacked["offline"] and not hacked["online"]
    epochs = s_steps * q.BATCH / n["offline_prompts"]
    plot = _plot(curves, summary, setup.out / "teacher_hacking.png")
    rows = []
    for step_i, step in enumerate(at):
        off, on = curves["offline"][step_i], curves["online"][step_i]
        rows.append([step, off["proxy_kl"], off["golden_kl"], on["proxy_kl"], on["golden_kl"]])
    table = md_table(["step", "offline proxy KL(t||s)", "offline golden KL(o||s)",
                      "online proxy KL(t||s)", "online golden KL(o||s)"], rows)  # fmt: skip
    fit_rows = [[regime, s["power_law"]["exponent"], s["power_law"]["departure"],
                 s["golden_min_step"], s["golden_min"], s["golden_final"], s["golden_rise"],
                 s["proxy_falling"], "yes" if s["hacking"] else "no"] for regime, s in summary.items()]  # fmt: skip
    table += "\n\n" + md_table(
        ["regime", "proxy power-law exponent (early fit)", "proxy departure at the end (log ratio)",
         "golden min at step", "golden min", "golden final", "golden rise (rel.)",
         "proxy still falling", "teacher hacking"], fit_rows)  # fmt: skip
    table += (
        f"\n\nTeacher vs oracle on the same held-out sequences: KL(o||t) = "
        f"{judge.teacher_gap:.4f} (the floor a perfect imitation of the teacher sits on)."
    )
    verdict = (f"Offline ({epochs:.0f} epochs over {n['offline_prompts']} fixed completions): "
               f"{_says(summary['offline'])}. Online (fresh student samples every step): "
               f"{_says(summary['online'])}. The proxy's departure from its early power law is "
               f"{summary['offline']['power_law']['departure']:+.3f} offline vs "
               f"{summary['online']['power_law']['departure']:+.3f} online (log ratio, positive: "
               "converging slower than the power law).")  # fmt: skip
    if not holds:
        verdict += (" The pattern the paper reports (golden up while proxy down offline only) "
                    "is not what this run measured; see the table for which part differs.")  # fmt: skip
        best = min(s["proxy_final"] for s in summary.values())
        if best > judge.teacher_gap:
            verdict += (f" The students end farther from the teacher (proxy {best:.3f}) than the "
                        f"teacher is from the oracle ({judge.teacher_gap:.3f}): they have not "
                        "fit the teacher closely enough to inherit its errors.")  # fmt: skip
    setup_text = (f"Oracle: hidden {q.SHAPES[o_idx][0]}, {q.SHAPES[o_idx][1]} layers, {o_steps} "
                  f"steps on the corpus. Teacher: hidden {q.SHAPES[t_idx][0]}, "
                  f"{q.SHAPES[t_idx][1]} layers, {t_steps} steps on {n['teacher_docs']} corpus "
                  f"prompts ({P} tokens) with oracle completions ({C} tokens, temperature 1). "
                  f"Student: hidden {q.SHAPES[s_idx][0]}, {q.SHAPES[s_idx][1]} layers, {s_steps} "
                  f"steps of {q.BATCH} rows, K = {min(n['top_k'], vocab)} sampled teacher logits, "
                  f"cosine lr 3e-3 -> 3e-4, on {n['offline_prompts']} prompts: offline (one fixed "
                  f"teacher completion each) or online (a fresh student completion each step). "
                  f"Distances on {n['eval_prompts']} held-out prompts with oracle completions, "
                  "per completion token over the full vocabulary.")  # fmt: skip
    results = {"sizes": n, "steps": {"oracle": o_steps, "teacher": t_steps, "student": s_steps},
               "offline_epochs": epochs, "teacher_oracle_kl": judge.teacher_gap,
               "eval_steps": at, "curves": curves, "summary": summary, "hacking": hacked}  # fmt: skip
    return write_report(setup, "offline vs online distillation from an imperfect teacher",
                        CLAIM, setup_text, table, verdict, holds, [plot], results)  # fmt: skip


def _says(s: dict[str, Any]) -> str:
    """One regime's outcome in words."""
    return (
        f"golden {'rises' if s['golden_rise'] > RISE else 'does not rise'} "
        f"({s['golden_min']:.4f} at step {s['golden_min_step']} -> {s['golden_final']:.4f}, "
        f"{100 * s['golden_rise']:+.1f}%) while the proxy "
        f"{'keeps falling' if s['proxy_falling'] else 'does not fall'} "
        f"({s['proxy_at_golden_min']:.4f} -> {s['proxy_final']:.4f}): teacher hacking "
        f"{'yes' if s['hacking'] else 'no'}"
    )


# ------------------------------------------------------------------ data
def corpus_prompts(data: Path, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` prompts of `length` tokens: <bos> + a span at a random offset of the packed corpus."""
    import numpy as np

    from ..data.pack import open_dataset

    ds = open_dataset(data)
    stream = ds.streams["corpus"]
    bos = int(ds.manifest.get("bos_id") or 2)
    rng = np.random.default_rng(seed)
    starts = rng.choice(stream.num_tokens - length, size=n, replace=False)
    return [[bos, *stream.read(int(s), length - 1).tolist()] for s in starts]


def complete(model_dir: str, prompts: list[list[int]], n: int, seed: int) -> list[list[int]]:
    """Prompt + `n` sampled tokens (temperature 1, eos ignored, seeded per prompt)."""
    from ..checkpoint import load_model
    from ..infer import Engine, Request

    engine = Engine(load_model(model_dir).eval(), max_batch=64, optimize=False,
                    max_seq_len=len(prompts[0]) + n + 1)  # fmt: skip
    reqs = [Request(p, max_new_tokens=n, temperature=1.0, ignore_eos=True, seed=seed * 100_003 + i)
            for i, p in enumerate(prompts)]  # fmt: skip
    return [p + list(r.token_ids[:n]) for p, r in zip(prompts, engine.generate(reqs))]


def write_docs(root: Path, docs: list[list[int]], vocab: int, tokenizer: Path) -> Path:
    """A prepared dataset (geode.data.pack format), one stream `train`, a document per row:
    documents of T tokens plus one closing <bos> make windows of T + 1 = one document each."""
    from ..data.pack import FORMAT, MANIFEST, VERSION, StreamWriter, write_json_atomic
    from ..fileio import sha256_file

    w = StreamWriter(root, "train", "uint16")
    w.add([*docs, [docs[0][0]]])
    manifest = {"format": FORMAT, "version": VERSION, "dtype": "uint16", "vocab_size": vocab,
                "bos_id": docs[0][0], "eos_id": 1, "pad_id": 0,
                "tokenizer": {"path": str(tokenizer), "sha256": sha256_file(tokenizer)},
                "streams": {"train": w.close()}}  # fmt: skip
    write_json_atomic(root / MANIFEST, manifest)  # last: marks the dataset complete
    return root


def _doc_recipe(r: dict[str, Any], data: Path, seq_len: int) -> dict[str, Any]:
    """A recipe moved onto a dataset of one-document rows (no held-out stream, no export)."""
    r["data"] = {"path": str(data), "seq_len": seq_len, "seed": r["data"]["seed"]}
    r["eval"] = {"every": 0, "batches": 1}
    return r


# ------------------------------------------------------------------ distances
class Distances:
    """Proxy and golden distances of a student on fixed held-out sequences (prompt + oracle
    completion): per completion position, over the full vocabulary,
    KL(p || s) = sum_v p_v (log p_v - log s_v) and TV(p, s) = 1/2 sum_v |p_v - s_v|, averaged."""

    def __init__(self, docs: list[list[int]], prompt: int, oracle: str, teacher: str):
        import torch

        from ..checkpoint import load_model

        self.ids = torch.tensor(docs)  # (E, T)
        self.prompt = prompt
        self.oracle = self._logp(load_model(oracle).eval())  # (E, C, V)
        self.teacher = self._logp(load_model(teacher).eval())  # (E, C, V)
        self.teacher_gap = self._kl(self.oracle, self.teacher)

    def _logp(self, model: Any) -> Any:
        """log-probabilities at the completion positions: (E, C, V)."""
        import torch

        with torch.no_grad():
            logits = model(self.ids[:, :-1])  # (E, T-1, V): position t predicts token t+1
        return torch.log_softmax(logits[:, self.prompt - 1 :].float(), -1)  # (E, C, V)

    @staticmethod
    def _kl(p: Any, s: Any) -> float:
        return float((p.exp() * (p - s)).sum(-1).mean())

    @staticmethod
    def _tv(p: Any, s: Any) -> float:
        return float(0.5 * (p.exp() - s.exp()).abs().sum(-1).mean())

    def __call__(self, model: Any) -> dict[str, float]:
        """proxy_kl, golden_kl, proxy_tv, golden_tv of `model` (put back in train mode after)."""
        was = model.training
        model.eval()
        s = self._logp(model)
        model.train(was)
        return {"proxy_kl": self._kl(self.teacher, s), "golden_kl": self._kl(self.oracle, s),
                "proxy_tv": self._tv(self.teacher, s), "golden_tv": self._tv(self.oracle, s)}  # fmt: skip


def eval_steps(steps: int, n: int) -> list[int]:
    """About `n` evaluation steps spaced evenly in log(step) from 1 to `steps` (both included)."""
    import numpy as np

    return sorted({int(round(s)) for s in np.geomspace(1, steps, n)} | {steps})


def distill_curve(recipe: Any, out: Path, judge: Distances, at: list[int],
                  setup: Setup) -> list[dict[str, float]]:  # fmt: skip
    """Train with geode's Trainer one step at a time, measuring the distances at steps `at`."""
    from ..progress import progress
    from ..train.loop import Trainer

    tr = Trainer(recipe, out, progress=False)
    points = []
    bar = progress(recipe.train.max_steps, recipe.name, "step", enabled=setup.progress)
    try:
        while tr.step < recipe.train.max_steps:
            rec = tr.train_step()
            tr.metrics.write({k: v for k, v in rec.items() if not k.startswith("_")})
            bar.update(1)
            if tr.step in at:
                points.append({"step": tr.step, **judge(tr.raw_model)})
                bar.set_postfix({"proxy": f"{points[-1]['proxy_kl']:.3f}",
                                 "golden": f"{points[-1]['golden_kl']:.3f}"})  # fmt: skip
    finally:
        bar.close()
        tr.metrics.close()
    return points


def analyse(curve: list[dict[str, float]]) -> dict[str, Any]:
    """Golden minimum and rise, whether the proxy still falls after it, and the proxy's power
    law log d = a + b log step fitted to the early points (the first step left out: the
    curve starts flat), with the final point's departure
    log(d_final / d_fit(final)) (the paper's oracle-free diagnostic)."""
    import numpy as np

    steps = np.array([p["step"] for p in curve], dtype=np.float64)
    proxy = np.array([p["proxy_kl"] for p in curve])
    golden = np.array([p["golden_kl"] for p in curve])
    i_min = int(golden.argmin())
    rise = float(golden[-1] / golden[i_min] - 1.0)
    falling = bool(proxy[-1] < proxy[i_min]) if i_min < len(curve) - 1 else False
    early = (steps >= 2) & (steps <= max(EARLY * steps[-1], steps[min(3, len(steps) - 1)]))
    b, a = np.polyfit(np.log(steps[early]), np.log(np.maximum(proxy[early], 1e-12)), 1)
    departure = float(math.log(max(proxy[-1], 1e-12)) - (a + b * math.log(steps[-1])))
    return {"golden_min_step": int(steps[i_min]), "golden_min": float(golden[i_min]),
            "golden_final": float(golden[-1]), "golden_rise": rise,
            "proxy_at_golden_min": float(proxy[i_min]), "proxy_final": float(proxy[-1]),
            "proxy_falling": falling, "hacking": bool(rise > RISE and falling),
            "power_law": {"exponent": float(b), "log_coefficient": float(a),
                          "fit_points": int(early.sum()), "departure": departure}}  # fmt: skip


def _plot(curves: dict[str, list[dict[str, float]]], summary: dict[str, Any], path: Path) -> Path:
    """Proxy and golden KL against steps, log-log, one panel per regime, with the power law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..fileio import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (regime, c) in zip(axes, curves.items()):
        steps = np.array([p["step"] for p in c], dtype=np.float64)
        ax.plot(steps, [p["proxy_kl"] for p in c], "o-", label="proxy KL(teacher || student)")
        ax.plot(steps, [p["golden_kl"] for p in c], "s-", label="golden KL(oracle || student)")
        fit = summary[regime]["power_law"]
        ax.plot(steps, np.exp(fit["log_coefficient"]) * steps ** fit["exponent"], "k:", lw=1,
                label=f"power law fitted to early proxy (b = {fit['exponent']:.2f})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("student step")
        ax.set_title(f"{regime} distillation")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out distance (nats/token)")
    fig.tight_layout()
    return save_figure(fig, path)
