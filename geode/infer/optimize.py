"""Decode fast paths swapped into a geode model in place, without changing its parameters.

`optimize_for_decode(model)` changes the class of some modules to subclasses whose forward, when
autograd is off and the input is a small CPU batch, calls the kernels of kernels.c (one call
for q/k/v, one for gate/up) and the fused `F.rms_norm`; otherwise they run the original
forward. Parameters, buffers, module names and state_dict keys are untouched, so the same model
still trains, saves and loads; the math is the same (tests compare against the plain model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import Attention
from ..model.layers import GatedMLP, RMSNorm
from . import kernels

_FLOATS = (torch.float32, torch.bfloat16)
_AVAILABLE: list[bool] = []  # memo of kernels.available()


def _use_kernels(x: torch.Tensor) -> bool:
    """Kernels apply to inference-time CPU inputs of at most kernels.MAX_ROWS rows."""
    if torch.is_grad_enabled() or x.is_cuda or x.dtype not in _FLOATS:
        return False
    if x.numel() > kernels.MAX_ROWS * x.shape[-1] or x.device.type != "cpu":
        return False
    if not _AVAILABLE:
        _AVAILABLE.append(kernels.available())
    return _AVAILABLE[0]


def linear_group(x: torch.Tensor, mods: list[nn.Module], owner: nn.Module) -> list[torch.Tensor]:
    """[m(x) for m in mods] with one kernel call when every module offers a compatible spec.

    x (..., K) -> [(..., N_i)] (views of one output). Each module implements `kernel_spec()`
    (None: no kernel) and `fallback(x)`. `owner` keeps the cached call plan.
    """
    if _use_kernels(x):
        specs = tuple(m.kernel_spec() for m in mods)
        if all(s is not None for s in specs):
            cached = owner.__dict__.get("_kplan")
            if cached is None or cached[0] != specs:
                try:
                    cached = (specs, kernels.GemvPlan(list(specs)))
                except ValueError:
                    cached = (specs, None)
                owner.__dict__["_kplan"] = cached
            plan = cached[1]
            if plan is not None:
                lead = x.shape[:-1]
                x2 = x.reshape(-1, x.shape[-1])
                if x2.dtype != torch.float32 or not x2.is_contiguous():
                    x2 = x2.float().contiguous()
                y = kernels.gemv(x2, plan)  # (M, sum N_i) float32
                if x.dtype != torch.float32:
                    y = y.to(x.dtype)
                outs = y.split(plan.splits, dim=-1) if len(mods) > 1 else (y,)
                res = []
                for m, o in zip(mods, outs, strict=True):
                    bias = getattr(m, "bias", None)
                    if bias is not None:
                        o = o + bias
                    res.append(o.view(*lead, o.shape[-1]))
                return res
    return [m.fallback(x) for m in mods]


_CACHE_KEYS = ("_kspec", "_kplan", "_fplan", "_scale")


class _CachesNotCopied:
    """Mixin: kernel caches (ctypes pointers) are dropped on copy/pickle and rebuilt on use."""

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in _CACHE_KEYS:
            state.pop(key, None)
        return state


class _SpecCache:
    """Rebuild a kernel spec only when the weight tensor changes (new storage or in-place edit)."""

    def spec_for(self, owner: nn.Module, weight: torch.Tensor) -> kernels.WeightSpec | None:
        cached = owner.__dict__.get("_kspec")
        if (
            cached is not None
            and cached[0] is weight
            and cached[1] == weight._version
            and cached[2] == weight.data_ptr()
        ):
            return cached[3]
        spec = kernels.float_spec(weight)
        owner.__dict__["_kspec"] = (weight, weight._version, weight.data_ptr(), spec)
        return spec


_SPECS = _SpecCache()


def _norm_scale(norm: RMSNorm) -> torch.Tensor:
    """Gemma's (1 + w) in float32, cached until the weight changes."""
    w = norm.weight
    key = (w.data_ptr(), w._version)
    cached = norm.__dict__.get("_scale")
    if cached is None or cached[0] != key:
        cached = (key, (1.0 + w.detach().float()).contiguous())
        norm.__dict__["_scale"] = cached
    return cached[1]


