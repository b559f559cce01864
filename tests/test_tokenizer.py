"""Tokenizer: ids equal the HF Gemma tokenizer's for the same model file; decoding equals
SentencePiece's; streaming decode equals full decode; training and loading errors are clear."""

from __future__ import annotations

import pickle
import random
import sysconfig
import warnings
from pathlib import Path

import pytest

from geode.chat import render
from geode.cli import main as cli_main
from geode.tokenizer import (
    DEFAULT_USER_SYMBOLS,
    SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

TEMPLATE = Path(__file__).resolve().parents[1].parent / "shared/fixtures/gemma3_chat_template.jinja"

WORDS = {
    "en": "the quick brown fox jumps over lazy dog model token train data value return".split(),
    "fr": "été déjà naïve où français garçon cœur".split(),
    "de": "Straße Größe übermäßig schön Mädchen".split(),
    "ru": "привет мир данные модель обучение".split(),
    "el": "γεια σου κόσμε δεδομένα".split(),
    "ja": "日本語 東京 テキスト です 学習 データ".split(),
    "zh": "中文 文本 测试 模型 训练 数据".split(),
    "ko": "한국어 데이터 모델 학습".split(),
    "ar": "مرحبا بالعالم بيانات".split(),
    "hi": "नमस्ते दुनिया डेटा".split(),
}
EMOJI = ["😀", "🎉", "👍🏽", "👨\u200d👩\u200d👧", "🇺🇸", "❤️", "🤖"]
SPACES = [" ", "  ", "    ", "\t", "\n", "\n\n", "   \n", "\r\n", "\u00a0", "\u3000", " \t "]
CODE = [
    "def f(x):\n    return x * 2\n",
    "for i in range(10):\n\tprint(i)",
    "if (a && b) { return -1; }",
    "x = {'k': [1, 2, 3]}  # comment",
    "SELECT * FROM t WHERE id = 42;",
    '<div class="a">&amp;</div>',
]
ODD = ["\x00", "\x7f", "\ufeff", "e\u0301", "\U0001f9ea", "\U000e0041", "\U0010fffd", "\ue000"]
SPECIAL = [*SPECIAL_TOKENS, "<mask>", "<unk>", "[multimodal]", "<start_of", "<<bos>>", "<eos"]


def _number(rng: random.Random) -> str:
    return rng.choice(
        [str(rng.randrange(10 ** rng.randrange(1, 12))), f"{rng.random() * 1000:.3f}", "1,000,000"]
    )


def random_text(rng: random.Random, n: int = 20, special: bool = True) -> str:
    """A random mix of scripts, emoji, code, numbers, whitespace runs and special tokens."""
    parts = []
    for _ in range(rng.randrange(1, n)):
        kind = rng.random()
        if kind < 0.4:
            parts.append(rng.choice(WORDS[rng.choice(list(WORDS))]))
        elif kind < 0.55:
            parts.append(rng.choice(SPACES))
        elif kind < 0.65:
            parts.append(_number(rng))
        elif kind < 0.72:
            parts.append(rng.choice(EMOJI))
        elif kind < 0.78:
            parts.append(rng.choice(CODE))
        elif kind < 0.83:
            parts.append(rng.choice(ODD))
        elif kind < 0.88:  # characters never seen in training: byte fallback
            parts.append(
                chr(rng.choice([rng.randrange(0x4E00, 0xA000), rng.randrange(0x1F300, 0x1FA00)]))
            )
        elif kind < 0.93 and special:
            parts.append(rng.choice(SPECIAL))
        else:
            parts.append(rng.choice(".,;:!?-()[]{}\"'/\\@#$%^&*+=_~`|"))
        if rng.random() < 0.5:
            parts.append(" ")
    return "".join(parts)


def training_texts() -> list[str]:
    rng = random.Random(1234)
    texts = [random_text(rng, 60, special=False) for _ in range(1500)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts += [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("[a-c]*.py"))[:12]]
    return texts


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts=training_texts(), vocab_size=3000, out=out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir: Path):
    pytest.importorskip(
        "google.protobuf", reason="transformers needs protobuf to read .model files"
    )
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GemmaTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def sp(tok: Tokenizer):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=tok.serialized_model())


