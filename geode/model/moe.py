"""Gemma 4's sparse mixture-of-experts feed-forward block, numerically transformers' Gemma4.

One decoder layer's feed-forward half with `enable_moe_block` (transformers 5.25,
`Gemma4TextDecoderLayer.forward`): a dense GeGLU MLP and a top-k routed set of experts run
side by side on the same residual stream, each with its own norms, and their sum is normed
once more before it joins the residual:

    dense  = post_ff_norm_1(mlp(pre_ff_norm(x)))
    p      = softmax(proj(rms(x) * scale * d^-1/2))               router (no learned norm scale)
    w, e   = top-k(p); w <- w / sum(w) * per_expert_scale[e]      renormalise, per-expert scale
    sparse = post_ff_norm_2(sum_k w_k * expert_{e_k}(pre_ff_norm_2(x)))
    out    = post_ff_norm(dense + sparse)                         the layer adds x + out

Routing is top-k softmax gating (Shazeer et al. 2017, arXiv:1701.06538, eq. 3-5, here with
the softmax before the top-k and the kept weights renormalised, as in Mixtral). Every expert
is a GeGLU (Shazeer 2020, arXiv:2002.05202) with gate and up fused in one tensor, as the
Hugging Face checkpoints store it. There is no capacity limit: no token is ever dropped.

Parameter names equal the Hugging Face names below a decoder layer (`HF_KEYS`), so a
checkpoint maps one to one: geode `<layer>.<name>` <-> HF `model.layers.<i>.<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .layers import GatedMLP, ScaleRMSNorm

ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF name -> F.gelu approximate


@dataclass(frozen=True)
class MoEConfig:
    """Shape of one MoE feed-forward block; field names follow transformers' Gemma4TextConfig."""

    hidden_size: int  # residual stream width d
    intermediate_size: int  # width of the dense GeGLU MLP beside the experts
    moe_intermediate_size: int  # width of each expert's GeGLU
    num_experts: int  # experts E
    top_k_experts: int  # experts each token is routed to, k <= E
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_experts",
            "top_k_experts",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"MoEConfig.{name} must be a positive integer, got {value!r}")
        if self.top_k_experts > self.num_experts:
            raise ConfigError(
                f"MoEConfig.top_k_experts ({self.top_k_experts}) is larger than num_experts "
                f"({self.num_experts}): a token cannot be routed to more experts than exist"
            )
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(
                f"MoEConfig.hidden_activation {self.hidden_activation!r} is not supported; "
                f"use one of {sorted(ACTIVATIONS)}"
            )
        if not (isinstance(self.rms_norm_eps, int | float) and self.rms_norm_eps > 0):
            raise ConfigError(f"MoEConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> MoEConfig:
        """The MoE part of a Gemma4TextConfig dict (`enable_moe_block` must be true)."""
        if not config.get("enable_moe_block"):
            raise ConfigError(f"{source}: enable_moe_block is not true; there is no MoE block")
        for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if config.get(name) is None:
                raise ConfigError(f"{source}: enable_moe_block is true but {name} is not set")
        try:
            return cls(
                hidden_size=config.get("hidden_size", 2304),
                intermediate_size=config.get("intermediate_size", 9216),
                moe_intermediate_size=config["moe_intermediate_size"],
                num_experts=config["num_experts"],
                top_k_experts=config["top_k_experts"],
                hidden_activation=config.get("hidden_activation") or "gelu_pytorch_tanh",
                rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def params(self) -> tuple[int, int]:
        """(total, active per token) parameters of one block: k of E experts run per token."""
        d, f, m, e = (
            self.hidden_size,
            self.intermediate_size,
            self.moe_intermediate_size,
            self.num_experts,
        )
        shared = 3 * d * f + d * e + d + e + 5 * d  # dense MLP, router proj/scales, five norms
        expert = 3 * d * m
        return shared + e * expert, shared + self.top_k_experts * expert


# Parameter names of MoEBlock == Hugging Face names below `model.layers.<i>.` (Gemma4, 5.25).
HF_KEYS: dict[str, str] = {
    name: name
    for name in (
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "router.proj.weight",
        "router.scale",
        "router.per_expert_scale",
        "experts.gate_up_proj",
        "experts.down_proj",
        "pre_feedforward_layernorm.weight",
        "post_feedforward_layernorm.weight",
        "pre_feedforward_layernorm_2.weight",
        "post_feedforward_layernorm_1.weight",
        "post_feedforward_layernorm_2.weight",
    )
}


class Routing(NamedTuple):
    """A router's decision for N tokens."""

    logits: torch.Tensor  # (N, E) scores before the softmax (the balancing loss's input)
    weights: torch.Tensor  # (N, k) float32: renormalised top-k probabilities * per-expert scale
    experts: torch.Tensor  # (N, k) int64: chosen expert of each slot


class Router(nn.Module):
    """Scale-free RMSNorm, learned scale * d^-1/2, projection, softmax, top-k, renormalise."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.top_k = config.top_k_experts
        self.root_size = config.hidden_size**-0.5
        self.norm = ScaleRMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        """x (N, d) -> Routing of N tokens over E experts."""
        logits = self.proj(self.norm(x) * self.scale * self.root_size)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, k) each
        weights = weights / weights.sum(-1, keepdim=True)
        return Routing(logits, weights * self.per_expert_scale[experts], experts)


class Experts(nn.Module):
    """E GeGLU experts stored as 3-D tensors (the HF layout: gate and up fused, gate first)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        e, d, m = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * m, d))  # (E, 2m, d)
        self.down_proj = nn.Parameter(torch.empty(e, d, m))  # (E, d, m)
        self.approximate = ACTIVATIONS[config.hidden_activation]
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x (N, d), experts/weights (N, k) -> sum_k w_k * expert_{e_k}(x), (N, d) in x's dtype.

        Token-expert pairs are sorted by expert and each expert runs once on its rows (a
        grouped matmul; experts with no rows are skipped).
        """
        n, k = experts.shape
        flat = experts.reshape(-1)  # (N*k,)
        order = torch.argsort(flat, stable=True)  # pair indices grouped by expert
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        out = torch.zeros_like(x)  # (N, d)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start : start + count]  # (c,)
            start += count
            rows = pairs // k  # (c,) token of each pair
            gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)  # (c, m) each
            h = F.linear(F.gelu(gate, approximate=self.approximate) * up, self.down_proj[e])
            h = h * weights.reshape(-1)[pairs, None]  # (c, d), float32 weights promote
            # index_put_ (accumulate) = index_add_, without the latter's thread-pool start
            # that costs milliseconds per call on a busy CPU (decode calls it per expert)
            out.index_put_((rows,), h.to(out.dtype), accumulate=True)
        return out


class MoEOutput(NamedTuple):
    """The block's contribution to the residual stream and what training needs from routing."""

    hidden: torch.Tensor  # (B, T, d): added to the residual by the decoder layer
    router_logits: torch.Tensor  # (B*T, E): input of the load-balancing loss
    expert_load: torch.Tensor  # (E,) float32: fraction of the B*T*k assignments each expert got


