"""GGUF checkpoints (llama.cpp, Ollama, LM Studio): read into geode, convert to and from HF.

Reading follows transformers' GGUF loader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`
with its `Gemma2TensorProcessor`): tensors are dequantized by the `gguf` package's own
`dequantize`, names mapped with `gguf`'s tensor-name map, and RMSNorm weights, which GGUF
stores as the applied scale (1 + w), get 1 subtracted (no Q/K permutation for Gemma). The
config comes from the `gemma3.*` metadata with llama.cpp's fixed Gemma 3 conventions (5 local
: 1 global layers, local RoPE base 10,000, query scale head_dim**-0.5, or (hidden/heads)**-0.5
for the 62-layer 27B). The tokenizer is rebuilt as a SentencePiece `tokenizer.model` from the
`tokenizer.ggml.*` fields. Writing (`hf_to_gguf`) is the inverse, with `gguf`'s `GGUFWriter`
and `quantize`, and refuses configs that llama.cpp's fixed conventions cannot express.
See docs/checkpoints.md.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, load_model, parse_dtype, read_config, save_model
from .config import ConfigError, ModelConfig, default_layer_types
from .fileio import fsync_dir
from .model.transformer import Transformer, check_dtype

ARCH = "gemma3"
GGUF_TYPES = ("f32", "bf16", "q8_0")  # what `hf_to_gguf` / `geode convert --type` write
_LLAMA_CPP_LOCAL_ROPE = 10_000.0  # llama.cpp: rope_freq_base_train_swa for gemma3
_LLAMA_CPP_PATTERN = 6  # llama.cpp: hparams.set_swa_pattern(6) for gemma3
_27B_LAYERS = 62  # llama.cpp scales 27B queries by (hidden/heads)**-0.5
_SPACE = "\u2581"  # SentencePiece's escaped space


def _gguf() -> Any:
    """The `gguf` package (imported on first use)."""
    import gguf

    return gguf


def _is_norm(gguf_name: str) -> bool:
    """Whether a GGUF tensor is an RMSNorm weight stored as (1 + w) (transformers' test)."""
    return "norm.weight" in gguf_name


@cache
def _name_map(num_layers: int) -> Any:
    gguf = _gguf()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, num_layers)


def gguf_name(name: str, num_layers: int) -> str:
    """The GGUF tensor name of a geode parameter (e.g. 'layers.0.mlp.up_proj.weight' ->
    'blk.0.ffn_up.weight'), from `gguf`'s own HF name map."""
    hf = name if name == "lm_head.weight" else f"model.{name}"
    base, suffix = hf.rsplit(".", 1)
    mapped = _name_map(num_layers).get_name(base)
    if mapped is None:
        raise CheckpointError(f"parameter {name!r} has no GGUF {ARCH} tensor name")
    return f"{mapped}.{suffix}"


