"""Rewards: each built-in term on real cases, the weighted combination, and failure accounting
(a raising, a NaN and a hanging term counted while the other samples are still scored)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest
import torch
from transformers import Gemma3TextForSequenceClassification

import geode
from geode.data.tasks import generate
from geode.post.pairs import encode_response, prompt_text, response_text, text_response
from geode.post.reward import RewardModel, average_models, save_reward_model
from geode.post.rewards import (
    RewardSpec,
    Sample,
    Term,
    build_rewards,
    final_answer,
    register_reward,
)
from geode.recipe import RecipeError
from geode.tokenizer import END_OF_THINKING, END_OF_TURN, START_OF_THINKING, load_tokenizer
from tests.eval.conftest import shared_file

USER = [{"role": "user", "content": "Solve it."}]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_synth_verifier_reads_the_answer_outside_thinking():
    problems = generate(6, seed=3, min_steps=1, max_steps=3, max_value=30)
    right = [Sample(USER, p.solution + END_OF_TURN, answer=str(p.answer)) for p in problems]
    wrong = [Sample(USER, f"#### {p.answer + 1}", answer=str(p.answer)) for p in problems]
    p = problems[0]
    thought = Sample(  # the right answer only inside the thinking: no answer
        USER, f"{START_OF_THINKING}#### {p.answer}{END_OF_THINKING}#### 0", answer=str(p.answer)
    )
    opened = Sample(  # the prompt opened the thinking section: its text is not the answer
        USER, f"#### {p.answer}", answer=str(p.answer), meta={"in_thinking": True}
    )
    closed = Sample(
        USER,
        f"hmm{END_OF_THINKING}#### {p.answer}",
        answer=str(p.answer),
        meta={"in_thinking": True},
    )
    rewards = build_rewards([{"kind": "synth"}])
    scored = rewards([*right, *wrong, thought, opened, closed])
    assert scored.rewards.tolist() == [1.0] * 6 + [0.0] * 6 + [0.0, 0.0, 1.0]
    assert not scored.failed.any() and rewards.stats == {}


def test_math_verify_on_real_math500_answers_in_a_warm_worker():
    from geode.eval.tasks.math500 import gold_of

    rows = [json.loads(x) for x in shared_file("math500", "test.jsonl").read_text().splitlines()]
    golds = [gold_of(r, f"row {i}") for i, r in enumerate(rows[:10])]
    samples = [
        Sample(USER, r["answer"].split("The answer is:")[0], answer=r["answer"]) for r in rows[:10]
    ]
    samples += [Sample(USER, f"So the answer is ${g}$.", answer=g) for g in golds]
    samples += [Sample(USER, f"\\boxed{{{g}+1}}", answer=g) for g in golds]
    equivalent = [("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "\\dfrac12"), ("3", "#### 3")]
    samples += [
        Sample(USER, f"\\boxed{{{b}}}" if "#" not in b else b, answer=a) for a, b in equivalent
    ]
    rewards = build_rewards([{"kind": "math", "options": {"timeout": 10}}])
    term = rewards.terms[0][2]
    first = rewards(samples)
    pid = term.verifier._proc.pid
    assert first.rewards.tolist() == [1.0] * 20 + [0.0] * 10 + [1.0] * 3
    again = rewards(samples[:2])  # the same worker process, already warm
    assert again.rewards.tolist() == [1.0, 1.0] and term.verifier._proc.pid == pid
    assert final_answer("x \\boxed{7} y") == "7" and final_answer("The answer is: $x^2$.") == "x^2"
    assert final_answer("#### 1,200") == "1200" and final_answer("no answer here") is None
    rewards.close()


def test_a_hung_math_verify_parse_is_killed_and_counted():
    rewards = build_rewards([{"kind": "math", "options": {"timeout": 1.0}}])
    term = rewards.terms[0][2]
    rewards([Sample(USER, "\\boxed{2}", answer="2")])  # warm the worker up (imports)
    pid = term.verifier._proc.pid
    hang = Sample(USER, "\\boxed{9^{9^{9^{9}}}}", answer="1")  # math-verify spins ~5 s on it
    scored = rewards(
        [Sample(USER, "\\boxed{4}", answer="4"), hang, Sample(USER, "\\boxed{5}", answer="5")]
    )
    assert scored.failed.tolist() == [False, True, False]  # killed at 1 s, not math-verify's 5 s
    assert scored.rewards.tolist() == [1.0, 0.0, 1.0]
    assert rewards.stats == {"math/timeout": 1} and scored.failures == {"math": 1}
    assert not _alive(pid) and term.verifier._proc.pid != pid  # killed, then restarted
    rewards.close()


CHECK = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_code_runs_the_unit_tests_in_the_sandbox():
    def sample(body: str, **meta) -> Sample:
        code = f"Here it is:\n```python\ndef add(a, b):\n    {body}\n```"
        return Sample(USER, code, tests=CHECK, meta={"entry_point": "add", **meta})

    rewards = build_rewards([{"kind": "code", "options": {"timeout": 2.0}}])
    scored = rewards(
        [
            sample("return a + b"),
            sample("return a - b"),
            sample("while True:\n        pass"),
            Sample(USER, "```python\ndef add(a, b):\n    return a + b\n```", tests=CHECK),
        ]
    )
    assert scored.rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert scored.failed.tolist() == [False, False, False, True]  # no entry point: failed
    assert rewards.stats == {"code/missing entry_point": 1}
    assert rewards.terms[0][2].outcomes == {"passed": 1, "failed": 1, "timed out": 1}


@register_reward("test-flaky")
class Flaky(Term):
    """Sleeps, raises or returns NaN when a sample's meta asks for it; else len(completion)."""

    name = "test-flaky"

    def __call__(self, samples):
        out = []
        for s in samples:
            if s.meta.get("sleep"):
                time.sleep(60)
            if s.meta.get("raise"):
                raise RuntimeError("boom")
            out.append(float("nan") if s.meta.get("nan") else float(len(s.completion)))
        return out


