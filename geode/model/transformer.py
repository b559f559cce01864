"""The Gemma decoders (Gemma 3, Gemma 4, RecurrentGemma): one definition for training, RL,
evaluation and serving. The family's spec (geode/family.py) names each layer's parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import family as fam
from ..config import FULL, SLIDING, ModelConfig
from .attention import Attention, Gemma4Attention, KVCache, LocalAttention, clear_mask_memo
from .layers import (
    GatedMLP,
    RMSNorm,
    ScaledEmbedding,
    ScaleRMSNorm,
    rope_cos_sin,
    rope_inv_freq,
    rope_inv_freq_proportional,
)
from .moe import Experts, MoEBlock, Router
from .recurrent import RGLRU, RecurrentMixer
from .vision import (
    MultiModalProjector,
    SiglipVisionTower,
    VisionConfig,
    image_group_ids,
    place_image_features,
)

# Layer parts by name (litgpt-style): the family spec and the config pick them.
NORMS: dict[str, type[nn.Module]] = {"RMSNorm": RMSNorm, "ScaleRMSNorm": ScaleRMSNorm}
MIXERS: dict[str, type[nn.Module]] = {
    "Attention": Attention,
    "Gemma4Attention": Gemma4Attention,
    "LocalAttention": LocalAttention,
    "RecurrentMixer": RecurrentMixer,
}


def build_mlp(name: str, config: ModelConfig, layer: int) -> nn.Module:
    """A layer's feed-forward by name: "GatedMLP", "BiasedGatedMLP" (RecurrentGemma), "MoEBlock"."""
    if name == "MoEBlock":
        return MoEBlock(fam.moe_config(config, layer))
    width = fam.mlp_width(config, layer)
    return GatedMLP(config.hidden_size, width, config.hidden_activation, bias=name != "GatedMLP")


FLOAT16_REFUSAL = (
    "float16 is refused for Gemma 3: its activations exceed float16's range (65504) and the "
    "model produces inf/NaN (transformers issue #36822). Use bfloat16 or float32, or pass "
    "allow_float16=True (CLI: --force-float16) to force it."
)


def check_dtype(dtype: torch.dtype | None, allow_float16: bool = False) -> None:
    """Refuse dtypes the model cannot run in (float16 unless forced; non-floating types)."""
    if dtype is None:
        return
    if not dtype.is_floating_point:
        raise ValueError(f"model dtype must be a floating type, got {dtype}")
    if dtype == torch.float16 and not allow_float16:
        raise ValueError(FLOAT16_REFUSAL)


def plain_causal(positions: torch.Tensor | None, segment_ids: torch.Tensor | None, T: int) -> bool:
    """True when every row is one document at positions 0..T-1 (positions/segments (B, T)).

    Then attention is plainly causal and the kernels' causal path (which skips the masked
    upper triangle) gives the same result as the explicit mask. Packed training rows whose
    document spans the whole row take this path.
    """
    if positions is not None:
        if positions.shape[-1] != T or positions.device.type == "meta":
            return False
        ramp = torch.arange(T, device=positions.device)
        if not bool((positions == ramp).all()):
            return False
    if segment_ids is not None and not bool((segment_ids == segment_ids[..., :1]).all()):
        return False
    return True