# ---------------------------------------------------------------------- reading
@dataclass
class GGUFCheckpoint:
    """A validated GGUF file: its config, its tensors by geode name, its metadata fields."""

    path: Path
    config: ModelConfig
    tensors: dict[str, GGUFTensorInfo]  # geode parameter name -> stored tensor
    fields: dict[str, Any]  # metadata key -> value (str, number, bool, list or numpy array)


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file: name, torch-order shape, GGML type, bytes in the file."""

    name: str
    shape: tuple[int, ...]  # torch order (ggml lists the innermost dimension first)
    qtype: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int
    path: Path

    def raw(self) -> np.ndarray:
        """The stored bytes, memory-mapped, as (rows, bytes per row) uint8."""
        data = np.memmap(
            self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=(self.n_bytes,)
        )
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return data.reshape(rows, self.n_bytes // rows)


# GGUF metadata value types (gguf.GGUFValueType) -> struct formats of the scalar ones.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class _HeaderParser:
    """GGUF v2/v3 header reader (metadata + tensor infos): the format of gguf.GGUFReader, read
    with one numpy call per numeric array, since GGUFReader builds a numpy view per array
    element (tens of seconds for Gemma's 262,144-token vocabulary)."""

    def __init__(self, buf: bytes, path: Path) -> None:
        self.buf, self.pos, self.path, self.what = buf, 0, path, "the magic"

    def take(self, fmt: str) -> Any:
        import struct

        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise EOFError
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _ARRAY:
            itype, n = self.take("I"), self.take("Q")
            if itype in _SCALARS and itype != 7:
                dtype = np.dtype("<" + _SCALARS[itype].replace("?", "b"))
                end = self.pos + n * dtype.itemsize
                if end > len(self.buf):
                    raise EOFError
                arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
                self.pos = end
                return arr
            return [self.value(itype) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {vtype}")


def _read_header(path: Path) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Metadata fields and tensor infos of a GGUF file, with the file's length checked; the
    last few files read are remembered (by path, size and mtime): loading a model and then
    its tokenizer parses the header once."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    st = path.stat()
    return _read_header_cached(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _read_header_cached(
    path: Path, size: int, mtime_ns: int
) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    import mmap
    import struct

    gguf = _gguf()
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    p = _HeaderParser(buf, path)
    fields: dict[str, Any] = {}
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    try:
        p.pos = 4
        p.what = "the version"
        version = p.take("I")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_fields = p.take("Q"), p.take("Q")
        for i in range(n_fields):
            p.what = f"metadata field #{i}"
            key = p.string()
            p.what = f"metadata field {key!r}"
            fields[key] = p.value(p.take("I"))
        for i in range(n_tensors):
            p.what = f"tensor info #{i}"
            name = p.string()
            p.what = f"tensor info {name!r}"
            dims = [p.take("Q") for _ in range(p.take("I"))]
            infos.append((name, tuple(reversed(dims)), p.take("I"), p.take("Q")))
    except (struct.error, EOFError, UnicodeDecodeError, ValueError, OverflowError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"{path}: truncated or corrupted GGUF header while reading {p.what} at byte "
            f"{p.pos} ({type(e).__name__}: {e or 'end of file'})"
        ) from None
    align = int(fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-p.pos // align) * align
    buf.close()
    tensors = []
    for name, shape, raw_type, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unknown GGML type id {raw_type} "
                "(unsupported quantization type)"
            ) from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        numel = int(np.prod(shape)) if shape else 1
        if not shape or shape[-1] % block:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {list(shape)} does not fill whole "
                f"{qtype.name} blocks of {block}"
            )
        n_bytes = numel // block * type_size
        end = data_start + offset + n_bytes
        if end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} but the file has "
                f"{size} bytes"
            )
        tensors.append(GGUFTensorInfo(name, shape, qtype, data_start + offset, n_bytes, path))
    return fields, tensors


def _field(fields: dict[str, Any], key: str, path: Path, default: Any = ...) -> Any:
    """A metadata value (str, number, bool or list); `default` when absent, else an error.
    A float32 scalar comes back as the shortest decimal that is that float32 (1e-06, not
    9.99999997e-07), i.e. the value the writer was given."""
    if key not in fields:
        if default is ...:
            raise CheckpointError(f"{path}: missing GGUF metadata field {key!r}")
        return default
    value = fields[key]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float):
        return float(str(np.float32(value)))
    return value