class MoEBlock(nn.Module):
    """Dense GeGLU MLP and routed experts side by side, with Gemma 4's norms around both."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.config = config
        self.mlp = GatedMLP(d, config.intermediate_size, config.hidden_activation)
        self.router = Router(config)
        self.experts = Experts(config)
        self.pre_feedforward_layernorm = ScaleRMSNorm(d, eps)
        self.post_feedforward_layernorm = ScaleRMSNorm(d, eps)
        self.pre_feedforward_layernorm_2 = ScaleRMSNorm(d, eps)
        self.post_feedforward_layernorm_1 = ScaleRMSNorm(d, eps)
        self.post_feedforward_layernorm_2 = ScaleRMSNorm(d, eps)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """x (B, T, d), the residual stream after attention -> MoEOutput (hidden (B, T, d))."""
        flat = x.reshape(-1, x.shape[-1])  # (N, d), N = B*T
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        routing = self.router(flat)  # the router reads the residual itself, not a normed copy
        sparse = self.experts(
            self.pre_feedforward_layernorm_2(flat), routing.experts, routing.weights
        )
        sparse = self.post_feedforward_layernorm_2(sparse.reshape(x.shape))  # (B, T, d)
        hidden = self.post_feedforward_layernorm(dense + sparse)
        return MoEOutput(
            hidden, routing.logits, expert_load(routing.experts, self.config.num_experts)
        )


def expert_load(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of token-expert assignments per expert: experts (N, k) -> (E,) float32, sums to 1."""
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).float()  # (E,)
    return counts / max(experts.numel(), 1)


def init_moe_(block: MoEBlock, std: float, generator: torch.Generator | None = None) -> None:
    """transformers' Gemma4 init: N(0, std) for projections and experts; ones for every scale."""
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, ScaleRMSNorm) and module.weight is not None:
                module.weight.fill_(1.0)
        block.experts.gate_up_proj.normal_(0.0, std, generator=generator)
        block.experts.down_proj.normal_(0.0, std, generator=generator)
        block.router.scale.fill_(1.0)
        block.router.per_expert_scale.fill_(1.0)


__all__ = [
    "HF_KEYS",
    "MoEBlock",
    "MoEConfig",
    "MoEOutput",
    "Router",
    "Routing",
    "Experts",
    "ScaleRMSNorm",
    "expert_load",
    "init_moe_",
]
