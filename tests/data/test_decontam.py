"""Decontamination: n-gram overlap with evaluation sets, including a planted GSM8K question."""

from __future__ import annotations

import json
from pathlib import Path

from geode.data.decontam import DecontamConfig, Decontaminator, normalize_words
from geode.data.pack import open_dataset
from geode.data.prepare import DataRecipe, prepare
from geode.data.sources import SourceConfig
from geode.data.tasks import generate
from tests.data.helpers import ByteTokenizer


def test_normalisation() -> None:
    assert normalize_words("Janet’s DUCKS lay 16 eggs, per_day!") == [
        "janet",
        "s",
        "ducks",
        "lay",
        "16",
        "eggs",
        "per",
        "day",
    ]


def test_ngram_overlap_and_short_items() -> None:
    d = Decontaminator(ngram=5, min_words=3)
    d.add("e1", "The quick brown fox jumps over the lazy dog")
    d.add("e2", "tiny item")  # 2 words < min_words: skipped
    d.add("e3", "red green blue")  # shorter than n, matched whole
    assert d.items == 2 and d.skipped == ["e2"]
    m = d.check("Yesterday THE quick-brown fox jumps high.")
    assert m is not None and m.eval_id == "e1" and m.ngram == "the quick brown fox jumps"
    assert d.check("the quick brown fox walks over the lazy dog") is None  # no shared 5-gram
    assert d.check("colors: Red, green; blue!").eval_id == "e3"
    assert d.check("tiny item") is None
    assert Decontaminator().check("anything") is None  # no eval sets: nothing dropped


def test_gsm8k_questions_are_found(gsm8k_test: Path) -> None:
    rows = [json.loads(line) for line in gsm8k_test.read_text().splitlines()[:300]]
    d = Decontaminator(ngram=13)
    d.add_all((f"gsm8k:{i}", r["question"]) for i, r in enumerate(rows))
    for i in (0, 17, 299):  # a question pasted inside other text, re-cased and re-spaced
        text = "Homework:\n" + rows[i]["question"].upper().replace(" ", "  ") + "\nThanks!"
        assert d.check(text).eval_id == f"gsm8k:{i}"
    clean = [p.document() for p in generate(300, seed=0)]
    assert not any(d.check(t) for t in clean)


def test_prepare_drops_planted_gsm8k_question(gsm8k_test: Path, tmp_path: Path) -> None:
    """A GSM8K test question hidden in a training mix is removed and reported."""
    line = 42
    question = json.loads(gsm8k_test.read_text().splitlines()[line - 1])["question"]
    train = [p.document() for p in generate(60, seed=1)]
    planted = f"Practice problem.\n{question}\nWork it out step by step."
    train.insert(30, planted)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    recipe = DataRecipe(
        sources=[
            SourceConfig(name="mix", kind="jsonl", paths=[str(path)]),
            SourceConfig(name="code", kind="stdlib", max_docs=20),
        ],
        decontam=DecontamConfig(
            eval_sets=[
                SourceConfig(
                    name="gsm8k", kind="jsonl", paths=[str(gsm8k_test)], text_field="question"
                )
            ]
        ),
    )
    out = tmp_path / "data"
    summary = prepare(recipe, out=out, tokenizer=ByteTokenizer(), progress=False)
    assert summary["total"]["decontam_drops"] == 1
    assert summary["sources"]["mix"]["dropped"] == {"decontam": 1}
    assert summary["sources"]["mix"]["documents"] == 60
    assert summary["decontam"]["eval_items"] == 1319
    report = [json.loads(x) for x in (out / "decontam.jsonl").read_text().splitlines()]
    assert len(report) == 1
    assert report[0]["doc"] == f"{path}:31" and report[0]["source"] == "mix"
    assert report[0]["eval_item"] == f"gsm8k:{gsm8k_test}:{line}"
    assert len(report[0]["ngram"].split()) == 13
    stream = open_dataset(out).streams["mix"]
    kept = "".join(ByteTokenizer().decode(stream.document(i).tolist()) for i in range(60))
    assert question not in kept and train[0] in kept