def _config(fields: dict[str, Any], embed_rows: int, tied: bool, path: Path) -> ModelConfig:
    """ModelConfig from the `gemma3.*` and `tokenizer.ggml.*` metadata."""

    def get(key: str, default: Any = ...) -> Any:
        return _field(fields, f"{ARCH}.{key}", path, default)

    layers = int(get("block_count"))
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise CheckpointError(
            f"{path}: {ARCH}.attention.value_length={value_dim} differs from key_length="
            f"{head_dim}; Gemma 3 uses one head_dim"
        )
    hf: dict[str, Any] = {
        "model_type": "gemma3_text",
        "vocab_size": embed_rows,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10_000.0)),
        "rope_local_base_freq": _LLAMA_CPP_LOCAL_ROPE,
        "sliding_window": int(get("attention.sliding_window")),
        "layer_types": list(default_layer_types(layers, _LLAMA_CPP_PATTERN)),
        "query_pre_attn_scalar": hidden // heads if layers == _27B_LAYERS else head_dim,
        "tie_word_embeddings": tied,
        "_name_or_path": str(_field(fields, "general.name", path, "")),
    }
    scaling = get("rope.scaling.type", None)
    if scaling not in (None, "none", "linear"):
        raise CheckpointError(
            f"{path}: {ARCH}.rope.scaling.type={scaling!r} is not supported (none or linear)"
        )
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
        value = _field(fields, f"tokenizer.ggml.{key}_token_id", path, None)
        if value is not None:
            hf[name] = int(value)
    pad = _field(fields, "tokenizer.ggml.padding_token_id", path, None)
    if pad is not None:
        hf["pad_token_id"] = int(pad)
    try:
        return ModelConfig.from_hf(hf, source=str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


@cache
def _dequantizable(qtype: int) -> bool:
    """Whether `gguf.dequantize` handles this tensor type (tried on one zero block)."""
    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    try:
        out = gguf.dequantize(np.zeros(size, dtype=np.uint8), gguf.GGMLQuantizationType(qtype))
    except NotImplementedError:
        return False
    return out.dtype.kind == "f" and out.size == block


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open and validate a GGUF file: architecture, config fields, every tensor's name, shape
    and type, and the file's length; reads no tensor data."""
    path = Path(path)
    fields, infos = _read_header(path)
    arch = _field(fields, "general.architecture", path)
    if arch != ARCH:
        raise CheckpointError(
            f"{path}: general.architecture is {arch!r}; geode reads {ARCH!r} GGUF files only"
        )
    by_name = {t.name: t for t in infos}
    if "token_embd.weight" not in by_name:
        raise CheckpointError(f"{path}: missing tensor 'token_embd.weight'")
    embed_rows = by_name["token_embd.weight"].shape[0]
    config = _config(fields, embed_rows, "output.weight" not in by_name, path)
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in Transformer(config).state_dict().items()}
    to_geode = {gguf_name(n, config.num_hidden_layers): n for n in expected}
    tensors: dict[str, Any] = {}
    for t in infos:
        name = to_geode.get(t.name)
        if name is None:
            raise CheckpointError(
                f"{path}: unexpected tensor {t.name!r}: not part of a {ARCH} model with "
                f"{config.num_hidden_layers} layers"
            )
        if t.shape != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} has shape {list(t.shape)}, expected "
                f"{list(expected[name])} from the {ARCH}.* metadata"
            )
        if not _dequantizable(int(t.qtype)):
            raise CheckpointError(
                f"{path}: tensor {t.name!r} has type {t.qtype.name}, which the gguf "
                "package cannot dequantize to floats (unsupported quantization type)"
            )
        tensors[name] = t
    missing = [n for n in expected if n not in tensors]
    if missing:
        n = missing[0]
        raise CheckpointError(
            f"{path}: missing tensor {gguf_name(n, config.num_hidden_layers)!r} (geode "
            f"{n!r}, shape {list(expected[n])})"
        )
    return GGUFCheckpoint(path, config, tensors, fields)


def gguf_tensor(ckpt: GGUFCheckpoint, name: str) -> torch.Tensor:
    """One parameter in geode's convention, dequantized to float32 (norms: stored - 1)."""
    t = ckpt.tensors[name]
    gguf = _gguf()
    values = gguf.dequantize(t.raw(), t.qtype)  # (rows, row elements) float32
    if _is_norm(t.name):
        values = values - np.float32(1)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if not values.flags.writeable:  # F32 comes back as a view of the read-only file mapping
        values = values.copy()
    return torch.from_numpy(values.reshape(t.shape))


