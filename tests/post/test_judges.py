"""Judges: verifier, reward model, prompted LLM (in-process function backend and a real HTTP
endpoint that times out or answers garbage: the pair is skipped and counted)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from geode.eval.backends import EndpointBackend, FunctionBackend
from geode.post.judges import (
    JudgeItem,
    LLMJudge,
    RewardModelJudge,
    VerifierJudge,
    parse_verdict,
)

Q = [{"role": "user", "content": "Mia has 3 apples. She finds 4 more. How many now?"}]
RIGHT, WRONG = "3 + 4 = 7.\n#### 7", "3 + 4 = 8.\n#### 8"
LONG = "Let me think.\n3 + 4 = 7.\n#### 7"


def test_verifier_prefers_correct_then_concise():
    j = VerifierJudge()
    items = [
        JudgeItem(Q, RIGHT, WRONG, 7),
        JudgeItem(Q, WRONG, RIGHT, 7),
        JudgeItem(Q, LONG, RIGHT, 7),
        JudgeItem(Q, RIGHT, RIGHT, 7),
    ]
    assert j.judge(items) == [0, 1, 1, None]
    assert j.stats() == {"judged": 3, "skipped": 1, "skipped_tie": 1}


def test_parse_verdict():
    assert parse_verdict("A") == (0, "")
    assert parse_verdict(" **B**.\n") == (1, "")
    assert parse_verdict("Response B is better than A")[0] is None  # both letters
    assert parse_verdict("banana") == (None, "garbage")
    assert parse_verdict(None, "timeout") == (None, "timeout")


def test_llm_judge_prompt_instruction_and_both_orders():
    seen = []

    def shorter(g):  # a judge that always picks the shorter response, wherever it stands
        text = g.prompt[0]["content"]
        seen.append(text)
        a = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
        b = text.split("[Response B]\n")[1].split("\n\n")[0]
        return "A" if len(a) <= len(b) else "B"

    j = LLMJudge(backend=FunctionBackend(shorter), instruction="Prefer the shorter answer.")
    assert j.judge([JudgeItem(Q, LONG, RIGHT), JudgeItem(Q, RIGHT, LONG)]) == [1, 0]
    assert "Prefer the shorter answer.\nWhich response is better?" in seen[0]
    assert Q[0]["content"] in seen[0]
    biased = LLMJudge(backend=FunctionBackend(lambda g: "A"), both_orders=True)
    assert biased.judge([JudgeItem(Q, LONG, RIGHT)]) == [None]  # always "A": position bias
    assert biased.stats()["skipped_disagree"] == 1
    consistent = LLMJudge(backend=FunctionBackend(shorter), both_orders=True)
    assert consistent.judge([JudgeItem(Q, LONG, RIGHT)]) == [1]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        if "SLOW" in content:
            time.sleep(1.5)
        reply = "I cannot decide." if "GARBAGE" in content else "B"
        data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_endpoint_judge_timeout_and_garbage_are_skipped_and_counted(endpoint):
    backend = EndpointBackend(endpoint, model="judge", timeout=0.3, retries=0, concurrency=2)
    j = LLMJudge(backend=backend)
    slow = [{"role": "user", "content": "SLOW question"}]
    junk = [{"role": "user", "content": "GARBAGE question"}]
    items = [
        JudgeItem(Q, RIGHT, WRONG),
        JudgeItem(slow, RIGHT, WRONG),
        JudgeItem(junk, RIGHT, WRONG),
    ]
    assert j.judge(items) == [1, None, None]
    assert j.stats() == {"judged": 1, "skipped": 2, "skipped_garbage": 1, "skipped_timeout": 1}


class _LengthRM(torch.nn.Module):
    """A stand-in reward model: minus the number of non-pad tokens (prefers short answers)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, ids):
        return -(ids != 0).sum(-1).float() * self.w


class _ByteTok:
    pad_id = 0

    def encode(self, text):
        return [b + 3 for b in text.encode()]


def test_reward_model_judge_and_ensemble():
    j = RewardModelJudge(models=[_LengthRM()], tokenizer=_ByteTok())
    assert j.judge(
        [JudgeItem(Q, LONG, RIGHT), JudgeItem(Q, RIGHT, LONG), JudgeItem(Q, RIGHT, RIGHT)]
    ) == [1, 0, None]
    flipped = _LengthRM()
    with torch.no_grad():
        flipped.w.fill_(-3.0)  # prefers long answers three times as strongly
    ens = RewardModelJudge(models=[_LengthRM(), flipped], tokenizer=_ByteTok())
    assert ens.judge([JudgeItem(Q, LONG, RIGHT)]) == [0]  # the mean of the two scores decides


def test_llm_judge_runs_a_geode_model_in_process(sft_policy):
    """The in-process judge: the engine on a geode checkpoint; a tiny model's replies are
    mostly not a clean A/B, and every item is either judged or counted as skipped."""
    from geode.eval.backends import EngineBackend

    j = LLMJudge(backend=EngineBackend.from_path(str(sft_policy), chat=True), max_tokens=4)
    verdicts = j.judge([JudgeItem(Q, RIGHT, WRONG), JudgeItem(Q, WRONG, LONG)])
    assert len(verdicts) == 2 and all(v in (0, 1, None) for v in verdicts)
    assert j.judged + sum(j.skipped.values()) == 2
    assert set(j.skipped) <= {"garbage"}
