"""The `geode` console script: every verb has --help with an example; init writes a checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest

import geode
from geode.cli import build_parser, main


def _verbs() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    return sorted(sub.choices)


@pytest.mark.parametrize("verb", _verbs())
def test_every_verb_has_help_with_example(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "example" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "geode", "info", "nano-1m"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "nano-1m" in out.stdout


def test_init_writes_loadable_checkpoint(tmp_path, capsys):
    assert main(["init", "nano-1m", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert "wrote nano-1m" in capsys.readouterr().out
    model = geode.load_model(tmp_path / "m")
    ref = geode.build_model(geode.get_preset("nano-1m"), seed=3)
    assert all(
        (a == b).all() for a, b in zip(model.state_dict().values(), ref.state_dict().values())
    )


def test_init_ships_tokenizer_and_checks_its_size(tmp_path, capsys):
    import random

    from geode.tokenizer import train_tokenizer

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(3000)]
    text = [" ".join(rng.choices(words, k=12)) for _ in range(2000)]
    tok = train_tokenizer(texts=text, vocab_size=600, out=tmp_path / "tok.model")
    assert (
        main(["init", "nano-1m", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok.model")])
        == 0
    )
    assert geode.load_tokenizer(tmp_path / "m").vocab_size == tok.vocab_size
    big = train_tokenizer(texts=text, vocab_size=2100, out=tmp_path / "big.model")
    assert big.vocab_size > 2048
    assert (
        main(["init", "nano-1m", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "big.model")])
        == 1
    )
    assert "do not fit nano-1m's 2048-row embedding" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_init_sizes_the_embedding_from_the_tokenizer(tmp_path, capsys):
    """One row per piece: sampling can never pick an id the tokenizer cannot decode."""
    import json
    import random

    from geode.tokenizer import train_tokenizer

    rng = random.Random(1)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 8))) for _ in range(800)
    ]
    tok = train_tokenizer(texts=[" ".join(rng.choices(words, k=10)) for _ in range(800)],
                          vocab_size=400, out=tmp_path / "tok.model")  # fmt: skip
    argv = ["init", "nano-1m", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok.model")]
    assert main(argv) == 0
    assert "400-row embedding sized from the tokenizer" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == 400
    model = geode.load_model(tmp_path / "m")
    assert model.embed_tokens.weight.shape == (400, model.config.hidden_size)
    argv = ["generate", str(tmp_path / "m"), "--prompt", "ab", "--max-new-tokens", "48",
            "--ignore-eos", "--seed", "0", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 48 and max(out["token_ids"]) < 400
    assert out["text"] == tok.decode(out["token_ids"], skip_special=True)


def _generate_json(argv: list[str], capsys) -> dict:
    import json

    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def test_generate_with_a_draft_keeps_output_and_fields(tmp_path, capsys):
    ids = ["--ids", "2,17,40,17,40,17", "--temperature", "0", "--max-new-tokens", "12"]
    plain = _generate_json(["nano-1m", *ids], capsys)
    ngram = _generate_json(["nano-1m", *ids, "--draft-ngram", "2"], capsys)
    assert main(["init", "nano-1m", str(tmp_path / "d"), "--seed", "0"]) == 0  # = the preset
    capsys.readouterr()
    model = _generate_json(["nano-1m", *ids, "--draft", str(tmp_path / "d")], capsys)
    for out in (ngram, model):
        assert out["token_ids"] == plain["token_ids"]
        assert set(out) == set(plain) | {"speculative"}  # today's fields, one new key
        st = out["speculative"]
        assert st["draft_tokens"] > 0 and 0 <= st["accepted_tokens"] <= st["draft_tokens"]
    assert model["speculative"]["acceptance_rate"] == 1.0  # the target drafting for itself
    assert "speculative" not in plain


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--draft-ngram", "0"], "--draft-ngram must be >= 1"),
        (["--draft-ngram", "2", "--num-draft-tokens", "0"], "--num-draft-tokens must be >= 1"),
        (["--draft", "no/such/dir"], "not a checkpoint directory"),
    ],
)
def test_generate_draft_flag_errors(flags, message, capsys):
    assert main(["generate", "nano-1m", "--ids", "2,5", *flags]) == 2
    assert message in capsys.readouterr().err


def test_generate_rejects_a_draft_with_another_vocabulary(tmp_path, capsys):
    assert main(["init", "nano-5m", str(tmp_path / "d")]) == 0  # 4096 rows vs nano-1m's 2048
    capsys.readouterr()
    assert main(["generate", "nano-1m", "--ids", "2,5", "--draft", str(tmp_path / "d")]) == 2
    assert "vocabulary size 4096 differs from the target's 2048" in capsys.readouterr().err


def test_load_for_inference(tmp_path):
    import torch

    from geode.infer.load import load_for_inference

    model, tok = load_for_inference("nano-1m", "bfloat16", seed=1)
    assert tok is None and model.dtype == torch.bfloat16
    assert main(["init", "nano-1m", str(tmp_path / "m"), "--seed", "1"]) == 0
    loaded, tok = load_for_inference(tmp_path / "m", quant="int8")
    assert tok is None and loaded.quantization["mode"] == "int8"
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_for_inference(tmp_path / "m", require_tokenizer=True)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory"):
        load_for_inference(tmp_path / "nothing")


def test_serve_and_chat_take_the_draft_flags():
    from geode.cli.generate import draft_kwargs

    for verb in ("serve", "chat"):
        args = build_parser().parse_args(
            [verb, "m", "--draft-ngram", "3", "--num-draft-tokens", "6"]
        )
        assert draft_kwargs(args) == {"draft": "ngram:3", "num_draft_tokens": 6}
        assert draft_kwargs(build_parser().parse_args([verb, "m"])) == {}
