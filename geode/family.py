"""The family registry: what each member (Gemma 3, Gemma 4, RecurrentGemma) brings, in one place.

Shaped like torchtitan's model specs: per family its config part (the `ModelConfig` fields it
owns, `FAMILY_FIELDS`), the layer classes `DecoderLayer` builds by name (litgpt-style), the
Hugging Face adapter (config dict both ways, tensor names both ways for every key layout in
circulation), a cache/state factory (`layer_states`: what each layer keeps while decoding, which
the engine's cache allocates), the FSDP2 wrap units and the runner paths that support it.
`parameter_counts` is the one parameter count (total and active per token) and `state_bytes`
the one decode-state size, for every family.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import FULL, RECURRENT, SLIDING, ConfigError, ModelConfig, default_layer_types

# Runner paths: "forward" (full sequence, no cache: training, scoring, parity), "torch" (the
# engine's torch runner with a KV cache), "native" (the C decode step).
RUNNER_PATHS = ("forward", "torch", "native")
SHARED = "shared"  # LayerState.kind of a Gemma 4 kv-shared layer (reads its source's K/V)


@dataclass(frozen=True)
class LayerState:
    """What one layer keeps while decoding (the engine's cache allocates it per row).

    kind FULL: K/V of every position; SLIDING: K/V of the last `sliding_window` positions (a
    ring); SHARED: nothing, the layer attends to layer `source`'s K/V (Gemma 4 kv sharing);
    RECURRENT: the conv's last `conv - 1` inputs (width W, the activations' dtype) and the
    RG-LRU state h (W, float32): a constant size, whatever the length.
    """

    kind: str
    kv_heads: int = 0  # K/V heads (FULL/SLIDING)
    head_dim: int = 0  # K/V head dim (FULL/SLIDING)
    source: int | None = None  # SHARED: the layer whose K/V it reads
    width: int = 0  # RECURRENT: W
    conv: int = 0  # RECURRENT: conv1d_width


@dataclass(frozen=True)
class FamilySpec:
    """One family member: how to build, load, save, count and serve it."""

    name: str
    hf_text_model_types: tuple[str, ...]  # config.json model_type of the text decoder
    hf_wrapper_model_types: tuple[str, ...]  # multimodal wrappers holding a `text_config`
    config_from_hf: Callable[[dict[str, Any], str], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    key_to_hf: Callable[[ModelConfig, str], str]  # geode name -> HF name below `model.`
    key_from_hf: Callable[[ModelConfig, str], str | None]  # HF -> geode; None: ignore it
    norm_class_name: str  # "RMSNorm" (1 + w) or "ScaleRMSNorm" (w)
    attention_class_name: str  # token mixer of SLIDING/FULL layers
    mlp_class_name: str  # dense feed-forward ("MoEBlock" replaces it where enabled)
    sandwich_norms: bool  # post-attention and post-feed-forward norms (Gemma 2/3/4)
    runner_paths: tuple[str, ...]
    layer_states: Callable[[ModelConfig], list[LayerState]]  # the cache/state factory
    # HF architecture of the family's VLM whose SigLIP tower + projector geode builds
    # (`Transformer(config, vision)`, geode/model/vision.py); None: text decoder only.
    vision_architecture: str | None = None

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """Modules FSDP2 shards one by one (then the root): every decoder layer, experts inside."""
        return list(model.layers)  # type: ignore[arg-type]


FAMILY_SPECS: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> None:
    """Add a family member to the registry."""
    FAMILY_SPECS[spec.name] = spec


def get_family(name: str) -> FamilySpec:
    """The spec of a family; unknown names list the known ones."""
    if name not in FAMILY_SPECS:
        raise ConfigError(f"family {name!r} is unknown; known: {sorted(FAMILY_SPECS)}")
    return FAMILY_SPECS[name]


def family_for_model_type(model_type: Any) -> FamilySpec | None:
    """The non-Gemma-3 family reading this HF model_type, or None (Gemma 3's own reader)."""
    for spec in FAMILY_SPECS.values():
        if spec.name != "gemma3" and model_type in (
            spec.hf_text_model_types + spec.hf_wrapper_model_types
        ):
            return spec
    return None


# ---------------------------------------------------------------------- layer classes
def mixer_class_name(config: ModelConfig, layer: int) -> str:
    """Token mixer of a layer, by name: the family's attention, or the recurrent block."""
    if config.layer_types[layer] == RECURRENT:
        return "RecurrentMixer"
    return get_family(config.family).attention_class_name


def mlp_class_name(config: ModelConfig, layer: int) -> str:
    """Feed-forward of a layer, by name: the family's dense MLP or the MoE block."""
    return "MoEBlock" if config.enable_moe_block else get_family(config.family).mlp_class_name


def mlp_width(config: ModelConfig, layer: int) -> int:
    """Intermediate width of a layer's dense GeGLU (Gemma 4 kv-shared layers: 2x if double-wide;
    RecurrentGemma: intermediate_size / 2, as transformers' RecurrentGemmaMlp)."""
    if config.family == "recurrent_gemma":
        return config.intermediate_size // 2
    wide = config.use_double_wide_mlp and kv_source(config, layer) is not None
    return config.intermediate_size * (2 if wide else 1)


def moe_config(config: ModelConfig, layer: int) -> Any:
    """The `MoEConfig` of a Gemma 4 layer with the MoE block."""
    from .model.moe import MoEConfig

    return MoEConfig(
        hidden_size=config.hidden_size,
        intermediate_size=mlp_width(config, layer),
        moe_intermediate_size=config.moe_intermediate_size,  # type: ignore[arg-type]
        num_experts=config.num_experts,  # type: ignore[arg-type]
        top_k_experts=config.top_k_experts,  # type: ignore[arg-type]
        hidden_activation=config.hidden_activation,
        rms_norm_eps=config.rms_norm_eps,
    )


def recurrent_config(config: ModelConfig) -> Any:
    """The `RecurrentConfig` of a RecurrentGemma model's recurrent layers."""
    from .model.recurrent import RecurrentConfig

    return RecurrentConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        lru_width=config.lru_width,
        conv1d_width=config.conv1d_width,
        hidden_activation=config.hidden_activation,
    )


