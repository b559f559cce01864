"""Gemma 3's vision parts: the SigLIP vision tower and the multimodal projector.

The tower is the image encoder of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training", arXiv:2303.15343): a ViT (Dosovitskiy et al. 2021, arXiv:2010.11929) with
non-overlapping patches, learned absolute position embeddings, pre-LayerNorm encoder layers with
a GeLU(tanh) MLP, and a final LayerNorm; Gemma 3 uses no pooling head. The projector is Gemma
3's (Gemma 3 Technical Report, arXiv:2503.19786, section 2.1): the 64x64 patch embeddings of an
896x896 image are average-pooled 4x4 into 256 soft tokens, normalised with the Gemma (1+w)
RMSNorm and projected into the text width. The soft tokens replace the image placeholder
embeddings of the text, without the text embedding's sqrt(hidden) scale.

Module names equal transformers' `Gemma3ForConditionalGeneration` names (a model holds a
`vision_tower` = `SiglipVisionTower` and a `multi_modal_projector` = `MultiModalProjector`), so
checkpoint keys map one to one through `hf_vision_keys`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .layers import RMSNorm

HF_VISION_MODEL_TYPE = "siglip_vision_model"  # SiglipVisionConfig
HF_MULTIMODAL_MODEL_TYPE = "gemma3"  # Gemma3Config: vision_config + mm_tokens_per_image


@dataclass
class VisionConfig:
    """The SigLIP tower and projector shape; names follow HF's SiglipVisionConfig + Gemma3Config."""

    image_size: int = 896  # square input side in pixels
    patch_size: int = 14  # patch side; image_size / patch_size patches per side (64)
    num_channels: int = 3  # RGB
    hidden_size: int = 1152  # tower width
    intermediate_size: int = 4304  # MLP width
    num_hidden_layers: int = 27  # encoder layers
    num_attention_heads: int = 16  # heads (head_dim = hidden_size / heads = 72)
    layer_norm_eps: float = 1e-6  # LayerNorms of the tower and the projector's RMSNorm
    hidden_act: str = "gelu_pytorch_tanh"  # GeLU with the tanh approximation
    mm_tokens_per_image: int = 256  # soft tokens per image after pooling (a square number)
    # Gemma3Config's special token ids (its defaults: Gemma 3's vocabulary)
    image_token_index: int = 262144  # <image_soft_token>: the placeholders the soft tokens replace
    boi_token_index: int = 255999  # <start_of_image>
    eoi_token_index: int = 256000  # <end_of_image>
    name: str = ""  # preset or checkpoint name, informational
    extra: dict[str, Any] = field(default_factory=dict)  # unrecognised HF fields kept verbatim

    def __post_init__(self) -> None:
        positive = (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "mm_tokens_per_image",
        )
        tokens = ("image_token_index", "boi_token_index", "eoi_token_index")
        for name in tokens:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"VisionConfig.{name} must be a token id >= 0, got {value!r}")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"VisionConfig.{name} must be a positive integer, got {value!r}")
        eps = self.layer_norm_eps
        if not isinstance(eps, int | float) or not eps > 0 or not math.isfinite(eps):
            raise ConfigError(f"VisionConfig.layer_norm_eps must be a positive number, got {eps!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"VisionConfig.image_size ({self.image_size}) must be a multiple of "
                f"patch_size ({self.patch_size})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"VisionConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        side = math.isqrt(self.mm_tokens_per_image)
        if side * side != self.mm_tokens_per_image or self.patches_per_side % side:
            raise ConfigError(
                f"VisionConfig.mm_tokens_per_image ({self.mm_tokens_per_image}) must be the square "
                f"of a divisor of the {self.patches_per_side} patches per side, so the average "
                "pool tiles the patch grid exactly"
            )
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(
                f"VisionConfig.hidden_act {self.hidden_act!r} is not supported; "
                "use 'gelu_pytorch_tanh' (SigLIP) or 'gelu'"
            )

    # ------------------------------------------------------------------ derived
    @property
    def patches_per_side(self) -> int:
        """Patches along one side of the image (64 for 896 / 14)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch embeddings per image, the tower's sequence length (4096)."""
        return self.patches_per_side**2

    @property
    def tokens_per_side(self) -> int:
        """Soft tokens along one side after pooling (16)."""
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def pool_kernel(self) -> int:
        """Side of the average-pool window and its stride (4)."""
        return self.patches_per_side // self.tokens_per_side

    def replace(self, **changes: Any) -> VisionConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF mapping
    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> VisionConfig:
        """Build from a HF `Gemma3Config` dict (its `vision_config` + `mm_tokens_per_image`) or
        a bare `SiglipVisionConfig` dict (then 256 soft tokens, Gemma3Config's default)."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        mm_tokens = 256
        wrapper: dict[str, Any] = {}  # the Gemma3Config's own token ids, when given
        if config.get("model_type") == HF_MULTIMODAL_MODEL_TYPE:
            vision = config.get("vision_config")
            if not isinstance(vision, dict):
                raise ConfigError(f"{source}: model_type 'gemma3' needs a 'vision_config' object")
            if config.get("mm_tokens_per_image") is not None:
                mm_tokens = config["mm_tokens_per_image"]
            wrapper = {k: config[k] for k in _WRAPPER_TOKENS if config.get(k) is not None}
            source = f"{source}:vision_config"
        else:
            vision = config
        model_type = vision.get("model_type", HF_VISION_MODEL_TYPE)
        if model_type != HF_VISION_MODEL_TYPE:
            raise ConfigError(
                f"{source}: vision model_type {model_type!r} is not supported; geode reads "
                f"{HF_VISION_MODEL_TYPE!r} (SigLIP, as Gemma 3 uses)"
            )
        c = {**_HF_SIGLIP_VISION_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
        extra = {k: v for k, v in vision.items() if k not in _HF_SIGLIP_VISION_DEFAULTS}
        extra.pop("model_type", None)
        for name in _HF_VISION_IGNORED:
            extra.pop(name, None)
        if c["attention_dropout"]:
            warnings.warn(
                f"{source}: attention_dropout={c['attention_dropout']} is ignored "
                "(geode's vision tower has no dropout)",
                stacklevel=2,
            )
            extra["attention_dropout"] = c["attention_dropout"]
        for name in ("image_size", "patch_size"):
            if isinstance(c[name], list | tuple):  # SiglipVisionConfig allows (h, w) pairs
                if len(set(c[name])) != 1:
                    raise ConfigError(f"{source}: non-square {name} {c[name]} is not supported")
                c[name] = c[name][0]
        try:
            fields = {name: c[name] for name in _SIGLIP_FIELDS}
            return cls(**fields, **wrapper, mm_tokens_per_image=mm_tokens, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The vision fields of a HF `Gemma3Config`: `vision_config`, `mm_tokens_per_image` and
        the image token ids."""
        return {
            **{name: getattr(self, name) for name in _WRAPPER_TOKENS},
            "vision_config": {
                "model_type": HF_VISION_MODEL_TYPE,
                **{name: getattr(self, name) for name in _SIGLIP_FIELDS},
                "attention_dropout": 0.0,
                "vision_use_head": False,
            },
            "mm_tokens_per_image": self.mm_tokens_per_image,
        }


# SiglipVisionConfig's defaults (transformers 5, configuration_siglip.py): a published
# vision_config omits the fields that keep them.
_HF_SIGLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "vision_use_head": True,  # the pooling head; Gemma 3 never runs it (its weights are skipped)
}
_WRAPPER_TOKENS = ("image_token_index", "boi_token_index", "eoi_token_index")
_SIGLIP_FIELDS = tuple(
    k for k in _HF_SIGLIP_VISION_DEFAULTS if k not in ("attention_dropout", "vision_use_head")
)
_HF_VISION_IGNORED = {
    "architectures",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "attn_implementation",
    "id2label",
    "label2id",
}

