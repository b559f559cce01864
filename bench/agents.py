"""Agent-loop episode throughput: the loop on the engine (KV of earlier turns reused, env
messages and tool results appended as forced tokens) vs the same loop re-prefilling the
whole conversation every turn.

Drivers (same model, same envs, same policy, one engine each, no prefix cache unless named):

  kv         `geode.agents.loop.run_agent`: one engine request per episode; after a model turn
             the env's messages go in as forced tokens (engine.append) on the same KV cache.
  reprefill  the same episodes, but every model turn is a fresh engine request on the whole
             token history (prompt + every earlier turn and env message): the conversation is
             prefilled again each turn, as a stateless server does. Turns are closed by the
             rollout's own `_end_turn` (the env steps, the forced ids of its messages), so the
             two drivers differ only in how the history reaches the model.
  reprefill+prefix  reprefill on an engine with the prefix cache (geode.infer.prefix): the
             history's KV blocks are found again instead of recomputed.

Policy: `--policy expert` (default) drives both with the envs' scripted experts through
`geode.agents.loop.ScriptedPolicy` (greedy over logits where only the script's next token is
left: the model's forward passes are all real, the turns are the expert's; each request gets
its episode's script by its prompt, so the episodes run batched); `--policy greedy`
takes the model's own greedy turns (a model that ends its turns, e.g. an agent SFT
checkpoint via --model). Either way the transcripts and token ids of both drivers must be
equal (checked; the run fails otherwise).

Envs: MiniGrid text missions (`--grid-family`, the BabyAI bot's actions) and the calculator
task family in plan-act-verify mode (plan, tool call, answer: 3 turns). Output: one JSON line
per (env, driver) with the median of `--reps` interleaved runs, then a markdown table with
episodes/min, sampled tokens/s, token positions the model ran (prefill, decode and forced
tokens: the work re-prefilling repeats) and the speed-up of kv over each driver.

    python bench/agents.py                      # nano-20m-shaped random model, 2 threads
    python bench/agents.py --real               # the real Gemma 3 270M (f32, bench/real.py)
    python bench/agents.py --smoke              # tiny, one rep (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import geode  # noqa: E402
from geode.agents.loop import ScriptedPolicy, run_agent  # noqa: E402
from geode.post.env import spawn  # noqa: E402
from geode.post.rollout import Episode, _end_turn, _Live, _prompt_ids  # noqa: E402
from geode.tokenizer import END_OF_TURN  # noqa: E402


class _Forced:
    """Stands for the engine in `_end_turn`: keeps the env's forced ids instead of appending."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def append(self, _rid: str, ids: list[int]) -> None:
        self.ids = list(ids)


class _After:
    """A logits processor seeing the history before this request's output (the re-prefilled
    turns), so a ScriptedPolicy keyed on the whole episode works on fresh requests."""

    def __init__(self, inner: Any, history: list[int]):
        self.inner, self.history = inner, history

    def __call__(self, out: list[int], logits: torch.Tensor) -> torch.Tensor:
        return self.inner([*self.history, *out], logits)


def scripted_engine(scripts: dict[tuple[int, ...], ScriptedPolicy], **kw: Any) -> Any:
    """An Engine whose requests get their episode's ScriptedPolicy, found by the episode's
    prompt at the start of the request's ids (what comes after it is the history)."""
    from geode.infer import Engine

    class Scripted(Engine):
        def add_request(self, request: Any) -> str:
            ids = list(request.prompt)
            for key, policy in scripts.items():
                if tuple(ids[: len(key)]) == key:
                    proc = _After(policy, ids[len(key) :])
                    request.params = dataclasses.replace(request.params, logits_processors=(proc,))
                    break
            else:
                raise ValueError("scripted_engine: a request of no known episode")
            return super().add_request(request)

    return Scripted(**kw)


