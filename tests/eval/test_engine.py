"""The in-process engine backend on a tiny random model: log-likelihoods against a direct
forward pass, identical results through `geode serve` + the endpoint backend, the CLI."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest
import torch

from geode.eval import EndpointBackend, EngineBackend, Gen, TaskConfig, evaluate


@pytest.fixture(scope="module")
def engine_backend(tiny_ckpt):
    return EngineBackend.from_path(str(tiny_ckpt), batch_size=8)


def test_loglikelihood_matches_a_direct_forward_pass(engine_backend):
    tok, model = engine_backend.tokenizer, engine_backend.engine.model
    pairs = [("Mia has 3 apples.", " She finds 2 more."), ("Question: 2+2?\nAnswer:", " 4")]
    got = engine_backend.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        c_ids = [tok.bos_id, *tok.encode(ctx)]
        x_ids = tok.encode(cont)
        ids = torch.tensor([c_ids + x_ids])
        with torch.no_grad():
            logp = model(ids).float().log_softmax(-1)[0]  # (T, V)
        n = len(x_ids)
        pos = torch.arange(len(c_ids) - 1, len(c_ids) - 1 + n)
        ref = logp[pos, torch.tensor(x_ids)].sum().item()
        assert ll == pytest.approx(ref, abs=1e-4)
        assert greedy == bool((logp[pos].argmax(-1) == torch.tensor(x_ids)).all())


def test_engine_generation_is_greedy_and_batch_independent(engine_backend):
    gens = [Gen(f"Noah has {i} marbles.", max_tokens=6) for i in range(5)]
    batched = engine_backend.generate(gens)
    one = [engine_backend.generate([g])[0] for g in gens[:2]]
    assert batched[:2] == one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def geode_server(tiny_ckpt):
    uvicorn = pytest.importorskip("uvicorn")
    from geode.serve.app import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(str(tiny_ckpt)), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    else:
        pytest.fail("geode serve did not become healthy")
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def _samples(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_in_process_and_geode_serve_give_identical_samples(
    tiny_ckpt, engine_backend, geode_server, tmp_path
):
    import geode

    tok = geode.load_tokenizer(tiny_ckpt)
    cfg = TaskConfig(limit=4, max_tokens=10)
    endpoint = EndpointBackend(geode_server, concurrency=2, tokenizer=tok)
    evaluate(["tasks"], engine_backend, tmp_path / "engine", cfg, progress=False)
    evaluate(["tasks"], endpoint, tmp_path / "endpoint", cfg, progress=False)
    a = _samples(tmp_path / "engine" / "tasks" / "samples.jsonl")
    b = _samples(tmp_path / "endpoint" / "tasks" / "samples.jsonl")
    assert [s["output"] for s in a] == [s["output"] for s in b]
    assert [s["correct"] for s in a] == [s["correct"] for s in b]
    # chat prompts (mrcr is a conversation) render the same on both sides
    cfg = TaskConfig(limit=2, max_tokens=6, options={"turns": 4})
    evaluate(["mrcr"], engine_backend, tmp_path / "engine", cfg, progress=False)
    evaluate(["mrcr"], endpoint, tmp_path / "endpoint", cfg, progress=False)
    a = _samples(tmp_path / "engine" / "mrcr" / "samples.jsonl")
    b = _samples(tmp_path / "endpoint" / "mrcr" / "samples.jsonl")
    assert [s["output"] for s in a] == [s["output"] for s in b]
    # log-likelihoods: token ids through the endpoint (with the tokenizer) and as text
    pairs = [("Question: Sky?\nAnswer:", " blue"), ("Mia has 3 apples.", " She finds 2 more.")]
    ref = engine_backend.loglikelihood(pairs)
    for got in (endpoint.loglikelihood(pairs), EndpointBackend(geode_server).loglikelihood(pairs)):
        for (x, gx), (y, gy) in zip(got, ref, strict=True):
            assert x == pytest.approx(y, abs=1e-3) and gx == gy


def test_cli_smoke(tiny_ckpt, tmp_path, capsys):
    from geode.cli import main

    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "q?", "choices": ["a", "bb"], "answer": 0}) + "\n")
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "tasks,mc",
            "--model",
            str(tiny_ckpt),
            "--limit",
            "2",
            "--max-tokens",
            "4",
            "--data",
            str(mc),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "| tasks | accuracy |" in text and "| mc | acc |" in text
    assert (out / "results.json").is_file() and (out / "tasks" / "samples.jsonl").is_file()
    rc = main(["eval", "gsm8k", "--model", str(tiny_ckpt), "--out", str(out), "--no-progress"])
    assert rc == 2 and "needs --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "example" in capsys.readouterr().out
