"""The agent loop on the real engine, driven by scripted policies (ScriptedPolicy forces the
script's tokens through the engine's sampler): every tool end to end, tool faults reported to
the model while the episode goes on, budgets, an env that crashes, a tool output larger than
the context, the KV of earlier turns reused, plan-act-verify, the tool-use task families and
`geode agent` on a tiny saved model."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time

import pytest

import geode
from geode.agents import tasks as tt
from geode.agents.loop import (
    INSTRUCTIONS,
    ScriptedPolicy,
    ToolEnv,
    run_agent,
    turn_text,
)
from geode.agents.tools import (
    Toolbox,
    calculator_tool,
    file_tools,
    mcp_tools,
    python_tool,
    search_tool,
    tool,
)
from geode.chat import ToolCall, render
from tests.agents.test_tools import write_mcp_server


def call_turn(*calls: tuple[str, dict]) -> str:
    """A model turn making these tool calls."""
    msg = {"role": "assistant", "content": "",
           "tool_calls": [ToolCall(n, a, f"call_{i}").to_openai() for i, (n, a) in enumerate(calls)]}  # fmt: skip
    return turn_text(msg)


def responses(history: str) -> list[dict]:
    """The tool responses in the conversation so far (as the model reads them)."""
    parts = history.split("<start_of_tool_response>")[1:]
    return [json.loads(p.split("<end_of_tool_response>")[0]) for p in parts]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random model with a tokenizer trained on agent transcripts (HF layout)."""
    from geode.config import get_preset
    from geode.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("agent-model")
    texts = []
    for fam in tt.FAMILIES:
        for task in tt.generate(fam, 12, seed=3):
            for mode in ("act", "plan-act-verify"):
                d = tt.demonstration(task, mode)
                texts.append(render(d["messages"], add_generation_prompt=False, tools=d["tools"]))
    rng = random.Random(0)
    texts += [" ".join(str(rng.randint(0, 10**7)) for _ in range(12)) for _ in range(50)]
    tok = train_tokenizer(texts=texts, vocab_size=500, out=root / "tok", num_threads=1)
    cfg = dataclasses.replace(get_preset("nano-1m"), vocab_size=tok.vocab_size,
                              num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                              max_position_embeddings=4096, layer_types=None)  # fmt: skip
    path = root / "model"
    geode.save_model(geode.build_model(cfg, seed=0), path,
                     files={"tokenizer.model": root / "tok" / "tokenizer.model"})  # fmt: skip
    return path


@pytest.fixture(scope="module")
def engine(saved_model):
    from geode.infer import Engine

    tok = geode.load_tokenizer(saved_model)
    return Engine(geode.load_model(saved_model), tok, max_batch=8, optimize=False, seed=0)


def drive(engine, envs, policy, max_new_tokens: int = 200, group_size: int = 1):
    """run_agent with the scripted policy."""
    sp = ScriptedPolicy(engine.tokenizer, policy)
    return run_agent(engine, envs, sampling=sp.sampling(max_new_tokens=max_new_tokens),
                     group_size=group_size)  # fmt: skip


