"""`geode sft` (and the other post-training verbs): run a post-training recipe.

Each verb is thin: parse, load the recipe (`--set` overrides), call the library function
inside `_guard()` (user errors become `geode: error: ...`, exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

_FMT = argparse.RawDescriptionHelpFormatter

_SFT_EXAMPLE = """\
example:
  geode sft --make-data runs/sft-data                  # chat JSONL from the synthetic task family
  geode sft recipes/post/sft-nano.toml --out runs/sft --set model.init=runs/nano/model
  geode sft recipes/post/sft-nano-lora.toml --out runs/sft-lora   # LoRA: OUT/adapter + merged OUT/model
"""


def _common(p: argparse.ArgumentParser) -> None:
    """RECIPE, --out, --resume, --max-steps, --set KEY=VALUE, --no-progress."""
    from .train import _common as train_common

    train_common(p)


def _load(args: argparse.Namespace):
    """The recipe of `args` with its overrides (a RecipeError becomes a CLIError)."""
    from ..recipe import RecipeError
    from ..train.recipe import load_train_recipe
    from . import CLIError
    from .train import _overrides

    try:
        return load_train_recipe(args.recipe, _overrides(args))
    except RecipeError as e:
        raise CLIError(str(e)) from None


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Map user errors (recipe, data, reference, resume, memory) to CLIError; end torchrun."""
    import torch.distributed as dist

    from ..chat import ChatFormatError
    from ..data import DataError
    from ..recipe import RecipeError
    from ..train.memory import BatchMemoryError
    from ..train.reference import IncompatibleReference
    from ..train.state import ResumeError
    from . import CLIError

    ok = False
    try:
        yield
        ok = True
    except (RecipeError, DataError, ChatFormatError, IncompatibleReference, ResumeError,
            BatchMemoryError) as e:  # fmt: skip
        raise CLIError(str(e)) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `sft` verb."""
    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on chat JSONL (full or LoRA), loss on assistant tokens",
        description='Fine-tune a model on conversations (chat JSONL: one {"messages": [...], '
        '"tools": [...]} per line, rendered with geode\'s chat format). The loss covers the '
        "assistant's tokens only ([objective.options] tool_calls = true adds its tool calls); "
        "whole conversations are packed into rows with per-conversation attention. With a "
        "[lora] section only LoRA adapters train (peft); OUT/adapter holds them in peft's "
        "layout and OUT/model the merged model. See docs/post-training.md.",
        epilog=_SFT_EXAMPLE,
        formatter_class=_FMT,
    )
    p.add_argument("recipe", nargs="?", help="SFT recipe, a TOML file (recipes/post/sft-*.toml)")
    p.add_argument("--out", help="output directory (default: the recipe's `out`)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest good checkpoint in --out"
    )
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set optim.lr=1e-4 (repeatable; TOML values)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--make-data",
        metavar="DIR",
        help="write DIR/train.jsonl and DIR/heldout.jsonl (chat-formatted synthetic task "
        "problems) and exit",
    )
    p.add_argument("--n", type=int, default=2000, help="--make-data: training conversations")
    p.add_argument("--seed", type=int, default=0, help="--make-data: generator seed")
    p.set_defaults(func=run_sft)


def run_sft(args: argparse.Namespace) -> int:
    """Run `geode sft`."""
    from . import CLIError

    if args.make_data:
        from ..train.sft import write_task_data

        with _guard():
            paths = write_task_data(args.make_data, args.n, max(args.n // 10, 1), args.seed)
        print(f"geode sft: wrote {paths['train']} and {paths['heldout']}")
        return 0
    if not args.recipe:
        raise CLIError("geode sft needs a RECIPE (or --make-data DIR)")
    from ..train.sft import sft

    recipe = _load(args)
    with _guard():
        sft(recipe, args.out, args.resume, False if args.no_progress else None)
    return 0