# ---------------------------------------------------------------------- presets
# Gemma 3 4B/12B/27B share one vision config. Source: the `vision_config` and
# `mm_tokens_per_image` of the config.json of google/gemma-3-4b-it (hidden 1152, intermediate
# 4304, 27 layers, 16 heads, image 896, patch 14, no pooling head; 256 soft tokens) with
# SiglipVisionConfig's defaults for the omitted fields (layer_norm_eps 1e-6, gelu_pytorch_tanh,
# 3 channels); Gemma 3 Technical Report (arXiv:2503.19786) section 2.1: a 400M SigLIP encoder
# at 896x896 whose output is condensed to 256 vectors.
VISION_PRESETS: dict[str, VisionConfig] = {
    "gemma3-vision": VisionConfig(name="gemma3-vision"),
    # CPU-sized: 8x8 patches pooled 2x2 into 16 soft tokens, so the pooling is real.
    "nano-vision": VisionConfig(
        image_size=32,
        patch_size=4,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        mm_tokens_per_image=16,
        name="nano-vision",
    ),
}


def get_vision_preset(name: str) -> VisionConfig:
    """A fresh copy of a registered vision preset; unknown names list the known ones."""
    if name not in VISION_PRESETS:
        known = ", ".join(sorted(VISION_PRESETS))
        raise KeyError(f"unknown vision preset {name!r}; known vision presets: {known}")
    preset = VISION_PRESETS[name]
    return dataclasses.replace(preset, extra=dict(preset.extra))


