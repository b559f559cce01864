"""Judges and self-improvement on a BabyAI mission family (issue #21 item 4), on CPU.

1. A tokenizer trained on the family's text (expert episodes, judge and setter prompts).
2. The agent: a nano model behaviour-cloned on noisy scripted-expert episodes (BabyAI's bot,
   run through the engine by `ScriptedPolicy`, so the demonstrations are episodes exactly like
   the agent's own), kept weak on purpose: few demonstrations, so self-improvement has room.
3. Judge data: the agent's own episodes (temperature 1) on goals the task setter proposes,
   labelled by MiniGrid's reward; training scenes and held-out scenes are disjoint.
4. Judges: LLM judges (transcript + final view) and VLM judges (final rendered frame) at two
   sizes each, random init; agreement with the env's success on held-out episodes before and
   after `train_judge` (a yes/no classifier fine-tune on the training episodes).
5. Self-improvement from the same agent with each trained judge and with the oracle (the env's
   own reward as the judge: the ceiling of the judge's part): `rounds` rounds of propose ->
   attempt -> judge -> filtered behaviour cloning; held-out success (greedy, MiniGrid's own
   missions and reward) per round.

Output: one JSON line per measurement, markdown tables, OUT/<run>/selfimprove.{json,png},
OUT/summary.json.

    python bench/selfimprove.py --out runs/bench-selfimprove
    python bench/selfimprove.py --smoke --out /tmp/si-smoke      # minutes -> seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import geode  # noqa: E402
from geode.agents.envs.minigrid import MiniGridEnv, expert_action, mission_family  # noqa: E402
from geode.agents.judge import (  # noqa: E402
    LLM_PROMPT,
    VLM_PROMPT,
    LLMJudge,
    VLMJudge,
    judge_agreement,
    train_judge,
)
from geode.agents.loop import ScriptedPolicy  # noqa: E402
from geode.agents.selfimprove import (  # noqa: E402
    FINAL_VIEW,
    SETTER_PROMPT,
    GoalEnv,
    SelfImproveConfig,
    TaskSetter,
    attempts,
    behaviour_clone,
    heldout,
    self_improve,
)
from geode.chat import render  # noqa: E402
from geode.fileio import atomic_write_bytes  # noqa: E402

MOVES = ("left", "right", "forward")
SIZES = {  # decoder shapes (nano-1m cut down); "small" is the agent's
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=32),
    "large": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, head_dim=32),
}  # fmt: skip
VISION = {  # SigLIP towers over the 32 px frame: nano-vision, and a wider, deeper one
    "small": {},
    "large": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4),
}


def emit(**row: Any) -> None:
    print(json.dumps(row), flush=True)


def build(vocab: int, size: str, seed: int, tok: Any = None, vision: bool = False) -> Any:
    """A random Gemma 3 decoder of SIZES[size] (+ a SigLIP tower of VISION[size])."""
    from geode.model.vision import get_vision_preset

    cfg = geode.get_preset("nano-1m").replace(
        **SIZES[size], vocab_size=vocab, num_key_value_heads=1, query_pre_attn_scalar=32,
        sliding_window=512, max_position_embeddings=1024,
        layer_types=["sliding_attention", "full_attention"] * (SIZES[size]["num_hidden_layers"] // 2),
    )  # fmt: skip
    vc = None
    if vision:
        sp = tok.special_ids
        vc = get_vision_preset("nano-vision").replace(
            image_token_index=sp["<image_soft_token>"], boi_token_index=sp["<start_of_image>"],
            eoi_token_index=sp["<end_of_image>"], **VISION[size],
        )  # fmt: skip
    return geode.build_model(cfg, seed=seed, vision=vc)


def scripted_texts(cfg: SelfImproveConfig, n: int) -> list[str]:
    """Chat text of expert episodes (no engine) and the prompts, for the tokenizer."""
    texts = ["yes no", SETTER_PROMPT.format(objects="red ball, blue key")]
    for env_id, seed in mission_family(cfg.family, "train", n):
        env = MiniGridEnv(env_id, seed, max_turns=cfg.max_turns)
        msgs = env.reset()
        for _ in range(cfg.max_turns):
            a = expert_action(env)
            new, _, done = env.step(a)
            msgs.append({"role": "assistant", "content": a})
            if done:
                break
            msgs += new
        texts.append(render(msgs, add_generation_prompt=False))
        texts.append(LLM_PROMPT.format(goal=env.mission, transcript="user: x\nassistant: left"))
        texts.append(FINAL_VIEW.format(view="You see: nothing"))
        texts.append(VLM_PROMPT.format(goal=env.mission))
    return texts


def expert_episodes(engine: Any, envs: list[Any], noise: float, seed: int) -> list[Any]:
    """One episode per env driven by BabyAI's bot through the engine (a random move with
    probability `noise` at each turn: the demonstrations show recoveries)."""
    rng = random.Random(seed)
    out = []
    for env in envs:

        def act(_history: str, env: Any = env) -> str:
            return rng.choice(MOVES) if rng.random() < noise else expert_action(env)

        policy = ScriptedPolicy(engine.tokenizer, act)
        eps, _ = attempts(engine, [env], policy.sampling(max_new_tokens=8))
        out += eps
    return out


def oracle(episodes: list[Any]) -> list[float]:
    """The env's own success as the judge (the ceiling of the judge's part)."""
    return [1.0 if e.success else 0.0 for e in episodes]


def judge_data(engine: Any, setter: TaskSetter, cfg: SelfImproveConfig, split: str,
               start: int, n: int, seed: int) -> list[Any]:  # fmt: skip
    """The agent's episodes (temperature 1) on setter goals of n scenes of `split`."""
    from geode.infer import SamplingParams

    specs = mission_family(cfg.family, split, start + n)[start:]
    scenes = [MiniGridEnv(i, s, max_turns=cfg.max_turns) for i, s in specs]
    goals = setter.propose(scenes, seed=seed)
    kw = dict(max_turns=cfg.max_turns, record=True, tile_size=cfg.tile_size)
    envs = [GoalEnv(s.env_id, s.seed, g, **kw) for s, g in zip(scenes, goals, strict=True)]
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=seed)
    return attempts(engine, envs, sampling)[1]