def load_gguf_model(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    allow_float16: bool = False,
    check_finite: bool = True,
) -> Transformer:
    """Load a GGUF file into a geode model (eval mode); dtype None -> bfloat16 when every
    matrix is stored BF16, else float32 (quantized tensors are dequantized)."""
    ckpt = read_gguf(path)
    target = parse_dtype(dtype) or _natural_dtype(ckpt)
    check_dtype(target, allow_float16)
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    state = {}
    for name, t in ckpt.tensors.items():
        tensor = gguf_tensor(ckpt, name).to(target)
        if check_finite and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{ckpt.path}: tensor {t.name!r} contains NaN or inf values")
        state[name] = tensor.to(device) if device is not None else tensor
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _natural_dtype(ckpt: GGUFCheckpoint) -> torch.dtype:
    bf16 = _gguf().GGMLQuantizationType.BF16
    matrices = [t for t in ckpt.tensors.values() if len(t.shape) > 1]
    return torch.bfloat16 if all(t.qtype == bf16 for t in matrices) else torch.float32


def gguf_tokenizer_proto(path: str | os.PathLike, fields: dict[str, Any] | None = None) -> bytes:
    """A serialized SentencePiece ModelProto rebuilt from a GGUF's `tokenizer.ggml.*` fields.

    Two llama.cpp conventions are undone: user-defined pieces are stored with plain spaces
    (SentencePiece escapes them as U+2581), and `<unk>` is stored as a control piece
    (SentencePiece needs it typed UNKNOWN, at `tokenizer.ggml.unknown_token_id`).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = Path(path)
    if fields is None:
        fields = _read_header(path)[0]
    kind = _field(fields, "tokenizer.ggml.model", path)
    if kind != "llama":
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model is {kind!r}; geode rebuilds SentencePiece ('llama') "
            "tokenizers only"
        )
    tokens = _field(fields, "tokenizer.ggml.tokens", path)
    scores = _field(fields, "tokenizer.ggml.scores", path)
    types = _field(fields, "tokenizer.ggml.token_type", path)
    if not len(tokens) == len(scores) == len(types):
        raise CheckpointError(
            f"{path}: tokenizer.ggml.tokens/scores/token_type have different lengths "
            f"({len(tokens)}, {len(scores)}, {len(types)})"
        )
    ids = {
        key: _field(fields, f"tokenizer.ggml.{key}_token_id", path, default)
        for key, default in (("unknown", 3), ("bos", 2), ("eos", 1), ("padding", 0))
    }
    for key, value in ids.items():
        if not 0 <= int(value) < len(tokens):
            raise CheckpointError(
                f"{path}: tokenizer.ggml.{key}_token_id={value} is outside the {len(tokens)} tokens"
            )
    proto = pb.ModelProto()
    seen: dict[str, int] = {}
    for i, (piece, score, kind_id) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind_id not in pb.ModelProto.SentencePiece.Type.values():
            raise CheckpointError(f"{path}: tokenizer.ggml.token_type[{i}]={kind_id} is unknown")
        if kind_id == pb.ModelProto.SentencePiece.USER_DEFINED:
            piece = piece.replace(" ", _SPACE)
        if piece in seen or not piece:
            raise CheckpointError(
                f"{path}: tokenizer.ggml.tokens[{i}]={piece!r} is empty or repeats token "
                f"{seen.get(piece)}"
            )
        seen[piece] = i
        proto.pieces.add(piece=piece, score=float(score), type=int(kind_id))
    unk = int(ids["unknown"])
    proto.pieces[unk].type = pb.ModelProto.SentencePiece.UNKNOWN
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(t == pb.ModelProto.SentencePiece.BYTE for t in types)
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = (
        unk,
        int(ids["bos"]),
        int(ids["eos"]),
        int(ids["padding"]),
    )
    spec.unk_piece, spec.bos_piece = proto.pieces[unk].piece, proto.pieces[spec.bos_id].piece
    spec.eos_piece, spec.pad_piece = (
        proto.pieces[spec.eos_id].piece,
        proto.pieces[spec.pad_id].piece,
    )
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_field(fields, "tokenizer.ggml.add_space_prefix", path, True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def load_gguf_tokenizer(path: str | os.PathLike, num_threads: int = -1) -> Any:
    """A geode Tokenizer from a GGUF file's tokenizer fields."""
    from .tokenizer import Tokenizer

    return Tokenizer(gguf_tokenizer_proto(path), num_threads=num_threads)