def reprefill(engine: Any, envs: list[Any], sampling: Any) -> list[Episode]:
    """The episodes of `envs` with every model turn a fresh request on the whole history."""
    from geode.infer import Request

    tok = engine.tokenizer
    eot = tok.special_ids.get(END_OF_TURN)
    every = []
    for g, env in enumerate(envs):
        e = spawn(env)
        messages = e.reset()
        ids = _prompt_ids(tok, messages, getattr(e, "tools", None))
        ep = Episode(list(ids), [], [], [], [], [], False, g, list(messages),
                     dict(getattr(e, "meta", {}) or {}))  # fmt: skip
        every.append(_Live(e, ep))
    turn_params = dataclasses.replace(sampling, ignore_eos=False, logprobs=0)
    live = list(every)
    while live:
        reqs = []
        for st in live:
            ep = st.episode
            reqs.append(Request(ep.prompt_ids + ep.token_ids, params=turn_params))
        still = []
        for st, r in zip(live, engine.generate(reqs), strict=True):
            ep = st.episode
            st.turn_start = len(ep.token_ids)
            ep.token_ids += r.token_ids
            ep.sampled_mask += [1] * len(r.token_ids)
            ended = bool(r.token_ids) and r.token_ids[-1] in engine.eos_token_ids
            forced = _Forced()
            if not _end_turn(forced, tok, st, "-", truncated=not ended, eot=eot):
                ep.token_ids += forced.ids
                ep.sampled_mask += [0] * len(forced.ids)
                still.append(st)
        live = still
    return [st.episode for st in every]


def kv(engine: Any, envs: list[Any], sampling: Any) -> list[Episode]:
    """The episodes on the agent loop (run_agent: KV reuse, forced tokens)."""
    return [r.episode for r in run_agent(engine, envs, sampling=sampling)]


DRIVERS = {"kv": kv, "reprefill": reprefill, "reprefill+prefix": reprefill}


# ---------------------------------------------------------------------- envs and experts
def grid_items(family: str, n: int, max_turns: int) -> list[tuple[Any, list[str]]]:
    """(MiniGridEnv, the BabyAI bot's actions) of `n` held-out missions of the family."""
    from geode.agents.envs.minigrid import MiniGridEnv, expert_action, mission_family

    out, seen = [], set()
    for env_id, seed in mission_family(family, "heldout", 4 * n):
        env = MiniGridEnv(env_id, seed, max_turns=max_turns)
        first = str(spawn(env).reset())
        if first in seen:  # each episode's prompt finds its expert script (scripted_engine)
            continue
        seen.add(first)
        play, turns, done = spawn(env), [], False
        play.reset()
        while not done:
            turns.append(expert_action(play))
            _, _, done = play.step(turns[-1])
        out.append((env, turns))
        if len(out) == n:
            break
    return out


def calc_items(n: int) -> list[tuple[Any, list[dict]]]:
    """(ToolEnv in plan-act-verify mode, the expert's turns) of `n` held-out calc tasks."""
    from geode.agents import tasks

    return [
        (tasks.make_env(t, mode="plan-act-verify"), tasks.expert(t, "plan-act-verify"))
        for t in tasks.generate("calc", n, seed=0, split="heldout")
    ]


def scripts_of(tok: Any, items: list[tuple[Any, list]]) -> dict[tuple[int, ...], Any]:
    """Each episode's prompt ids -> the ScriptedPolicy of its expert turns."""
    out = {}
    for env, turns in items:
        e = spawn(env)
        key = tuple(_prompt_ids(tok, e.reset(), getattr(e, "tools", None)))
        out[key] = ScriptedPolicy(tok, turns)
    return out


def same(a: list[Episode], b: list[Episode]) -> bool:
    """Equal transcripts and token ids (prompt, turns, forced env tokens)."""
    return all(
        x.messages == y.messages and x.prompt_ids == y.prompt_ids and x.token_ids == y.token_ids
        and x.sampled_mask == y.sampled_mask for x, y in zip(a, b, strict=True)
    )  # fmt: skip


# ---------------------------------------------------------------------- model
def random_model(items: dict[str, list], preset: str, vocab: int) -> tuple[Any, Any]:
    """A random model of `preset` with a tokenizer trained on the expert episodes' text."""
    from geode.chat import render
    from geode.tokenizer import train_tokenizer

    texts = []
    for its in items.values():
        for env, turns in its:
            msgs = spawn(env).reset()
            if turns and isinstance(turns[0], dict):  # the expert's messages (tool results too)
                texts.append(render(msgs + turns, tools=getattr(env, "tools", None)))
            else:
                texts.append(render(msgs, tools=getattr(env, "tools", None)) + " ".join(turns))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(texts=texts * 8, vocab_size=vocab, out=tmp, num_threads=1)
    cfg = dataclasses.replace(geode.get_preset(preset), vocab_size=len(tok))
    return geode.build_model(cfg, seed=0), tok


