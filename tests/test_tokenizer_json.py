"""tokenizer.json support: a Tokenizer read from a Hugging Face tokenizer.json (the `tokenizers`
library) gives the ids, special tokens, decoding, streaming and chat ids of the SentencePiece
tokenizer it was converted from and of transformers' own tokenizer — on random small vocabularies
and on the real Gemma 3 270M (its GGUF tokenizer, saved by transformers as tokenizer.json only)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import warnings
from pathlib import Path

import pytest

from geode.chat import render
from geode.cli import main as cli_main
from geode.tokenizer import (
    JSON_FILENAME,
    MODEL_FILENAME,
    Tokenizer,
    find_tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from tests.conftest import _cached, _real_cache_dir
from tests.eval.conftest import shared_file
from tests.test_tokenizer import (
    EMOJI,
    TEMPLATE,
    _random_ids,
    random_text,
    samples,
    training_texts,
)

MESSAGES = [
    {"role": "system", "content": "Be brief. 日本語"},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": "A cat 🐱."},
    {"role": "user", "content": "  And 2+2?  "},
]


def _hf_from(directory: Path, cls: str = "GemmaTokenizer"):
    """transformers' tokenizer for a directory (tokenizer.model or tokenizer.json)."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cls).from_pretrained(directory)


def _hf_ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


def _chat_ids(hf) -> list[int]:
    ref = hf.apply_chat_template(
        MESSAGES, chat_template=TEMPLATE.read_text(), add_generation_prompt=True, tokenize=True
    )
    return list(ref["input_ids"] if hasattr(ref, "keys") else ref)


def _stream_text(tok: Tokenizer, ids: list[int], skip: bool = False) -> str:
    dec = tok.stream_decoder(skip)
    return "".join(dec.push(i) for i in ids) + dec.flush()


# ---- random small vocabularies: SentencePiece -> transformers -> tokenizer.json -------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Tokenizer, object]:
    """(geode SentencePiece tokenizer, geode tokenizer.json tokenizer, HF tokenizer.json one):
    transformers' GemmaTokenizerFast converts the geode-trained tokenizer.model."""
    root = tmp_path_factory.mktemp("tokjson")
    sp = train_tokenizer(texts=training_texts(), vocab_size=3000, out=root / "sp")
    _hf_from(root / "sp", "GemmaTokenizerFast").save_pretrained(root / "json")
    assert (root / "json" / JSON_FILENAME).is_file()
    assert not (root / "json" / MODEL_FILENAME).exists()
    return sp, load_tokenizer(root / "json"), _hf_from(root / "json")


def test_vocabulary_and_specials_equal(pair) -> None:
    sp, tj, hf = pair
    assert tj.path.name == JSON_FILENAME and tj.vocab_size == sp.vocab_size == len(hf)
    assert [tj.id_to_piece(i) for i in range(tj.vocab_size)] == [
        sp.id_to_piece(i) for i in range(sp.vocab_size)
    ]
    ids = (tj.pad_id, tj.eos_id, tj.bos_id, tj.unk_id)
    assert ids == (sp.pad_id, sp.eos_id, sp.bos_id, sp.unk_id)
    assert ids == (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, hf.unk_token_id)
    assert tj.special_ids == sp.special_ids
    assert tj.piece_to_id("<no such piece>") is None
    assert tj._bytes == sp._bytes  # same decoding table both ways


def test_ids_equal_both_ways(pair) -> None:
    sp, tj, hf = pair
    texts = samples(300, seed=11)
    for text in texts:
        ids = tj.encode(text)
        assert ids == sp.encode(text) == _hf_ids(hf, text), repr(text)
        assert tj.decode(ids) == sp.decode(ids) == text, repr(text)
    assert tj.encode_batch(texts, add_bos=True) == sp.encode_batch(texts, add_bos=True)
    assert tj.encode("hi", add_bos=True, add_eos=True) == [tj.bos_id, *sp.encode("hi"), tj.eos_id]


