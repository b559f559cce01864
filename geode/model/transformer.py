"""The Gemma 3 decoder: one definition for training, RL, evaluation and serving."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import FULL, SLIDING, ModelConfig
from .attention import Attention, KVCache, clear_mask_memo
from .layers import GatedMLP, RMSNorm, ScaledEmbedding, rope_cos_sin, rope_inv_freq

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
    """Pre- and post-norm around attention and around the MLP (Gemma 2/3 'sandwich' norm)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_activation)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        segment_ids: torch.Tensor | None,
        causal_default: bool,
    ) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden)."""
        a = self.self_attn(
            self.input_layernorm(x), cos, sin, positions, cache, segment_ids, causal_default
        )
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Transformer(nn.Module):
    """Gemma 3 text decoder with a tied (or separate) LM head.

    Module names equal the Hugging Face `Gemma3ForCausalLM` names without the `model.`
    prefix, so checkpoint keys map one to one.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = ScaledEmbedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # Inference may install a faster or quantized LM head here (geode.infer); it holds no
        # parameters of its own, so checkpoints are unchanged. None: the plain projection.
        self.head_override: nn.Module | None = None
        self.gradient_checkpointing = False  # recompute each layer in backward (trainer sets it)
        self._inv_freq = {
            SLIDING: rope_inv_freq(config.head_dim, config.rope_local_base_freq),
            FULL: rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_factor),
        }  # plain tensors, not buffers: a meta-device build (checkpoint loading) keeps them real

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for linear/embedding weights, zeros for the (1+w) norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.zero_()
        self.embed_tokens.weight[self.config.pad_token_id].zero_()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) [or embeds (B, T, hidden)] -> logits (B, T, V) in the model dtype.

        positions (B, T): absolute position of each token (default 0..T-1; packed documents
        restart at 0); negative marks padding. cache: a `KVCache` (see attention.py).
        segment_ids (B, T): document ids; attention never crosses documents.
        rows (B, T) bool: return only those positions' logits, (N, V) in row-major order (a
        loss on a few positions, e.g. SFT's assistant tokens, skips the others' LM head).
        """
        h = self.hidden(input_ids, positions, cache, segment_ids, embeds)  # (B, T, hidden)
        return self.logits(h if rows is None else h[rows])

    def hidden(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden); `logits` turns any subset into scores."""
        if (input_ids is None) == (embeds is None):
            raise ValueError("pass exactly one of input_ids or embeds")
        x = self.embed_tokens(input_ids) if embeds is None else embeds  # (B, T, hidden)
        B, T, _ = x.shape
        causal_default = cache is None and plain_causal(positions, segment_ids, T)
        if positions is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
        tables = {  # per layer type: (cos, sin), each (B, T, head_dim)
            kind: rope_cos_sin(positions.clamp(min=0), inv, x.dtype)
            for kind, inv in self._inv_freq.items()
        }
        clear_mask_memo()
        try:
            for i, layer in enumerate(self.layers):
                cos, sin = tables[self.config.layer_types[i]]
                args = (x, cos, sin, positions, cache, segment_ids, causal_default)
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(layer, *args, use_reentrant=False)
                else:
                    x = layer(*args)
        finally:
            clear_mask_memo()
        return self.norm(x)

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


def build_model(
    config: ModelConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int | None = None,
    allow_float16: bool = False,
) -> Transformer:
    """A freshly initialised model (training from scratch, tests, benchmarks)."""
    check_dtype(dtype, allow_float16)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model = Transformer(config)
    model.init_weights(generator)
    return model.to(device=device, dtype=dtype)