class DecoderLayer(nn.Module):
    """Norms around a token mixer and a feed-forward, the parts named by the family's spec.

    Gemma 2/3/4: pre- and post-norm around both halves ('sandwich'); RecurrentGemma: pre-norms
    only. The token mixer is attention (of the family's kind) or the recurrent block; the
    feed-forward a GeGLU or Gemma 4's MoE block (which owns its norms). Gemma 4 adds the
    per-layer input (gate, projection, norm) and a layer scalar after the feed-forward.
    """

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        spec = fam.get_family(config.family)
        norm = NORMS[spec.norm_class_name]
        mlp = fam.mlp_class_name(config, layer)
        self.self_attn = MIXERS[fam.mixer_class_name(config, layer)](config, layer)
        self.mlp = build_mlp(mlp, config, layer)
        self.moe = mlp == "MoEBlock"
        self.input_layernorm = norm(h, eps)
        sandwich = spec.sandwich_norms
        self.post_attention_layernorm = norm(h, eps) if sandwich else None
        self.pre_feedforward_layernorm = None if self.moe else norm(h, eps)
        self.post_feedforward_layernorm = norm(h, eps) if sandwich and not self.moe else None
        self.per_layer_input_gate = self.per_layer_projection = None
        self.post_per_layer_input_norm = None
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None  # last MoE routing
        if config.family == "gemma4":
            p = config.hidden_size_per_layer_input
            if p:
                self.per_layer_input_gate = nn.Linear(h, p, bias=False)
                self.per_layer_projection = nn.Linear(p, h, bias=False)
                self.post_per_layer_input_norm = norm(h, eps)
                self.approximate = (
                    "tanh" if config.hidden_activation == "gelu_pytorch_tanh" else "none"
                )
            self.layer_scalar = nn.Buffer(torch.ones(1))  # a stored tensor in Gemma 4 checkpoints

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        positions: torch.Tensor,
        cache: KVCache | None,
        segment_ids: torch.Tensor | None,
        causal_default: bool,
        shared: dict | None = None,
        per_layer_input: torch.Tensor | None = None,
        image_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden); `shared`: Gemma 4's k/v of producer layers,
        `per_layer_input` (B, T, p): Gemma 4's per-layer input of this layer;
        `image_groups` (B, T): Gemma 3's image group ids (bidirectional within an image)."""
        args = (self.input_layernorm(x), cos, sin, positions, cache, segment_ids, causal_default)
        extra = {} if image_groups is None else {"image_groups": image_groups}
        if shared is not None:
            extra["shared"] = shared
        a = self.self_attn(*args, **extra)
        if self.post_attention_layernorm is not None:
            a = self.post_attention_layernorm(a)
        x = x + a
        if self.moe:
            out = self.mlp(x)  # MoEOutput: the block reads the residual, norms inside
            self.routing = (out.router_logits, out.expert_load)
            x = x + out.hidden
        else:
            f = self.mlp(self.pre_feedforward_layernorm(x))
            if self.post_feedforward_layernorm is not None:
                f = self.post_feedforward_layernorm(f)
            x = x + f
        if self.per_layer_input_gate is not None:
            g = F.gelu(self.per_layer_input_gate(x), approximate=self.approximate)  # (B, T, p)
            g = self.per_layer_projection(g * per_layer_input)
            x = x + self.post_per_layer_input_norm(g)
        if hasattr(self, "layer_scalar"):
            x = x * self.layer_scalar
        return x