def kv_source(config: ModelConfig, layer: int) -> int | None:
    """Gemma 4 kv sharing: the earlier layer whose k/v `layer` reuses, or None (its own).

    Layers from L - num_kv_shared_layers on reuse the last non-shared layer of their kind
    (transformers' Gemma4TextConfig.kv_sharing_modes).
    """
    first = config.num_hidden_layers - config.num_kv_shared_layers
    if config.num_kv_shared_layers == 0 or layer < first:
        return None
    kind = config.layer_types[layer]
    producers = [i for i in range(first) if config.layer_types[i] == kind]
    if not producers:
        raise ConfigError(
            f"ModelConfig.num_kv_shared_layers={config.num_kv_shared_layers}: layer {layer} "
            f"({kind}) has no earlier non-shared {kind} layer to take keys and values from"
        )
    return producers[-1]


# ---------------------------------------------------------------------- validation
def check_gemma4(config: ModelConfig) -> None:
    """Gemma 4 field checks (called by ModelConfig)."""
    n = config.num_kv_shared_layers
    if not isinstance(n, int) or not 0 <= n < config.num_hidden_layers:
        raise ConfigError(
            f"ModelConfig.num_kv_shared_layers must be in [0, num_hidden_layers), got {n!r}"
        )
    for i in range(config.num_hidden_layers):
        kv_source(config, i)
    if config.layer_types[-1] != FULL:
        raise ConfigError("ModelConfig.layer_types: Gemma 4's last layer must be full_attention")
    for name in ("global_head_dim", "num_global_key_value_heads", "vocab_size_per_layer_input"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(
                f"ModelConfig.{name} must be None or a positive integer, got {value!r}"
            )
    if (config.global_head_dim or config.head_dim) % 2:
        raise ConfigError(f"ModelConfig.global_head_dim must be even, got {config.global_head_dim}")
    kv = config.num_global_key_value_heads or config.num_key_value_heads
    if config.num_attention_heads % kv:
        raise ConfigError(
            f"ModelConfig.num_global_key_value_heads ({kv}) must divide num_attention_heads "
            f"({config.num_attention_heads})"
        )
    if config.hidden_size_per_layer_input < 0:
        raise ConfigError("ModelConfig.hidden_size_per_layer_input must be >= 0 (0: none)")
    if config.enable_moe_block:
        for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if getattr(config, name) is None:
                raise ConfigError(f"ModelConfig: enable_moe_block is True but {name} is not set")
        moe_config(config, 0)  # MoEConfig names the bad field (top-k > experts, ...)
    elif any(
        getattr(config, k) is not None
        for k in ("num_experts", "top_k_experts", "moe_intermediate_size")
    ):
        raise ConfigError(
            "ModelConfig: num_experts/top_k_experts set but enable_moe_block is False"
        )


def check_recurrent_gemma(config: ModelConfig) -> None:
    """RecurrentGemma field checks (called by ModelConfig)."""
    recurrent_config(config)  # heads dividing the widths, conv width, activation
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        raise ConfigError(
            f"ModelConfig.head_dim must be hidden_size / num_attention_heads "
            f"({config.hidden_size // config.num_attention_heads}) for recurrent_gemma, "
            f"got {config.head_dim}"
        )
    if FULL in config.layer_types:
        raise ConfigError(
            "ModelConfig.layer_types: recurrent_gemma has recurrent and sliding layers"
        )
    if int(config.head_dim * config.partial_rotary_factor) % 2:
        raise ConfigError("ModelConfig.partial_rotary_factor * head_dim must be even")


# ---------------------------------------------------------------------- HF adapters
_IGNORED = {
    "architectures", "model_type", "use_cache", "torch_dtype", "dtype", "transformers_version",
    "_name_or_path", "output_hidden_states", "output_attentions", "return_dict", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    "tokenizer_class", "attention_dropout", "initializer_range", "skip", "pad_token_id",
    "eos_token_id", "bos_token_id", "tie_word_embeddings", "max_position_embeddings",
    "rms_norm_eps", "hidden_activation", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "attention_bias", "sliding_window", "layer_types", "rope_parameters",
    "attn_implementation", "_attn_implementation_autoset", "cache_implementation",
}  # fmt: skip


def _unwrap(config: dict[str, Any], spec_types: tuple[str, ...], text_type: str, source: str):
    """The text part of a multimodal wrapper config (its `text_config`), with its source."""
    if config.get("model_type") in spec_types:
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: model_type {config['model_type']!r} needs a text_config")
        return {"model_type": text_type, **text}, f"{source}:text_config"
    return config, source


def _tokens(c: dict[str, Any]) -> dict[str, int]:
    """pad/eos/bos ids (eos lists: the first)."""
    eos = c.get("eos_token_id", 1)
    if isinstance(eos, list):
        eos = eos[0]
    return {
        "pad_token_id": 0 if c.get("pad_token_id") is None else c["pad_token_id"],
        "eos_token_id": 1 if eos is None else eos,
        "bos_token_id": 2 if c.get("bos_token_id") is None else c["bos_token_id"],
    }


# Gemma4TextConfig's defaults (transformers 5.25, configuration_gemma4.py).
_GEMMA4_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_144, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 30, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "attention_bias": False, "sliding_window": 512, "final_logit_softcapping": None,
    "vocab_size_per_layer_input": 262_144, "hidden_size_per_layer_input": 256,
    "attention_k_eq_v": False, "num_kv_shared_layers": 0, "enable_moe_block": False,
    "use_double_wide_mlp": False, "global_head_dim": 512,
}  # fmt: skip
# Gemma 4 options geode does not implement: refused by name when set (never ignored).
_GEMMA4_REFUSED = {
    "use_bidirectional_attention": (None,),  # vision tokens / all tokens bidirectional
    "attention_dropout": (None, 0, 0.0),  # geode has no dropout
}


