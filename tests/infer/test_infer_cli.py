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


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    """A nano-1m checkpoint with a 600-piece tokenizer (`geode init --tokenizer`)."""
    import random

    from geode.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tokmodel")
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnop", k=rng.randint(2, 7))) for _ in range(2000)]
    text = [" ".join(rng.choices(words, k=12)) for _ in range(1500)]
    train_tokenizer(texts=text, vocab_size=600, out=root / "tok.model")
    assert main(["init", "nano-1m", str(root / "m"), "--tokenizer", str(root / "tok.model")]) == 0
    return root / "m"


def _first_token(capsys, model, prompt: str) -> int:
    argv = ["generate", str(model), "--prompt", prompt, "--temperature", "0", "--json",
            "--max-new-tokens", "1", "--ignore-eos"]  # fmt: skip
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)["token_ids"][0]


def test_empty_result_is_explained_with_finish_reason_and_stop_token(capsys, tok_model):
    import geode

    tok = geode.load_tokenizer(tok_model)
    first = _first_token(capsys, tok_model, "abc")
    argv = ["generate", str(tok_model), "--prompt", "abc", "--temperature", "0",
            "--stop-token-id", str(first)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out == "\n"  # the (empty) text is still printed, for scripts
    assert "empty result (finish_reason=stop)" in out.err
    assert f"the model produced {tok.id_to_piece(first)!r} (id {first}) first" in out.err
    assert "--min-new-tokens" in out.err
    # Generating past it: a non-empty result, no note.
    assert main([*argv, "--min-new-tokens", "3", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "empty" not in out.err
    # A stop string that matches at once.
    piece = tok.decode([first])
    assert main([*argv[:-2], "--stop", piece.strip()[:1]]) == 0
    out = capsys.readouterr()
    assert f"the stop string {piece.strip()[:1]!r} matched " in out.err
    assert repr(tok.id_to_piece(first)) in out.err


def test_logprobs_print_a_table_without_json(capsys, tok_model):
    argv = ["generate", str(tok_model), "--prompt", "abc", "--temperature", "0",
            "--max-new-tokens", "4", "--ignore-eos", "--logprobs", "2"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ref["text"] and lines[1].startswith("logprobs")
    rows = lines[2:]
    assert len(rows) == 4
    import geode

    tok = geode.load_tokenizer(tok_model)
    for row, t, lp, top in zip(rows, ref["token_ids"], ref["logprobs"], ref["top_logprobs"]):
        assert row.split()[0] == repr(tok.id_to_piece(t))
        assert float(row.split()[1]) == pytest.approx(lp, abs=1e-3)
        assert len(top) == 2 and all(f"{v:.3f}" in row for v in top.values())
    assert main([*argv, "--stream"]) == 0  # streamed text, then the same table
    assert capsys.readouterr().out.splitlines()[1:] == lines[1:]


def test_whitespace_only_result_is_explained(tok_model):
    import geode
    from geode.cli.generate import explain_empty
    from geode.infer.engine import Result

    tok = geode.load_tokenizer(tok_model)
    space = tok.encode(" " * 40)
    r = Result("r", [2], space, tok.decode(space), "length")
    note = explain_empty(r, tok)
    assert note.startswith(
        "only whitespace (40 characters: '                '...; finish_reason=length)"
    )
    assert (
        f"{len(space)} generated token(s) without visible text: {tok.id_to_piece(space[0])!r}"
        in note
    )
    eos = Result("r", [2], [*space, tok.eos_id], tok.decode(space), "stop", stop_reason=tok.eos_id)
    assert explain_empty(eos, tok).endswith(f", then '<eos>' (id {tok.eos_id})")
