"""`geode generate` and `geode bench decode` end to end on a tiny preset (random weights)."""

from __future__ import annotations

import json

import pytest

from geode.cli import main


def test_generate_ids_json(capsys):
    rc = main(["generate", "nano-1m", "--ids", "2,5,6", "--ids", "2,9", "--temperature", "0",
               "--max-new-tokens", "5", "--ignore-eos", "--logprobs", "2", "--json"])  # fmt: skip
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt_token_ids"] for x in lines] == [[2, 5, 6], [2, 9]]
    assert all(len(x["token_ids"]) == 5 and x["finish_reason"] == "length" for x in lines)
    assert all(len(x["top_logprobs"][0]) == 2 for x in lines)


def test_generate_stream_seeded_is_reproducible(capsys):
    argv = ["generate", "nano-1m", "--ids", "2,5", "--max-new-tokens", "6", "--seed", "3",
            "--ignore-eos", "--stream"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and len(first.split()) == 6


@pytest.mark.parametrize(
    "flags,field",
    [(["--top-p", "1.5"], "top_p"), (["--temperature", "-1"], "temperature"),
     (["--top-k", "-2"], "top_k"), (["--max-new-tokens", "5000"], "max_new_tokens")],
)  # fmt: skip
def test_generate_bad_values_name_the_field(capsys, flags, field):
    assert main(["generate", "nano-1m", "--ids", "2,5", *flags]) == 1
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err


def test_text_prompt_without_tokenizer_is_a_clear_error(capsys):
    assert main(["generate", "nano-1m", "--prompt", "hello"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_bench_decode_json(capsys):
    rc = main(["bench", "decode", "nano-1m", "--batch", "1,2", "--prompt-len", "8",
               "--new-tokens", "4", "--reps", "1", "--quant", "int8", "--json"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and 0 < r["roofline_fraction"] for r in rows)


@pytest.mark.parametrize("verb", [["generate"], ["bench", "decode"]])
def test_help_has_an_example(capsys, verb):
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    assert "example" in capsys.readouterr().out