def _gemma4_rope(c: dict[str, Any], source: str) -> dict[str, float]:
    """Full/sliding RoPE of a Gemma 4 config: bases, linear factor, proportional fraction."""
    params = c.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    }
    local, full = params.get(SLIDING) or {}, params.get(FULL) or {}
    if local.get("rope_type", "default") != "default" or local.get("partial_rotary_factor", 1) != 1:
        raise ConfigError(
            f"{source}: rope_parameters.{SLIDING} {local!r} is not supported (plain RoPE only)"
        )
    kind = full.get("rope_type", "default")
    if kind not in ("default", "proportional"):
        raise ConfigError(
            f"{source}: rope_parameters.{FULL}.rope_type {kind!r} is not supported "
            "(Gemma 4 uses 'proportional')"
        )
    return {
        "rope_local_base_freq": float(local.get("rope_theta", 10_000.0)),
        "rope_theta": float(full.get("rope_theta", 1e6)),
        "rope_scaling_factor": float(full.get("factor", 1.0)) if kind == "proportional" else 1.0,
        "partial_rotary_factor": (
            float(full.get("partial_rotary_factor", 1.0)) if kind == "proportional" else 1.0
        ),
    }


def _gemma4_from_hf(config: dict[str, Any], source: str) -> ModelConfig:
    """ModelConfig of a `Gemma4TextConfig` dict (or a `Gemma4Config`'s text_config)."""
    config, source = _unwrap(config, ("gemma4",), "gemma4_text", source)
    for name, allowed in _GEMMA4_REFUSED.items():
        if config.get(name) not in allowed:
            raise ConfigError(
                f"{source}: {name}={config[name]!r} is not implemented in geode's Gemma 4 "
                "(text decoder, causal attention only)"
            )
    c = {**_GEMMA4_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    layers = c["num_hidden_layers"]
    layer_types = list(c.get("layer_types") or default_layer_types(layers))
    layer_types[-1] = FULL  # transformers forces the last layer global
    k_eq_v = bool(c["attention_k_eq_v"])
    global_hd = c["global_head_dim"]
    global_kv = c.get("num_global_key_value_heads") if k_eq_v else None
    table = c.get("per_layer_config")  # transformers 5.25 writes the resolved per-layer table
    if isinstance(table, dict):  # authoritative when present: a layer without entry is plain
        full = [table.get(str(i)) or {} for i, t in enumerate(layer_types) if t == FULL]
        if any(f != full[0] for f in full):
            raise ConfigError(f"{source}: per_layer_config differs between full layers {table}")
        global_hd = full[0].get("head_dim", c["head_dim"])
        global_kv = full[0].get("num_key_value_heads")
    if global_kv == c["num_key_value_heads"]:
        global_kv = None
    extra = {k: v for k, v in config.items() if k not in _IGNORED and k not in _GEMMA4_DEFAULTS}
    for k in ("per_layer_config", "num_global_key_value_heads", "use_bidirectional_attention"):
        extra.pop(k, None)
    for k in ("enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size"):
        extra.pop(k, None)
    moe = bool(c["enable_moe_block"])
    try:
        return ModelConfig(
            family="gemma4",
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c["num_key_value_heads"],
            head_dim=c["head_dim"],
            query_pre_attn_scalar=1.0,  # Gemma 4 scales scores by 1 (q/k norms set the size)
            sliding_window=c["sliding_window"],
            layer_types=tuple(layer_types),
            attention_bias=bool(c["attention_bias"]),
            max_position_embeddings=c["max_position_embeddings"],
            rms_norm_eps=c["rms_norm_eps"],
            hidden_activation=c["hidden_activation"],
            final_logit_softcapping=c.get("final_logit_softcapping"),
            tie_word_embeddings=bool(c["tie_word_embeddings"]),
            initializer_range=c["initializer_range"],
            global_head_dim=global_hd if global_hd != c["head_dim"] else None,
            num_global_key_value_heads=global_kv,
            attention_k_eq_v=k_eq_v,
            num_kv_shared_layers=c["num_kv_shared_layers"],
            use_double_wide_mlp=bool(c["use_double_wide_mlp"]),
            hidden_size_per_layer_input=c["hidden_size_per_layer_input"] or 0,
            vocab_size_per_layer_input=(
                c["vocab_size_per_layer_input"] if c["hidden_size_per_layer_input"] else None
            ),
            enable_moe_block=moe,
            num_experts=c.get("num_experts") if moe else None,
            top_k_experts=c.get("top_k_experts") if moe else None,
            moe_intermediate_size=c.get("moe_intermediate_size") if moe else None,
            name=str(config.get("_name_or_path", "")),
            extra=extra,
            **_gemma4_rope(c, source),
            **_tokens(c),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _gemma4_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A `Gemma4TextConfig` dict (`Gemma4ForCausalLM`) in the published checkpoints' form."""
    global_kv = config.num_global_key_value_heads
    if global_kv is not None and not config.attention_k_eq_v:
        raise ConfigError(
            "to_hf: num_global_key_value_heads differs from num_key_value_heads without "
            "attention_k_eq_v; transformers' Gemma4TextConfig cannot express it"
        )
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.partial_rotary_factor != 1.0 or config.rope_scaling_factor != 1.0:
        full_rope = {
            "rope_type": "proportional",
            "partial_rotary_factor": config.partial_rotary_factor,
            "rope_theta": config.rope_theta,
        }
        if config.rope_scaling_factor != 1.0:
            full_rope["factor"] = config.rope_scaling_factor
    moe = config.enable_moe_block
    out = {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "global_head_dim": config.global_head_dim or config.head_dim,
        "hidden_activation": config.hidden_activation,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "bos_token_id": config.bos_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": config.rope_local_base_freq},
            FULL: full_rope,
        },
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types),
        "final_logit_softcapping": config.final_logit_softcapping,
        "use_bidirectional_attention": None,
        "vocab_size_per_layer_input": config.vocab_size_per_layer_input or config.vocab_size,
        "hidden_size_per_layer_input": config.hidden_size_per_layer_input,
        "attention_k_eq_v": config.attention_k_eq_v,
        "num_kv_shared_layers": config.num_kv_shared_layers,
        "enable_moe_block": moe,
        "use_double_wide_mlp": config.use_double_wide_mlp,
        "num_experts": config.num_experts,
        "top_k_experts": config.top_k_experts,
        "moe_intermediate_size": config.moe_intermediate_size,
        "use_cache": True,
    }
    if global_kv is not None:
        out["num_global_key_value_heads"] = global_kv
    return out