# ---------------------------------------------------------------------- the tower
class SiglipEmbeddings(nn.Module):
    """Patches -> tokens: x_p E + E_pos (ViT eq. 1, without the class token)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, S, S) -> (N, P, D), P = (S / patch)^2 in row-major patch order."""
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (N, {', '.join(map(str, expected))}) for this "
                f"vision tower, got {tuple(pixel_values.shape)}"
            )
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(weight.dtype))  # (N, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (N, P, D)
        return x + self.position_embedding.weight  # (N, P, D)


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased projections (no mask, no RoPE)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, P, D) -> (N, P, D): softmax(q k^T / sqrt(d_head)) v per head."""
        N, P, _ = x.shape
        shape = (N, P, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (N, H, P, d)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, P, d); scale d**-0.5
        return self.out_proj(out.transpose(1, 2).reshape(N, P, -1))


class SiglipMLP(nn.Module):
    """fc2(gelu(fc1(x))), biased, GeLU with the tanh approximation."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, D) -> (N, P, D)."""
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then + mlp(LN2(.)) (LayerNorm: Ba et al. 2016)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, D) -> (N, P, D)."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    """The stack of encoder layers."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, D) -> (N, P, D)."""
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipTransformer(nn.Module):
    """Embeddings, encoder and the final LayerNorm (HF's `SiglipVisionTransformer`)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, S, S) -> patch embeddings (N, P, D)."""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class SiglipVisionTower(nn.Module):
    """Gemma 3's `vision_tower` (HF's `SiglipVisionModel` with `vision_use_head=False`)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = SiglipTransformer(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, S, S), normalised -> last hidden state (N, P, D)."""
        return self.vision_model(pixel_values)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Normal(0, std) for conv/linear/embedding weights, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


