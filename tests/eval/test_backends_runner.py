"""Endpoint backend against a local stub server; runner files, resume, self-correction; mc."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from geode.eval import (
    BackendError,
    EndpointBackend,
    EvalError,
    FunctionBackend,
    Gen,
    TaskConfig,
    TaskError,
    evaluate,
    get_task,
)


class Stub:
    """A tiny OpenAI-compatible server: echoes prompts, fails some requests on purpose."""

    def __init__(self, fail_first: int = 0, status: int = 500, delay: float = 0.05):
        self.fail_first, self.status, self.delay = fail_first, status, delay
        self.calls: dict[str, int] = {}
        self.active = self.max_active = 0
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "stub-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps(body.get("prompt", body.get("messages")))
                with stub.lock:
                    stub.bodies.append(body)
                    stub.calls[key] = stub.calls.get(key, 0) + 1
                    n = stub.calls[key]
                    stub.active += 1
                    stub.max_active = max(stub.max_active, stub.active)
                try:
                    time.sleep(stub.delay)
                    if n <= stub.fail_first:
                        return self._send(stub.status, {"error": {"message": "boom"}})
                    if self.path.endswith("/chat/completions"):
                        text = "chat:" + body["messages"][-1]["content"]
                        return self._send(200, {"choices": [{"message": {"content": text}}]})
                    if body.get("echo"):
                        prompt = body["prompt"]
                        words = prompt.split(" ")
                        offs, toks, pos = [], [], 0
                        for i, w in enumerate(words):
                            tok = w if i == 0 else " " + w
                            offs.append(pos)
                            toks.append(tok)
                            pos += len(tok)
                        lps = [None] + [-float(len(t)) for t in toks[1:]]
                        tops = [None] + [{t: lp} for t, lp in zip(toks[1:], lps[1:], strict=True)]
                        lp = {
                            "tokens": toks,
                            "token_logprobs": lps,
                            "text_offset": offs,
                            "top_logprobs": tops,
                        }
                        return self._send(200, {"choices": [{"text": prompt, "logprobs": lp}]})
                    return self._send(200, {"choices": [{"text": "out:" + body["prompt"][-12:]}]})
                finally:
                    with stub.lock:
                        stub.active -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def make(**kw):
        s = Stub(**kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def test_endpoint_completions_bounded_concurrency_and_order(stub):
    s = stub()
    b = EndpointBackend(s.url, concurrency=3, api_key="k")
    prompts = [f"prompt number {i:03d}" for i in range(12)]
    out = b.generate([Gen(p, max_tokens=5, stop=("\n",)) for p in prompts])
    assert out == ["out:" + p[-12:] for p in prompts]
    assert s.max_active <= 3 and s.max_active >= 2
    assert s.bodies[0]["model"] == "stub-model" and s.bodies[0]["stop"] == ["\n"]


def test_endpoint_retries_5xx_then_succeeds(stub):
    s = stub(fail_first=2, status=503)
    b = EndpointBackend(s.url + "/v1", retries=3, backoff=0.01)
    assert b.generate([Gen("hello there")]) == ["out:hello there"]
    assert s.calls[json.dumps("hello there")] == 3


def test_endpoint_gives_up_with_a_clear_error(stub):
    s = stub(fail_first=10, status=500)
    b = EndpointBackend(s.url, retries=1, backoff=0.01)
    with pytest.raises(BackendError, match=r"HTTP 500 .*after 2 attempts"):
        b.generate([Gen("x")])
    s4 = stub(fail_first=10, status=400)
    with pytest.raises(BackendError, match="HTTP 400"):
        EndpointBackend(s4.url, retries=3, backoff=0.01).generate([Gen("y")])
    assert s4.calls[json.dumps("y")] == 1  # 4xx is not retried


def test_endpoint_timeout_and_unreachable(stub):
    s = stub(delay=1.0)
    b = EndpointBackend(s.url, retries=0, timeout=0.2, model="m")
    with pytest.raises(BackendError, match="after 1 attempts"):
        b.generate([Gen("slow")])
    dead = EndpointBackend("http://127.0.0.1:9", retries=0, model="m")
    with pytest.raises(BackendError, match="cannot reach"):
        dead.generate([Gen("x")])


def test_endpoint_chat_and_loglikelihood(stub):
    s = stub()
    b = EndpointBackend(s.url, chat=True)
    assert b.generate([Gen("hi")]) == ["chat:hi"]
    assert s.bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]
    ll = EndpointBackend(s.url).loglikelihood([("Question: q\nAnswer:", " yes no")])
    assert ll == [(-7.0, True)]  # " yes" (-4) + " no" (-3), each the top token


def test_runner_writes_files_and_resumes(tmp_path):
    calls = []

    def fn(g):
        calls.append(g.prompt)
        if len(calls) == 7:
            raise ConnectionError("endpoint went away")
        return "#### 0"

    cfg = TaskConfig(limit=12)
    task = get_task("tasks", cfg)
    with pytest.raises(EvalError, match="rerun the same command to resume"):
        evaluate([task], FunctionBackend(fn), tmp_path, cfg, progress=False)
    # batches of 64: the failing batch is lost, nothing was written twice
    calls.clear()
    from geode.eval.runner import run_task

    run_task(
        task,
        FunctionBackend(lambda g: (calls.append(g), "#### 0")[1]),
        tmp_path,
        progress=False,
        batch_size=5,
    )
    assert len(calls) == 12
    calls.clear()
    res = evaluate([get_task("tasks", cfg)], FunctionBackend(fn), tmp_path, cfg, progress=False)
    assert calls == []  # everything resumed from samples.jsonl
    assert res["tasks"]["tasks"]["n"] == 12
    lines = (tmp_path / "tasks" / "samples.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert {"prompt", "output", "extracted", "correct", "gold", "id"} <= set(rec)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.png").is_file()
    assert "| tasks | accuracy |" in (tmp_path / "results.md").read_text()
    with pytest.raises(TaskError, match="different configuration"):
        evaluate(
            ["tasks"], FunctionBackend(fn), tmp_path, TaskConfig(limit=12, shots=2), progress=False
        )


def test_runner_resumes_after_a_partial_write(tmp_path):
    cfg = TaskConfig(limit=10)
    from geode.eval.runner import run_task

    n = {"calls": 0}

    def flaky(g):
        n["calls"] += 1
        if n["calls"] > 4:
            raise ConnectionError("down")
        return "x"

    with pytest.raises(EvalError, match="stopped after 4 of 10"):
        run_task(
            get_task("tasks", cfg), FunctionBackend(flaky), tmp_path, batch_size=1, progress=False
        )
    n["calls"] = -100
    m = run_task(
        get_task("tasks", cfg), FunctionBackend(flaky), tmp_path, batch_size=1, progress=False
    )
    assert m["n"] == 10 and n["calls"] == -94


def test_self_correction_mode(tmp_path):
    from geode.data.tasks import generate

    probs = generate(6, seed=0, split="heldout")
    answers = {p.question: p.answer for p in probs}

    def fn(g):
        assert isinstance(g.prompt, list)  # chat in self-correction mode
        q = g.prompt[0]["content"].strip()
        a = answers[q]
        first = len(g.prompt) == 1
        idx = list(answers).index(q)
        # problems 0-2 right first; 0,1 stay right, 2 flips wrong; 3 fixed; 4,5 stay wrong
        right = idx in (0, 1, 2) if first else idx in (0, 1, 3)
        return f"#### {a if right else a + 1}"

    res = evaluate(
        ["tasks"],
        FunctionBackend(fn),
        tmp_path,
        TaskConfig(limit=6),
        self_correct=True,
        progress=False,
    )
    sc = res["tasks"]["tasks"]["self_correction"]
    assert sc["accuracy@t1"] == pytest.approx(0.5) and sc["accuracy@t2"] == pytest.approx(0.5)
    assert sc["delta_i_to_c"] == pytest.approx(1 / 6) and sc["delta_c_to_i"] == pytest.approx(1 / 6)
    rec = json.loads((tmp_path / "tasks" / "samples.jsonl").read_text().splitlines()[0])
    assert len(rec["turns"]) == 2 and rec["prompt"][-1]["content"].startswith("There might be")
    assert "delta_i_to_c" in (tmp_path / "results.md").read_text()


def _mc_file(tmp_path):
    rows = [
        {"question": "2+2?", "choices": ["four", "five", "a very long wrong answer"], "answer": 0},
        {"question": "Sky?", "choices": ["green", "blue"], "answer": "B"},
        {"question": "Cat?", "choices": ["meow", "woof"], "answer": "meow"},
    ]
    p = tmp_path / "mc.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_mc_acc_and_acc_norm_with_predictable_loglikelihoods(tmp_path):
    # log-likelihood = -(number of characters): short answers win `acc`; under acc_norm
    # every option scores -1 per character and the first one wins ties.
    def ll(context, continuation):
        bonus = 5.0 if continuation == " blue" else 0.0
        return (-float(len(continuation)) + bonus, False)

    cfg = TaskConfig(data=str(_mc_file(tmp_path)))
    res = evaluate(["mc"], FunctionBackend(None, ll), tmp_path / "out", cfg, progress=False)
    m = res["tasks"]["mc"]
    # acc: q1 "four" (-5) vs "five" (-5) tie -> first = correct; q2 blue wins; q3 meow/woof tie -> meow
    assert m["acc"] == 1.0
    rows = [
        json.loads(x) for x in (tmp_path / "out" / "mc" / "samples.jsonl").read_text().splitlines()
    ]
    assert rows[1]["extracted"] == 1 and rows[1]["correct_norm"]


def test_mc_bad_answer_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:1: 'answer' 5 is out of range"):
        get_task("mc", TaskConfig(data=str(p))).load()


def test_retryable_and_permanent_errors(stub, tmp_path):
    """A server that keeps failing with 503 (retryable) says a rerun resumes and keeps the
    samples; one that rejects the request with 400 (permanent) says a rerun will not help."""
    from geode.cli import main

    cfg = TaskConfig(limit=3)
    down = stub(fail_first=100, status=503)
    b = EndpointBackend(down.url, retries=1, backoff=0.01, model="m")
    with pytest.raises(EvalError, match="rerun the same command to resume") as e:
        evaluate(["tasks"], b, tmp_path / "down", cfg, progress=False)
    assert e.value.retryable
    rejected = stub(fail_first=100, status=400)
    b = EndpointBackend(rejected.url, retries=3, backoff=0.01, model="m")
    with pytest.raises(EvalError, match="not transient: rerunning will fail the same way") as e:
        evaluate(["tasks"], b, tmp_path / "rejected", cfg, progress=False)
    assert not e.value.retryable and "resume" not in str(e.value)
    assert "HTTP 400" in str(e.value)
    for out in ("down", "rejected"):
        assert not (tmp_path / out).exists()  # no empty output directories
    args = ["eval", "tasks", "--limit", "2", "--retries", "0", "--no-progress"]
    assert main([*args, "--endpoint", down.url, "--out", str(tmp_path / "c1")]) == 75
    assert main([*args, "--endpoint", rejected.url, "--out", str(tmp_path / "c2")]) == 2


def test_no_files_on_early_errors_and_shots_change_with_zero_samples(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TaskError, match="gsm8k needs --data"):
        evaluate(["gsm8k"], FunctionBackend(lambda g: "x"), out, progress=False)
    assert not out.exists()
    out.mkdir()  # a directory the user made stays, but gets nothing
    with pytest.raises(EvalError):
        evaluate(["tasks"], FunctionBackend(lambda g: 1 / 0), out, TaskConfig(limit=2))
    assert list(out.iterdir()) == []
    # leftovers of an older geode (run.json + an empty samples file) do not block other shots
    (out / "tasks").mkdir()
    (out / "tasks" / "run.json").write_text(json.dumps({"task": "tasks", "shots": 0}))
    (out / "tasks" / "samples.jsonl").write_text("")
    res = evaluate(
        ["tasks"], FunctionBackend(lambda g: "#### 1"), out, TaskConfig(limit=2, shots=2)
    )
    assert res["tasks"]["tasks"]["n"] == 2
    assert json.loads((out / "tasks" / "run.json").read_text())["shots"] == 2


def test_each_task_checks_its_data_fields(tmp_path):
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": "Tom has 3 pens.", "answer": "3 pens.\n#### 3"}) + "\n")
    with pytest.raises(TaskError, match=r"gsm8k.jsonl:1: field 'answer' ends in a '#### N'.*GSM8K"):
        get_task("math500", TaskConfig(data=str(gsm))).load()
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(TaskError, match=r"math.jsonl:1: missing field\(s\) \['question'\]"):
        get_task("gsm8k", TaskConfig(data=str(math), shots=0)).load()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": 7, "answer": "#### 7"}) + "\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:1: field 'question' must be str, got int"):
        get_task("gsm8k", TaskConfig(data=str(bad), shots=0)).load()
    nohash = tmp_path / "nohash.jsonl"
    nohash.write_text(json.dumps({"question": "q", "answer": "7"}) + "\n")
    with pytest.raises(TaskError, match=r"nohash.jsonl:1: field 'answer' has no '#### N' line"):
        get_task("gsm8k", TaskConfig(data=str(nohash), shots=0)).load()
    with pytest.raises(TaskError, match=r"gsm8k.jsonl:1: missing field\(s\) \['choices'"):
        get_task("mc", TaskConfig(data=str(gsm))).load()