class Transformer(nn.Module):
    """Gemma text decoder (any family) with a tied (or separate) LM head.

    Gemma 3's module names equal the Hugging Face `Gemma3ForCausalLM` names without the
    `model.` prefix; the other families' names map through their spec's `key_to_hf`.

    With a `vision` config (Gemma 3 only) the model is also `Gemma3ForConditionalGeneration`:
    it holds the SigLIP `vision_tower` and the `multi_modal_projector` (geode/model/vision.py),
    and `forward(input_ids, pixel_values=...)` puts each image's soft tokens on its
    placeholders with bidirectional attention among them. It stays a `Transformer`, so a
    text-only caller (the engine's runners) uses it unchanged.
    """

    def __init__(self, config: ModelConfig, vision: VisionConfig | None = None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.vision_tower: SiglipVisionTower | None = None
        self.multi_modal_projector: MultiModalProjector | None = None
        if vision is not None:
            if fam.get_family(config.family).vision_architecture is None:
                raise ValueError(
                    f"family {config.family!r} has no vision tower geode builds (Gemma 3 has)"
                )
            self.vision_tower = SiglipVisionTower(vision)
            self.multi_modal_projector = MultiModalProjector(vision, config.hidden_size)
        h = config.hidden_size
        scale_dtype = {"gemma4": torch.float32, "recurrent_gemma": torch.bfloat16}
        self.embed_tokens = ScaledEmbedding(
            config.vocab_size,
            h,
            padding_idx=config.pad_token_id,
            scale_dtype=scale_dtype.get(config.family),
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = NORMS[fam.get_family(config.family).norm_class_name](h, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # Inference may install a faster or quantized LM head here (geode.infer); it holds no
        # parameters of its own, so checkpoints are unchanged. None: the plain projection.
        self.head_override: nn.Module | None = None
        self.gradient_checkpointing = False  # recompute each layer in backward (trainer sets it)
        self._inv_freq = _inv_freqs(config)
        # plain tensors, not buffers: a meta-device build (checkpoint loading) keeps them real
        self.embed_tokens_per_layer = None
        p = config.hidden_size_per_layer_input
        if p:  # Gemma 4 per-layer input embeddings (transformers' PLE)
            L = config.num_hidden_layers
            self.embed_tokens_per_layer = ScaledEmbedding(
                config.vocab_size_per_layer_input or config.vocab_size,
                L * p,
                padding_idx=config.pad_token_id,
                scale=p**0.5,
                scale_dtype=torch.float32,
            )
            self.per_layer_model_projection = nn.Linear(h, L * p, bias=False)
            self.per_layer_projection_norm = ScaleRMSNorm(p, config.rms_norm_eps)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for linear/embedding weights and experts, zeros for the
        (1+w) norms, ones for Gemma 4's w norms and router scales; the RG-LRU and conv keep
        the init of their constructors (transformers' RecurrentGemma init)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.zero_()
            elif isinstance(module, ScaleRMSNorm) and module.weight is not None:
                module.weight.fill_(1.0)
            elif isinstance(module, Router):
                module.scale.fill_(1.0)
                module.per_expert_scale.fill_(1.0)
            elif isinstance(module, Experts):
                module.gate_up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)
            elif isinstance(module, RGLRU | nn.Conv1d):
                continue
        if self.vision_tower is not None and self.multi_modal_projector is not None:
            self.vision_tower.init_weights(generator, std)
            self.multi_modal_projector.init_weights(generator, std)
        self.embed_tokens.weight[self.config.pad_token_id].zero_()
        if self.embed_tokens_per_layer is not None:
            self.embed_tokens_per_layer.weight[self.config.pad_token_id].zero_()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) [or embeds (B, T, hidden)] -> logits (B, T, V) in the model dtype.

        positions (B, T): absolute position of each token (default 0..T-1; packed documents
        restart at 0); negative marks padding. cache: a `KVCache` (see attention.py).
        segment_ids (B, T): document ids; attention never crosses documents.
        rows (B, T) bool: return only those positions' logits, (N, V) in row-major order (a
        loss on a few positions, e.g. SFT's assistant tokens, skips the others' LM head).
        pixel_values (N, C, S, S): the images of the image placeholder runs of input_ids, in
        order (a model with a vision tower); image_groups (B, T): image group ids for a caller
        passing embeds with soft tokens already placed (see `hidden`).
        """
        h = self.hidden(
            input_ids, positions, cache, segment_ids, embeds, pixel_values, image_groups
        )  # (B, T, hidden)
        return self.logits(h if rows is None else h[rows])

    def hidden(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden); `logits` turns any subset into scores.

        With pixel_values the image placeholders' embeddings are the images' soft tokens and
        each image's tokens attend to each other (`image_group_ids`); with a cache, one
        image must lie inside this call's tokens (the cache keeps no group ids).
        """
        if (input_ids is None) == (embeds is None):
            raise ValueError("pass exactly one of input_ids or embeds")
        x = self.embed_tokens(input_ids) if embeds is None else embeds  # (B, T, hidden)
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids (the image placeholders)")
            token = self.image_token_id
            x = place_image_features(x, input_ids, self.image_features(pixel_values), token)
            if image_groups is None:
                image_groups = image_group_ids(input_ids, token)  # (B, T)
        if image_groups is not None and not bool((image_groups >= 0).any()):
            image_groups = None  # no image: the text model's masks exactly
        if image_groups is not None and self.config.family != "gemma3":
            raise ValueError(f"image_groups: the {self.config.family} mask has no image term")
        B, T, _ = x.shape
        causal_default = cache is None and plain_causal(positions, segment_ids, T)
        if positions is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
        tables = {  # per layer type: (cos, sin), each (B, T, rotary dims)
            kind: rope_cos_sin(positions.clamp(min=0), inv, x.dtype)
            for kind, inv in self._inv_freq.items()
        }
        gemma3 = self.config.family == "gemma3"
        shared: dict = {}  # Gemma 4 kv sharing: producer layer -> (k, v)
        ple = None if self.embed_tokens_per_layer is None else self.per_layer_inputs(input_ids, x)
        clear_mask_memo()
        try:
            for i, layer in enumerate(self.layers):
                cos, sin = tables.get(self.config.layer_types[i], (None, None))
                args = (x, cos, sin, positions, cache, segment_ids, causal_default)
                if not gemma3:
                    args += (shared, None if ple is None else ple[:, :, i])
                kw = {} if image_groups is None else {"image_groups": image_groups}
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(layer, *args, use_reentrant=False, **kw)
                else:
                    x = layer(*args, **kw)
        finally:
            clear_mask_memo()
        return self.norm(x)

    @property
    def image_token_id(self) -> int:
        """The image placeholder id (`image_token_index`); a text-only model has none."""
        if self.vision is None:
            raise ValueError(
                "this model has no vision tower (a text-only checkpoint, or loaded with "
                "vision=False): it cannot take pixel_values"
            )
        return self.vision.image_token_index

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, S, S) -> soft tokens (N, mm_tokens_per_image, hidden)."""
        assert self.vision_tower is not None and self.multi_modal_projector is not None
        _ = self.image_token_id  # the clear error for a text-only model
        c = self.vision
        want = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"pixel_values must be (N_images, {want[0]}, {want[1]}, {want[2]}), got "
                f"{tuple(pixel_values.shape)}"
            )
        px = pixel_values.to(self.vision_tower.vision_model.embeddings.patch_embedding.weight)
        return self.multi_modal_projector(self.vision_tower(px))

    def per_layer_inputs(self, input_ids: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Gemma 4's per-layer inputs (B, T, L, p): (norm(proj(x) / sqrt(d)) + emb(ids)) / sqrt(2).

        x (B, T, d) is the scaled token embedding; the token part needs `input_ids`.
        """
        if input_ids is None:
            raise ValueError("Gemma 4 per-layer input embeddings need input_ids, not embeds")
        assert self.embed_tokens_per_layer is not None
        L, p = self.config.num_hidden_layers, self.config.hidden_size_per_layer_input
        proj = self.per_layer_model_projection(x) * self.config.hidden_size**-0.5  # (B, T, L*p)
        proj = self.per_layer_projection_norm(proj.reshape(*x.shape[:-1], L, p))
        tokens = self.embed_tokens_per_layer(input_ids).reshape(*input_ids.shape, L, p)
        return (proj + tokens) * 2.0**-0.5

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., V), with Gemma 2's final soft-cap c*tanh(z/c) when configured."""
        if self.head_override is not None:
            z = self.head_override(hidden)
        else:
            weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            z = F.linear(hidden, weight)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        return z

    # ------------------------------------------------------------------ facts
    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.embed_tokens.weight.device


