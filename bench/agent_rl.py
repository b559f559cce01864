"""Agentic RL step time, split: rollout (the model's turns on the engine) / env + judge (the
envs' steps: MiniGrid actions, tool calls, the verifier that gives the reward) / update.

For each family (recipes/agents/minigrid-rl.toml, recipes/agents/tools-rl.toml) the recipe's
RL step runs on a policy (`--minigrid-policy DIR` / `--tools-policy DIR`: e.g. the SFT'd
OUT/sft/model of a `geode agent-rl` run; else a short demonstration SFT of `--sft-steps` under
~/.cache/geode-bench/agent-rl-*) for --warmup + --reps steps through the same code as
`geode agent-rl` (geode.agents.rl.agent_source + geode.post.rl.policy_trainer). Per step:
`generation_s` (rollout; of which `env_s` inside env.step), `scoring_s` (batch rewards: none
here, the env's reward is computed in its step), `update_s` (forward, backward, optimizer);
rollout tokens/s = sampled tokens / (generation_s - env_s). Medians over --reps steps; one
JSON line per family, then a markdown table.

    python bench/agent_rl.py                       # both families, 1 warm-up + 3 timed steps
    python bench/agent_rl.py --families minigrid --minigrid-policy runs/agent-rl-minigrid/sft/model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "agents"
CACHE = Path(os.environ.get("GEODE_BENCH_CACHE", Path.home() / ".cache" / "geode-bench"))


def policy(family: str, given: str | None, sft_steps: int, threads: int) -> Path:
    """The policy directory: given, else a cached short demonstration SFT of the recipe."""
    from geode.agents.rl import demonstration_sft, load_agent_recipe

    if given:
        return Path(given)
    recipe = load_agent_recipe(RECIPES / f"{family}-rl.toml",
                               [f"agent.sft_steps={sft_steps}", f"train.threads={threads}",
                                "train.progress=false"])  # fmt: skip
    return demonstration_sft(recipe, CACHE / f"agent-rl-{family}-sft{sft_steps}", progress=False)


def run(family: str, init: Path, args: argparse.Namespace) -> dict:
    """warmup + reps RL steps of the family's recipe on `init`; medians of the timed steps."""
    from geode.agents.rl import agent_source, get_family, load_agent_recipe
    from geode.post.rl import policy_trainer
    from geode.tokenizer import load_tokenizer

    steps = args.warmup + args.reps
    recipe = load_agent_recipe(RECIPES / f"{family}-rl.toml", [
        f"model.init='{init}'", "model.overrides={}", "agent.demos=0", f"train.max_steps={steps}",
        f"train.threads={args.threads}", "train.progress=false", "checkpoint.export=false",
    ])  # fmt: skip
    a = recipe.agent
    tasks = get_family(family).tasks("train", a.train_tasks, a.seed, a.options)
    tok = load_tokenizer(init / "tokenizer.model")
    with tempfile.TemporaryDirectory() as out:
        source = agent_source(recipe, tok, tasks)
        trainer, source, _ = policy_trainer(recipe, out, source=source, progress=False)
        trainer.fit()
        recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if r.get("kind") == "train"][args.warmup :]

    def med(key: str) -> float:
        return statistics.median(float(r.get(key) or 0.0) for r in timed)

    sampled = [r["completion_length"] * r["episodes"] for r in timed]
    model_s = [r["generation_s"] - r["env_s"] for r in timed]
    return {
        "bench": "agent-rl-step", "family": family, "policy": str(init),
        "rows": recipe.batch.global_batch_size, "group_size": recipe.rl.group_size,
        "step_s": med("step_s"), "rollout_s": statistics.median(model_s), "env_s": med("env_s"),
        "scoring_s": med("scoring_s"), "update_s": med("update_s"),
        "rollout_tok_per_s": statistics.median(n / s for n, s in zip(sampled, model_s)),
        "sampled_tokens": statistics.median(sampled), "turns": med("turns"),
        "success": med("success"), "reps": len(timed), "threads": args.threads,
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    """The markdown table of the rows."""
    head = ("| family | rows | step s | rollout s | env + judge s | scoring s | update s | "
            "rollout tok/s | sampled tokens | turns / episode | success |")  # fmt: skip
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['rows']} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | "
            f"{r['env_s']:.3f} | {r['scoring_s']:.4f} | {r['update_s']:.2f} | "
            f"{r['rollout_tok_per_s']:.0f} | {r['sampled_tokens']:.0f} | {r['turns']:.2f} | "
            f"{r['success']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run each family, print JSON lines and the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="minigrid,tools")
    p.add_argument("--minigrid-policy")
    p.add_argument("--tools-policy")
    p.add_argument("--sft-steps", type=int, default=40, help="SFT steps of a policy made here")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for family in args.families.split(","):
        given = getattr(args, f"{family}_policy")
        row = run(family, policy(family, given, args.sft_steps, args.threads), args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print()
    print(f"load average {os.getloadavg()[0]:.1f}, {args.threads} threads")
    print(table(rows))


if __name__ == "__main__":
    main()
