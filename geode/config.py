"""ModelConfig: the shape of a geode model, its Hugging Face mapping, and the preset registry."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

SLIDING = "sliding_attention"  # local layer: attends to the last `sliding_window` keys
FULL = "full_attention"  # global layer: attends to the whole causal prefix
RECURRENT = (
    "recurrent"  # Griffin's RG-LRU block (transformers' layers_block_type: linear_attention)
)
LAYER_TYPES = (SLIDING, FULL, RECURRENT)
FAMILIES = ("gemma3", "gemma4", "recurrent_gemma")  # their specs: geode/family.py
HF_TEXT_MODEL_TYPES = ("gemma3_text",)  # Gemma3TextConfig
HF_MULTIMODAL_MODEL_TYPES = ("gemma3",)  # Gemma3Config with a `text_config`
# Fields of the other families, with the value that means "absent" (Gemma 3 has none of them).
FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "gemma4": {
        "global_head_dim": None,
        "num_global_key_value_heads": None,
        "partial_rotary_factor": 1.0,
        "attention_k_eq_v": False,
        "num_kv_shared_layers": 0,
        "use_double_wide_mlp": False,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": None,
        "enable_moe_block": False,
        "num_experts": None,
        "top_k_experts": None,
        "moe_intermediate_size": None,
    },
    "recurrent_gemma": {"lru_width": None, "conv1d_width": 4, "partial_rotary_factor": 1.0},
}


class ConfigError(ValueError):
    """A model configuration field has an invalid value."""


def default_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's interleaving: every `pattern`-th layer is global, the rest local (5:1 for 6)."""
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