def table(rows: list[list[Any]], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench-selfimprove")
    p.add_argument("--family", default="goto-local")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--goals", type=int, default=32)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--heldout", type=int, default=96)
    p.add_argument("--max-turns", type=int, default=10)
    p.add_argument("--demos", type=int, default=48)
    p.add_argument("--demo-noise", type=float, default=0.3)
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--judge-train", type=int, default=256)
    p.add_argument("--judge-heldout", type=int, default=128)
    p.add_argument("--judge-steps", type=int, default=80)
    p.add_argument("--judge-max-len", type=int, default=256, help="LLM judge prompt tokens")
    p.add_argument("--judges", default="llm-small,llm-large,vlm-small,vlm-large")
    p.add_argument("--loops", default="oracle,llm-small,vlm-small")
    p.add_argument("--bc-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a wiring check")
    a = p.parse_args(argv)
    if a.smoke:
        a.rounds, a.goals, a.samples, a.heldout, a.demos, a.sft_steps = 1, 4, 2, 4, 4, 2
        a.judge_train, a.judge_heldout, a.judge_steps, a.bc_steps = 8, 8, 2, 2
        a.judges, a.loops = "llm-small,vlm-small", "oracle,llm-small"
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from geode.infer import Engine
    from geode.tokenizer import train_tokenizer

    cfg = SelfImproveConfig(
        family=a.family, rounds=a.rounds, goals=a.goals, samples=a.samples, heldout=a.heldout,
        max_turns=a.max_turns, bc_steps=a.bc_steps, seed=a.seed,
    )  # fmt: skip
    t0 = time.perf_counter()
    tok = train_tokenizer(texts=scripted_texts(cfg, 200), vocab_size=400,
                          out=out / "tokenizer.model", num_threads=1)  # fmt: skip
    # ---- the agent: behaviour cloning on few noisy expert episodes (train seeds past the
    # rounds' scenes and the judge's data)
    agent = build(len(tok), "small", a.seed)
    engine = Engine(agent, tok, max_batch=max(cfg.goals * cfg.samples, cfg.heldout, 64),
                    optimize=False, seed=a.seed)  # fmt: skip
    first = cfg.rounds * cfg.goals + a.judge_train
    specs = mission_family(cfg.family, "train", first + a.demos)[first:]
    demo_envs = [MiniGridEnv(i, s, max_turns=cfg.max_turns) for i, s in specs]
    demos = expert_episodes(engine, demo_envs, a.demo_noise, a.seed)
    demo_success = float(np.mean([e.info["success"] for e in demo_envs]))
    losses = behaviour_clone(agent, demos, tok.pad_id, steps=a.sft_steps, lr=3e-3,
                             batch_size=16, seed=a.seed)  # fmt: skip
    held0 = heldout(engine, cfg)["success"]
    emit(stage="agent", demos=len(demos), demo_success=demo_success, sft_steps=a.sft_steps,
         sft_loss=[losses[0], losses[-1]] if losses else None, heldout_success=held0,
         seconds=time.perf_counter() - t0)  # fmt: skip
    # ---- judge data: the agent's own episodes on proposed goals
    setter = TaskSetter(agent, tok)
    t1 = time.perf_counter()
    train_eps = judge_data(engine, setter, cfg, "train", cfg.rounds * cfg.goals, a.judge_train,
                           a.seed + 1)  # fmt: skip
    held_eps = judge_data(engine, setter, cfg, "heldout", cfg.heldout, a.judge_heldout,
                          a.seed + 2)  # fmt: skip
    pos = [float(np.mean([e.success for e in eps])) for eps in (train_eps, held_eps)]
    emit(stage="judge-data", train=len(train_eps), heldout=len(held_eps),
         train_success=pos[0], heldout_success=pos[1], seconds=time.perf_counter() - t1)  # fmt: skip
    # ---- judges: agreement before / after training, two sizes each
    judges: dict[str, Any] = {"oracle": oracle}
    rows = []
    for name in [j for j in a.judges.split(",") if j]:
        kind, size = name.split("-")
        t2 = time.perf_counter()
        model = build(len(tok), size, a.seed + 11, tok, vision=kind == "vlm")
        if kind == "vlm":
            judge = VLMJudge(model, tok, batch_size=32)
        else:  # the last turns and the final view decide; earlier turns are cut
            judge = LLMJudge(model, tok, batch_size=32, max_len=a.judge_max_len)
        before = judge_agreement(judge, held_eps)
        jl = train_judge(judge, train_eps, steps=a.judge_steps, lr=1e-3, batch_size=16,
                         seed=a.seed)  # fmt: skip
        after = judge_agreement(judge, held_eps)
        params = sum(p.numel() for p in model.parameters())
        secs = time.perf_counter() - t2
        emit(stage="judge", judge=name, params=params, before=before, after=after,
             loss=[jl[0], jl[-1]], seconds=secs)  # fmt: skip
        judges[name] = judge
        for when, m in (("untrained", before), (f"trained {a.judge_steps} steps", after)):
            rows.append([name, f"{params / 1e6:.2f}M", when, f"{m['precision']:.3f}",
                         f"{m['recall']:.3f}", f"{m['accuracy']:.3f}", f"{m['f1']:.3f}",
                         f"{m['mean_p_yes']:.3f}"])  # fmt: skip
    agree_table = table(rows, ["judge", "params", "state", "precision", "recall", "accuracy",
                               "F1", "mean P(yes)"])  # fmt: skip
    # ---- self-improvement from the same agent with each judge
    start_state = copy.deepcopy(agent.state_dict())
    loops: dict[str, Any] = {}
    for name in [j for j in a.loops.split(",") if j]:
        agent.load_state_dict(start_state)
        t3 = time.perf_counter()
        summary = self_improve(agent, tok, judges[name], TaskSetter(agent, tok), cfg,
                               out / f"loop-{name}", progress=True)  # fmt: skip
        loops[name] = summary
        emit(stage="loop", judge=name, heldout_success=summary["heldout_success"],
             rounds=[{k: r[k] for k in ("true_success", "judged_success", "kept")}
                     | {"precision": r["judge"]["precision"], "recall": r["judge"]["recall"]}
                     for r in summary["rounds"]], seconds=time.perf_counter() - t3)  # fmt: skip
    rows = []
    for name, s in loops.items():
        for r in s["rounds"]:
            j = r["judge"]
            rows.append([name, r["round"], f"{r['true_success']:.3f}",
                         f"{r['judged_success']:.3f}", r["kept"], f"{j['precision']:.3f}",
                         f"{j['recall']:.3f}", f"{s['heldout_success'][r['round'] - 1]:.3f}",
                         f"{r['heldout_success']:.3f}"])  # fmt: skip
    loop_table = table(rows, ["judge", "round", "success on proposed goals", "judged success",
                              "kept", "judge precision", "judge recall", "held-out before",
                              "held-out after"])  # fmt: skip
    result = {"args": vars(a), "agent_heldout_success": held0, "judge_data_success": pos,
              "loops": {k: v["heldout_success"] for k, v in loops.items()},
              "seconds": time.perf_counter() - t0}  # fmt: skip
    atomic_write_bytes(out / "summary.json", json.dumps(result, indent=1).encode())
    print("\n" + agree_table + "\n\n" + loop_table)
    print(f"\ntotal {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