# ---------------------------------------------------------------------- converting
def gguf_to_hf(
    src: str | os.PathLike, dest: str | os.PathLike, dtype: torch.dtype | str | None = None
) -> Path:
    """Convert a GGUF file to a HF-layout checkpoint directory (config.json, safetensors,
    tokenizer.model rebuilt from the metadata), atomically; dtype as in `load_gguf_model`."""
    model = load_gguf_model(src, dtype=dtype)
    proto = gguf_tokenizer_proto(src)
    with tempfile.TemporaryDirectory(prefix=".geode-gguf-") as tmp:
        tok = Path(tmp) / "tokenizer.model"
        tok.write_bytes(proto)
        return save_model(model, dest, files={"tokenizer.model": tok})


def check_llama_cpp_config(config: ModelConfig, where: str = "config") -> None:
    """Refuse a config whose model GGUF's gemma3 metadata cannot express (llama.cpp fixes these
    to Gemma 3's values), naming the field."""
    pattern = default_layer_types(config.num_hidden_layers, _LLAMA_CPP_PATTERN)
    heads_scalar = config.hidden_size // config.num_attention_heads
    scalar = heads_scalar if config.num_hidden_layers == _27B_LAYERS else config.head_dim
    problems = {
        "layer_types": (config.layer_types == pattern, "5 local : 1 global (every 6th global)"),
        "rope_local_base_freq": (
            config.rope_local_base_freq == _LLAMA_CPP_LOCAL_ROPE,
            _LLAMA_CPP_LOCAL_ROPE,
        ),
        "query_pre_attn_scalar": (config.query_pre_attn_scalar == scalar, scalar),
        "final_logit_softcapping": (config.final_logit_softcapping is None, None),
        "attn_logit_softcapping": (config.attn_logit_softcapping is None, None),
        "attention_bias": (not config.attention_bias, False),
        "hidden_activation": (config.hidden_activation == "gelu_pytorch_tanh", "gelu_pytorch_tanh"),
    }
    for name, (ok, wanted) in problems.items():
        if not ok:
            raise CheckpointError(
                f"{where}: {name}={getattr(config, name)!r} cannot be written to GGUF: "
                f"llama.cpp's {ARCH} fixes it to {wanted!r}"
            )


