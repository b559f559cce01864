"""Building blocks of the Gemma decoders: RMSNorms, rotary embeddings, gated MLP, scaled embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Gemma RMSNorm: y = x / sqrt(mean(x^2) + eps) * (1 + w), computed in float32.

    Zhang & Sennrich 2019 (arXiv:1910.07467) with Gemma's zero-centred scale (1 + w), so a
    freshly initialised weight of zeros is the identity scale.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim) in x's dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


class ScaleRMSNorm(nn.Module):
    """Gemma 4's RMSNorm: y = x * (mean(x^2) + eps)^-1/2 [* w], float32; w starts at ones.

    Unlike Gemma 3's (1 + w) norm the scale multiplies directly; `with_scale=False` is the
    scale-free form (the MoE router's norm, attention's v_norm: no parameter). The power form
    matches transformers (and JAX).
    """

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim) in x's dtype."""
        xf = x.float()
        y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


def rope_inv_freq(head_dim: int, base: float, scaling_factor: float = 1.0) -> torch.Tensor:
    """Inverse frequencies theta_i = base^(-2i/d) / factor, i < d/2 (RoFormer eq. 15; linear PI).

    Linear position interpolation (Chen et al. 2023, arXiv:2306.15595) divides positions by
    `scaling_factor`, which is the same as dividing the frequencies.
    """
    # Explicit CPU device: stays real when the model is built under torch.device("meta").
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (base**exponent) / scaling_factor


def rope_inv_freq_proportional(
    head_dim: int, base: float, fraction: float, scaling_factor: float = 1.0
) -> torch.Tensor:
    """Gemma 4's "proportional" RoPE on full layers: the first fraction * d/2 frequencies of
    `rope_inv_freq` (exponent over the whole head_dim), the rest 0 (those pairs are not rotated).
    """
    angles = int(fraction * head_dim // 2)
    exponent = torch.arange(0, 2 * angles, 2, dtype=torch.int64, device="cpu").float() / head_dim
    rotated = 1.0 / (base**exponent)  # (angles,)
    zeros = torch.zeros(head_dim // 2 - angles, dtype=torch.float32, device="cpu")
    return torch.cat((rotated, zeros)) / scaling_factor  # (d/2,)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, T, d) for positions (B, T), in the half-split (rotate_half) layout."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, d) by position: x*cos + rotate_half(x)*sin (RoFormer, half-split form)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first r = cos.shape[-1] dims of x (B, H, T, d), the rest passed through
    (RecurrentGemma: r = d/2; the rotated part in the half-split layout of its own r dims)."""
    r = cos.shape[-1]
    return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)


class GatedMLP(nn.Module):
    """GeGLU feed-forward (Shazeer 2020, arXiv:2002.05202): down(gelu(gate(x)) * up(x))."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        activation: str = "gelu_pytorch_tanh",
        bias: bool = False,
    ):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.approximate = "tanh" if activation == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., hidden)."""
        gate = F.gelu(self.gate_proj(x), approximate=self.approximate)
        return self.down_proj(gate * self.up_proj(x))


class ScaledEmbedding(nn.Embedding):
    """Token embedding multiplied by a scale (default sqrt(hidden)) rounded to the weight dtype.

    `scale_dtype` rounds the scale to that dtype first, as transformers stores it: Gemma 4 keeps
    a float32 buffer, RecurrentGemma a bfloat16 one (sqrt(2560) = 50.596 is used as 50.5 even
    in float32). None (Gemma 3) rounds straight to the weight dtype.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        scale: float | None = None,
        scale_dtype: torch.dtype | None = None,
    ):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.scale = embedding_dim**0.5 if scale is None else scale
        self.scale_dtype = scale_dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, hidden)."""
        dtype = self.weight.dtype
        scale = torch.tensor(self.scale, dtype=self.scale_dtype or dtype).to(dtype)
        return super().forward(input_ids) * scale.to(self.weight.device)