def main() -> None:
    """Run the drivers on both env kinds, print JSON lines and the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a checkpoint directory (default: a random --preset model)")
    p.add_argument("--preset", default="nano-20m")
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer pieces (random model)")
    p.add_argument("--policy", choices=("expert", "greedy"), default="expert")
    p.add_argument("--episodes", type=int, default=6, help="episodes per env kind")
    p.add_argument("--grid-family", default="goto-local")
    p.add_argument("--max-turns", type=int, default=12, help="MiniGrid turns at most")
    p.add_argument("--max-new-tokens", type=int, default=96, help="per model turn")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefix-cache-mb", type=int, default=256)
    p.add_argument("--drivers", default="kv,reprefill,reprefill+prefix")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 episodes, 1 rep")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.vocab, args.episodes, args.reps = "nano-1m", 400, 2, 1
        args.grid_family, args.max_turns = "goto-obj-s4", 4
    torch.set_num_threads(args.threads)
    from geode.infer import Engine, SamplingParams

    items = {
        f"minigrid:{args.grid_family}": grid_items(args.grid_family, args.episodes,
                                                   args.max_turns),
        "calc (plan-act-verify)": calc_items(args.episodes),
    }  # fmt: skip
    if args.model:
        from geode.infer.load import load_for_inference

        model, tok = load_for_inference(args.model, None, require_tokenizer=True)
        name = Path(args.model).name
    else:
        model, tok = random_model(items, args.preset, args.vocab)
        name = f"random {args.preset}"
    params = sum(p.numel() for p in model.parameters())
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    print(f"# {name} ({params / 1e6:.1f}M parameters), policy {args.policy}, {args.threads} "
          f"threads, {args.episodes} episodes per env, {args.reps} reps", flush=True)  # fmt: skip
    rows = []
    for kind, its in items.items():
        scripts = scripts_of(tok, its) if args.policy == "expert" else None
        engines = {}
        for d in args.drivers.split(","):
            kw = dict(model=model, tokenizer=tok, max_batch=max(8, args.episodes), seed=0,
                      prefix_cache_bytes=args.prefix_cache_mb << 20 if "prefix" in d else 0)  # fmt: skip
            engines[d] = scripted_engine(scripts, **kw) if scripts else Engine(**kw)
        times: dict[str, list[float]] = {d: [] for d in engines}
        positions: dict[str, int] = {}  # token positions the model ran (prefill, decode, forced)
        ref: list[Episode] | None = None
        eps: dict[str, list[Episode]] = {}
        for _ in range(args.reps + 1):  # the first round warms up (not timed)
            for d, engine in engines.items():
                if engine.prefix is not None:  # nothing cached from an earlier round
                    engine.prefix.clear()
                before = engine.stats["positions_run"]
                t0 = time.perf_counter()
                eps[d] = DRIVERS[d](engine, [env for env, _ in its], sampling)
                times[d].append(time.perf_counter() - t0)
                positions[d] = engine.stats["positions_run"] - before
                ref = ref or eps[d]
                if not same(ref, eps[d]):
                    raise SystemExit(f"{kind}: {d}'s episodes differ from {next(iter(engines))}'s")
        for d in engines:
            wall = statistics.median(times[d][1:])
            sampled = sum(sum(e.sampled_mask) for e in eps[d])
            turns = sum(len(e.turns) for e in eps[d])
            row = {"env": kind, "driver": d, "episodes": len(eps[d]), "turns": turns,
                   "sampled_tokens": sampled, "positions_run": positions[d], "seconds": wall,
                   "episodes_per_min": 60 * len(eps[d]) / wall, "tokens_per_s": sampled / wall}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| env | driver | episodes/min | sampled tok/s | turns | positions run | kv speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["env"] == r["env"] and x["driver"] == "kv")
        ratio = base["episodes_per_min"] / r["episodes_per_min"]
        print(f"| {r['env']} | {r['driver']} | {r['episodes_per_min']:.1f} | "
              f"{r['tokens_per_s']:.1f} | {r['turns']} | {r['positions_run']} | "
              f"{ratio:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