def _tokenizer_fields(writer: Any, proto_bytes: bytes, vocab_size: int, where: str) -> None:
    """Write a SentencePiece model as `tokenizer.ggml.*` fields the way llama.cpp's converter
    does (user-defined spaces unescaped, `<unk>` as a control piece, padding to the model's
    vocabulary with UNUSED `[PAD<i>]` pieces)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    gguf = _gguf()
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(proto_bytes)
    except Exception as e:
        raise CheckpointError(f"{where}: not a SentencePiece model ({e})") from None
    if len(proto.pieces) > vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {len(proto.pieces)} pieces but the model's vocab_size "
            f"is {vocab_size}"
        )
    sp = pb.ModelProto.SentencePiece
    tokens, scores, types = [], [], []
    for p in proto.pieces:
        if p.type == sp.USER_DEFINED and " " in p.piece:
            raise CheckpointError(
                f"{where}: user-defined piece {p.piece!r} holds a plain space; GGUF stores "
                f"user-defined pieces with {_SPACE!r} written as a space, so it would come back "
                f"as {p.piece.replace(' ', _SPACE)!r}"
            )
        kind = sp.CONTROL if p.type == sp.UNKNOWN else p.type
        tokens.append(p.piece.replace(_SPACE, " ") if p.type == sp.USER_DEFINED else p.piece)
        scores.append(p.score)
        types.append(int(kind))
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    spec = proto.trainer_spec
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(spec.bos_id)
    writer.add_eos_token_id(spec.eos_id)
    writer.add_unk_token_id(spec.unk_id)
    if spec.pad_id >= 0:
        writer.add_pad_token_id(spec.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)


def _quantized(tensor: torch.Tensor, gguf_tensor_name: str, out_type: str) -> tuple[Any, Any]:
    """(data, GGML type) of one tensor: norms as float32 (1 + w), other 1-D tensors float32,
    matrices in `out_type` (float32 when their rows do not fill whole quantization blocks)."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    values = tensor.detach().to("cpu", torch.float32).numpy()
    if _is_norm(gguf_tensor_name):
        return values + np.float32(1), q.F32
    qtype = {"f32": q.F32, "bf16": q.BF16, "q8_0": q.Q8_0}[out_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if values.ndim == 1 or values.shape[-1] % block:
        return values, q.F32
    return gguf.quantize(values, qtype), qtype


def hf_to_gguf(src: str | os.PathLike, dest: str | os.PathLike, out_type: str = "bf16") -> Path:
    """Write a HF-layout checkpoint directory (with its tokenizer.model) as one GGUF file that
    llama.cpp runs: `out_type` f32, bf16 or q8_0 for the matrices; written atomically."""
    if out_type not in GGUF_TYPES:
        raise ValueError(f"GGUF type {out_type!r} is not supported; use one of {GGUF_TYPES}")
    src, dest = Path(src), Path(dest)
    config = read_config(src)
    check_llama_cpp_config(config, where=str(src / "config.json"))
    tok_file = src / "tokenizer.model"
    if not tok_file.is_file():
        raise CheckpointError(
            f"{src}: no tokenizer.model; a GGUF file carries its SentencePiece tokenizer"
        )
    model = load_model(src)
    gguf = _gguf()
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[out_type]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(config.name or src.name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_sliding_window(config.sliding_window)
        if config.rope_scaling_factor != 1.0:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(config.rope_scaling_factor)
        writer.add_file_type(file_type)
        if out_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer_fields(writer, tok_file.read_bytes(), config.vocab_size, str(tok_file))
        for name, tensor in model.state_dict().items():
            gname = gguf_name(name, config.num_hidden_layers)
            data, qtype = _quantized(tensor, gname, out_type)
            writer.add_tensor(gname, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def convert(src: str | os.PathLike, dest: str | os.PathLike, out_type: str | None = None) -> Path:
    """`geode convert`: a .gguf file -> HF directory (out_type f32|bf16, default from the file),
    a HF directory -> .gguf file (out_type f32|bf16|q8_0, default bf16)."""
    src, dest = Path(src), Path(dest)
    if src.is_file() and src.suffix.lower() == ".gguf":
        if out_type not in (None, "f32", "bf16"):
            raise ValueError(f"--type {out_type} is a GGUF type; a HF checkpoint is f32 or bf16")
        if dest.is_file():
            raise CheckpointError(f"{dest}: exists and is a file; the HF output is a directory")
        return gguf_to_hf(
            src, dest, dtype={"f32": torch.float32, "bf16": torch.bfloat16}.get(out_type or "")
        )
    if src.is_dir():
        if dest.is_dir():
            raise CheckpointError(f"{dest}: is a directory; the GGUF output is a file")
        return hf_to_gguf(src, dest, out_type or "bf16")
    raise CheckpointError(
        f"{src}: expected a .gguf file or a HF checkpoint directory"
        + ("" if src.exists() else " (it does not exist)")
    )


__all__ = [
    "GGUF_TYPES",
    "GGUFCheckpoint",
    "check_llama_cpp_config",
    "convert",
    "gguf_name",
    "gguf_tensor",
    "gguf_to_hf",
    "gguf_tokenizer_proto",
    "hf_to_gguf",
    "load_gguf_model",
    "load_gguf_tokenizer",
    "read_gguf",
]