def test_scripted_model_drives_every_tool_through_the_loop_on_one_kv_cache(engine, tmp_path):
    from geode.sandbox import Limits

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "notes.txt").write_text("meet at noon")
    corpus = ["Paris is the capital of France.", "The Nile is a river.", "Cats purr."]
    lim = Limits(timeout=5, cpu_seconds=5, memory_bytes=256 << 20, total_memory_bytes=256 << 20)
    box = Toolbox([calculator_tool(), python_tool(ws, limits=lim), *file_tools(ws),
                   search_tool(corpus, k=1), *mcp_tools(write_mcp_server(tmp_path))])  # fmt: skip
    try:
        script = [
            call_turn(
                ("calculator", {"expression": "2**64 + 1"}),
                ("python", {"code": "print(open('notes.txt').read().upper())"}),
            ),  # fmt: skip
            call_turn(("write_file", {"path": "out/a.txt", "content": "written"})),
            call_turn(("read_file", {"path": "out/a.txt"}), ("list_files", {})),
            call_turn(("search", {"query": "capital of France"})),
            call_turn(("add", {"a": 2, "b": 40}), ("shout", {"text": "done"})),
        ]

        def policy(history: str) -> str:  # the final answer is made of what the tools returned
            got = responses(history)
            if len(script) > history.count("<start_of_turn>") // 2:
                return script[history.count("<start_of_turn>") // 2]
            return "Results: " + " | ".join(r["content"] for r in got) + "\n#### 42"

        expected = ["18446744073709551617", "MEET AT NOON", "wrote 7 bytes to out/a.txt",
                    "written", '["notes.txt", "out/a.txt"]', "Paris is the capital", "42",
                    "DONE!"]  # fmt: skip

        def verify(answer: str) -> float:
            return float(all(e in answer for e in expected) and answer.endswith("#### 42"))

        env = ToolEnv("Use every tool.", box, verify, max_turns=8)
        before = dict(engine.stats)
        [r] = drive(engine, [env], policy)
    finally:
        box.close()
    assert r.success and r.reward == 1.0, r.transcript
    assert r.info["steps"] == 6 and r.info["tool_calls"] == 8 and r.info["tool_errors"] == 0
    assert r.info["error"] is None and (ws / "out" / "a.txt").read_text() == "written"
    roles = [m["role"] for m in r.transcript]
    assert roles == ["system", "user"] + ["assistant", "tool", "tool", "assistant", "tool",
                                          "assistant", "tool", "tool", "assistant", "tool",
                                          "assistant", "tool", "tool", "assistant"]  # fmt: skip
    assert r.transcript[0]["content"] == INSTRUCTIONS["act"]
    assert r.transcript[2]["tool_calls"][1]["function"]["name"] == "python"
    results = [m["content"] for m in r.transcript if m["role"] == "tool"]
    assert len(results) == len(expected) and all(e in c for e, c in zip(expected, results))
    # one KV cache for the whole episode: the prompt (with the tool declarations) prefilled
    # once, every later position run exactly once (sampled or forced), nothing re-prefilled
    ep = r.episode
    tok = engine.tokenizer
    assert ep.prompt_ids == tok.encode(render(env.reset(), tools=box.declarations()))
    stats = {k: engine.stats[k] - before[k] for k in before}
    assert stats["prefill_tokens"] == len(ep.prompt_ids)
    assert stats["positions_run"] == len(ep.prompt_ids) + len(ep.token_ids) - 1
    assert len(ep.turns) == 6 and sum(ep.sampled_mask) == sum(b - a for a, b in ep.turns)
    (_, a1), (b0, _) = ep.turns[0], ep.turns[1]
    forced = tok.decode(ep.token_ids[a1:b0], skip_special=False)
    assert ep.sampled_mask[a1:b0] == [0] * (b0 - a1)
    assert "18446744073709551617" in forced and forced.endswith("<start_of_turn>model\n")
    reprefill = sum(len(ep.prompt_ids) + a for a, _ in ep.turns)  # what re-prefilling would run
    assert stats["prefill_tokens"] < reprefill / 4


def test_tool_faults_are_reported_to_the_model_and_the_episode_goes_on(engine):
    def boom(x: str) -> str:
        raise RuntimeError("kaboom")

    def hang() -> str:
        time.sleep(30)
        return "never"

    def garbage() -> object:
        return {1, 2}

    box = Toolbox([tool(boom), tool(hang, timeout=0.3), tool(garbage), calculator_tool()])
    script = [
        call_turn(
            ("boom", {"x": "a"}),
            ("hang", {}),
            ("garbage", {}),
            ("nosuch", {}),
            ("calculator", {"expr": "1"}),
        ),  # fmt: skip
        '<start_of_tool_call>{"name": "calculator", "arguments": {"expression": <end_of_tool_call>',
        call_turn(("calculator", {"expression": "3 + 4"})),
        "It is 7.\n#### 7",
    ]
    env = ToolEnv("What is 3 + 4?", box, lambda a: float(a.endswith("#### 7")))
    t0 = time.perf_counter()
    [r] = drive(engine, [env], script)
    assert time.perf_counter() - t0 < 20
    assert r.success and r.info["steps"] == 4 and r.info["tool_calls"] == 6
    assert r.info["tool_errors"] == 6  # five faulty calls and one malformed call
    tools = [m["content"] for m in r.transcript if m["role"] == "tool"]
    assert tools[0] == "error: tool 'boom' raised RuntimeError: kaboom"
    assert tools[1] == "error: tool 'hang' timed out after 0.3 s (abandoned)"
    assert tools[2].startswith("error: tool 'garbage' returned a set, which is not JSON")
    assert tools[3].startswith("error: unknown tool 'nosuch'")
    assert tools[4].startswith("error: bad arguments for tool 'calculator'")
    assert tools[5] == "7"
    feedback = r.transcript[-4]
    assert feedback["role"] == "user" and feedback["content"].startswith(
        "error: tool call 1: invalid JSON"
    )


def test_budgets_end_the_episode_and_name_themselves(engine):
    def slow() -> str:
        time.sleep(0.2)
        return "tick"

    box = Toolbox([tool(slow)])
    forever = call_turn(("slow", {}))
    by_turns = ToolEnv("Loop.", box, max_turns=3)
    by_time = ToolEnv("Loop.", box, max_turns=8, tool_seconds=0.5)
    r_turns, r_time = drive(engine, [by_turns, by_time], lambda h: forever)
    assert (
        r_turns.info["error"] == "turn budget: 3 model turns used (max_turns) before a final answer"
    )
    assert r_turns.info["steps"] == 3 and not r_turns.success
    assert r_time.info["error"] == "tool-time budget: 0.5 s of tool time used (tool_seconds)"
    assert r_time.info["tool_calls"] == 3 and r_time.info["tool_seconds"] >= 0.5
    [r_tokens] = drive(engine, [ToolEnv("Talk.", box)], lambda h: "word " * 50, max_new_tokens=12)
    assert r_tokens.info["error"] == "token budget: a model turn reached max_new_tokens=12"
    assert r_tokens.episode.truncated and r_tokens.info["tokens"] == 12


def test_a_crashing_env_and_an_output_over_the_context_fail_only_their_episode(engine):
    class CrashEnv(ToolEnv):
        def step(self, message):
            if self.info["steps"] >= 1:
                raise RuntimeError("library fault")
            return super().step(message)

    rng = random.Random(0)
    flood_text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(30_000))

    def flood() -> str:
        return flood_text

    cut = Toolbox([tool(flood)])  # the default cut at 2000 chars
    uncut = Toolbox([tool(flood)], max_output_chars=100_000)
    envs = [
        CrashEnv("Flood.", cut, lambda a: 1.0),
        ToolEnv("Flood.", uncut, lambda a: 1.0),
        ToolEnv("Flood.", cut, lambda a: float(a == "#### 1")),
    ]
    script = [call_turn(("flood", {})), "#### 1"]
    crash, over, ok = drive(engine, envs, script)
    assert crash.info["error"] == "CrashEnv.step raised RuntimeError: library fault"
    assert crash.episode.meta["error"] == crash.info["error"] and crash.reward == 0.0
    assert over.info["error"].startswith("ToolEnv's messages cannot be appended: append: ")
    assert "more than max_seq_len 4096" in over.info["error"] and not over.success
    assert ok.success and ok.info["steps"] == 2 and ok.info["error"] is None
    [shown] = [m["content"] for m in ok.transcript if m["role"] == "tool"]
    k = len(shown) - len("\n[output cut: 30000 chars, the first 1234 shown]")
    assert (
        len(shown) == 2000
        and shown == flood_text[:k] + f"\n[output cut: 30000 chars, the first {k} shown]"
    )
    assert not engine.has_unfinished()


