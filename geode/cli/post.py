"""`geode sft` (and the other post-training verbs): run a post-training recipe.

Each verb is thin: parse, load the recipe (`--set` overrides), call the library function
inside `_guard()` (user errors become `geode: error: ...`, exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

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
    from ..chat import ChatFormatError
    from ..data import DataError
    from ..recipe import RecipeError
    from ..train.memory import BatchMemoryError
    from ..train.reference import IncompatibleReference
    from ..train.state import ResumeError
    from .train import run_guard

    with run_guard((RecipeError, DataError, ChatFormatError, IncompatibleReference, ResumeError,
                    BatchMemoryError)):  # fmt: skip
        yield


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
    _post_common(
        p,
        "chat-formatted synthetic task problems",
        "training conversations",
        "--set optim.lr=1e-4",
    )
    p.set_defaults(func=run_sft)
    _register_preference(sub)
    _register_rl(sub)


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


# ---- reward models, WARM, DPO / IPO / SLiC, OAIF (geode.post) -----------------------------

_REWARD_EXAMPLE = """\
example:
  geode reward --make-data runs/prefs --noise 0.2     # generated preference pairs (20% flipped)
  geode reward recipes/post/reward-nano.toml --out runs/rm --set model.init=runs/sft/model
  geode reward recipes/post/reward-nano.toml --warm 4 --out runs/warm   # WARM: 4 RMs, averaged
"""
_DPO_EXAMPLE = """\
example:
  geode dpo recipes/post/dpo-nano.toml --out runs/dpo --set model.init=runs/sft/model
  geode dpo recipes/post/dpo-nano.toml --set objective.options.loss=ipo   # IPO (or slic)
  geode dpo recipes/post/oaif-nano.toml --out runs/oaif   # [online]: OAIF with a judge
"""


_PAIRS_DATA = "generated preference pairs: correct-and-concise over wrong or rambling"


def _post_common(p: argparse.ArgumentParser, data: str, n_help: str, set_example: str) -> None:
    """Arguments every post-training verb takes: RECIPE, --out/--resume/--max-steps/--set,
    --no-progress, and --make-data DIR (`data`: what it writes) with --n/--seed."""
    p.add_argument("recipe", nargs="?", help="recipe, a TOML file (recipes/post/)")
    p.add_argument("--out", help="output directory (default: the recipe's `out`)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest good checkpoint in --out"
    )
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a recipe field, e.g. {set_example} (repeatable; TOML values)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--make-data",
        metavar="DIR",
        help=f"write DIR/train.jsonl and DIR/heldout.jsonl ({data}) and exit",
    )
    p.add_argument("--n", type=int, default=2000, help=f"--make-data: {n_help}")
    p.add_argument("--seed", type=int, default=0, help="--make-data: generator seed")


def _register_preference(sub: argparse._SubParsersAction) -> None:
    """Add the `reward` and `dpo` verbs."""
    p = sub.add_parser(
        "reward",
        help="train a reward model on preference pairs (Bradley-Terry); --warm M: WARM",
        description="Train a reward model (the decoder plus a scalar head on the last token) "
        "on preference pairs with the Bradley-Terry loss; held-out pair accuracy is logged and "
        "OUT/model loads in transformers' Gemma3TextForSequenceClassification. With --warm M "
        "(or [warm] members) train M reward models from one init, diverse by data order, "
        "learning rate, dropout and init checkpoint, average their weights (WARM) and report "
        "every member's, the average's and the prediction ensemble's accuracy under each "
        "[warm] noise_levels rate (OUT/warm.json). See docs/post-training.md.",
        epilog=_REWARD_EXAMPLE,
        formatter_class=_FMT,
    )
    _post_common(p, _PAIRS_DATA, "training pairs", "--set objective.options.beta=0.2")
    p.add_argument("--noise", type=float, default=0.0, help="--make-data: flipped-label share")
    p.add_argument("--warm", type=int, metavar="M", help="WARM with M members")
    p.set_defaults(func=run_reward)
    p = sub.add_parser(
        "dpo",
        help="preference optimisation: DPO / IPO / SLiC offline, or OAIF with [online]",
        description="Optimise a policy on preference pairs against a frozen reference (the "
        "SFT model, model.init): DPO, IPO or SLiC ([objective.options] loss), reference "
        "log-probs computed once and cached in OUT/reference. With an [online] section: OAIF, "
        "each step the policy samples two answers per prompt and a judge (verifier, reward "
        "model incl. WARM, or a prompted LLM in-process or at an OpenAI-compatible URL) picks "
        "one. Ends with the policy against the starting one on held-out prompts (win rate, "
        "verified accuracy) in OUT/summary.json. See docs/post-training.md.",
        epilog=_DPO_EXAMPLE,
        formatter_class=_FMT,
    )
    _post_common(p, _PAIRS_DATA, "training pairs", "--set objective.options.beta=0.2")
    p.add_argument("--noise", type=float, default=0.0, help="--make-data: flipped-label share")
    p.set_defaults(func=run_dpo)


def _load_post(args: argparse.Namespace):
    from ..post.recipe import load_post_recipe
    from ..recipe import RecipeError
    from . import CLIError
    from .train import _overrides

    if not args.recipe:
        raise CLIError(f"geode {args.verb} needs a RECIPE (or --make-data DIR)")
    try:
        return load_post_recipe(args.recipe, _overrides(args))
    except RecipeError as e:
        raise CLIError(str(e)) from None


@contextlib.contextmanager
def _post_guard() -> Iterator[None]:
    """_guard, plus bad pair files."""
    from ..post.prefdata import PairError
    from . import CLIError

    with _guard():
        try:
            yield
        except PairError as e:
            raise CLIError(str(e)) from None


def _make_pairs(args: argparse.Namespace) -> int:
    from ..post.prefdata import EASY, make_pairs, write_jsonl

    root = Path(args.make_data)
    with _post_guard():
        write_jsonl(
            make_pairs(args.n, seed=args.seed, noise=args.noise, **EASY), root / "train.jsonl"
        )
        held = make_pairs(max(args.n // 10, 1), seed=args.seed, split="heldout", **EASY)
        write_jsonl(held, root / "heldout.jsonl")
    print(f"geode {args.verb}: wrote {root / 'train.jsonl'} and {root / 'heldout.jsonl'}")
    return 0


def run_reward(args: argparse.Namespace) -> int:
    """Run `geode reward` (WARM with --warm M or [warm] members)."""
    if args.make_data:
        return _make_pairs(args)
    import json

    from ..post.warm import train_reward, warm, warm_table

    recipe = _load_post(args)
    progress = False if args.no_progress else None
    with _post_guard():
        if args.warm is not None or recipe.warm.members:
            report = warm(recipe, args.out, args.warm, progress)
            print(warm_table(report))
        else:
            summary, _ = train_reward(recipe, args.out, args.resume, progress)
            print(json.dumps({k: summary.get(k) for k in ("heldout_accuracy", "model")}))
    return 0


def run_dpo(args: argparse.Namespace) -> int:
    """Run `geode dpo` (OAIF with an [online] section)."""
    if args.make_data:
        return _make_pairs(args)
    import json

    from ..post.dpo import dpo

    recipe = _load_post(args)
    with _post_guard():
        summary = dpo(recipe, args.out, args.resume, False if args.no_progress else None)
    print(
        json.dumps({"policy_vs_start": summary["policy_vs_start"], "judge": summary.get("judge")})
    )
    return 0


# ---- RL: GRPO and variants, WARP, SCoRe, CFG distillation (geode.post.rl) ------------------

_RL_EXAMPLE = """\
example:
  geode rl recipes/post/rl-nano.toml --out runs/rl --set model.init=runs/sft/model
  geode rl recipes/post/rl-nano.toml --set objective.options.loss_type=dapo --set rl.dynamic_sampling=true
  geode rl recipes/post/rl-nano.toml --set rl.estimator=rloo --set objective.options.beta=0.04