class KernelLinear(_CachesNotCopied, nn.Linear):
    """nn.Linear whose small-batch CPU inference forward uses the decode kernels."""

    def kernel_spec(self) -> kernels.WeightSpec | None:
        """Kernel view of the weight (None: dtype/layout/device not supported)."""
        return _SPECS.spec_for(self, self.weight)

    def fallback(self, x: torch.Tensor) -> torch.Tensor:
        """The plain nn.Linear forward."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return linear_group(x, [self], self)[0]


class KernelHead(_CachesNotCopied, nn.Module):
    """LM head (tied embedding or lm_head matrix) through the kernels; registers no parameters."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: state_dict stays unchanged

    def kernel_spec(self) -> kernels.WeightSpec | None:
        """Kernel view of the (V, hidden) head matrix."""
        return _SPECS.spec_for(self, self.owner.weight)

    def fallback(self, x: torch.Tensor) -> torch.Tensor:
        """x E^T with the head matrix E (V, hidden)."""
        return F.linear(x, self.owner.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., V)."""
        return linear_group(x, [self], self)[0]


class FastRMSNorm(_CachesNotCopied, RMSNorm):
    """RMSNorm through the C kernel at inference (same float32 math)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim) in x's dtype."""
        if not _use_kernels(x):
            return super().forward(x)
        if x.dtype == torch.float32:
            return kernels.rmsnorm(x, _norm_scale(self), self.eps)
        return kernels.rmsnorm(x.float(), _norm_scale(self), self.eps).to(x.dtype)


class FastAttention(_CachesNotCopied, Attention):
    """Attention with q/k/v projected by one kernel call and QK-norm + RoPE in one C call each."""

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, hidden) -> q, k, v projections."""
        q, k, v = linear_group(x, [self.q_proj, self.k_proj, self.v_proj], self)
        return q, k, v

    def norm_rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, T, H*D), k (B, T, Hkv*D) -> normed, rotated (B, H, T, D), (B, Hkv, T, D)."""
        if not _use_kernels(q) or self.head_dim > 1024:
            return super().norm_rope(q, k, cos, sin)
        B, T, _ = q.shape
        D, dtype, H, Hk = self.head_dim, q.dtype, self.num_heads, self.num_kv_heads
        q2, k2 = q.reshape(B * T, H * D), k.reshape(B * T, Hk * D)
        if dtype != torch.float32:
            q2, k2, cos, sin = q2.float(), k2.float(), cos.float(), sin.float()
        qo, ko = kernels.qk_norm_rope(
            q2, k2, H, Hk, _norm_scale(self.q_norm), _norm_scale(self.k_norm), self.q_norm.eps,
            cos, sin,
        )  # fmt: skip
        qo = qo.view(B, T, H, D).transpose(1, 2)
        ko = ko.view(B, T, Hk, D).transpose(1, 2)
        if dtype != torch.float32:
            qo, ko = qo.to(dtype), ko.to(dtype)
        return qo, ko


class FastGatedMLP(_CachesNotCopied, GatedMLP):
    """GeGLU MLP with gate/up projected by one kernel call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., hidden): down(gelu(gate(x)) * up(x))."""
        if torch.is_grad_enabled():
            return super().forward(x)
        gate, up = linear_group(x, [self.gate_proj, self.up_proj], self)
        h = F.gelu(gate, approximate=self.approximate) * up
        return linear_group(h, [self.down_proj], self.down_proj)[0]


_SWAPS: dict[type, type] = {
    nn.Linear: KernelLinear,
    RMSNorm: FastRMSNorm,
    Attention: FastAttention,
    GatedMLP: FastGatedMLP,
}


def optimize_for_decode(model: nn.Module) -> nn.Module:
    """Swap in the fast inference classes (in place; idempotent); returns the model.

    Quantized layers (geode.infer.quant) are already kernel-aware and left as they are.
    """
    for module in model.modules():
        new = _SWAPS.get(type(module))
        if new is not None:
            module.__class__ = new
    if getattr(model, "head_override", 1) is None:
        head = model.embed_tokens if model.lm_head is None else model.lm_head
        model.head_override = KernelHead(head)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo `optimize_for_decode` (back to the plain classes); returns the model."""
    back = {v: k for k, v in _SWAPS.items()}
    for module in model.modules():
        old = back.get(type(module))
        if old is not None:
            module.__class__ = old
            for key in _CACHE_KEYS:
                module.__dict__.pop(key, None)
    if isinstance(getattr(model, "head_override", None), KernelHead):
        model.head_override = None
    return model
