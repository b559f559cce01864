"""Prompts longer than the model's context: fewer shots, else a skipped sample, recorded, and
the same records in process and through `geode serve`; --dtype/--quant on `geode eval`."""

from __future__ import annotations

import json

import pytest

import geode
from geode.eval import BackendError, EndpointBackend, EngineBackend, Gen, TaskConfig, evaluate
from geode.eval.fit import fit_shots
from geode.serve.app import create_app
from tests.serve.helpers import LiveServer

CTX = 320  # the served and in-process context of the over-long task
SENTENCE = "Mia has 3 apples and finds 2 more. "


def test_fit_shots_rule():
    tokens = {3: 130, 2: 100, 1: 70, 0: 40}
    assert fit_shots(3, tokens.__getitem__, 20, 200) == (3, {})
    k, rec = fit_shots(3, tokens.__getitem__, 20, 100)
    assert k == 1 and rec == {
        "fit": {
            "shots": 1,
            "requested_shots": 3,
            "prompt_tokens": 70,
            "max_tokens": 20,
            "context": 100,
        }
    }
    k, rec = fit_shots(3, tokens.__getitem__, 20, 59)
    assert k == 0 and rec["fit"]["prompt_tokens"] == 40
    assert rec["skipped"] == (
        "prompt of 40 tokens with 0 of 3 shots + 20 for the output exceeds the model's context "
        "of 59 tokens"
    )
    assert fit_shots(3, tokens.__getitem__, 20, None) == (3, {})  # unknown context: as is


def _gsm8k_files(tmp_path, tok, max_tokens: int) -> tuple:
    """A GSM8K-format test file whose questions fit CTX with all 3 shots, with fewer, and not
    at all (lengths measured with the model's tokenizer, as the engine counts them)."""
    shot = {"question": SENTENCE, "answer": "She has 3 + 2 = 5 apples.\n#### 5"}
    (tmp_path / "train.jsonl").write_text((json.dumps(shot) + "\n") * 3)
    block = f"Question: {shot['question']}\nAnswer: {shot['answer']}\n\n"

    def prompt_len(n: int, shots: int) -> int:  # <bos> + the gsm8k prompt
        return 1 + len(tok.encode(block * shots + f"Question: {SENTENCE * n}\nAnswer:"))

    room = CTX - max_tokens
    fewer = next(n for n in range(1, 100) if prompt_len(n, 3) > room)
    skipped = next(n for n in range(1, 200) if prompt_len(n, 0) > room)
    assert prompt_len(1, 3) <= room and fewer + 2 < skipped
    rows = [(1, "full"), (fewer, "fewer"), (skipped, "skipped"), (fewer + 2, "fewer")]
    test = tmp_path / "test.jsonl"
    test.write_text(
        "".join(
            json.dumps({"question": SENTENCE * n, "answer": f"#### {i}"}) + "\n"
            for i, (n, _) in enumerate(rows)
        )
    )
    return test, [kind for _, kind in rows]


def _samples(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_over_long_task_gives_identical_records_through_both_backends(tiny_ckpt, tmp_path):
    tok = geode.load_tokenizer(tiny_ckpt)
    test, kinds = _gsm8k_files(tmp_path, tok, max_tokens=8)
    cfg = TaskConfig(data=str(test), shots=3, max_tokens=8)
    engine = EngineBackend.from_path(str(tiny_ckpt), batch_size=4, max_seq_len=CTX)
    evaluate(["gsm8k"], engine, tmp_path / "engine", cfg, progress=False)
    ref = _samples(tmp_path / "engine" / "gsm8k" / "samples.jsonl")
    got = [("fit" in s) + ("skipped" in s) for s in ref]
    assert got == [{"full": 0, "fewer": 1, "skipped": 2}[k] for k in kinds]
    for s in ref:
        if "fit" in s:
            f = s["fit"]
            assert f["requested_shots"] == 3 and f["context"] == CTX and f["max_tokens"] == 8
            assert s["prompt"].count("Question: ") == f["shots"] + 1
            assert len(tok.encode(s["prompt"])) + 1 == f["prompt_tokens"]
        if "skipped" in s:
            assert s["output"] is None and s["correct"] is None
            assert f"exceeds the model's context of {CTX} tokens" in s["skipped"]
        elif "fit" in s:
            assert s["fit"]["prompt_tokens"] + 8 <= CTX and isinstance(s["output"], str)
    metrics = json.loads((tmp_path / "engine" / "results.json").read_text())["tasks"]["gsm8k"]
    assert metrics["skipped"] == 1 and metrics["fewer_shots"] == 2 and metrics["n"] == 3
    assert "1 skipped (prompt longer than the model's context)" in (
        (tmp_path / "engine" / "results.md").read_text()
    )

    server = LiveServer(create_app(str(tiny_ckpt), max_seq_len=CTX)).start()
    try:
        for name, backend in {
            "tokenizer": EndpointBackend(server.url, tokenizer=tok, concurrency=2),
            "server-count": EndpointBackend(server.url, concurrency=2),  # /tokenize
        }.items():
            assert backend.max_context == CTX
            evaluate(["gsm8k"], backend, tmp_path / name, cfg, progress=False)
            assert _samples(tmp_path / name / "gsm8k" / "samples.jsonl") == ref, name
    finally:
        server.stop()


def test_engine_refuses_instead_of_truncating(tiny_ckpt):
    backend = EngineBackend.from_path(str(tiny_ckpt), batch_size=2, max_seq_len=64)
    with pytest.raises(BackendError, match=r"context is 64 tokens, but \d+ were requested") as e:
        backend.generate([Gen(SENTENCE * 20, max_tokens=4)])
    assert not e.value.retryable
    with pytest.raises(BackendError, match="context is 64 tokens"):
        backend.loglikelihood([(SENTENCE * 20, " yes")])


def test_cli_dtype_and_quant(tiny_ckpt, tmp_path, capsys):
    from geode.cli import main

    out = tmp_path / "out"
    args = ["eval", "tasks", "--model", str(tiny_ckpt), "--limit", "2", "--max-tokens", "4"]
    assert main([*args, "--dtype", "bfloat16", "--quant", "int8", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    run = json.loads((out / "tasks" / "run.json").read_text())
    assert run["backend"] == f"engine:{tiny_ckpt}:bfloat16:int8"
    capsys.readouterr()
    assert main([*args, "--dtype", "float8", "--out", str(tmp_path / "x")]) == 2
    assert "--dtype: unknown dtype 'float8'" in capsys.readouterr().err
    endpoint = ["eval", "tasks", "--endpoint", "http://127.0.0.1:9", "--quant", "int4"]
    assert main([*endpoint, "--out", str(tmp_path / "y")]) == 2
    assert "apply to --model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