def samples(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fixed = [
        "",
        " ",
        "   leading spaces",
        "trailing spaces   ",
        "a\n\n\n  b\t\tc",
        "3.14159 + 2,718 = 5.85959; 1234567890",
        "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n",
        "<bos><bos><eos><pad><unk>",
        " <start_of_image> <image_soft_token><end_of_image> ",
        *CODE,
        *EMOJI,
        *ODD,
        " ".join(w for ws in WORDS.values() for w in ws),
    ]
    return fixed + [random_text(rng) for _ in range(n)]


# ---- equality with the reference ------------------------------------------------------------


def test_vocabulary_matches_hf(tok: Tokenizer, hf) -> None:
    assert tok.vocab_size == len(hf)
    pieces = hf.convert_ids_to_tokens(list(range(tok.vocab_size)))
    assert [tok.id_to_piece(i) for i in range(tok.vocab_size)] == pieces
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (
        hf.pad_token_id,
        hf.eos_token_id,
        hf.bos_token_id,
        hf.unk_token_id,
    )
    for name, i in tok.special_ids.items():
        assert hf.convert_tokens_to_ids(name) == i, name
        assert tok.piece_to_id(name) == i
    assert set(tok.special_ids) == set(SPECIAL_TOKENS)
    assert tok.piece_to_id("<no such piece>") is None


def test_encode_matches_hf_and_round_trips(tok: Tokenizer, hf) -> None:
    texts = samples(400)
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), repr(text)
        assert tok.decode(ids) == text, repr(text)
        assert hf.decode(ids) == text, repr(text)
    assert tok.encode_batch(texts) == [hf.encode(t, add_special_tokens=False) for t in texts]


def test_bos_eos(tok: Tokenizer, hf) -> None:
    ids = hf.encode("hello world", add_special_tokens=False)
    assert tok.encode("hello world", add_bos=True) == [hf.bos_token_id, *ids]
    assert tok.encode("hello world", add_bos=True, add_eos=True) == [
        hf.bos_token_id,
        *ids,
        hf.eos_token_id,
    ]
    assert tok.encode_batch(["hello world", ""], add_eos=True) == [
        [*ids, hf.eos_token_id],
        [hf.eos_token_id],
    ]


def test_chat_text_encodes_like_hf_chat_template(tok: Tokenizer, hf) -> None:
    if not TEMPLATE.is_file():
        pytest.skip(f"reference chat template not found at {TEMPLATE}")
    messages = [
        {"role": "system", "content": "Be brief. 日本語"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat 🐱."},
        {"role": "user", "content": "  And 2+2?  "},
    ]
    ref = hf.apply_chat_template(
        messages, chat_template=TEMPLATE.read_text(), add_generation_prompt=True, tokenize=True
    )
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    ids = tok.encode(render(messages))
    assert ids == list(ref)
    assert ids[0] == tok.bos_id and ids.count(tok.special_ids["<start_of_turn>"]) == 4


def test_skip_special_matches_hf_for_control_tokens(tok: Tokenizer, hf) -> None:
    rng = random.Random(3)
    for _ in range(100):
        ids = []  # control ids between whole texts (HF decodes broken byte runs differently)
        for _ in range(3):
            ids += tok.encode(random_text(rng, 8, special=False))
            ids.append(rng.choice([tok.bos_id, tok.eos_id, tok.pad_id]))
        assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids) == hf.decode(ids)
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn><eos>")
    assert tok.decode(ids, skip_special=True) == tok.decode(tok.encode("user\nhi"))


def _random_ids(rng: random.Random, tok: Tokenizer, byte_ids: list[int], n: int) -> list[int]:
    """Random ids, most of them byte pieces (so multi-byte characters get split and broken)."""
    out: list[int] = []
    while len(out) < n:
        r = rng.random()
        if r < 0.35:  # a valid multi-byte character as byte pieces
            ch = chr(rng.choice([rng.randrange(0x80, 0x800), rng.randrange(0x4E00, 0xA000)]))
            ch = rng.choice([ch, rng.choice(EMOJI)[0]])
            out += [byte_ids[b] for b in ch.encode("utf-8")]
        elif r < 0.6:
            out.append(rng.choice(byte_ids))
        else:
            out.append(rng.randrange(tok.vocab_size))
    return out


