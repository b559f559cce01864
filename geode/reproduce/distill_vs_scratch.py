"""`geode reproduce distill-vs-scratch`: Gemma 3's distillation against the same student
trained from scratch at equal tokens.

Gemma 3 Technical Report (arXiv:2503.19786) §2.2: every Gemma 3 model is trained by
distillation, the student learning the teacher's distribution on 256 logits sampled per token
(geode.train.distill). Here: a teacher pretrained on the built-in corpus, then a smaller
student distilled from it with sampled top-K logits and the same student from scratch on the
same tokens (geode.train.run.distill with its control); held-out loss curves on one plot.
"""

from __future__ import annotations

from typing import Any

from .common import Setup, corpus, heldout_curve, lm_recipe, md_table, step_count, write_report

CLAIM = ("A student distilled from a larger teacher (sampled top-K teacher logits, Gemma 3 "
         "§2.2) reaches a lower held-out loss than the same student trained from scratch on "
         "the same tokens.")  # fmt: skip


def run(setup: Setup) -> dict[str, Any]:
    """Teacher, then distilled student and from-scratch control; REPORT.md, plot, results.json."""
    from .. import quickstart as q
    from ..train.recipe import load_train_recipe
    from ..train.run import distill, train

    setup.stage(1, 4, "corpus (task family + stdlib), tokenizer, packing")
    ctx = corpus(setup)
    vocab = ctx.done["tokenizer"]["vocab_size"]
    t_idx, s_idx = (1, 0) if setup.tiny else (2, 1)
    t_shape, s_shape = q._shape(*q.SHAPES[t_idx]), q._shape(*q.SHAPES[s_idx])
    if setup.tiny:
        t_steps, s_steps = 4, 4
    else:
        t_steps = step_count(setup, 0.5, t_shape, vocab, lo=20)
        fwd = q._measure_step(t_shape, vocab, forward_only=True)
        s_steps = step_count(setup, 0.35, s_shape, vocab, runs=2, lo=10, extra_s=fwd)
        s_steps = min(s_steps, t_steps // 2)  # the teacher saw 2x the tokens (as the quickstart)

    setup.stage(2, 4, f"teacher {q.SHAPES[t_idx][:2]} (hidden, layers): {t_steps} steps")
    t_dir = setup.out / "teacher"
    teacher = train(load_train_recipe(lm_recipe(ctx, setup, "teacher", t_shape, t_steps, t_dir)),
                    t_dir, progress=setup.progress)  # fmt: skip

    setup.stage(
        3, 4, f"student {q.SHAPES[s_idx][:2]} distilled + from scratch: {s_steps} steps each"
    )
    s_dir = setup.out / "student"
    recipe = lm_recipe(
        ctx, setup, "student", s_shape, s_steps, s_dir, evals=8 if not setup.tiny else 2
    )
    recipe["distill"] = {"teacher": teacher["model"], "top_k": min(128, vocab),
                         "sampling": "sample", "control": True}  # fmt: skip
    distill(load_train_recipe(recipe), s_dir, progress=setup.progress)

    setup.stage(4, 4, "report")
    student, control = heldout_curve(s_dir / "student"), heldout_curve(s_dir / "control")
    tokens_per_step = q.BATCH * q.SEQ_LEN
    steps = sorted(set(student) & set(control))
    curve = [{"step": s, "tokens": s * tokens_per_step, "distilled": student[s],
              "scratch": control[s], "difference": student[s] - control[s]} for s in steps]  # fmt: skip
    final = curve[-1]
    below = sum(r["difference"] < 0 for r in curve)
    holds = final["difference"] < 0
    plot = _plot(curve, teacher.get("eval_loss"), setup.out / "distill_vs_scratch.png")
    table = md_table(["step", "tokens", "distilled held-out loss", "from-scratch held-out loss",
                      "distilled - scratch"],
                     [[r["step"], r["tokens"], r["distilled"], r["scratch"], r["difference"]]
                      for r in curve])  # fmt: skip
    table += (f"\n\nTeacher ({q.SHAPES[t_idx][0]}x{q.SHAPES[t_idx][1]}, {t_steps} steps): "
              f"held-out loss {teacher.get('eval_loss', float('nan')):.4f}.")  # fmt: skip
    verdict = (f"At {final['tokens']:,} training tokens the distilled student's held-out loss is "
               f"{final['distilled']:.4f} against {final['scratch']:.4f} from scratch "
               f"({final['difference']:+.4f} nats/token); it is below the control at {below} of "
               f"{len(curve)} evaluation points.")  # fmt: skip
    if not holds:
        verdict += (" At this budget the teacher is too weak (or the run too short) for its soft "
                    "targets to beat the data's own next tokens.")  # fmt: skip
    setup_text = (f"Teacher: nano Gemma 3 shape hidden {q.SHAPES[t_idx][0]}, "
                  f"{q.SHAPES[t_idx][1]} layers, {t_steps} steps on the corpus. Student: hidden "
                  f"{q.SHAPES[s_idx][0]}, {q.SHAPES[s_idx][1]} layers, {s_steps} steps of "
                  f"{q.BATCH}x{q.SEQ_LEN} tokens, distilled with K = {min(128, vocab)} sampled "
                  "teacher logits per token (`geode.train.run.distill`), and the same student "
                  "and data order with the plain next-token loss (the control). Held-out: the "
                  "task family's held-out split.")  # fmt: skip
    results = {"teacher": {"steps": t_steps, "heldout_loss": teacher.get("eval_loss"),
                           "hidden_size": q.SHAPES[t_idx][0], "layers": q.SHAPES[t_idx][1]},
               "student": {"steps": s_steps, "hidden_size": q.SHAPES[s_idx][0],
                           "layers": q.SHAPES[s_idx][1], "top_k": min(128, vocab)},
               "tokens_per_step": tokens_per_step, "curve": curve,
               "final": {"distilled": final["distilled"], "scratch": final["scratch"],
                         "difference": final["difference"]},
               "distilled_below_at": below}  # fmt: skip
    return write_report(setup, "distilled student vs from scratch at equal tokens", CLAIM,
                        setup_text, table, verdict, holds, [plot], results)  # fmt: skip


def _plot(curve: list[dict[str, Any]], teacher_loss: float | None, path: Any) -> Any:
    """Held-out loss of the distilled student and the control against training tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4))
    tokens = [r["tokens"] for r in curve]
    ax.plot(tokens, [r["distilled"] for r in curve], "o-", label="distilled (top-K teacher logits)")
    ax.plot(tokens, [r["scratch"] for r in curve], "s-", label="from scratch (control)")
    if teacher_loss is not None:
        ax.axhline(teacher_loss, color="gray", ls="--", lw=1, label="teacher (final)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("distillation vs from scratch at equal tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
