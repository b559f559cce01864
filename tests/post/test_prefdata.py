"""The generated preference task: chosen = correct and concise, known label noise, validation."""

from __future__ import annotations

import json

import pytest

from geode.data import tasks as synth
from geode.post.prefdata import EASY, PairError, make_pairs, read_pairs, write_jsonl


def _text(msgs):
    return msgs[-1]["content"]


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.3])
def test_pairs_prefer_correct_concise_with_exact_noise(noise):
    pairs = make_pairs(60, seed=3, noise=noise, **EASY)
    assert sum(p["flipped"] for p in pairs) == round(noise * 60)
    assert {p["kind"] for p in pairs} == {"wrong", "rambling", "rambling_wrong"}
    for p in pairs:
        good, bad = _text(p["chosen"]), _text(p["rejected"])
        if p["flipped"]:
            good, bad = bad, good
        assert synth.verify(p["answer"], good)
        assert synth.verify(p["answer"], bad) == (p["kind"] == "rambling")
        assert len(good) < len(bad) or p["kind"] == "wrong"


def test_heldout_pairs_share_no_problem_with_train():
    train = {p["uid"] for p in make_pairs(100, seed=0, **EASY)}
    held = {p["uid"] for p in make_pairs(20, seed=0, split="heldout", **EASY)}
    assert not train & held


def test_roundtrip_and_clear_errors(tmp_path):
    path = write_jsonl(make_pairs(5, seed=1), tmp_path / "p.jsonl")
    assert [p["uid"] for p in read_pairs(path)] == [p["uid"] for p in make_pairs(5, seed=1)]

    good = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    assert read_pairs(write_jsonl([good], tmp_path / "s.jsonl"))[0]["chosen"] == [
        {"role": "assistant", "content": "yes"}
    ]
    bad = tmp_path / "bad.jsonl"
    cases = [
        ({"prompt": "Q?", "chosen": "yes"}, r"bad.jsonl:2: missing field\(s\) 'rejected'"),
        ({**good, "chosen": ""}, "field 'chosen' is empty"),
        ({**good, "rejected": [{"role": "user", "content": "x"}]}, "'rejected' has no assistant"),
        ({**good, "prompt": [{"role": "user"}]}, r"prompt\[0\] must be a message"),
    ]
    for record, message in cases:
        bad.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(PairError, match=message):
            read_pairs(bad)
    bad.write_text("{not json\n")
    with pytest.raises(PairError, match="bad.jsonl:1: not JSON"):
        read_pairs(bad)
