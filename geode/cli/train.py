"""`geode train` and `geode distill`: run a training recipe (also under torchrun)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

_FMT = argparse.RawDescriptionHelpFormatter

_TRAIN_EXAMPLE = """\
example:
  geode train recipes/train/nano.toml --out runs/nano
  geode train recipes/train/nano.toml --out runs/nano --resume --max-steps 400
  geode train recipes/train/nano.toml --out runs/nano --resume --allow-fresh
  geode train recipes/train/nano.toml --set optim.lr=1e-3 --set train.precision=bfloat16
  torchrun --nproc-per-node 2 -m geode train recipes/train/nano.toml --out runs/nano-ddp
  torchrun --nproc-per-node 2 --max-restarts 2 -m geode train recipes/train/nano.toml \\
      --set train.parallel=fsdp --set fault.replica_every=20
"""

_DISTILL_EXAMPLE = """\
example:
  geode train recipes/train/teacher.toml --out runs/teacher
  geode distill recipes/train/distill.toml --out runs/distill \\
      --set distill.teacher=runs/teacher/model
  geode distill recipes/train/distill.toml --no-control --set distill.mode=offline \\
      --set distill.cache=runs/distill-cache
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="training recipe, a TOML file (see docs/training.md)")
    p.add_argument("--out", help="output directory (default: the recipe's `out`)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest good checkpoint in --out; if none is valid, exit non-zero "
        "naming every bad file",
    )
    p.add_argument(
        "--allow-fresh",
        action="store_true",
        help="with --resume (or a torchrun restart): start again from step 0 when no checkpoint "
        "or replica is valid; the abandoned run's checkpoints and metrics are moved aside",
    )
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set optim.lr=1e-3 (repeatable; TOML values)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `train` and `distill` verbs."""
    p = sub.add_parser(
        "train",
        help="pretrain a model from a recipe (single process or torchrun DDP/FSDP2)",
        description="Train a model from a TOML recipe: AdamW with warmup+cosine/WSD, gradient "
        "accumulation and clipping, bf16 autocast, held-out eval, metrics JSONL + curves PNG, "
        "exact resume from checkpoints, SDC checks and in-memory replicas under torchrun; "
        "the final model is written to OUT/model in the Hugging Face layout.",
        epilog=_TRAIN_EXAMPLE,
        formatter_class=_FMT,
    )
    _common(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser(
        "distill",
        help="distil a student from a teacher (Gemma 3: sampled top-K logits), vs a control",
        description="Gemma 3 distillation: per token, K teacher logits are sampled by "
        "teacher probability, renormalised, and the student is trained with cross-entropy to "
        "them. Online (teacher in-process) or offline (precomputed target cache). Trains the "
        "student into OUT/student and the same student from scratch into OUT/control, then "
        "compares their held-out losses (OUT/comparison.json, OUT/comparison.png).",
        epilog=_DISTILL_EXAMPLE,
        formatter_class=_FMT,
    )
    _common(p)
    p.add_argument("--no-control", action="store_true", help="skip the from-scratch control")
    p.set_defaults(func=run_distill)


def _overrides(args: argparse.Namespace) -> list[str]:
    items = list(args.overrides)
    if args.max_steps is not None:
        items.append(f"train.max_steps={args.max_steps}")
    return items


def run_train(args: argparse.Namespace) -> int:
    """Run `geode train`."""
    return _run(args, distill=False)


def run_distill(args: argparse.Namespace) -> int:
    """Run `geode distill`."""
    return _run(args, distill=True)


def _run(args: argparse.Namespace, distill: bool) -> int:
    from ..recipe import RecipeError
    from ..train.fault import ReplicaDirError, SDCError
    from ..train.memory import BatchMemoryError
    from ..train.recipe import load_train_recipe
    from ..train.run import distill as run_distill_
    from ..train.run import train as run_train_
    from ..train.state import ResumeError
    from . import CLIError

    try:
        recipe = load_train_recipe(args.recipe, _overrides(args))
    except RecipeError as e:
        raise CLIError(str(e)) from None
    progress = False if args.no_progress else None
    with run_guard((RecipeError, BatchMemoryError, ResumeError, SDCError, ReplicaDirError)):
        if distill:
            control = False if args.no_control else None
            run_distill_(
                recipe, args.out, args.resume, progress, control=control,
                allow_fresh=args.allow_fresh,
            )  # fmt: skip
        else:
            run_train_(recipe, args.out, args.resume, progress, allow_fresh=args.allow_fresh)
    return 0


@contextlib.contextmanager
def run_guard(errors: tuple[type[Exception], ...]) -> Iterator[None]:
    """A training run's user errors (`errors`) become CLIError (exit 2, no traceback); a torchrun
    process group is destroyed at the end, after a barrier when the run finished."""
    import torch.distributed as dist

    from . import CLIError

    ok = False
    try:
        yield
        ok = True
    except errors as e:
        raise CLIError(str(e)) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()