def test_decode_matches_sentencepiece(tok: Tokenizer, sp) -> None:
    byte_ids = [tok.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    rng = random.Random(5)
    special = {i for i in range(tok.vocab_size) if sp.IsControl(i) or sp.IsUnknown(i)}
    for n in range(2000):  # (SentencePiece drops control ids; we render them as text)
        ids = [i for i in _random_ids(rng, tok, byte_ids, n % 12) if i not in special]
        assert tok.decode(ids) == sp.decode(ids), ids
    assert tok.decode([]) == sp.decode([]) == ""


def test_decode_matches_sentencepiece_with_dummy_prefix(tmp_path: Path) -> None:
    """Llama-style models (dummy prefix) drop the first piece's leading space, as SentencePiece does."""
    import sentencepiece

    rng = random.Random(9)
    llama = train_tokenizer(
        texts=[random_text(rng, 40, special=False) for _ in range(300)],
        vocab_size=800,
        out=tmp_path / "llama.model",
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
    )
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama.path))
    control = {i for i in range(llama.vocab_size) if sp.IsControl(i) or sp.IsUnknown(i)}
    for _ in range(1000):
        ids = [rng.randrange(llama.vocab_size) for _ in range(rng.randrange(8))]
        ids = [i for i in ids if i not in control]
        assert llama.decode(ids) == sp.decode(ids), ids
        stream = llama.stream_decoder()
        assert "".join(stream.push(i) for i in ids) + stream.flush() == sp.decode(ids)


# ---- streaming -------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    dec = tok.stream_decoder(skip_special)
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.flush())
    assert dec.text == "".join(deltas)
    return deltas


def test_stream_decode_equals_full_decode(tok: Tokenizer) -> None:
    byte_ids = [tok.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    for seed in range(400):
        rng = random.Random(seed)
        ids = _random_ids(rng, tok, byte_ids, rng.randrange(60))
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip), (seed, ids)
        # feeding in random-size chunks gives the same text
        dec, out, pos = tok.stream_decoder(), [], 0
        while pos < len(ids):
            k = rng.randrange(1, 5)
            out.append(dec.extend(ids[pos : pos + k]))
            pos += k
        assert "".join(out) + dec.flush() == tok.decode(ids)


def test_stream_decode_never_splits_characters(tok: Tokenizer) -> None:
    for seed in range(200):
        text = random_text(random.Random(seed), 30)
        ids = tok.encode(text)
        deltas = _stream(tok, ids)
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas), (text, deltas)
    # a character spelled as byte pieces appears whole, on its last byte
    ch = "\U0001d11e"
    assert tok.piece_to_id(ch) is None  # not in the vocabulary: byte fallback
    ids = tok.encode("a " + ch)
    assert ids[-4:] == [tok.piece_to_id(f"<0x{b:02X}>") for b in ch.encode()]
    deltas = _stream(tok, ids)
    assert deltas[-5:] == ["", "", "", ch, ""] and "".join(deltas) == "a " + ch


# ---- persistence and options ----------------------------------------------------------------


def test_save_load_pickle(tok: Tokenizer, tmp_path: Path) -> None:
    text = samples(0)[6]
    path = tok.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.model"
    assert load_tokenizer(tmp_path / "ckpt").encode(text) == tok.encode(text)
    path2 = tok.save(tmp_path / "other.model")
    assert path2.read_bytes() == path.read_bytes()
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(text) == tok.encode(text) and copy.path == tok.path


def test_gemma_training_options(tok: Tokenizer) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.serialized_model())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert spec.model_type == pb.TrainerSpec.BPE
    assert spec.byte_fallback and spec.split_digits and spec.allow_whitespace_only_pieces
    assert norm.name == "identity"
    assert not norm.add_dummy_prefix and not norm.remove_extra_whitespaces
    assert [p.piece for p in proto.pieces[:4]] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    user = [p.piece for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED]
    assert user == list(DEFAULT_USER_SYMBOLS)