# RecurrentGemmaConfig's defaults (transformers 5.25, configuration_recurrent_gemma.py).
_RG_DEFAULTS: dict[str, Any] = {
    "num_hidden_layers": 26, "vocab_size": 256_000, "hidden_size": 2560,
    "intermediate_size": 3 * 2560, "num_attention_heads": 10, "lru_width": None,
    "attention_window_size": 2048, "conv1d_width": 4, "logits_soft_cap": 30.0,
    "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
    "block_types": ("recurrent", "recurrent", "attention"), "num_key_value_heads": None,
    "attention_bias": False, "tie_word_embeddings": True, "max_position_embeddings": 8192,
}  # fmt: skip
_RG_IGNORED = {
    "w_init_variance_scale", "final_w_init_variance_scale", "rope_theta",
    "partial_rotary_factor", "embeddings_scale_by_sqrt_dim", "block_types", "_block_types",
    "attention_window_size", "logits_soft_cap", "lru_width", "conv1d_width",
}  # fmt: skip


def _recurrent_from_hf(config: dict[str, Any], source: str) -> ModelConfig:
    """ModelConfig of a `RecurrentGemmaConfig` dict."""
    if config.get("embeddings_scale_by_sqrt_dim") is False:
        raise ConfigError(
            f"{source}: embeddings_scale_by_sqrt_dim=False is not implemented "
            "(transformers always scales the embedding by its bfloat16 sqrt(hidden_size))"
        )
    c = {**_RG_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if "block_types" not in config and config.get("_block_types"):
        c["block_types"] = config["_block_types"]  # google/recurrentgemma-2b's config.json
    if c.get("attention_dropout") not in (None, 0, 0.0):
        raise ConfigError(
            f"{source}: attention_dropout={c['attention_dropout']!r} is not implemented (no dropout)"
        )
    rope = c.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(
            f"{source}: rope_parameters.rope_type {rope.get('rope_type')!r} is not supported"
        )
    theta = float(rope.get("rope_theta", c.get("rope_theta", 10_000.0)))
    partial = float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5)))
    layers = c["num_hidden_layers"]
    blocks = (list(c["block_types"]) * layers)[:layers]
    bad = sorted({b for b in blocks if b not in ("recurrent", "attention")})
    if bad:
        raise ConfigError(f"{source}: block_types {bad} unknown (recurrent, attention)")
    heads = c["num_attention_heads"]
    known = _IGNORED | _RG_IGNORED | set(_RG_DEFAULTS)
    try:
        return ModelConfig(
            family="recurrent_gemma",
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=c["num_key_value_heads"] or heads,
            head_dim=c["hidden_size"] // heads,
            query_pre_attn_scalar=c["hidden_size"] // heads,
            sliding_window=c["attention_window_size"],
            layer_types=tuple(RECURRENT if b == "recurrent" else SLIDING for b in blocks),
            attention_bias=bool(c["attention_bias"]),
            rope_theta=theta,
            rope_local_base_freq=theta,
            partial_rotary_factor=partial,
            max_position_embeddings=c["max_position_embeddings"],
            rms_norm_eps=c["rms_norm_eps"],
            hidden_activation=c["hidden_activation"],
            final_logit_softcapping=c["logits_soft_cap"],
            tie_word_embeddings=bool(c["tie_word_embeddings"]),
            initializer_range=c.get("initializer_range", 0.02),
            lru_width=c["lru_width"] if c["lru_width"] != c["hidden_size"] else None,
            conv1d_width=c["conv1d_width"],
            name=str(config.get("_name_or_path", "")),
            extra={k: v for k, v in config.items() if k not in known},
            **_tokens(c),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _recurrent_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A `RecurrentGemmaConfig` dict (`RecurrentGemmaForCausalLM`)."""
    if config.final_logit_softcapping is None:
        raise ConfigError("to_hf: RecurrentGemma always soft-caps logits; set a cap")
    if config.intermediate_size % 2:
        raise ConfigError("to_hf: RecurrentGemma's MLP is intermediate_size / 2 wide; use even")
    return {
        "architectures": ["RecurrentGemmaForCausalLM"],
        "model_type": "recurrent_gemma",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "lru_width": config.lru_width or config.hidden_size,
        "attention_window_size": config.sliding_window,
        "conv1d_width": config.conv1d_width,
        "logits_soft_cap": config.final_logit_softcapping,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_activation": config.hidden_activation,
        "block_types": ["recurrent" if t == RECURRENT else "attention" for t in config.layer_types],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rope_theta,
            "partial_rotary_factor": config.partial_rotary_factor,
        },
        "attention_bias": config.attention_bias,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "bos_token_id": config.bos_token_id,
        "use_cache": True,
    }


# ---------------------------------------------------------------------- tensor names
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def _identity(config: ModelConfig, name: str) -> str:
    """geode and HF names agree (Gemma 3)."""
    return name


def _gemma4_key_to_hf(config: ModelConfig, name: str) -> str:
    """geode `layers.i.mlp.<k>` of an MoE block is HF `layers.i.<k>` (the block's parts sit on
    the HF decoder layer itself); everything else is identical."""
    m = _LAYER.match(name)
    if m and config.enable_moe_block and m.group(2).startswith("mlp."):
        return f"layers.{m.group(1)}.{m.group(2)[4:]}"
    return name


def _gemma4_key_from_hf(config: ModelConfig, name: str) -> str | None:
    """HF -> geode; the k/v weights some checkpoints keep on kv-shared layers are ignored (as
    transformers ignores them: those layers read the producer's k/v)."""
    from .model.moe import HF_KEYS

    m = _LAYER.match(name)
    if not m:
        return name
    i, rest = int(m.group(1)), m.group(2)
    if i < config.num_hidden_layers and kv_source(config, i) is not None:
        if rest.split(".")[:2][-1] in ("k_proj", "v_proj", "k_norm", "v_norm"):
            return None
    if config.enable_moe_block and rest in HF_KEYS:
        return f"layers.{i}.mlp.{rest}"
    return name


# RecurrentGemma's module names (HF) for the generic decoder layer's (geode).
_RG_NAMES = {
    "input_layernorm": "temporal_pre_norm",
    "self_attn": "temporal_block",
    "pre_feedforward_layernorm": "channel_pre_norm",
    "mlp": "mlp_block",
}
_RG_NAMES_BACK = {v: k for k, v in _RG_NAMES.items()}


def _rename(name: str, table: dict[str, str], final: tuple[str, str]) -> str:
    """Rename the first component below `layers.i.` (and the final norm) by `table`."""
    if name == final[0]:
        return final[1]
    m = _LAYER.match(name)
    if not m:
        return name
    head, _, tail = m.group(2).partition(".")
    return f"layers.{m.group(1)}.{table.get(head, head)}" + (f".{tail}" if tail else "")


def _recurrent_key_to_hf(config: ModelConfig, name: str) -> str:
    """geode -> HF names of RecurrentGemmaForCausalLM (below `model.`)."""
    return _rename(name, _RG_NAMES, ("norm.weight", "final_norm.weight"))


def _recurrent_key_from_hf(config: ModelConfig, name: str) -> str | None:
    """HF -> geode names of RecurrentGemmaForCausalLM."""
    return _rename(name, _RG_NAMES_BACK, ("final_norm.weight", "norm.weight"))


# ---------------------------------------------------------------------- cache/state factories
def _attention_states(config: ModelConfig) -> list[LayerState]:
    """Gemma 3: K/V of one shape on every layer, a ring on the sliding ones."""
    h, d = config.num_key_value_heads, config.head_dim
    return [LayerState(kind, h, d) for kind in config.layer_types]


def _gemma4_states(config: ModelConfig) -> list[LayerState]:
    """Gemma 4: full layers with their own head dim / kv heads, kv-shared layers nothing."""
    out = []
    for i, kind in enumerate(config.layer_types):
        src = kv_source(config, i)
        if src is not None:
            out.append(LayerState(SHARED, source=src))
        elif kind == FULL:
            hd = config.global_head_dim or config.head_dim
            kv = config.num_global_key_value_heads or config.num_key_value_heads
            out.append(LayerState(FULL, kv, hd))
        else:
            out.append(LayerState(SLIDING, config.num_key_value_heads, config.head_dim))
    return out


def _recurrent_states(config: ModelConfig) -> list[LayerState]:
    """RecurrentGemma: a constant recurrent state, or a ring of local K/V."""
    w = config.lru_width or config.hidden_size
    return [
        LayerState(RECURRENT, width=w, conv=config.conv1d_width)
        if kind == RECURRENT
        else LayerState(kind, config.num_key_value_heads, config.head_dim)
        for kind in config.layer_types
    ]


def layer_states(config: ModelConfig) -> list[LayerState]:
    """The per-layer decode states of a model, from its family's factory."""
    return get_family(config.family).layer_states(config)


def runner_refusal(config: ModelConfig, path: str) -> str | None:
    """Why runner path `path` cannot run this family (None: it can), from the registry."""
    spec = get_family(config.family)
    if path in spec.runner_paths:
        return None
    return (
        f"the {path} runner does not support family {config.family!r} (its runner paths: "
        f"{', '.join(spec.runner_paths)})"
    )


# ---------------------------------------------------------------------- registry
register_family(
    FamilySpec(
        name="gemma3",
        hf_text_model_types=("gemma3_text",),
        hf_wrapper_model_types=("gemma3",),
        config_from_hf=lambda c, s: ModelConfig.from_hf(c, s),
        config_to_hf=lambda c: c.to_hf(),
        key_to_hf=_identity,
        key_from_hf=_identity,
        norm_class_name="RMSNorm",
        attention_class_name="Attention",
        mlp_class_name="GatedMLP",
        sandwich_norms=True,
        runner_paths=RUNNER_PATHS,
        layer_states=_attention_states,
        vision_architecture="Gemma3ForConditionalGeneration",
    )
)
register_family(
    FamilySpec(
        name="gemma4",
        hf_text_model_types=("gemma4_text",),
        hf_wrapper_model_types=("gemma4",),
        config_from_hf=_gemma4_from_hf,
        config_to_hf=_gemma4_to_hf,
        key_to_hf=_gemma4_key_to_hf,
        key_from_hf=_gemma4_key_from_hf,
        norm_class_name="ScaleRMSNorm",
        attention_class_name="Gemma4Attention",
        mlp_class_name="GatedMLP",
        sandwich_norms=True,
        runner_paths=("forward", "torch"),
        layer_states=_gemma4_states,
    )
)
register_family(
    FamilySpec(
        name="recurrent_gemma",
        hf_text_model_types=("recurrent_gemma",),
        hf_wrapper_model_types=(),
        config_from_hf=_recurrent_from_hf,
        config_to_hf=_recurrent_to_hf,
        key_to_hf=_recurrent_key_to_hf,
        key_from_hf=_recurrent_key_from_hf,
        norm_class_name="RMSNorm",
        attention_class_name="LocalAttention",
        mlp_class_name="BiasedGatedMLP",
        sandwich_norms=False,
        runner_paths=("forward", "torch"),
        layer_states=_recurrent_states,
    )
)


# ---------------------------------------------------------------------- counts and state
def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Total, active-per-token, embedding and non-embedding parameters of any family's model.

    Counted on a meta-device build (nothing allocated), so the count is the model's by
    construction. Active: an MoE layer runs top_k of num_experts experts per token, so the
    other experts' weights are subtracted; embedding tables count as active (one row is read).
    """
    from .model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    idle = 0
    if config.enable_moe_block:
        per_expert = 3 * config.hidden_size * config.moe_intermediate_size  # type: ignore[operator]
        idle = config.num_hidden_layers * (config.num_experts - config.top_k_experts) * per_expert  # type: ignore[operator]
    return {
        "total": total,
        "active": total - idle,
        "embedding": embedding,
        "non_embedding": total - embedding,
    }


def state_bytes(
    config: ModelConfig,
    n_tokens: int,
    dtype: torch.dtype = torch.bfloat16,
    ring_buffer: bool = True,
    kinds: tuple[str, ...] = (SLIDING, FULL, RECURRENT),
    slack: int = 0,
) -> int:
    """Decode-state bytes of one sequence after n tokens, for any family (its `layer_states`).

    Attention layers keep K and V (2 * H_kv * D * b per token; local layers at most W + slack
    tokens with a ring buffer; Gemma 4 kv-shared layers nothing, full layers their own D and
    H_kv). A recurrent layer keeps a constant (conv1d_width - 1) * W inputs (dtype) + W h
    (float32). The engine's `geode.infer.cache.kv_cache_bytes` is this sum, and a one-row
    cache allocates it. `kinds`: count only the layers of those kinds.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    b = torch.empty((), dtype=dtype).element_size()
    local = min(n_tokens, config.sliding_window + slack) if ring_buffer else n_tokens
    total = 0
    for kind, st in zip(config.layer_types, layer_states(config), strict=True):
        if kind not in kinds:
            continue
        if st.kind == RECURRENT:
            total += (st.conv - 1) * st.width * b + st.width * 4
        elif st.kind in (FULL, SLIDING):
            kept = local if st.kind == SLIDING else n_tokens
            total += 2 * st.kv_heads * st.head_dim * b * kept
    return total
