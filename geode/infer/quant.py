"""Weight-only quantization of a geode model's linear layers (and LM head) for generation.

Formats (activations stay float; weights are dequantized inside the kernels):
- int8, per output channel, symmetric: w = q * s_n, q in [-127, 127], s_n = max_k |w_nk| / 127
  (one float32 scale per row: 8 + 32/K bits per weight).
- int4, group-wise along the input dimension, asymmetric: for each group of G in {32, 64, 128}
  consecutive weights of a row, w = q * s + m with q in 0..15, s = (max - min) / 15, m = min,
  s and m stored as float16 (4 + 32/G bits per weight: 5 at G=32, 4.25 at G=128). In each
  block of 32 values, byte j holds value j (low nibble) and value j + 16 (high nibble).
  This is the GPTQ/AWQ "asymmetric with zero point" layout without calibration (round to
  nearest); Dettmers & Zettlemoyer 2023 ("The case for 4-bit precision") find group sizes
  of 64-128 the sweet spot for round-to-nearest.

`quantize(model, "int4", group_size=64)` swaps `QuantLinear` modules in, in place. On CPU the
decode kernels (kernels.c) read the packed weights directly; elsewhere (and for long prefill
chunks) the weight is dequantized on the fly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .optimize import _CachesNotCopied, linear_group

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)


# ---------------------------------------------------------------------- int8
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) int8, scale (N,) float32 with w ~ q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0  # (N,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N, K) int8, (N,) -> (N, K) float32."""
    return q.float() * scale[:, None]


# ---------------------------------------------------------------------- int4
def quantize_int4(w: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, ...]:
    """w (N, K) -> packed (N, K/2) uint8, scale (N, K/G) float16, mins (N, K/G) float16."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"input width {K} is not a multiple of group_size {group_size}")
    g = w.detach().float().view(N, K // group_size, group_size)  # (N, K/G, G)
    lo, hi = g.amin(-1), g.amax(-1)  # (N, K/G)
    scale = ((hi - lo) / 15.0).to(torch.float16)
    mins = lo.to(torch.float16)
    s, m = scale.float()[..., None], mins.float()[..., None]  # the stored (rounded) values
    q = torch.where(s > 0, torch.round((g - m) / torch.where(s > 0, s, 1.0)), 0.0)
    q = q.clamp(0, 15).to(torch.uint8).view(N, K // 32, 2, 16)  # blocks of 32: two halves
    packed = q[:, :, 0] | (q[:, :, 1] << 4)  # (N, K/32, 16): byte j = v[j] | v[j+16] << 4
    return packed.reshape(N, K // 2).contiguous(), scale.contiguous(), mins.contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> q (N, K) uint8 in 0..15 (inverse of the packing above)."""
    N, half = packed.shape
    p = packed.view(N, half // 16, 16)
    return torch.stack([p & 0x0F, p >> 4], dim=2).reshape(N, half * 2)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, group_size: int
) -> torch.Tensor:
    """(N, K/2), (N, K/G), (N, K/G) -> (N, K) float32: w = q * s + m per group."""
    q = unpack_int4(packed).float()
    N, K = q.shape
    g = q.view(N, K // group_size, group_size)
    return (g * scale.float()[..., None] + mins.float()[..., None]).view(N, K)


# ---------------------------------------------------------------------- module
class QuantLinear(_CachesNotCopied, nn.Module):
    """A bias-optional linear layer with int8 or int4 weights (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int = 64):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.group_size = mode, group_size if mode == "int4" else 0
        for name in ("qweight", "scale", "mins", "bias"):  # filled by from_weight
            self.register_buffer(name, None)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        mode: str,
        group_size: int = 64,
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Quantize a (out, in) weight (and keep an optional float bias)."""
        N, K = weight.shape
        q = cls(K, N, mode, group_size)
        if mode == "int8":
            qw, scale = quantize_int8(weight)
            q.register_buffer("qweight", qw)
            q.register_buffer("scale", scale)
        else:
            qw, scale, mins = quantize_int4(weight, group_size)
            q.register_buffer("qweight", qw)
            q.register_buffer("scale", scale)
            q.register_buffer("mins", mins)
        q.to(weight.device)
        if bias is not None:
            q.register_buffer("bias", bias.detach().clone())
        return q

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the quantized values stand for."""
        if self.mode == "int8":
            w = dequantize_int8(self.qweight, self.scale)
        else:
            w = dequantize_int4(self.qweight, self.scale, self.mins, self.group_size)
        return w.to(dtype)

    def kernel_spec(self) -> kernels.WeightSpec | None:
        """Kernel view of the packed weight (CPU only)."""
        if self.qweight.device.type != "cpu":
            return None
        key = (self.qweight.data_ptr(), self.scale.data_ptr())
        cached = self.__dict__.get("_kspec")
        if cached is None or cached[0] != key:
            if self.mode == "int8":
                spec = kernels.WeightSpec("i8", self.qweight, self.scale)
            else:
                spec = kernels.WeightSpec(
                    "i4",
                    self.qweight,
                    self.scale.view(torch.int16),
                    self.mins.view(torch.int16),
                    group=self.group_size,
                    k=self.in_features,
                )
            cached = (key, spec)
            self.__dict__["_kspec"] = cached
        return cached[1]

    def fallback(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T with W dequantized for this call (long prefill chunks, non-CPU devices)."""
        rows = x.numel() // x.shape[-1]
        spec = self.kernel_spec() if x.device.type == "cpu" else None
        if spec is not None and not torch.is_grad_enabled() and rows <= 256 and kernels.available():
            # Medium batches: the kernel in slices of MAX_ROWS still beats dequantizing.
            x2 = x.reshape(rows, self.in_features).float().contiguous()
            plan = self.__dict__.get("_fplan")
            if plan is None or plan.specs[0] is not spec:
                plan = kernels.GemvPlan([spec])
                self.__dict__["_fplan"] = plan
            y = torch.cat([kernels.gemv(c, plan) for c in x2.split(kernels.MAX_ROWS)])
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return linear_group(x, [self], self)[0]

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in={self.in_features}, out={self.out_features}, {self.mode}{g}"


def quantize(
    model: nn.Module, mode: str = "int4", group_size: int = 64, head: bool = True
) -> nn.Module:
    """Replace the linear layers of the decoder blocks (and the LM head when `head`) with
    QuantLinear, in place; returns the model. The embedding lookup stays in float."""
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    for block in model.layers:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                q = QuantLinear.from_weight(module.weight, mode, group_size, module.bias)
                setattr(parent, name.rsplit(".", 1)[-1], q)
    if head:
        weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        model.head_override = QuantLinear.from_weight(weight, mode, group_size)
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads for weights: quantized buffers + float parameters in use
    (the embedding table counts once when the head is quantized: only one row is read)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
    for name, p in model.named_parameters():
        if name == "embed_tokens.weight" and isinstance(model.head_override, QuantLinear):
            continue
        total += p.numel() * p.element_size()
    return total
