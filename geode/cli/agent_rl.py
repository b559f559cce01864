"""`geode agent-rl RECIPE`: agentic RL (geode.agents.rl) — an optional demonstration-SFT step,
then multi-turn GRPO / RLOO over MiniGrid missions or tool-use tasks, held-out success
before / after in OUT/summary.json."""

from __future__ import annotations

import argparse

_EXAMPLE = """\
example:
  geode agent-rl recipes/agents/minigrid-rl.toml --out runs/agent-rl-minigrid
  geode agent-rl recipes/agents/tools-rl.toml --out runs/agent-rl-tools --set rl.group_size=4
  geode agent-rl recipes/agents/minigrid-rl.toml --set model.init=runs/my-policy/model --set agent.demos=0
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `agent-rl` verb."""
    p = sub.add_parser(
        "agent-rl",
        help="agentic RL: multi-turn GRPO/RLOO over MiniGrid missions and tool-use tasks",
        description="Train an agent with reinforcement learning on multi-turn episodes sampled "
        "by geode's engine ([rl]: group size, estimator, temperature; [objective] kind = 'rl'): "
        "the model's turns are sampled, observations and tool results are forced tokens "
        "(no loss on them), the reward is the environment's at the episode's end plus the "
        "[agent] shaping terms. With [agent] demos > 0 the policy is first trained from "
        "scratch: a tokenizer on the family's episode text and behaviour cloning of noisy "
        "scripted-expert episodes. Writes OUT/summary.json (held-out success greedy and avg@k "
        "before / after, per-step curves, step split rollout / judge / update) and "
        "OUT/curves.png. See docs/agents.md.",
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe, a TOML file (recipes/agents/)")
    p.add_argument("--out", help="output directory (default: the recipe's `out`)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest good checkpoint in --out"
    )
    p.add_argument("--max-steps", type=int, help="override train.max_steps (RL steps)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set agent.demo_noise=0.3 (repeatable; TOML values)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_agent_rl)


def run_agent_rl(args: argparse.Namespace) -> int:
    """Run `geode agent-rl`."""
    import json

    from ..agents.rl import agent_rl, load_agent_recipe
    from ..recipe import RecipeError
    from . import CLIError
    from .post import _guard
    from .train import _overrides

    try:
        recipe = load_agent_recipe(args.recipe, _overrides(args))
    except RecipeError as e:
        raise CLIError(str(e)) from None
    with _guard():
        summary = agent_rl(recipe, args.out, args.resume, False if args.no_progress else None)
    keys = ("family", "heldout_success_before", "heldout_success_after",
            "heldout_avg_at_k_before", "heldout_avg_at_k_after", "mean_success",
            "mean_generation_s", "mean_scoring_s", "mean_update_s", "model")  # fmt: skip
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0