@dataclass
class ModelConfig:
    """Everything needed to build a decoder; field names follow Hugging Face's Gemma3TextConfig."""

    # --- sizes ---
    vocab_size: int = 262_144  # rows of the embedding (4B/12B/27B: 262,208 > tokenizer's 262,144)
    hidden_size: int = 1152  # residual stream width d_model
    intermediate_size: int = 6912  # width of each gated-MLP branch
    num_hidden_layers: int = 26  # decoder blocks
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 1  # key/value heads (GQA: query heads share them in groups)
    head_dim: int = 256  # per-head width; need not equal hidden_size / num_attention_heads
    # --- attention ---
    query_pre_attn_scalar: float = (
        256  # scores are scaled by query_pre_attn_scalar**-0.5 (27B: 168)
    )
    sliding_window: int = 512  # a local layer sees the last W keys, the current token included
    layer_types: tuple[str, ...] = ()  # per layer, SLIDING or FULL; empty -> 5 local : 1 global
    attn_logit_softcapping: float | None = None  # tanh cap on scores (Gemma 2; geode-native only)
    attention_bias: bool = False  # biases on q/k/v/o projections (False for Gemma)
    # --- positions ---
    rope_theta: float = 1_000_000.0  # RoPE base of global layers
    rope_local_base_freq: float = 10_000.0  # RoPE base of local layers
    rope_scaling_factor: float = 1.0  # linear position interpolation on global layers (8 -> 128K)
    max_position_embeddings: int = 32_768  # longest context the model is built for
    # --- numerics and head ---
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    hidden_activation: str = "gelu_pytorch_tanh"  # GeLU with the tanh approximation
    final_logit_softcapping: float | None = None  # tanh cap on output logits (None in Gemma 3)
    tie_word_embeddings: bool = True  # LM head reuses the embedding matrix
    initializer_range: float = 0.02  # std of the normal init of linear/embedding weights
    # --- special tokens (Gemma's SentencePiece ids) ---
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    # --- Gemma 4 (family "gemma4"; Gemma4TextConfig's names) ---
    global_head_dim: int | None = None  # head_dim of full layers (None: head_dim)
    num_global_key_value_heads: int | None = None  # kv heads of full layers (None: as local)
    partial_rotary_factor: float = 1.0  # share of the head RoPE rotates (Gemma 4 full: 0.25 of
    # each half, "proportional"; RecurrentGemma: 0.5, the first half of the head)
    attention_k_eq_v: bool = False  # full layers have no v_proj: v = k_proj(x) (normed apart)
    num_kv_shared_layers: int = 0  # the last N layers reuse the last earlier layer's k/v per kind
    use_double_wide_mlp: bool = False  # kv-shared layers have a 2x intermediate_size MLP
    hidden_size_per_layer_input: int = 0  # per-layer input embeddings width (0: none)
    vocab_size_per_layer_input: int | None = None  # rows of the per-layer table (None: vocab)
    enable_moe_block: bool = False  # every layer adds routed experts beside its dense MLP
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None  # width of each expert's GeGLU
    # --- RecurrentGemma (family "recurrent_gemma"; RecurrentGemmaConfig's names) ---
    lru_width: int | None = None  # RG-LRU width (None: hidden_size)
    conv1d_width: int = 4  # temporal conv taps
    # --- family ---
    family: str = "gemma3"  # which member of the family this config builds (geode/family.py)
    name: str = ""  # preset or checkpoint name, informational
    extra: dict[str, Any] = field(default_factory=dict)  # unrecognised HF fields kept verbatim

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        self.layer_types = tuple(self.layer_types)
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "sliding_window",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("query_pre_attn_scalar", "rope_theta", "rope_local_base_freq", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
                raise ConfigError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if not self.rope_scaling_factor >= 1.0:
            raise ConfigError(
                f"ModelConfig.rope_scaling_factor must be >= 1 (linear interpolation), "
                f"got {self.rope_scaling_factor!r}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"ModelConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"ModelConfig.layer_types has {len(self.layer_types)} entries but "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ConfigError(f"ModelConfig.layer_types has unknown types {bad}; use {LAYER_TYPES}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"ModelConfig.{name} must be None or > 0, got {value!r}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(
                f"ModelConfig.hidden_activation {self.hidden_activation!r} is not supported; "
                "use 'gelu_pytorch_tanh' (Gemma) or 'gelu'"
            )
        if self.family not in FAMILIES:
            raise ConfigError(f"ModelConfig.family {self.family!r} is unknown; known: {FAMILIES}")
        self._check_family_fields()
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"ModelConfig.{name}={value} is outside the vocabulary (size {self.vocab_size})"
                )

    def _check_family_fields(self) -> None:
        """Fields of another family keep their 'absent' value; the family's own are checked."""
        own = FAMILY_FIELDS.get(self.family, {})
        for family, fields in FAMILY_FIELDS.items():
            for name, absent in fields.items():
                if name not in own and getattr(self, name) != absent:
                    raise ConfigError(
                        f"ModelConfig.{name}={getattr(self, name)!r} is a {family} option; "
                        f"family {self.family!r} has no such field (leave it {absent!r})"
                    )
        if RECURRENT in self.layer_types and self.family != "recurrent_gemma":
            raise ConfigError(f"ModelConfig.layer_types: {RECURRENT!r} layers need recurrent_gemma")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(
                f"ModelConfig.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}"
            )
        if self.family == "gemma4":
            from .family import check_gemma4

            check_gemma4(self)
        elif self.family == "recurrent_gemma":
            from .family import check_recurrent_gemma

            check_recurrent_gemma(self)

    # ------------------------------------------------------------------ derived
    @property
    def num_recurrent_layers(self) -> int:
        """Griffin RG-LRU layers (constant-size state)."""
        return sum(t == RECURRENT for t in self.layer_types)

    @property
    def num_global_layers(self) -> int:
        """Layers that attend to the whole context."""
        return sum(t == FULL for t in self.layer_types)

    @property
    def num_local_layers(self) -> int:
        """Sliding-window layers."""
        return sum(t == SLIDING for t in self.layer_types)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (layer_types re-derived if the depth changes)."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF mapping
    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a HF `Gemma3TextConfig` dict or the `text_config` of a `Gemma3Config` dict."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type")
        from .family import family_for_model_type

        other = family_for_model_type(model_type)
        if other is not None:  # Gemma 4, RecurrentGemma: their adapters (geode/family.py)
            return other.config_from_hf(config, source)
        if model_type in HF_MULTIMODAL_MODEL_TYPES:
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: model_type 'gemma3' needs a 'text_config' object")
            text = dict(text)
            text.setdefault("model_type", "gemma3_text")
            # Published multimodal configs omit text defaults that Gemma3TextConfig supplies.
            return cls.from_hf(text, source=f"{source}:text_config")
        if model_type not in HF_TEXT_MODEL_TYPES:
            from .family import FAMILY_SPECS

            known = [t for f in FAMILY_SPECS.values() for t in f.hf_text_model_types]
            known += [t for f in FAMILY_SPECS.values() for t in f.hf_wrapper_model_types]
            raise ConfigError(f"{source}: unknown model_type {model_type!r}; geode reads {known}")
        hf_defaults = _HF_GEMMA3_TEXT_DEFAULTS
        c = {**hf_defaults, **{k: v for k, v in config.items() if v is not None or k in _NULLABLE}}
        global_theta, local_theta, factor = _read_rope(c, source)
        layer_types = c.get("layer_types")
        if layer_types is None:
            pattern = c.get("sliding_window_pattern", 6)
            layer_types = default_layer_types(c["num_hidden_layers"], pattern)
        if c.get("use_bidirectional_attention"):
            raise ConfigError(f"{source}: use_bidirectional_attention=True is not supported")
        eos = c.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        known = set(_HF_GEMMA3_TEXT_DEFAULTS) | _HF_IGNORED
        extra = {k: v for k, v in config.items() if k not in known}
        if c.get("attn_logit_softcapping") is not None:
            # Gemma 3 replaced Gemma 2's attention soft-capping with QK-norm; transformers'
            # Gemma3 keeps the field but never applies it, so neither do we (kept in extra).
            warnings.warn(
                f"{source}: attn_logit_softcapping={c['attn_logit_softcapping']} is ignored, "
                "as transformers' Gemma3 ignores it (Gemma 3 uses QK-norm instead)",
                stacklevel=2,
            )
            extra["attn_logit_softcapping"] = c["attn_logit_softcapping"]
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        try:
            return cls(
                vocab_size=c["vocab_size"],
                hidden_size=c["hidden_size"],
                intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_hidden_layers"],
                num_attention_heads=c["num_attention_heads"],
                num_key_value_heads=c["num_key_value_heads"],
                head_dim=head_dim,
                query_pre_attn_scalar=c["query_pre_attn_scalar"],
                sliding_window=c["sliding_window"],
                layer_types=tuple(layer_types),
                attention_bias=bool(c.get("attention_bias", False)),
                rope_theta=global_theta,
                rope_local_base_freq=local_theta,
                rope_scaling_factor=factor,
                max_position_embeddings=c["max_position_embeddings"],
                rms_norm_eps=c["rms_norm_eps"],
                hidden_activation=c.get("hidden_activation") or "gelu_pytorch_tanh",
                final_logit_softcapping=c.get("final_logit_softcapping"),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
                initializer_range=c.get("initializer_range", 0.02),
                pad_token_id=c.get("pad_token_id") if c.get("pad_token_id") is not None else 0,
                eos_token_id=eos if eos is not None else 1,
                bos_token_id=c.get("bos_token_id") if c.get("bos_token_id") is not None else 2,
                name=str(config.get("_name_or_path", "")),
                extra=extra,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A `Gemma3TextConfig` dict (`Gemma3ForCausalLM`) that transformers and vLLM load."""
        if self.family != "gemma3":
            from .family import get_family

            return get_family(self.family).config_to_hf(self)
        if self.attn_logit_softcapping is not None:
            raise ConfigError(
                "to_hf: attn_logit_softcapping is set, but transformers' Gemma3 ignores it; "
                "this model cannot be written in the Gemma3 layout without changing its outputs"
            )
        full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor != 1.0:
            full_rope = {
                "rope_type": "linear",
                "factor": self.rope_scaling_factor,
                "rope_theta": self.rope_theta,
            }
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_activation": self.hidden_activation,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            # Legacy keys (published checkpoints, transformers 4, vLLM) and the transformers 5
            # form; both describe the same RoPE.
            "rope_theta": self.rope_theta,
            "rope_local_base_freq": self.rope_local_base_freq,
            "rope_scaling": (
                {"rope_type": "linear", "factor": self.rope_scaling_factor}
                if self.rope_scaling_factor != 1.0
                else None
            ),
            "rope_parameters": {
                FULL: full_rope,
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_base_freq},
            },
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": self.extra.get("attn_logit_softcapping"),
            "use_cache": True,
        }


# Gemma3TextConfig's defaults (transformers 5, configuration_gemma3.py): a published config
# may omit a field and mean this value.
_HF_GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "rope_scaling": None,
    "rope_parameters": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "layer_types": None,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "use_bidirectional_attention": False,
}
_NULLABLE = {"final_logit_softcapping", "attn_logit_softcapping", "rope_scaling", "layer_types"}
_HF_IGNORED = {
    "architectures",
    "model_type",
    "use_cache",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "cache_implementation",
    "attn_implementation",
    "_attn_implementation_autoset",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "tokenizer_class",
    "_sliding_window_pattern",
}


def _read_rope(c: dict[str, Any], source: str) -> tuple[float, float, float]:
    """(global base, local base, linear factor) from either HF rope layout."""
    global_theta = float(c.get("rope_theta") or 1_000_000.0)
    local_theta = float(c.get("rope_local_base_freq") or 10_000.0)
    scaling = c.get("rope_scaling")
    params = c.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        full = params.get(FULL) or {}
        local = params.get(SLIDING) or {}
        global_theta = float(full.get("rope_theta", global_theta))
        local_theta = float(local.get("rope_theta", local_theta))
        if local.get("rope_type", "default") != "default":
            raise ConfigError(
                f"{source}: rope_parameters.{SLIDING}.rope_type "
                f"{local.get('rope_type')!r} is not supported (expected 'default')"
            )
        scaling = full
    elif isinstance(params, dict):  # a single dict applying to global layers
        global_theta = float(params.get("rope_theta", global_theta))
        scaling = params
    factor = 1.0
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "linear":
            factor = float(scaling["factor"])
        elif rope_type != "default":
            raise ConfigError(
                f"{source}: rope type {rope_type!r} is not supported; Gemma 3 uses 'linear' "
                "(factor 8 for 128K context) or 'default'"
            )
    return global_theta, local_theta, factor


# ---------------------------------------------------------------------- presets
# Published Gemma 3 shapes. Source: the config.json of each Hugging Face checkpoint
# (google/gemma-3-1b-pt, google/gemma-3-{4b,12b,27b}-pt, text_config) and Table 1 and
# section 2 of the Gemma 3 Technical Report (arXiv:2503.19786): 5 local layers per global
# layer, local window 1024 (512 for 1B), RoPE base 10k local / 1M global, positions of
# global layers interpolated by a factor 8 for 128K context in 4B+.
PRESETS: dict[str, ModelConfig] = {}


def register_preset(name: str, config: ModelConfig) -> None:
    """Add a named configuration to the registry (later families register theirs here)."""
    config.name = name
    PRESETS[name] = config


register_preset(
    "gemma3-1b",
    ModelConfig(
        vocab_size=262_144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        max_position_embeddings=32_768,
    ),
)
register_preset(
    "gemma3-4b",
    ModelConfig(
        vocab_size=262_208,
        hidden_size=2560,
        intermediate_size=10_240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        rope_scaling_factor=8.0,
        max_position_embeddings=131_072,
    ),
)
register_preset(
    "gemma3-12b",
    ModelConfig(
        vocab_size=262_208,
        hidden_size=3840,
        intermediate_size=15_360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        rope_scaling_factor=8.0,
        max_position_embeddings=131_072,
    ),
)
register_preset(
    "gemma3-27b",
    ModelConfig(
        vocab_size=262_208,
        hidden_size=5376,
        intermediate_size=21_504,
        num_hidden_layers=62,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168,  # = hidden_size / num_attention_heads, not head_dim
        sliding_window=1024,
        rope_scaling_factor=8.0,
        max_position_embeddings=131_072,
    ),
)

# CPU-sized members with the same 5:1 local/global structure, QK-norm, GQA and dual RoPE.
# Parameter counts (tied embeddings) are checked in tests/test_config.py.
register_preset(
    "nano-1m",
    ModelConfig(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=64,
        max_position_embeddings=2048,
    ),
)
register_preset(
    "nano-5m",
    ModelConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=128,
        max_position_embeddings=4096,
    ),
)
register_preset(
    "nano-20m",
    ModelConfig(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=12,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=256,
        max_position_embeddings=8192,
    ),
)
register_preset(
    "nano-60m",  # the shape DESIGN.md's llama.cpp / transformers CPU numbers were measured on
    ModelConfig(
        vocab_size=32_000,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=512,
        max_position_embeddings=8192,
    ),
)


# Gemma 4 (text decoders). Sources: the `text_config` of each checkpoint's config.json
# (google/gemma-4-E2B, -E4B, -26B-A4B, -31B; transformers 5.25's Gemma4TextConfig for
# omitted fields). Scores are scaled by 1 (q/k norms), full layers have
# a 512-wide head and proportional RoPE rotating 1/4 of it (base 1M), local layers base 10k.
_GEMMA4 = dict(
    family="gemma4", vocab_size=262_144, head_dim=256, global_head_dim=512,
    query_pre_attn_scalar=1.0, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    partial_rotary_factor=0.25, final_logit_softcapping=30.0,
)  # fmt: skip
register_preset(
    "gemma4-e2b",  # 5.1B with embeddings, 2.3B "effective" (Gemma 4 model card)
    ModelConfig(
        **_GEMMA4,
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=35,
        num_attention_heads=8,
        num_key_value_heads=1,
        sliding_window=512,
        layer_types=default_layer_types(35, 5),
        max_position_embeddings=131_072,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262_144,
    ),  # fmt: skip
)
register_preset(
    "gemma4-e4b",  # 8B with embeddings and encoders, 4.5B "effective" (model card)
    ModelConfig(
        **_GEMMA4,
        hidden_size=2560,
        intermediate_size=10_240,
        num_hidden_layers=42,
        num_attention_heads=8,
        num_key_value_heads=2,
        sliding_window=512,
        max_position_embeddings=131_072,
        num_kv_shared_layers=18,
        hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262_144,
    ),  # fmt: skip
)
register_preset(
    "gemma4-26b-a4b",  # 25.2B total, 3.8B active per token (model card)
    ModelConfig(
        **_GEMMA4,
        hidden_size=2816,
        intermediate_size=2112,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        sliding_window=1024,
        max_position_embeddings=262_144,
        enable_moe_block=True,
        num_experts=128,
        top_k_experts=8,
        moe_intermediate_size=704,
    ),  # fmt: skip
)
register_preset(
    "gemma4-31b",  # 30.7B (model card)
    ModelConfig(
        **_GEMMA4,
        hidden_size=5376,
        intermediate_size=21_504,
        num_hidden_layers=60,
        num_attention_heads=32,
        num_key_value_heads=16,
        num_global_key_value_heads=4,
        attention_k_eq_v=True,
        sliding_window=1024,
        max_position_embeddings=262_144,
    ),  # fmt: skip
)
# CPU-sized Gemma 4 members: the MoE block (8 experts, top 2) and the E2B-style options
# (per-layer inputs, kv sharing, double-wide MLP, k = v on full layers).
_GEMMA4_NANO = dict(
    family="gemma4", vocab_size=4096, hidden_size=128, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=1, head_dim=32, global_head_dim=64,
    query_pre_attn_scalar=1.0, sliding_window=64, partial_rotary_factor=0.25,
    max_position_embeddings=4096, final_logit_softcapping=30.0,
    layer_types=(SLIDING, SLIDING, FULL) * 2,
)  # fmt: skip
register_preset(
    "gemma4-nano-moe",
    ModelConfig(
        **_GEMMA4_NANO,
        intermediate_size=128,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=64,
    ),  # fmt: skip
)
register_preset(
    "gemma4-nano-ple",
    ModelConfig(
        **_GEMMA4_NANO,
        intermediate_size=256,
        hidden_size_per_layer_input=32,
        vocab_size_per_layer_input=4096,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        attention_k_eq_v=True,
    ),  # fmt: skip
)

# RecurrentGemma (Griffin). Sources: google/recurrentgemma-2b's config.json and Table 1 of
# the RecurrentGemma report (arXiv:2404.07839): width 2560 / 4096, RG-LRU width = width,
# depth 26 / 38, 10 / 16 heads with one kv head (MQA), MLP expansion 3 (HF stores the two
# GeGLU branches: intermediate_size = 6 * width), local attention window 2048, the pattern
# (recurrent, recurrent, attention), RoPE on half of each head, logits soft-capped at 30.
_RG = dict(
    family="recurrent_gemma", vocab_size=256_000, num_key_value_heads=1, head_dim=256,
    query_pre_attn_scalar=256, sliding_window=2048, rope_theta=10_000.0,
    rope_local_base_freq=10_000.0, partial_rotary_factor=0.5, final_logit_softcapping=30.0,
    max_position_embeddings=8192,
)  # fmt: skip


def griffin_layer_types(num_layers: int) -> tuple[str, ...]:
    """RecurrentGemma's block pattern: (recurrent, recurrent, attention) repeated."""
    return tuple(SLIDING if i % 3 == 2 else RECURRENT for i in range(num_layers))


register_preset(
    "recurrentgemma-2b",  # 2.68B = 2.03B non-embedding + 0.65B embedding (report, Table 1)
    ModelConfig(
        **_RG,
        hidden_size=2560,
        intermediate_size=15_360,
        num_hidden_layers=26,
        num_attention_heads=10,
        layer_types=griffin_layer_types(26),
    ),  # fmt: skip
)
register_preset(
    "recurrentgemma-9b",  # 8.58B = 7.53B non-embedding + 1.05B embedding (report, Table 1)
    ModelConfig(
        **_RG,
        hidden_size=4096,
        intermediate_size=24_576,
        num_hidden_layers=38,
        num_attention_heads=16,
        layer_types=griffin_layer_types(38),
    ),  # fmt: skip
)
register_preset(
    "recurrentgemma-nano",
    ModelConfig(
        **{
            **_RG,
            "vocab_size": 4096,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 64,
            "max_position_embeddings": 8192,
        },
        hidden_size=128,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,
        layer_types=griffin_layer_types(6),
    ),  # fmt: skip
)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a registered preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], extra=dict(PRESETS[name].extra))