def test_raising_nan_and_hanging_terms_fail_their_samples_only():
    samples = [
        Sample(USER, "#### 3", answer="3"),
        Sample(USER, "#### 3", answer="3", meta={"sleep": True}),
        Sample(USER, "#### 3", answer="3", meta={"raise": True}),
        Sample(USER, "#### 3", answer="3", meta={"nan": True}),
        Sample(USER, "#### 4", answer="3"),
    ]
    specs = [
        RewardSpec("synth", 2.0),
        RewardSpec("test-flaky", 0.5, {"timeout": 0.5}),  # in a worker process, killed at 0.5 s
    ]
    rewards = build_rewards(specs, failed_reward=-1.0)
    iso = rewards.terms[1][2]
    start = time.perf_counter()
    scored = rewards(samples)
    assert time.perf_counter() - start < 10
    assert scored.failed.tolist() == [False, True, True, True, False]
    assert scored.rewards.tolist() == [2.0 + 3.0, -1.0, -1.0, -1.0, 0.0 + 3.0]
    assert scored.terms["synth"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    flaky = scored.terms["test-flaky"]
    assert flaky[[0, 4]].tolist() == [6.0, 6.0] and flaky[1:4].isnan().all()
    assert scored.failures == {"test-flaky": 3}
    assert rewards.stats == {"test-flaky/timeout": 1, "test-flaky/error": 1, "test-flaky/nan": 1}
    pid = iso._proc.pid  # the worker restarted after the kill
    rewards(samples[1:2])
    assert not _alive(pid) and rewards.stats["test-flaky/timeout"] == 2  # counted over the run
    rewards.close()
    # in process (no timeout): a raising batch is retried sample by sample
    inproc = build_rewards([{"kind": "test-flaky"}, {"kind": "synth", "weight": 1}])
    scored = inproc([samples[0], samples[2], samples[3], samples[4]])
    assert scored.failed.tolist() == [False, True, True, False]
    assert scored.rewards.tolist() == [7.0, 0.0, 0.0, 6.0]
    assert inproc.stats == {"test-flaky/error": 1, "test-flaky/nan": 1}


def _rm(vocab: int, seed: int, init: RewardModel | None = None) -> RewardModel:
    cfg = dataclasses.replace(
        geode.get_preset("nano-1m"), num_hidden_layers=2, layer_types=None, vocab_size=vocab
    )
    rm = RewardModel(geode.build_model(cfg, seed=0), generator=torch.Generator().manual_seed(0))
    if seed:  # a fine-tuned member: the shared init plus its own perturbation
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in rm.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return rm


def test_reward_models_warm_average_and_ensemble_match_transformers(task_dir, tmp_path):
    tok = load_tokenizer(task_dir / "tokenizer.model")
    files = {"tokenizer.model": task_dir / "tokenizer.model"}
    members = [_rm(len(tok), s) for s in (1, 2)]
    for i, m in enumerate(members):
        save_reward_model(m, tmp_path / f"m{i}", files=files)
    save_reward_model(average_models(members), tmp_path / "avg", files=files)
    problems = generate(4, seed=1, min_steps=1, max_steps=1, max_value=20)
    samples = [
        Sample([{"role": "user", "content": p.question}], p.solution + END_OF_TURN)
        for p in problems
    ]
    ids = [
        list(tok.encode(prompt_text(s.prompt)))
        + list(encode_response(tok, response_text(s.prompt, text_response(s.completion))))
        for s in samples
    ]

    def hf_scores(path) -> list[float]:
        hf = Gemma3TextForSequenceClassification.from_pretrained(path).eval()
        with torch.no_grad():
            return [float(hf(input_ids=torch.tensor([x])).logits) for x in ids]

    paths = [str(tmp_path / "m0"), str(tmp_path / "m1")]
    rewards = build_rewards(
        [
            {"kind": "reward_model", "options": {"paths": paths}},
            {
                "kind": "reward_model",
                "options": {"paths": paths, "mode": "ensemble", "batch_size": 3},
            },
        ]
    )
    scored = rewards(samples)
    warm, ens = scored.terms["reward_model"], scored.terms["reward_model_2"]
    ref0, ref1 = hf_scores(paths[0]), hf_scores(paths[1])
    torch.testing.assert_close(
        warm, torch.tensor(hf_scores(tmp_path / "avg")), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        ens, (torch.tensor(ref0) + torch.tensor(ref1)) / 2, atol=1e-4, rtol=1e-4
    )
    assert (warm - ens).abs().max() > 1e-3  # the weight average is not the mean of scores
    torch.testing.assert_close(scored.rewards, warm + ens)


def test_format_checks():
    rewards = build_rewards([{"kind": "format", "options": {"answer": "any", "thinking": True}}])
    texts = [
        f"{START_OF_THINKING}plan{END_OF_THINKING}3 + 4 = 7\n#### 7{END_OF_TURN}",  # all 3 pass
        "3 + 4 = 7\n#### 7\nand more words",  # trailing text after the answer
        f"#### 7{END_OF_TURN}junk after the turn",  # text after <end_of_turn>
        f"{START_OF_THINKING}still thinking #### 7",  # thinking left open: no answer either
        "So \\boxed{\\frac{1}{2}}.",  # a boxed answer, nothing after it
        "no answer at all",
    ]
    scored = rewards([Sample(USER, t) for t in texts])
    torch.testing.assert_close(scored.rewards, torch.tensor([1.0, 2 / 3, 2 / 3, 0.0, 1.0, 1 / 3]))
    only = build_rewards([{"kind": "format", "options": {"answer": "synth", "trailing": False}}])
    assert only([Sample(USER, t) for t in texts]).rewards.tolist() == [1, 1, 1, 0, 0, 0]


def test_length_penalties_linear_and_dapo_soft_overlong(task_dir):
    tok = load_tokenizer(task_dir / "tokenizer.model")
    rewards = build_rewards(
        [
            {"kind": "length", "options": {"target": 10, "per_token": 0.5}},
            {"kind": "length", "weight": 0, "options": {"mode": "dapo", "max_len": 20, "cache": 8}},
        ],
        tokenizer=tok,
    )
    lengths = [5, 10, 12, 16, 20, 21, 40]
    scored = rewards([Sample(USER, "x", token_ids=[7] * n) for n in lengths])
    assert scored.terms["length"].tolist() == [0.0, 0.0, -1.0, -3.0, -5.0, -5.5, -15.0]
    # eq. 13 with L_max = 20, L_cache = 8: 0 up to 12, (12 - n) / 8 up to 20, then -1
    assert scored.terms["length_2"].tolist() == [0.0, 0.0, 0.0, -0.5, -1.0, -1.0, -1.0]
    text = "Mia has 12 apples."
    counted = rewards([Sample(USER, text)]).terms["length"]
    assert counted.item() == -0.5 * max(0, len(tok.encode(text)) - 10)
    no_tok = build_rewards([{"kind": "length", "options": {"target": 1}}])
    assert no_tok([Sample(USER, text)]).failed.tolist() == [True]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"kind": "nope"}, r"rl.rewards\[0\] \(kind 'nope'\): unknown reward kind; known: \["),
        ({"kind": "synth", "weight": "x"}, r"weight = 'x': expected a finite number"),
        ({"kind": "synth", "options": {"colour": 1}}, r"unknown option\(s\) \['colour'\]"),
        ({"kind": "math", "options": {"timeout": -1}}, r"kind 'math'\): option 'timeout' = -1"),
        ({"kind": "format", "options": {"answer": "xml"}}, r"'answer' = 'xml': expected one of"),
        ({"kind": "length", "options": {"per_token": 1}}, r"needs target >= 0"),
        (
            {"kind": "length", "options": {"mode": "dapo", "max_len": 4, "cache": 8}},
            "cache <= max_len",
        ),
        ({"kind": "reward_model"}, r"needs option 'path'"),
        ({"kind": "reward_model", "options": {"path": "/nonexistent"}}, "/nonexistent"),
        ({"kind": "test-flaky", "options": {"timeout": "soon"}}, r"'timeout' = 'soon'"),
        ({"weight": 1}, r"rl.rewards\[0\]: missing 'kind'"),
        ({"kind": "synth", "wieght": 1}, r"unknown key\(s\) \['wieght'\]"),
    ],
)
def test_bad_entries_are_clear_errors(entry, message):
    with pytest.raises(RecipeError, match=message):
        build_rewards([entry])


def test_no_terms_is_an_error():
    with pytest.raises(RecipeError, match="no reward terms"):
        build_rewards([])
