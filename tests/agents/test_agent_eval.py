"""Agent evaluation (`geode eval agent-*`): the client-side tool-call loop against an endpoint
(geode.agents.remote), the eval tasks' records, metrics, transcripts and GIFs, and greedy
parity of the in-process engine and `geode serve` on a tiny model trained on the episodes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from geode.eval import TaskConfig
from tests.eval.test_engine import geode_server  # noqa: F401 - serves this module's tiny_ckpt

MATH = TaskConfig(limit=2, options={"max_turns": 3})


def _demonstrations() -> list[dict]:
    """The expert episodes (calculator call, result, answer) of the first two held-out
    agent-math documents, from the task's own envs: the trained model meets these prompts."""
    from geode.agents import tasks
    from geode.eval.tasks import get_task

    convs = []
    math = get_task("agent-math", MATH)
    for doc in math.load():
        env = math.make_env(doc)
        convs.append({"messages": env.reset() + tasks.expert(doc["task"]), "tools": env.tools})
    return convs


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """(Here: the agent model, which `geode_server` serves.) A 1-layer model with a tokenizer of its own, trained until it replays the expert
    episodes greedily (the tool call with its id, <end_of_turn>, the answer)."""
    import geode
    from geode.chat import render
    from geode.tokenizer import train_tokenizer
    from geode.train.sft import encode_conversation

    path = tmp_path_factory.mktemp("agent-ckpt")
    convs = _demonstrations()
    texts = [render(c["messages"], tools=c.get("tools")) for c in convs]
    tok = train_tokenizer(texts=texts * 4, vocab_size=400, out=path, num_threads=1)
    cfg = dataclasses.replace(
        geode.get_preset("nano-1m"), vocab_size=len(tok), max_position_embeddings=1024,
        num_hidden_layers=1, layer_types=None, hidden_size=64, intermediate_size=128,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
    )  # fmt: skip
    model = geode.build_model(cfg, seed=0)
    enc = [encode_conversation(tok, c, tool_calls=True) for c in convs]
    width = max(len(e.ids) for e in enc)
    ids = torch.zeros(len(enc), width, dtype=torch.long)  # (B, T)
    trained = torch.zeros(len(enc), width, dtype=torch.bool)  # (B, T)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        trained[i, : len(e.ids)] = torch.tensor(e.trained)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    try:
        for _ in range(300):
            logits = model(ids[:, :-1]).float()  # (B, T-1, V)
            mask = trained[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[mask], ids[:, 1:][mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 2e-2:
                break
    finally:
        torch.set_num_threads(threads)
    geode.save_model(model, path, files={"tokenizer.model": path / "tokenizer.model"})
    return path


def _samples(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_greedy_episodes_in_process_and_through_geode_serve_are_the_same(
    tiny_ckpt,
    geode_server,  # noqa: F811
    tmp_path,
):
    from geode.eval import EndpointBackend, EngineBackend, evaluate

    engine = EngineBackend.from_path(str(tiny_ckpt), batch_size=4)
    endpoint = EndpointBackend(geode_server, concurrency=2)
    a = evaluate(["agent-math"], engine, tmp_path / "engine", MATH, progress=False)
    b = evaluate(["agent-math"], endpoint, tmp_path / "endpoint", MATH, progress=False)
    ea = _samples(tmp_path / "engine" / "agent-math" / "samples.jsonl")
    eb = _samples(tmp_path / "endpoint" / "agent-math" / "samples.jsonl")
    fields = ("success", "reward", "steps", "tool_calls", "tokens", "turns", "truncated", "error")
    for x, y in zip(ea, eb, strict=True):
        assert {k: x[k] for k in fields} == {k: y[k] for k in fields}
        said = [(m.get("content"), m.get("tool_calls")) for m in x["transcript"]]
        assert said == [(m.get("content"), m.get("tool_calls")) for m in y["transcript"]]
    # the trained model replays the expert: a tool call, its result, the right answer
    assert [s["tool_calls"] for s in ea] == [1, 1] and all(s["success"] for s in ea)
    ma, mb = a["tasks"]["agent-math"], b["tasks"]["agent-math"]
    assert {k: ma[k] for k in ("success_rate", "steps", "tool_calls", "tokens")} == {
        k: mb[k] for k in ("success_rate", "steps", "tool_calls", "tokens")
    }


class _Crashing:
    """An agent env whose game crashes on the first step."""

    tools = None
    max_turns = 3

    def __init__(self) -> None:
        self.info = {"success": False, "steps": 0, "tool_calls": 0, "error": None}

    def reset(self) -> list[dict]:
        return [{"role": "user", "content": "What is 1 + 1?"}]

    def step(self, message: str):
        raise RuntimeError("the game's interpreter died")


def test_remote_loop_counts_endpoint_and_env_failures_and_goes_on(
    tiny_ckpt,
    geode_server,  # noqa: F811
):
    from geode.agents.remote import run_remote
    from geode.eval.tasks import get_task

    math = get_task("agent-math", MATH)
    good = math.make_env(math.load()[0])
    out = run_remote(geode_server, None, [_Crashing(), good], max_tokens=128, concurrency=2)
    assert out[0].success is False and out[0].turns == 1
    assert out[0].info["error"] == "RuntimeError: the game's interpreter died"
    assert out[1].success and out[1].info["tool_calls"] == 1 and out[1].info["error"] is None
    # tools went out as `tools`, the result came back as a role "tool" message with the call id
    call = out[1].transcript[2]["tool_calls"][0]
    assert out[1].transcript[3] == {"role": "tool", "name": "calculator", "tool_call_id": call["id"],
                                    "content": str(math.load()[0]["task"].answer)}  # fmt: skip
    assert out[1].tokens > 0 and out[1].prompt_tokens > out[1].tokens
    # a request the server rejects is a counted failure (not retryable); the run goes on
    out = run_remote(geode_server, None, [math.make_env(math.load()[1])], max_tokens=10**6)
    assert not out[0].success and not out[0].retryable and "HTTP 400" in out[0].info["error"]
    # an endpoint that is down: every episode fails as retryable, nothing raises
    dead = "http://127.0.0.1:9/v1"
    out = run_remote(dead, "m", [math.make_env(math.load()[0])], retries=0, timeout=2)
    assert out[0].retryable and not out[0].success and "cannot reach" in out[0].info["error"]


def test_eval_writes_episodes_metrics_and_gifs(tiny_ckpt, tmp_path):
    import numpy as np
    from PIL import Image

    from geode.eval import EngineBackend, FunctionBackend, evaluate
    from geode.eval.runner import EvalError
    from geode.eval.tasks import TaskError

    engine = EngineBackend.from_path(str(tiny_ckpt), batch_size=4)
    cfg = TaskConfig(limit=2, max_tokens=4, options={"gif": True, "max_turns": 2})
    res = evaluate(["agent-minigrid"], engine, tmp_path, cfg, progress=False)
    m = res["tasks"]["agent-minigrid"]
    rows = _samples(tmp_path / "agent-minigrid" / "samples.jsonl")
    assert [r["id"] for r in rows] == ["BabyAI-GoToObjS4-v0:1000000", "BabyAI-GoToObjS4-v0:1000001"]
    for r in rows:  # a math-trained model does not end a MiniGrid turn in 4 tokens: truncated
        assert r["truncated"] and r["turns"] == 1 and r["tokens"] == 4 and not r["success"]
        assert r["error"].startswith("token budget") and r["transcript"][0]["role"] == "user"
        with Image.open(tmp_path / "agent-minigrid" / r["gif"]) as gif:
            assert gif.size == (64, 64)  # the 4x4 room rendered with 16-pixel tiles
    steps = np.array([r["steps"] for r in rows], dtype=float)
    assert m["n"] == 2 and m["success_rate"] == 0.0 and m["steps"] == steps.mean()
    assert m["tokens_se"] == 0.0 and m["errors"] == 2 and m["truncated"] == 2
    assert m["steps_se"] == pytest.approx(steps.std(ddof=1) / np.sqrt(2))
    assert "| agent-minigrid | success_rate | 0.000 |" in (tmp_path / "results.md").read_text()
    with pytest.raises(TaskError, match="self-correction"):
        evaluate(["agent-math"], engine, tmp_path / "sc", MATH, self_correct=True, progress=False)
    with pytest.raises((TaskError, EvalError), match="engine .--model. or an endpoint"):
        evaluate(["agent-math"], FunctionBackend(lambda g: ""), tmp_path / "f", MATH,
                 progress=False)  # fmt: skip


def test_geode_agent_through_an_endpoint(tiny_ckpt, geode_server, capsys):  # noqa: F811
    from geode.cli import main
    from geode.eval import EndpointBackend
    from geode.eval.tasks import get_task

    task = get_task("agent-math", MATH).load()[0]["task"]
    name = EndpointBackend(geode_server).model
    argv = ["agent", name, "--endpoint", geode_server, "--task", task.prompt, "--max-turns", "3",
            "--max-new-tokens", "128"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f'-> calculator({{"expression": "{task.solution}"}})' in out
    assert f"#### {task.answer}" in out and "tool calls 1 (0 errors)" in out


def test_image_observations_go_to_the_endpoint_as_png_data_urls():
    import numpy as np
    from PIL import Image

    from geode.agents.remote import wire_message
    from geode.image import load_image, media_source

    frame = np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    msg = {"role": "user", "content": [{"type": "image", "image": Image.fromarray(frame)},
                                       {"type": "text", "text": "go"}]}  # fmt: skip
    for image in (Image.fromarray(frame), frame):  # a PIL image or an (H, W, 3) array
        msg["content"][0]["image"] = image
        sent = json.loads(json.dumps(wire_message(msg)))
        url = sent["content"][0]["image_url"]["url"]
        assert sent["content"][1] == {"type": "text", "text": "go"}
        back = np.asarray(load_image(media_source(url, None)))
        assert url.startswith("data:image/png;base64,") and (back == frame).all()