@pytest.mark.parametrize("family", tt.FAMILIES)
def test_task_family_experts_solve_their_tasks_in_plan_act_verify(engine, family):
    task = tt.generate(family, 1, seed=7, split="heldout")[0]
    env = tt.make_env(task, mode="plan-act-verify", max_turns=6)
    demo = tt.expert(task, "plan-act-verify")
    turns = [m for m in demo if m["role"] == "assistant"]
    wrong = {"role": "assistant", "content": "#### 1" if family == "calc" else
             f"```python\ndef {task.entry_point}(x):\n    return None\n```"}  # fmt: skip
    script = [*turns[:-1], wrong, turns[-1]]  # a wrong answer first, then the right one
    [r] = drive(engine, [env], script, max_new_tokens=300)
    assert r.success and r.reward == 1.0, r.transcript
    assert r.info["plan"] == turns[0]["content"] and r.info["revisions"] == 1
    verdict = r.transcript[-2]
    assert verdict["role"] == "user" and verdict["content"].startswith(
        "The verifier rejected the answer (reward 0.00)"
    )
    if family == "code":  # the sandbox's status is the verifier's feedback
        assert "failed" in verdict["content"]
    tool_msgs = [m for m in r.transcript if m["role"] == "tool"]
    expected_tool = [m for m in demo if m["role"] == "tool"]
    assert [m["content"] for m in tool_msgs] == [m["content"] for m in expected_tool]
    # the env renders what the demonstration (SFT data) renders, up to the revision
    d = tt.demonstration(task, "plan-act-verify")
    n = len(d["messages"]) - 1
    assert r.transcript[:n] == d["messages"][:n]
    # act mode: the expert's conversation as the script (its tool messages are skipped)
    [r] = drive(engine, [tt.make_env(task)], tt.expert(task), max_new_tokens=300)
    assert r.success and r.transcript == tt.demonstration(task)["messages"]