def test_decode_and_stream_equal(pair) -> None:
    sp, tj, hf = pair
    byte_ids = [tj.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    for seed in range(300):
        rng = random.Random(seed)
        ids = _random_ids(rng, tj, byte_ids, rng.randrange(40))
        assert tj.decode(ids) == sp.decode(ids), ids
        for skip in (False, True):
            assert _stream_text(tj, ids, skip) == tj.decode(ids, skip), (seed, ids)
    # skip_special drops what HF's tokenizer.json marks special (control pieces and <mask>)
    rng = random.Random(3)
    for _ in range(60):
        ids = []
        for _ in range(3):
            ids += tj.encode(random_text(rng, 8, special=False))
            ids.append(rng.choice([tj.bos_id, tj.eos_id, tj.pad_id, tj.piece_to_id("<mask>")]))
        assert tj.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
        assert tj.decode(ids) == hf.decode(ids)
    ch = "\U0001d11e"  # byte fallback: the character appears whole, on its last byte
    dec = tj.stream_decoder()
    assert [dec.push(i) for i in tj.encode("a" + ch)][-4:] == ["", "", "", ch]


def test_chat_ids_equal(pair) -> None:
    sp, tj, hf = pair
    ids = tj.encode(render(MESSAGES))
    assert ids == sp.encode(render(MESSAGES)) == _chat_ids(hf)
    assert ids[0] == tj.bos_id and ids.count(tj.special_ids["<start_of_turn>"]) == 4


def test_dummy_prefix_tokenizer_json(tmp_path: Path) -> None:
    """Llama-style tokenizer.json (Metaspace, decoder Strip): the first leading space goes, as in
    SentencePiece and transformers."""
    rng = random.Random(9)
    texts = [random_text(rng, 40, special=False) for _ in range(300)]
    llama = train_tokenizer(
        texts=texts, vocab_size=800, out=tmp_path / "sp", add_dummy_prefix=True,
        remove_extra_whitespaces=True,
    )  # fmt: skip
    _hf_from(tmp_path / "sp", "LlamaTokenizerFast").save_pretrained(tmp_path / "json")
    tj, hf = load_tokenizer(tmp_path / "json"), _hf_from(tmp_path / "json", "LlamaTokenizerFast")
    assert tj._strips_leading_space and not (tmp_path / "json" / MODEL_FILENAME).exists()
    for text in texts[:100]:
        assert tj.encode(text) == _hf_ids(hf, text), repr(text)
    control = {i for i in range(tj.vocab_size) if tj.is_special(i)}
    for _ in range(300):
        ids = [i for i in (rng.randrange(tj.vocab_size) for _ in range(6)) if i not in control]
        assert tj.decode(ids) == llama.decode(ids) == _stream_text(tj, ids), ids


def test_save_load_pickle_and_which_file(pair, tmp_path: Path) -> None:
    sp, tj, _ = pair
    text = "<start_of_turn>user\nhé 12 🤖"
    saved = tj.save(tmp_path / "ckpt")
    assert saved == tmp_path / "ckpt" / JSON_FILENAME and find_tokenizer(tmp_path / "ckpt") == saved
    assert load_tokenizer(tmp_path / "ckpt").encode(text) == tj.encode(text)
    copy = pickle.loads(pickle.dumps(tj))
    assert copy.encode(text) == tj.encode(text) and copy.path == tj.path
    assert copy.special_ids == tj.special_ids
    sp.save(tmp_path / "ckpt")  # both files: tokenizer.model is preferred
    assert find_tokenizer(tmp_path / "ckpt") == tmp_path / "ckpt" / MODEL_FILENAME
    assert load_tokenizer(tmp_path / "ckpt").path.name == MODEL_FILENAME
    assert find_tokenizer(tmp_path / "empty-dir-missing") is None


def _gpt2_style(path: Path) -> Path:
    """A byte-level BPE tokenizer.json (GPT-2 family), built with the tokenizers library."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    tk.train_from_iterator(training_texts()[:200], trainer)
    tk.save(str(path))
    return path


def test_other_families_and_bad_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "gpt2").mkdir()
    gpt2 = _gpt2_style(tmp_path / "gpt2" / JSON_FILENAME)
    with pytest.raises(
        ValueError, match=r"gpt2/tokenizer.json: pre_tokenizer type ByteLevel.*GPT-2"
    ):
        load_tokenizer(gpt2.parent)
    spec = json.loads(gpt2.read_text())
    spec["pre_tokenizer"] = spec["decoder"] = None
    spec["model"] = {"type": "WordPiece", "vocab": {"[UNK]": 0, "a": 1}, "unk_token": "[UNK]"}
    (tmp_path / "wp.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"wp.json: model.type 'WordPiece' is not supported"):
        load_tokenizer(tmp_path / "wp.json")
    spec["model"] = {"type": "BPE", "vocab": {"a": 0}, "merges": []}
    spec["decoder"] = {"type": "BPEDecoder", "suffix": "</w>"}
    (tmp_path / "dec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"dec.json: decoder BPEDecoder .* is not supported"):
        load_tokenizer(tmp_path / "dec.json")
    (tmp_path / "bad.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list.json: no 'model' object"):
        load_tokenizer(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.model .*and no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_generate_and_info_on_a_tokenizer_json_checkpoint(
    pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`geode generate` on a checkpoint with only tokenizer.json prints what it prints with the
    tokenizer.model it came from; `geode info` names the file."""
    import geode

    sp, tj, _ = pair
    cfg = dataclasses.replace(
        geode.get_preset("nano-1m"), vocab_size=len(sp), num_hidden_layers=2, layer_types=None
    )
    model = geode.build_model(cfg, seed=0)
    outs = []
    for tok in (sp, tj):
        path = tmp_path / f"ckpt-{tok.filename}"
        geode.save_model(model, path, files={tok.filename: tok.path})
        args = ["generate", str(path), "--prompt", "the quick 日本", "--max-new-tokens", "6"]
        assert cli_main([*args, "--temperature", "0", "--ignore-eos"]) == 0
        outs.append(capsys.readouterr().out)
        assert cli_main(["info", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["tokenizer"] == str(path / tok.filename)
    assert outs[0] == outs[1] and outs[0].strip()
    assert cli_main(["info", str(path)]) == 0
    assert f"tokenizer        {path / JSON_FILENAME}\n" in capsys.readouterr().out


def test_training_paths_find_a_tokenizer_json_checkpoint(pair, tmp_path: Path) -> None:
    """A checkpoint that ships only tokenizer.json feeds data preparation (hashed as the file
    it read), SFT / post-training recipes (model.init) and reference checks; a directory with
    neither file is a clear error."""
    from types import SimpleNamespace

    from geode.data.prepare import _load_tokenizer
    from geode.fileio import sha256_file
    from geode.recipe import RecipeError
    from geode.train.sft import tokenizer_path

    _, tj, _ = pair
    ckpt = Path(tj.path).parent
    tok, info = _load_tokenizer(str(ckpt))
    assert info == {"path": str(ckpt / JSON_FILENAME), "sha256": sha256_file(ckpt / JSON_FILENAME)}
    assert tok.encode("the quick") == tj.encode("the quick")
    recipe = SimpleNamespace(
        data=SimpleNamespace(tokenizer=""), model=SimpleNamespace(init=str(ckpt))
    )
    assert tokenizer_path(recipe) == ckpt / JSON_FILENAME
    recipe.model.init = str(tmp_path)
    with pytest.raises(RecipeError, match="holds no tokenizer.model or tokenizer.json"):
        tokenizer_path(recipe)


# ---- the real Gemma 3 270M: its tokenizer as transformers saves it (tokenizer.json only) ------


@pytest.fixture(scope="session")
def real_tokenizer_json(real_gguf: Path) -> Path:
    """Directory with the tokenizer.json transformers saves after loading the real GGUF's
    tokenizer (gguf_file=); built once into the real-model cache (about a minute)."""

    def build(tmp: Path) -> None:
        import transformers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoTokenizer.from_pretrained(
                real_gguf.parent, gguf_file=real_gguf.name
            )
        hf.save_pretrained(tmp)

    return _cached(_real_cache_dir() / "hf-tokenizer-json", build)


@pytest.fixture(scope="module")
def real(real_tokenizer_json: Path, real_gguf: Path) -> tuple[Tokenizer, object, Tokenizer]:
    """(geode's tokenizer from the real tokenizer.json, transformers' from the same file,
    geode's SentencePiece tokenizer rebuilt from the GGUF's metadata)."""
    import transformers

    assert not (real_tokenizer_json / MODEL_FILENAME).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoTokenizer.from_pretrained(real_tokenizer_json)
    return load_tokenizer(real_tokenizer_json), hf, load_tokenizer(real_gguf)


def _real_spans(n: int, seed: int = 0) -> list[str]:
    """Random spans of tinyshakespeare and GSM8K questions/answers, plus odd text."""
    rng = random.Random(seed)
    shakespeare = shared_file("tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    gsm = [json.loads(line) for line in shared_file("gsm8k", "test.jsonl").read_text().splitlines()]
    spans = []
    for _ in range(n // 2):
        start = rng.randrange(len(shakespeare) - 600)
        spans.append(shakespeare[start : start + rng.randrange(1, 600)])
        row = rng.choice(gsm)
        spans.append(rng.choice([row["question"], row["answer"], row["question"] + row["answer"]]))
    return spans + samples(40, seed=seed) + EMOJI


def test_real_gemma_ids_equal_transformers(real) -> None:
    tok, hf, gguf_sp = real
    assert tok.vocab_size == len(hf) == gguf_sp.vocab_size == 262_144
    assert tok._bytes == gguf_sp._bytes and tok._skip == gguf_sp._skip  # both backends agree
    spans = _real_spans(300)
    assert len(spans) >= 300
    batch = tok.encode_batch(spans)
    assert batch == gguf_sp.encode_batch(spans)
    for text, ids in zip(spans, batch, strict=True):
        assert ids == _hf_ids(hf, text), repr(text[:80])
        assert tok.decode(ids) == text == hf.decode(ids), repr(text[:80])
    assert tok.encode(spans[0], add_bos=True) == hf.encode(spans[0])  # HF adds <bos> itself


def test_real_gemma_specials_stream_and_chat(real) -> None:
    tok, hf, gguf_sp = real
    assert tok.special_ids == gguf_sp.special_ids
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.special_ids == {
        "<bos>": 2, "<eos>": 1, "<pad>": 0, "<start_of_turn>": 105, "<end_of_turn>": 106,
        "<start_of_image>": 255999, "<end_of_image>": 256000,
    }  # fmt: skip
    for name, i in tok.special_ids.items():
        assert hf.convert_tokens_to_ids(name) == i
    if TEMPLATE.is_file():
        assert tok.encode(render(MESSAGES)) == _chat_ids(hf)
    turn = "<start_of_turn>user\nWho wrote Hamlet?<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode(turn + "Shakespeare 🎭.<end_of_turn><eos>", add_bos=True)
    assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special=True) == "user\nWho wrote Hamlet?\nmodel\nShakespeare 🎭."
    for text in _real_spans(40, seed=1):
        ids = tok.encode(text)
        dec = tok.stream_decoder()
        deltas = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
