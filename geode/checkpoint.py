"""Checkpoints in the Hugging Face layout: config.json + (sharded) safetensors, read and written.

Reads `Gemma3ForCausalLM` checkpoints and `Gemma3ForConditionalGeneration` ones (with the
vision tower and projector, or their language-model part alone with `vision=False`), under
both key layouts in circulation, and writes both (`layout=`); reads the other
family members' (`Gemma4ForCausalLM`, the text part of `Gemma4ForConditionalGeneration`,
`RecurrentGemmaForCausalLM`) through their spec's tensor-name map (geode/family.py), without
transformers installed. Every tensor is validated (present, expected, right shape, finite)
before a model is returned; a model with random weights is never returned. Writes are
atomic: a temporary directory renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .family import get_family
from .fileio import fsync_dir, swap_dir_into_place
from .model.transformer import FLOAT16_REFUSAL, Transformer, check_dtype
from .model.vision import HF_MULTIMODAL_MODEL_TYPE, VISION_LAYOUTS, VisionConfig, hf_vision_keys

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Where the decoder's tensors live, by checkpoint flavour (key prefix -> geode name prefix).
TEXT_PREFIXES = (
    "model.language_model.",  # Gemma3ForConditionalGeneration as transformers >= 4.52 saves it
    "language_model.model.",  # the published multimodal Gemma 3 checkpoints
    "model.",  # Gemma3ForCausalLM
)
LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
# Where a written Gemma3ForConditionalGeneration keeps its decoder and LM head, by layout.
MULTIMODAL_TEXT = {
    "published": ("language_model.model.", "language_model.lm_head.weight"),
    "model": ("model.language_model.", "lm_head.weight"),
}
# Multimodal parts the text decoder does not use (Gemma 3's vision parts load with vision=True).
NON_TEXT_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "model.audio_tower.",  # Gemma 4's audio encoder and the embedders of both towers
    "model.embed_vision.",
    "model.embed_audio.",
)
_ST_DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, malformed or does not match the model it describes."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor lives and what the file header says it is."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch dtype from a dtype or a name like 'bfloat16'."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPE_NAMES))}")
    return _DTYPE_NAMES[name]


# ---------------------------------------------------------------------- reading
def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (reads config.json only) or a .gguf file."""
    root = Path(path)
    if root.suffix.lower() == ".gguf" and not root.is_dir():
        from .gguf import read_gguf

        return read_gguf(root).config
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory (expected the HF layout)")
    cfg_file = root / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; a checkpoint directory needs config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(raw, source=str(cfg_file))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """Validate a safetensors file's header against its size; tensor name -> entry."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        if size < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes; no safetensors header)")
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise CheckpointError(
                f"{file}: truncated or corrupted: header claims {n} bytes but the file has "
                f"{size - 8} after the length field"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupted safetensors header (not a JSON object)")
    data_len = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, itemsize = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{file}: corrupted header entry for tensor {name!r}: {info!r}"
            ) from None
        numel = 1
        for s in shape:
            numel *= s
        if end > data_len:
            raise CheckpointError(
                f"{file}: truncated: tensor {name!r} ends at byte {end} of the data section "
                f"but the file holds only {data_len} data bytes"
            )
        if not 0 <= begin <= end or end - begin != numel * itemsize:
            raise CheckpointError(
                f"{file}: corrupted header: tensor {name!r} of shape {list(shape)} "
                f"({info['dtype']}) needs {numel * itemsize} bytes, offsets say {end - begin}"
            )
        entries[name] = TensorEntry(file, dtype, shape)
    return entries


def _weight_files(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from the index when sharded."""
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e!r})") from None
        files = sorted({root / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which is missing")
        return files
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    found = sorted(root.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    hint = f" (found {pickles}: pickle weights are never loaded; convert them to safetensors)"
    raise CheckpointError(f"{root}: no *.safetensors weights{hint if pickles else ''}")


def _index_tensors(files: list[Path]) -> dict[str, TensorEntry]:
    """All stored tensors across shards; a name stored twice is an error."""
    table: dict[str, TensorEntry] = {}
    for file in files:
        for name, entry in read_safetensors_header(file).items():
            if name in table:
                raise CheckpointError(
                    f"tensor {name!r} is stored twice: in {table[name].file.name} and {file.name}"
                )
            table[name] = entry
    return table


def read_vision_config(path: str | os.PathLike) -> VisionConfig | None:
    """The VisionConfig of a Gemma3ForConditionalGeneration checkpoint directory, else None."""
    cfg_file = Path(path) / CONFIG_FILE
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: cannot read ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != HF_MULTIMODAL_MODEL_TYPE:
        return None
    if raw.get("vision_config") is None:
        return None
    try:
        return VisionConfig.from_hf(raw, source=str(cfg_file))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _vision_keys(stored: dict[str, TensorEntry]) -> dict[str, str]:
    """Stored vision key -> geode name (any layout); bad keys are CheckpointErrors naming them."""
    try:
        return hf_vision_keys(stored)
    except ValueError as e:
        key = next((k for k in stored if repr(k) in str(e)), None)
        where = f"{stored[key].file}: " if key is not None else ""
        raise CheckpointError(f"{where}{e}") from None


def _map_keys(
    stored: dict[str, TensorEntry],
    config: ModelConfig,
    heads: Collection[str] = (),
    vision_keys: Mapping[str, str] | None = None,
) -> dict[str, tuple[str, TensorEntry]]:
    """geode parameter name -> (stored name, entry); unknown tensors are errors, except the
    `heads` (tensors outside the decoder, e.g. a reward model's `score.weight`).
    `vision_keys` (stored -> geode name): the vision tensors to load; other vision tensors
    are skipped."""
    tied = config.tie_word_embeddings
    spec = get_family(config.family)
    mapped: dict[str, tuple[str, TensorEntry]] = {}
    for key, entry in stored.items():
        if vision_keys and key in vision_keys:
            mapped[vision_keys[key]] = (key, entry)
            continue
        if key.startswith(NON_TEXT_PREFIXES) or key in heads:
            continue
        if key in LM_HEAD_KEYS:
            if not tied:  # a tied checkpoint may still carry a copy of the embedding
                mapped["lm_head.weight"] = (key, entry)
            continue
        prefix = next((p for p in TEXT_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(
                f"{entry.file}: unexpected tensor {key!r}: not part of a {config.family} "
                f"checkpoint (text keys start with one of {TEXT_PREFIXES})"
            )
        name = spec.key_from_hf(config, key[len(prefix) :])
        if name is None:  # stored but unused by this family's model (e.g. kv-shared layers')
            continue
        if name in mapped:
            raise CheckpointError(
                f"{entry.file}: tensor {key!r} duplicates {mapped[name][0]!r} "
                "(two key layouts mixed in one checkpoint)"
            )
        mapped[name] = (key, entry)
    return mapped


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    allow_float16: bool = False,
    check_finite: bool = True,
    heads: Collection[str] = (),
    vision: bool | None = None,
) -> Transformer:
    """Load a HF-layout checkpoint directory (or a .gguf file) into a geode model (eval mode).

    dtype: None keeps the stored dtype; float16 is refused unless `allow_float16`.
    heads: stored tensors outside the decoder to leave for the caller (`load_heads`).
    vision: a Gemma3ForConditionalGeneration checkpoint loads its vision tower and projector
    (the model then takes `pixel_values`) when None and it stores them, or when True (then
    they must be there); False loads the text decoder alone.
    Peak memory stays near one copy of the weights: the model is built on the meta device
    and each tensor is read from the memory-mapped file and converted one at a time.
    """
    root = Path(path)
    if root.suffix.lower() == ".gguf" and not root.is_dir():  # llama.cpp's format: geode/gguf.py
        from .gguf import load_gguf_model

        return load_gguf_model(
            root, dtype, device, allow_float16=allow_float16, check_finite=check_finite
        )
    config = read_config(root)
    if "quantization_config" in config.extra:  # written from a quantized model
        from .infer.quant import load_quantized

        return load_quantized(root, config, dtype, device, check_finite)
    stored = _index_tensors(_weight_files(root))
    vision_config = read_vision_config(root) if vision is not False else None
    if vision and vision_config is None:
        raise CheckpointError(
            f"{root / CONFIG_FILE}: vision=True, but this is not a Gemma3ForConditionalGeneration "
            "config (model_type 'gemma3' with a vision_config)"
        )
    vision_keys = _vision_keys(stored) if vision_config is not None else {}
    if vision is None and not vision_keys:
        vision_config = None  # a multimodal config over the language model's tensors only
    mapped = _map_keys(stored, config, heads, vision_keys)

    with torch.device("meta"):
        model = Transformer(config, vision_config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    where = ", ".join(sorted({e.file.name for e in stored.values()}))
    missing = [n for n in expected if n not in mapped]
    if missing:
        n = missing[0]
        raise CheckpointError(
            f"{root}: missing tensor {n!r} (expected shape {list(expected[n])}; looked in "
            f"{where}){f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
        )
    for name, (key, entry) in mapped.items():
        if name not in expected:
            raise CheckpointError(
                f"{entry.file}: unexpected tensor {key!r}: the model described by config.json "
                "has no such parameter"
            )
        if entry.shape != expected[name]:
            raise CheckpointError(
                f"{entry.file}: tensor {key!r} has shape {list(entry.shape)}, expected "
                f"{list(expected[name])} from config.json"
            )
        if not entry.dtype.is_floating_point:
            raise CheckpointError(f"{entry.file}: tensor {key!r} has non-float dtype {entry.dtype}")

    target = parse_dtype(dtype)
    if target is None:
        target = stored[mapped["embed_tokens.weight"][0]].dtype
        if target == torch.float16 and not allow_float16:
            raise ValueError(
                f"{root}: weights are stored in float16. "
                f"{FLOAT16_REFUSAL} Pass dtype='bfloat16' or 'float32' to convert on load."
            )
    check_dtype(target, allow_float16)

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, (_, entry) in mapped.items():
        by_file.setdefault(entry.file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    key = mapped[name][0]
                    tensor = f.get_tensor(key).to(dtype=target)
                    if check_finite and not bool(torch.isfinite(tensor).all()):
                        raise CheckpointError(
                            f"{file}: tensor {key!r} contains NaN or inf values (corrupted?)"
                        )
                    state[name] = tensor.to(device) if device is not None else tensor
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own errors, I/O errors
            raise CheckpointError(f"{file}: cannot read tensors ({e})") from None
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_heads(
    path: str | os.PathLike, names: Collection[str], dtype: torch.dtype | str | None = None
) -> dict[str, torch.Tensor]:
    """The stored tensors `names` (outside the decoder, e.g. `score.weight`), checked finite."""
    root = Path(path)
    stored = _index_tensors(_weight_files(root))
    out = {}
    for name in names:
        if name not in stored:
            raise CheckpointError(f"{root}: missing tensor {name!r}")
        with safe_open(str(stored[name].file), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(name).to(dtype=parse_dtype(dtype) or stored[name].dtype)
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{stored[name].file}: tensor {name!r} contains NaN or inf")
        out[name] = tensor
    return out


# ---------------------------------------------------------------------- writing
def save_model(
    model: Transformer,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    files: Mapping[str, str | os.PathLike] | None = None,
    heads: Mapping[str, torch.Tensor] | None = None,
    hf_config: Mapping[str, Any] | None = None,
    layout: str = "published",
) -> Path:
    """Write `model` as a HF checkpoint directory of its family, atomically.

    (`Gemma3ForCausalLM`, `Gemma4ForCausalLM` or `RecurrentGemmaForCausalLM`; names through
    the family spec's `key_to_hf`.)

    Shards above `max_shard_bytes` (with model.safetensors.index.json); `files` maps extra
    file names (e.g. 'tokenizer.model') to source paths copied in. An existing directory
    at `path` is replaced only once the new one is complete. `heads` are tensors stored
    under their own names beside the decoder's, `hf_config` updates config.json (a reward
    model: `score.weight`, architectures = [Gemma3TextForSequenceClassification]).
    A model with a vision tower is written as `Gemma3ForConditionalGeneration` (a full
    `Gemma3Config`) in the key `layout` "published" (`language_model.model.*`,
    `vision_tower.*`, as google/gemma-3-* ship) or "model" (`model.language_model.*`).
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root}: exists and is not a directory")
    config = model.config
    quantized = getattr(model, "quantization", None) is not None  # geode.infer.quant.quantize
    vision = getattr(model, "vision", None)
    if quantized and vision is not None:
        raise CheckpointError("saving a quantized model with a vision tower is not supported")
    if quantized:  # compressed-tensors layout (geode/infer/quant.py)
        from .infer.quant import quantized_state

        state = quantized_state(model)
    elif vision is not None:
        state = _multimodal_state(model, layout)
    else:
        state = {}
        spec = get_family(config.family)
        for name, tensor in model.state_dict().items():
            key = name if name == "lm_head.weight" else f"model.{spec.key_to_hf(config, name)}"
            state[key] = tensor.detach().to("cpu").contiguous()
    for key, tensor in (heads or {}).items():
        state[key] = tensor.detach().to("cpu").contiguous()
    shards = _plan_shards(state, max_shard_bytes)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        hf = config.to_hf() if vision is None else multimodal_hf_config(model)
        dtype_name = str(model.dtype).removeprefix("torch.")
        hf["dtype"] = dtype_name
        hf.update(hf_config or {})
        if quantized:
            from .infer.quant import quantization_config

            hf["quantization_config"] = quantization_config(model)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        gen = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            total = 0
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for key, t in shard.items():
                    weight_map[key] = fname
                    total += t.numel() * t.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
        fsync_dir(tmp, files=True)
        swap_dir_into_place(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def multimodal_hf_config(model: Transformer) -> dict[str, Any]:
    """The full `Gemma3Config` dict of a model with a vision tower (transformers loads it)."""
    assert model.vision is not None
    text = model.config.to_hf()
    text.pop("architectures", None)
    return {
        "architectures": [get_family(model.config.family).vision_architecture],
        "model_type": HF_MULTIMODAL_MODEL_TYPE,
        "text_config": text,
        **model.vision.to_hf(),
        "initializer_range": model.config.initializer_range,
        "tie_word_embeddings": model.config.tie_word_embeddings,
    }


def _multimodal_state(model: Transformer, layout: str) -> dict[str, torch.Tensor]:
    """Stored key -> tensor of a Gemma3ForConditionalGeneration in the `layout`."""
    if layout not in MULTIMODAL_TEXT:
        raise ValueError(f"unknown key layout {layout!r}; use one of {list(VISION_LAYOUTS)}")
    text_prefix, head_key = MULTIMODAL_TEXT[layout]
    named = model.state_dict()
    vision = hf_vision_keys(
        [n for n in named if n.startswith(("vision_tower.", "multi_modal_projector."))], to=layout
    )
    state = {}
    for name, tensor in named.items():
        key = vision.get(name) or (head_key if name == "lm_head.weight" else text_prefix + name)
        state[key] = tensor.detach().to("cpu").contiguous()
    return state


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split of the state dict into shards of at most max_bytes (one tensor minimum)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards
