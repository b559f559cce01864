"""GGUF in and out on small random models: the format logic without the real 270M.

References: transformers' GGUF loader (`load_gguf_checkpoint`, the tensors it hands a
Gemma3ForCausalLM) and SentencePiece (the tokenizer a GGUF round trip rebuilds).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import geode
from geode import gguf as G
from geode.checkpoint import CheckpointError
from geode.cli import main
from geode.config import ModelConfig
from geode.tokenizer import train_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog hello world def return if else".split()
# Gemma-like user-defined pieces: whitespace runs (escaped, as SentencePiece matches them)
WHITESPACE = ("\u2581\u2581", "\u2581\u2581\u2581\u2581", "\n\n")
TEXTS = [
    "the quick brown fox",
    "def f(x):\n    return x  +  1\n\n\nhello   world",
    "<start_of_turn>user\nhi<end_of_turn>\n<bos>x<eos> <unk> ü é 日本 🙂",
]


@pytest.fixture(scope="module")
def nano(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-layer random model (5 local : 1 global, as GGUF's gemma3 fixes) + its tokenizer,
    HF layout, float32."""
    root = tmp_path_factory.mktemp("gguf")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(24)) + "\n    x  y\n" for _ in range(300)]
    tok = train_tokenizer(texts=texts, vocab_size=330, out=root / "tok", extra_symbols=WHITESPACE)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size + 6,  # embedding padding rows: GGUF pads the vocabulary
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=8,
        max_position_embeddings=256,
        name="nano-gguf",
    )
    model = geode.build_model(cfg, seed=0)
    with torch.no_grad():  # norms as trained models have them, not the all-zero init
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = root / "hf"
    geode.save_model(model, path, files={"tokenizer.model": root / "tok" / "tokenizer.model"})
    return path


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _transformers_tensors(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """What transformers' GGUF loader hands Gemma3ForCausalLM, by geode name."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        hf_model = Gemma3ForCausalLM(Gemma3TextConfig(**config.to_hf()))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf_model)
    return {k.removeprefix("model."): v for k, v in parsed["tensors"].items()}


@pytest.mark.parametrize("out_type", ["f32", "bf16", "q8_0"])
def test_export_import_equals_transformers_loader(nano: Path, tmp_path: Path, out_type: str):
    """HF -> GGUF -> geode gives exactly the tensors transformers' GGUF loader gives, and the
    weights the export started from (bitwise for f32 matrices, within the format otherwise)."""
    out = G.hf_to_gguf(nano, tmp_path / f"m-{out_type}.gguf", out_type)
    ckpt = G.read_gguf(out)
    assert ckpt.config == geode.read_config(nano).replace(name=ckpt.config.name)
    model = G.load_gguf_model(out, dtype="float32")
    ours, theirs, src = (
        _state(model),
        _transformers_tensors(out, ckpt.config),
        _state(geode.load_model(nano)),
    )
    assert set(theirs) == set(ours) - {"lm_head.weight"}
    for name, t in theirs.items():
        assert torch.equal(ours[name], t.float()), name
    for name, w in src.items():
        got = ours[name]
        if name.endswith("norm.weight"):  # stored as float32 (1 + w): what the model applies
            assert torch.equal(1 + got, 1 + w), name
        elif out_type == "f32":
            assert torch.equal(got, w), name
        elif out_type == "bf16":
            assert torch.equal(got, w.bfloat16().float()), name
        else:  # q8_0: int8 * an fp16 scale d = max|block| / 127 per 32 values: rounding to
            # the grid (d / 2) plus the scale's fp16 rounding (127 * d * 2**-11)
            d = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            err = (got - w).reshape(-1, 32).abs()
            assert bool((err <= d * (0.5 + 127 * 2**-11) + 1e-12).all()), name
    types = {t.name: t.qtype.name for t in ckpt.tensors.values()}
    want = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0"}[out_type]
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == want
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_bf16_round_trip_is_bitwise(nano: Path, tmp_path: Path):
    """HF (bf16) -> GGUF (bf16) -> HF gives bitwise-equal bf16 tensors, config and tokenizer."""
    bf16 = geode.save_model(
        geode.load_model(nano, dtype="bfloat16"),
        tmp_path / "bf16",
        files={"tokenizer.model": nano / "tokenizer.model"},
    )
    assert main(["convert", str(bf16), str(tmp_path / "m.gguf"), "--type", "bf16"]) == 0
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    a, b = geode.load_model(bf16), geode.load_model(tmp_path / "back")
    assert b.dtype == torch.bfloat16
    for (name, x), (_, y) in zip(_state(a).items(), _state(b).items(), strict=True):
        assert x.dtype == y.dtype == torch.bfloat16 and torch.equal(x, y), name
    assert geode.read_config(tmp_path / "back") == geode.read_config(bf16)
    tok_a, tok_b = geode.load_tokenizer(bf16), geode.load_tokenizer(tmp_path / "back")
    for text in TEXTS:
        assert tok_a.encode(text) == tok_b.encode(text)


def test_tiny_norm_weights_keep_the_applied_scale(nano: Path, tmp_path: Path):
    """GGUF stores a norm as float32 (1 + w): a |w| below 2**-16 cannot survive bitwise in
    bf16, but the scale the model applies, 1 + w in float32, does."""
    model = geode.load_model(nano, dtype="bfloat16")
    w = model.layers[0].input_layernorm.weight
    with torch.no_grad():
        w[:3] = torch.tensor([2.0**-20 * (1 + 2**-7), -(2.0**-19) * 1.5, 3.0]).bfloat16()
    src = geode.save_model(
        model, tmp_path / "src", files={"tokenizer.model": nano / "tokenizer.model"}
    )
    G.hf_to_gguf(src, tmp_path / "m.gguf", "bf16")
    back = G.load_gguf_model(tmp_path / "m.gguf").layers[0].input_layernorm.weight
    assert torch.equal(1 + back.float(), 1 + w.float())
    assert back[1:3].tolist() == w[1:3].tolist()
    assert back[0] == 2.0**-20 != w[0]  # 2**-27 is below float32's resolution at 1: the limit


def test_tokenizer_round_trip(nano: Path, tmp_path: Path):
    """geode tokenizer -> GGUF fields (llama.cpp's conventions) -> rebuilt SentencePiece model:
    the same pieces, scores and types, the same ids and text; the stored fields follow
    llama.cpp (user-defined whitespace unescaped, <unk> a control piece, [PAD] rows)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    out = G.hf_to_gguf(nano, tmp_path / "m.gguf", "f32")
    fields = G.read_gguf(out).fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"].tolist()
    src = geode.load_tokenizer(nano)
    ws = src.piece_to_id("\u2581\u2581")
    assert tokens[ws] == "  " and types[ws] == 4  # USER_DEFINED, plain spaces
    assert types[src.unk_id] == 3  # CONTROL
    assert tokens[src.vocab_size :] == [f"[PAD{i}]" for i in range(src.vocab_size, len(tokens))]
    a, b = pb.ModelProto(), pb.ModelProto()
    a.ParseFromString((nano / "tokenizer.model").read_bytes())
    b.ParseFromString(G.gguf_tokenizer_proto(out))
    assert [(p.piece, p.score, p.type) for p in a.pieces] == [
        (p.piece, p.score, p.type) for p in b.pieces[: len(a.pieces)]
    ]
    tok = geode.load_tokenizer(out)
    for text in TEXTS:
        assert tok.encode(text) == src.encode(text)
        assert tok.decode(src.encode(text)) == src.decode(src.encode(text)) == text
    assert tok.encode("a  b") == src.encode("a  b") and ws in tok.encode("a  b")
    assert tok.special_ids == src.special_ids


def test_load_model_generate_and_read_config_accept_gguf(nano: Path, tmp_path: Path, capsys):
    out = G.hf_to_gguf(nano, tmp_path / "m.gguf", "f32")
    model = geode.load_model(out)
    ids = torch.tensor([[2, 40, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), geode.load_model(nano)(ids), rtol=0, atol=1e-5)
    assert geode.read_config(out).num_hidden_layers == 6
    assert main(["generate", str(out), "--prompt", "the quick", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip()


# ------------------------------------------------------------------ bad input
def _write_gguf(path: Path, arch: str = "gemma3", tensors: dict | None = None) -> Path:
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    for name, data in (tensors or {"token_embd.weight": np.zeros((8, 32), np.float32)}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _no_output(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


def test_unsupported_architecture(tmp_path: Path):
    bad = _write_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(CheckpointError, match=r"general.architecture is 'llama'"):
        G.convert(bad, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 1
    _no_output(tmp_path, tmp_path / "out")


def test_unsupported_quantization_type(nano: Path, tmp_path: Path, monkeypatch):
    """A tensor stored as integers (I8): the error names the tensor and its type."""
    import gguf

    real = G._quantized

    def int8_q(tensor, name, out_type):
        if name == "blk.2.ffn_up.weight":
            return tensor.numpy().astype(np.int8), gguf.GGMLQuantizationType.I8
        return real(tensor, name, out_type)

    monkeypatch.setattr(G, "_quantized", int8_q)
    bad = G.hf_to_gguf(nano, tmp_path / "i8.gguf", "f32")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"'blk.2.ffn_up.weight' has type I8.*unsupported"):
        G.convert(bad, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")


def test_truncated_gguf(nano: Path, tmp_path: Path):
    good = G.hf_to_gguf(nano, tmp_path / "m.gguf", "q8_0").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[: len(good) * 2 // 3])
    with pytest.raises(
        CheckpointError, match=r"truncated: tensor 'blk\.\d+\.[a-z_]+\.weight' ends"
    ):
        G.convert(cut, tmp_path / "out")
    cut.write_bytes(good[:2000])  # inside the tokenizer metadata
    with pytest.raises(CheckpointError, match=r"truncated or corrupted GGUF header .*'tokenizer"):
        geode.load_model(cut)
    cut.write_bytes(b"GGML" + good[4:100])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        geode.load_tokenizer(cut)
    _no_output(tmp_path, tmp_path / "out")


def test_unexpressible_config_and_missing_tokenizer_write_nothing(nano: Path, tmp_path: Path):
    """llama.cpp fixes Gemma 3's layer pattern, local RoPE base and query scale: a model
    that differs is refused, naming the field; so is a checkpoint without tokenizer.model."""
    model = geode.load_model(nano)
    odd = geode.save_model(
        geode.build_model(model.config.replace(rope_local_base_freq=20_000.0)), tmp_path / "odd"
    )
    out = tmp_path / "odd.gguf"
    with pytest.raises(CheckpointError, match="rope_local_base_freq=20000.0 cannot be written"):
        G.hf_to_gguf(odd, out)
    _no_output(tmp_path, out)
    with pytest.raises(CheckpointError, match="no tokenizer.model"):
        G.hf_to_gguf(geode.save_model(model, tmp_path / "notok"), out)
    _no_output(tmp_path, out)
    with pytest.raises(ValueError, match="q8_0 is a GGUF type"):
        G.convert(G.hf_to_gguf(nano, tmp_path / "ok.gguf", "f32"), tmp_path / "hf", "q8_0")


def test_chat_and_info_accept_gguf(nano: Path, tmp_path: Path, monkeypatch, capsys):
    """`geode chat X.gguf` (the docs' two-command path) and `geode info X.gguf`."""
    import io

    out = G.hf_to_gguf(nano, tmp_path / "m.gguf", "q8_0")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))
    assert main(["chat", str(out), "--max-tokens", "3", "--temperature", "0"]) == 0
    assert "model> " in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokenizer"] == str(out) and info["layers"] == 6