"""


def _register_rl(sub: argparse._SubParsersAction) -> None:
    """Add the `rl` verb."""
    p = sub.add_parser(
        "rl",
        help="RL with verifiable rewards (GRPO/DAPO/Dr.GRPO/GSPO, RLOO, REINFORCE); WARP, SCoRe, CFG",
        description="Train a policy with reinforcement learning on rollouts sampled by geode's "
        "engine on the live weights (a group of samples shares one prefill), scored by the "
        "[rl] rewards (task verifier, math-verify, unit tests, reward models, format / length / "
        "thinking terms) and updated through the policy-gradient objective ([objective] kind = "
        "'rl': loss_type grpo/bnpo/dr_grpo/dapo, clipping, GSPO, KL to a reference with beta > "
        "0). Logs generation / scoring / update time per step and ends with held-out accuracy "
        "before and after in OUT/summary.json. A recipe with [warp], [score] or [cfg] runs "
        "WARP, SCoRe or CFG distillation. See docs/post-training.md.",
        epilog=_RL_EXAMPLE,
        formatter_class=_FMT,
    )
    _post_common(p, "task prompts with answers", "training prompts", "--set rl.group_size=4")
    p.set_defaults(func=run_rl, noise=0.0)


def run_rl(args: argparse.Namespace) -> int:
    """Run `geode rl`."""
    import json

    if args.make_data:  # pair files: their `prompt` and `answer` are the RL prompts
        return _make_pairs(args)
    from ..post.rl import rl

    recipe = _load_post(args)
    with _post_guard():
        summary = rl(recipe, args.out, args.resume, False if args.no_progress else None)
    keys = ("heldout_accuracy_before", "heldout_accuracy_after", "mean_reward_mean",
            "mean_generation_s", "mean_scoring_s", "mean_update_s", "model")  # fmt: skip
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0