def test_task_families_splits_are_disjoint_and_verifiers_exact():
    for family in tt.FAMILIES:
        train = tt.generate(family, 150, seed=0)
        held = tt.generate(family, 25, seed=1, split="heldout")
        assert {t.split for t in train} == {"train"} and {t.split for t in held} == {"heldout"}
        assert not {t.canonical for t in train} & {t.canonical for t in held}
        assert len({t.canonical for t in train}) == 150
        assert tt.generate(family, 5, seed=0) == train[:5]  # deterministic prefix
    calc = tt.generate("calc", 20, seed=0)
    for t in calc:
        assert t.answer == eval(t.solution) and len(str(t.answer)) >= 7
        v = tt.verifier(t)
        assert v(f"#### {t.answer}") == 1.0 and v(f"#### {t.answer + 1}") == 0.0
    code = tt.generate("code", 2, seed=0)
    for t in code:
        assert tt.code_check(t, f"```python\n{t.solution}```") == (1.0, "passed")
        reward, status = tt.code_check(t, f"def {t.entry_point}(*a):\n    return 0\n")
        assert reward == 0.0 and status.startswith("failed")
    with pytest.raises(ValueError, match="family must be one of"):
        tt.generate("chess", 1)


def test_tool_env_checks_its_arguments():
    box = Toolbox([calculator_tool()])
    with pytest.raises(ValueError, match="mode must be one of"):
        ToolEnv("x", box, mode="react")
    with pytest.raises(ValueError, match="max_turns=1 is too few for mode 'plan-act-verify'"):
        ToolEnv("x", box, mode="plan-act-verify", max_turns=1)
    with pytest.raises(ValueError, match="toolbox must be a Toolbox"):
        ToolEnv("x", [calculator_tool()])
    env = ToolEnv([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}],
                  box, instructions="Use tools.")  # fmt: skip
    assert env.reset()[0] == {"role": "system", "content": "Use tools.\n\nBe brief."}


def test_geode_agent_cli_runs_on_a_tiny_saved_model(saved_model, tmp_path, capsys):
    from geode.cli import main

    out = tmp_path / "run.jsonl"
    argv = ["agent", str(saved_model), "--task", "What is 6 * 7?", "--tools", "calculator,files",
            "--workspace", str(tmp_path / "ws"), "--max-turns", "2", "--max-new-tokens", "8",
            "--transcript", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[user]\nWhat is 6 * 7?" in printed and "steps " in printed
    row = json.loads(out.read_text())
    assert row["messages"][1] == {"role": "user", "content": "What is 6 * 7?"}
    assert row["info"]["tokens"] > 0 and row["mode"] == "act"
    assert main(["agent", str(saved_model), "--task", "x", "--tools", "shell"]) == 2
    assert "unknown tool(s) ['shell']" in capsys.readouterr().err
    assert main(["agent", str(saved_model), "--task", "x", "--tools", "search"]) == 2
    assert "--tools search needs --corpus" in capsys.readouterr().err
    server = " ".join(write_mcp_server(tmp_path))
    argv = ["agent", str(saved_model), "--task", "Add 2 and 3.", "--tools", "", "--mcp", server,
            "--max-turns", "1", "--max-new-tokens", "4", "--transcript", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "tools: add, shout, broken" in capsys.readouterr().out
    assert [t["function"]["name"] for t in json.loads(out.read_text())["tools"]] == [
        "add", "shout", "broken"]  # fmt: skip
    bad_mcp = f"{sys.executable} -c 'raise SystemExit(1)'"
    assert main(["agent", str(saved_model), "--task", "x", "--mcp", bad_mcp]) == 2
    assert "cannot connect" in capsys.readouterr().err