def _inv_freqs(config: ModelConfig) -> dict[str, torch.Tensor]:
    """RoPE inverse frequencies per attention kind (recurrent layers have none)."""
    kinds = set(config.layer_types)
    if config.family == "gemma4":  # full layers: their own head_dim, proportional RoPE
        freqs = {
            SLIDING: rope_inv_freq(config.head_dim, config.rope_local_base_freq),
            FULL: rope_inv_freq_proportional(
                config.global_head_dim or config.head_dim,
                config.rope_theta,
                config.partial_rotary_factor,
                config.rope_scaling_factor,
            ),
        }
    elif config.family == "recurrent_gemma":  # RoPE on the first partial * head_dim dims
        rotary = int(config.head_dim * config.partial_rotary_factor)
        freqs = {SLIDING: rope_inv_freq(rotary, config.rope_theta)}
    else:
        return {
            SLIDING: rope_inv_freq(config.head_dim, config.rope_local_base_freq),
            FULL: rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_factor),
        }
    return {k: v for k, v in freqs.items() if k in kinds}


def build_model(
    config: ModelConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int | None = None,
    allow_float16: bool = False,
    vision: VisionConfig | None = None,
) -> Transformer:
    """A freshly initialised model (training from scratch, tests, benchmarks); with `vision`
    a Gemma 3 VLM (tower and projector)."""
    check_dtype(dtype, allow_float16)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model = Transformer(config, vision)
    model.init_weights(generator)
    return model.to(device=device, dtype=dtype)