def test_training_is_deterministic(tmp_path: Path) -> None:
    texts = training_texts()[:400]
    a = train_tokenizer(texts=texts, vocab_size=1500, out=tmp_path / "a.model")
    b = train_tokenizer(texts=iter(texts), vocab_size=1500, out=tmp_path / "b")
    assert a.serialized_model() == b.serialized_model()


def test_tokenizer_without_chat_tokens(tmp_path: Path, hf) -> None:
    """A vocabulary lacking some special tokens loads, reports them absent, encodes like HF."""
    texts = training_texts()[:300]
    out = tmp_path / "plain"
    small = train_tokenizer(
        texts=texts, vocab_size=1500, out=out, user_symbols=["<start_of_turn>", "<end_of_turn>"]
    )
    assert set(small.special_ids) == {"<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"}
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.GemmaTokenizer.from_pretrained(out)
    text = "<start_of_turn>user\n<start_of_thinking>hm<end_of_thinking><start_of_image>"
    assert small.encode(text) == ref.encode(text, add_special_tokens=False)
    assert small.decode(small.encode(text)) == text


# ---- errors ---------------------------------------------------------------------------------


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model in checkpoint directory"):
        load_tokenizer(tmp_path)
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model"):
        load_tokenizer(tmp_path / "empty.model")
    (tmp_path / "tokenizer.model").write_bytes(random.Random(0).randbytes(5000))
    with pytest.raises(ValueError, match=r"tokenizer.model: not a valid SentencePiece model"):
        load_tokenizer(tmp_path)


def test_training_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no training text.*empty.txt"):
        train_tokenizer([tmp_path / "empty.txt"], ["", "   "], vocab_size=500, out=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer([tmp_path / "nope.txt"], vocab_size=500, out=tmp_path)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        train_tokenizer([tmp_path / "latin1.txt"], vocab_size=500, out=tmp_path)
    with pytest.raises(ValueError, match=r"vocab_size=100000.*too high"):
        train_tokenizer(texts=["tiny corpus"], vocab_size=100_000, out=tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def test_decode_errors(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="token id 3000 out of range"):
        tok.decode([1, 3000])
    with pytest.raises(ValueError, match="token id -1 out of range"):
        tok.stream_decoder().push(-1)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# ---- CLI ------------------------------------------------------------------------------------


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(training_texts()[:300]), encoding="utf-8")
    out = tmp_path / "cli"
    args = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "1500", "--out", str(out)]
    assert cli_main([*args, "--symbol", "<extra>"]) == 0
    tok = load_tokenizer(out)
    assert tok.piece_to_id("<extra>") is not None
    capsys.readouterr()
    text = "<start_of_turn>user\nhé 12"
    assert cli_main(["tokenizer", "encode", str(out), text, "--bos"]) == 0
    ids = capsys.readouterr().out.split()
    assert [int(i) for i in ids] == tok.encode(text, add_bos=True)
    assert cli_main(["tokenizer", "decode", str(out), *ids]) == 0
    assert capsys.readouterr().out == tok.decode([int(i) for i in ids]) + "\n"
    assert cli_main(["tokenizer", "info", str(out)]) == 0
    assert "<start_of_turn>" in capsys.readouterr().out
    assert cli_main(["tokenizer", "info", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err
    assert cli_main(["tokenizer", "train", "--vocab-size", "10", "--out", str(out)]) == 2


def test_cli_stdlib(tmp_path: Path) -> None:
    args = ["tokenizer", "train", "--stdlib", "--stdlib-mb", "0.5", "--vocab-size", "800"]
    assert cli_main([*args, "--out", str(tmp_path / "s.model")]) == 0
    assert load_tokenizer(tmp_path / "s.model").vocab_size == 800


@pytest.mark.parametrize("action", [[], ["train"], ["encode"], ["decode"], ["info"]])
def test_cli_help(action: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["tokenizer", *action, "--help"])
    assert e.value.code == 0
    assert "example" in capsys.readouterr().out
