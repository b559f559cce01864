"""`geode reproduce NAME`: a seed paper's claim at nano scale (geode.reproduce), REPORT.md."""

from __future__ import annotations

import argparse

_EXAMPLE = """\
example:
  geode reproduce distill-vs-scratch                  # runs/reproduce/distill-vs-scratch, 5 minutes
  geode reproduce local-global --budget-minutes 10 --seed 1
  geode reproduce teacher-hacking --out runs/th
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `reproduce` verb."""
    from ..reproduce import DEFAULT_BUDGET_MINUTES, REGISTRY

    names = ", ".join(REGISTRY)
    p = sub.add_parser(
        "reproduce",
        help="reproduce a paper claim at nano scale: teacher-hacking, local-global, "
        "distill-vs-scratch (REPORT.md, plot, results.json)",
        description="Run one of the seed papers' claims on the built-in data (the task family "
        "and the local Python stdlib) within a time budget and write OUT/REPORT.md (claim, "
        "setup, measured table, verdict), the PNG plot(s) and OUT/results.json. Names: "
        + names
        + ". See docs/reproduce.md.",
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help=f"the claim: one of {names}")
    p.add_argument("--out", default=None, help="output directory (runs/reproduce/NAME)")
    p.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES,
                   help=f"wall-clock budget ({DEFAULT_BUDGET_MINUTES:g}; under 1: a smoke test)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of model init and data order (0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_reproduce)


def run_reproduce(args: argparse.Namespace) -> int:
    """Run `geode reproduce NAME`; an unknown name or a failed run exits 1 with the reason."""
    import sys

    from ..reproduce import ReproduceError, reproduce

    try:
        rec = reproduce(args.name, args.out, args.budget_minutes, args.seed,
                        False if args.no_progress else None)  # fmt: skip
    except ReproduceError as e:
        print(f"geode reproduce: error: {e}", file=sys.stderr)
        return 1
    out = args.out or f"runs/reproduce/{args.name}"
    print(f"\n{args.name}: {'the claim shows' if rec['holds'] else 'the claim does NOT show'} "
          f"at this scale. {rec['verdict']}\nreport: {out}/REPORT.md")  # fmt: skip
    return 0
