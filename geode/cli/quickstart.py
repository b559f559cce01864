"""`geode quickstart`: the whole lifecycle in miniature (geode.quickstart), REPORT.md at the end."""

from __future__ import annotations

import argparse

_EXAMPLE = """\
example:
  geode quickstart                                   # runs/quickstart, 15 minutes
  geode quickstart --out demo_out --budget-minutes 10
  geode quickstart --out demo_out --resume           # continue after a failed stage
  geode convert gemma-3-270m-q4_k_m.gguf gemma-3-270m/
  geode quickstart --base gemma-3-270m/ --out qbase  # post-train an existing model
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `quickstart` verb."""
    p = sub.add_parser(
        "quickstart",
        help="the lifecycle in miniature: data, tokenizer, teacher, distilled student, SFT, "
        "WARM, DPO, GRPO, SCoRe, REPORT.md",
        description="Run every stage of the Gemini/Gemma lifecycle at nano scale within a time "
        "budget: data (task family + stdlib corpus, dedup, decontamination), tokenizer, teacher "
        "pretraining, distillation with a from-scratch control, SFT, reward models + WARM, DPO, "
        "RL with verifiable rewards (GRPO, thinking budget), SCoRe; held-out evaluation after "
        "each stage; OUT/REPORT.md with the table and plots, OUT/final in the HF layout. Each "
        "stage writes OUT/<stage>/done.json; --resume skips finished stages. See "
        "docs/quickstart.md.",
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/quickstart", help="output directory (runs/quickstart)")
    p.add_argument(
        "--budget-minutes", type=float, default=15.0, help="wall-clock budget of all stages (15)"
    )
    p.add_argument("--resume", action="store_true", help="skip the stages already done in --out")
    p.add_argument(
        "--base",
        metavar="PATH",
        default="",
        help="post-train this HF-layout checkpoint with its tokenizer (skips pretraining and "
        "distillation; LoRA adapters, merged on export, above 50M parameters)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    """Run `geode quickstart`; a failed stage exits 1 naming it."""
    from ..quickstart import QuickstartError, main_exit, next_commands, run

    try:
        run(args.out, args.budget_minutes, args.resume, args.base,
            False if args.no_progress else None)  # fmt: skip
    except QuickstartError as e:
        return main_exit(e)
    print(f"\nNext:\n{next_commands(args.out)}")
    return 0