class MultiModalProjector(nn.Module):
    """Gemma 3's `multi_modal_projector`: AvgPool to mm_tokens_per_image, (1+w) RMSNorm, project.

    soft = RMSNorm(AvgPool_k(X)) @ W, with X the (S/p x S/p) grid of patch embeddings, k the
    pool kernel and stride, and W (D_vision, D_text) = `mm_input_projection_weight`.
    """

    def __init__(self, config: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.config = config
        self.mm_input_projection_weight = nn.Parameter(
            torch.zeros(config.hidden_size, text_hidden_size)
        )
        self.mm_soft_emb_norm = RMSNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (N, P, D) -> soft tokens (N, mm_tokens_per_image, D_text)."""
        c = self.config
        N, P, D = patches.shape
        if P != c.num_patches:
            raise ValueError(f"the projector expects {c.num_patches} patches per image, got {P}")
        grid = patches.transpose(1, 2).reshape(N, D, c.patches_per_side, c.patches_per_side)
        pooled = F.avg_pool2d(grid, c.pool_kernel)  # (N, D, t, t), t = tokens_per_side
        pooled = pooled.flatten(2).transpose(1, 2)  # (N, t*t, D) in row-major order
        soft = self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight  # (N, T_mm, D_text)
        return soft.type_as(patches)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Normal(0, std) projection, zero (identity-scale) norm weight."""
        self.mm_input_projection_weight.normal_(0.0, std, generator=generator)
        self.mm_soft_emb_norm.weight.zero_()


def place_image_features(
    embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Put soft tokens where `input_ids` holds the image placeholder, in order (HF's
    masked_scatter): embeds (B, T, H), input_ids (B, T), features (N, T_mm, H) -> (B, T, H).

    The features are used as they are: the text embedding's sqrt(H) scale is not applied."""
    mask = input_ids == image_token_id  # (B, T)
    slots, given = int(mask.sum()), features.shape[0] * features.shape[1]
    if slots != given:
        raise ValueError(
            f"the text has {slots} image placeholder tokens (id {image_token_id}) but the images "
            f"give {given} soft tokens ({features.shape[0]} images x {features.shape[1]})"
        )
    if features.shape[-1] != embeds.shape[-1]:
        raise ValueError(
            f"image features have width {features.shape[-1]}, the text embeddings {embeds.shape[-1]}"
        )
    feats = features.to(embeds.device, embeds.dtype).reshape(-1, embeds.shape[-1])
    return embeds.masked_scatter(mask[..., None], feats)


def image_group_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Per token, the index of its image among the row's runs of placeholders, -1 for text:
    (B, T) -> (B, T). Tokens with the same id >= 0 attend to each other bidirectionally."""
    is_image = input_ids == image_token_id  # (B, T)
    starts = is_image & ~F.pad(is_image, (1, 0), value=False)[:, :-1]  # first token of each run
    groups = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(is_image, groups, torch.full_like(groups, -1))


# ---------------------------------------------------------------------- checkpoint keys
# Where the vision tensors live, by checkpoint layout. geode's names are the published ones.
# "published": google/gemma-3-*; "model": what transformers >= 4.52 saves.
VISION_LAYOUTS = {
    "published": ("vision_tower.vision_model.", "multi_modal_projector."),
    "model": ("model.vision_tower.vision_model.", "model.multi_modal_projector."),
}
# transformers 5 drops the SiglipVisionModel's `vision_model.` level when it saves (its
# CLIPVisionModel prefix change); read these too, never write them.
_READ_ONLY_TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.")
_GEODE_TOWER, _GEODE_PROJECTOR = VISION_LAYOUTS["published"]
_TOWER_PARTS = ("embeddings.", "encoder.", "post_layernorm.")  # what follows the tower prefix
# The SigLIP pooling head (present when vision_use_head was left at True); Gemma 3 never runs it.
UNUSED_TOWER_PREFIX = "head."


def hf_vision_keys(keys: Iterable[str], to: str = "geode") -> dict[str, str]:
    """Map vision tensor names between geode and a HF checkpoint, in either direction.

    to="geode": `keys` are stored checkpoint keys in any layout; returns {stored key: geode name}
    for the vision tower and projector tensors (other keys are left out; the unused SigLIP
    pooling head maps to nothing). to="published" or "model": `keys` are geode names; returns
    {geode name: key in that layout}. Mixed layouts or an unknown vision key raise ValueError.
    """
    if to == "geode":
        return _to_geode(keys)
    if to not in VISION_LAYOUTS:
        raise ValueError(f"unknown key layout {to!r}; use 'geode' or one of {list(VISION_LAYOUTS)}")
    tower, projector = VISION_LAYOUTS[to]
    out = {}
    for name in keys:
        if name.startswith(_GEODE_TOWER):
            out[name] = tower + name[len(_GEODE_TOWER) :]
        elif name.startswith(_GEODE_PROJECTOR):
            out[name] = projector + name[len(_GEODE_PROJECTOR) :]
        else:
            raise ValueError(
                f"{name!r} is not a geode vision parameter (names start with "
                f"{_GEODE_TOWER!r} or {_GEODE_PROJECTOR!r})"
            )
    return out


def _to_geode(keys: Iterable[str]) -> dict[str, str]:
    """Stored keys -> geode names for the vision tensors (see `hf_vision_keys`)."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}  # geode name -> the stored key that gave it
    for key in keys:
        rest = _strip_vision_prefix(key)
        if rest is None:
            continue
        kind, tail = rest
        if kind == "tower" and tail.startswith(UNUSED_TOWER_PREFIX):
            continue
        if kind == "tower" and not tail.startswith(_TOWER_PARTS):
            raise ValueError(
                f"unexpected vision tensor {key!r}: not part of Gemma 3's SigLIP tower "
                f"(after the prefix, names start with one of {_TOWER_PARTS})"
            )
        name = (_GEODE_TOWER if kind == "tower" else _GEODE_PROJECTOR) + tail
        if name in seen:
            raise ValueError(
                f"vision tensor {key!r} duplicates {seen[name]!r} "
                "(two key layouts mixed in one checkpoint)"
            )
        seen[name] = key
        out[key] = name
    return out


def _strip_vision_prefix(key: str) -> tuple[str, str] | None:
    """('tower' | 'projector', name below the part) for a vision key in any layout, else None."""
    for tower, projector in VISION_LAYOUTS.values():
        if key.startswith(tower):
            return "tower", key[len(tower) :]
        if key.startswith(projector):
            return "projector", key[len(projector) :]
    for tower in _READ_ONLY_TOWER_PREFIXES:
        if key.startswith(tower):
            return "tower", key[len(tower) :]
    return None
