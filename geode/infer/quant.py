"""Weight-only quantization of a geode model's linear layers (and LM head) for generation.

Formats (activations stay float; weights are dequantized inside the kernels):
- int8, per output channel, symmetric: w = q * s_n, q in [-127, 127], s_n = max_k |w_nk| / 127
  (one float32 scale per row: 8 + 32/K bits per weight).
- int4, group-wise along the input dimension, asymmetric: for each group of G in {32, 64, 128}
  consecutive weights of a row, w = (q - z) * s = q * s + m with q in 0..15, s = (max - min)
  / 15 over the group's range widened to hold 0, an integer zero point z = round(-min / s) in
  0..15 and m = -z * s; s and m stored as float16 (4 + 32/G bits per weight: 5 at G=32, 4.25
  at G=128). In each block of 32 values, byte j holds value j (low nibble) and value j + 16
  (high nibble). This is the GPTQ/AWQ "asymmetric with zero point" grid without calibration
  (round to nearest); Dettmers & Zettlemoyer 2023 ("The case for 4-bit precision") find group
  sizes of 64-128 the sweet spot for round-to-nearest.

`quantize(model, "int4", group_size=64)` swaps `QuantLinear` modules in, in place. On CPU the
decode kernels (kernels.c) read the packed weights directly; elsewhere (and for long prefill
chunks) the weight is dequantized on the fly. `geode.save_model` writes a quantized model in
compressed-tensors' layout and `geode.load_model` reads it back quantized (bottom of this file).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..config import ModelConfig
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
    """w (N, K) -> packed (N, K/2) uint8, scale (N, K/G) float16, mins (N, K/G) float16.

    Each group's range [min(lo, 0), max(hi, 0)] is cut into 15 steps s and anchored at an
    integer zero point z in 0..15 (GPTQ's asymmetric grid): w ~ (q - z) * s = q * s + m with
    m = -z * s, so the values are those of compressed-tensors' pack-quantized format."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"input width {K} is not a multiple of group_size {group_size}")
    g = w.detach().float().view(N, K // group_size, group_size)  # (N, K/G, G)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # (N, K/G), the range holds 0
    scale = ((hi - lo) / 15.0).to(torch.float16)
    s = scale.float()  # the stored (rounded) step
    safe = torch.where(s > 0, s, 1.0)
    zero = torch.round(-lo / safe).clamp(0, 15)  # (N, K/G); 0 for an all-zero group
    q = torch.round(g / safe[..., None] + zero[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.view(N, K)), scale.contiguous(), int4_mins(zero, scale)


def int4_mins(zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """m = -z * s (float16) from integer zero points z and float16 steps s, each (N, K/G)."""
    return (-zero.float() * scale.float()).to(torch.float16).contiguous()


def int4_zeros(scale: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The integer zero points z (N, K/G) int64 behind `int4_mins` (0 where s = 0)."""
    s = scale.float()
    return torch.where(s > 0, torch.round(-mins.float() / torch.where(s > 0, s, 1.0)), 0.0).long()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) uint8 in 0..15 -> (N, K/2) uint8: in each block of 32 values, byte j holds
    value j (low nibble) and value j + 16 (high nibble)."""
    N, K = q.shape
    b = q.to(torch.uint8).view(N, K // 32, 2, 16)  # blocks of 32: two halves
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> q (N, K) uint8 in 0..15 (inverse of `pack_int4`)."""
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

    @classmethod
    def empty_like(
        cls,
        weight: torch.Tensor,
        mode: str,
        group_size: int = 64,
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Uninitialised buffers of the shapes `from_weight` gives (on weight's device)."""
        N, K = weight.shape
        q = cls(K, N, mode, group_size)
        empty = {"device": weight.device}
        if mode == "int8":
            q.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8, **empty))
            q.register_buffer("scale", torch.empty(N, dtype=torch.float32, **empty))
        else:
            if group_size not in GROUP_SIZES or K % group_size:
                raise ValueError(f"input width {K} is not a multiple of group_size {group_size}")
            q.register_buffer("qweight", torch.empty(N, K // 2, dtype=torch.uint8, **empty))
            for name in ("scale", "mins"):
                q.register_buffer(
                    name, torch.empty(N, K // group_size, dtype=torch.float16, **empty)
                )
        if bias is not None:
            q.register_buffer("bias", torch.empty_like(bias))
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
    model: nn.Module,
    mode: str = "int4",
    group_size: int = 64,
    head: bool = True,
    *,
    layout_only: bool = False,
) -> nn.Module:
    """Replace the linear layers of the decoder blocks (and the LM head when `head`) with
    QuantLinear, in place; returns the model. The embedding lookup stays in float.
    `layout_only`: empty buffers of the right shapes instead (a model to load weights into)."""
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    done = getattr(model, "quantization", None)
    if done is not None:
        raise ValueError(
            f"the model is already quantized ({done['mode']}, e.g. a checkpoint written by "
            "`geode quantize`); load it as it is, without quantizing again"
        )
    make = QuantLinear.empty_like if layout_only else QuantLinear.from_weight
    for block in model.layers:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                q = make(module.weight, mode, group_size, module.bias)
                setattr(parent, name.rsplit(".", 1)[-1], q)
    if head:
        weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        model.head_override = make(weight, mode, group_size)
    model.quantization = {
        "mode": mode,
        "group_size": group_size if mode == "int4" else None,
        "head": head,
    }
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


# ---------------------------------------------------------------------- checkpoints
# A quantized model is saved in compressed-tensors' layout (the format vLLM, llm-compressor and
# transformers with `compressed-tensors` installed read): int8 -> "int-quantized" (per output
# channel, symmetric: `weight` int8 + `weight_scale` (N, 1)); int4 -> "pack-quantized" (groups,
# asymmetric: `weight_packed` int32 (N, K/8), `weight_scale` (N, K/G), `weight_zero_point`
# int32 (N/8, K/G), `weight_shape`). The LM head, quantized separately from the tied float
# embedding, is geode's own extension: `geode.lm_head.{qweight,scale,mins}` as in QuantLinear
# (other tools ignore it and use the float head). Format details: docs/inference.md.
CT_METHOD = "compressed-tensors"
CT_FORMATS = {"int8": "int-quantized", "int4": "pack-quantized"}
HEAD_PREFIX = "geode.lm_head."
_SHIFTS = torch.arange(0, 32, 4)  # value i of a word sits at bits 4i .. 4i+3


def _pack_int32(q: torch.Tensor) -> torch.Tensor:
    """(R, C) values in 0..15 -> (R, ceil(C/8)) int32, 8 per word, value i at bits 4i (as
    compressed-tensors' pack_to_int32 stores offset int4 values)."""
    R, C = q.shape
    q = F.pad(q.to(torch.int64), (0, -C % 8)).view(R, -1, 8)
    words = (q << _SHIFTS).sum(-1)  # (R, ceil(C/8)) in 0 .. 2^32-1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _unpack_int32(p: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `_pack_int32`: (R, W) int32 -> (R, cols) uint8 in 0..15."""
    x = (p.to(torch.int64) & 0xFFFFFFFF)[..., None] >> _SHIFTS  # (R, W, 8)
    return (x & 0xF).to(torch.uint8).reshape(p.shape[0], -1)[:, :cols]


def quantization_config(model: nn.Module) -> dict:
    """config.json's `quantization_config` (compressed-tensors) for a `quantize`d model."""
    q = model.quantization
    int4 = q["mode"] == "int4"
    weights = {
        "num_bits": 4 if int4 else 8,
        "type": "int",
        "symmetric": not int4,
        "strategy": "group" if int4 else "channel",
        "group_size": q["group_size"] if int4 else None,
        "dynamic": False,
        "observer": "minmax",
    }
    return {
        "quant_method": CT_METHOD,
        "format": CT_FORMATS[q["mode"]],
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": CT_FORMATS[q["mode"]],
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }


def _ct_tensors(m: QuantLinear) -> dict[str, torch.Tensor]:
    """A QuantLinear's buffers as compressed-tensors stores them (suffix -> tensor)."""
    if m.mode == "int8":
        return {"weight": m.qweight, "weight_scale": m.scale[:, None]}
    zeros = int4_zeros(m.scale, m.mins)
    if not torch.equal(int4_mins(zeros, m.scale), m.mins):
        raise ValueError("int4 weights without integer zero points cannot be saved")
    return {
        "weight_packed": _pack_int32(unpack_int4(m.qweight)),
        "weight_scale": m.scale,
        "weight_zero_point": _pack_int32(zeros.t()).t().contiguous(),
        "weight_shape": torch.tensor([m.out_features, m.in_features]),
    }


def _from_ct(
    m: QuantLinear, t: dict[str, torch.Tensor], symmetric: bool
) -> dict[str, torch.Tensor]:
    """QuantLinear buffers (qweight, scale[, mins]) from a module's compressed-tensors tensors."""
    if m.mode == "int8":
        return {"qweight": t["weight"], "scale": t["weight_scale"].float().reshape(-1)}
    N, K = m.out_features, m.in_features
    scale = t["weight_scale"].to(torch.float16)
    if symmetric:  # w = q' * s with q' in -8..7: z = 8 in the unsigned form
        zeros = torch.full(scale.shape, 8, dtype=torch.int64)
    else:
        zeros = _unpack_int32(t["weight_zero_point"].t(), N).t().long()
    q = _unpack_int32(t["weight_packed"], K)
    return {"qweight": pack_int4(q), "scale": scale, "mins": int4_mins(zeros, scale)}


def _ct_expected(m: QuantLinear, symmetric: bool) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """suffix -> (shape, allowed dtypes) of the stored tensors of one quantized linear."""
    N, K = m.out_features, m.in_features
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if m.mode == "int8":
        return {"weight": ((N, K), (torch.int8,)), "weight_scale": ((N, 1), floats)}
    out = {
        "weight_packed": ((N, K // 8), (torch.int32,)),
        "weight_scale": ((N, K // m.group_size), floats),
        "weight_shape": ((2,), (torch.int64, torch.int32)),
    }
    if not symmetric:
        out["weight_zero_point"] = ((-(-N // 8), K // m.group_size), (torch.int32,))
    return out


def _keys(model: nn.Module) -> tuple[dict[str, str], dict[str, QuantLinear]]:
    """(state_dict name -> stored key for the tensors stored as they are: float parameters and
    the geode head; module name -> QuantLinear for the decoder's compressed-tensors linears)."""
    linears = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and n != "head_override"
    }
    plain = {}
    for name in model.state_dict():
        owner, _, leaf = name.rpartition(".")
        if owner == "head_override":
            plain[name] = HEAD_PREFIX + leaf
        elif owner not in linears:
            plain[name] = name if name == "lm_head.weight" else f"model.{name}"
    return plain, linears


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a `quantize`d model (HF keys, compressed-tensors layout)."""
    plain, linears = _keys(model)
    sd = model.state_dict()
    state = {key: sd[name] for name, key in plain.items()}
    for name, m in linears.items():
        state.update({f"model.{name}.{k}": t for k, t in _ct_tensors(m).items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _read_quantization_config(raw: object, where: str) -> tuple[str, int, bool]:
    """(mode, group_size, symmetric) of a compressed-tensors weight-only int8/int4 config, or a
    CheckpointError naming the field geode cannot load."""
    from ..checkpoint import CheckpointError

    def bad(field: str, value: object, want: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: quantization_config.{field}={value!r}: geode loads compressed-tensors "
            f"weight-only int8 (channel) / int4 (group) checkpoints (`geode quantize`); {want}"
        )

    if not isinstance(raw, dict):
        raise bad("", raw, "expected an object")
    if raw.get("quant_method") != CT_METHOD:
        raise bad("quant_method", raw.get("quant_method"), f"expected {CT_METHOD!r}")
    fmt = raw.get("format")
    if fmt not in CT_FORMATS.values():
        raise bad("format", fmt, f"expected one of {sorted(CT_FORMATS.values())}")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise bad("config_groups", groups, "expected one group")
    name, group = next(iter(groups.items()))
    if not isinstance(group, dict) or group.get("targets") != ["Linear"]:
        raise bad(f"config_groups.{name}.targets", (group or {}).get("targets"), "want ['Linear']")
    if group.get("input_activations") or group.get("output_activations"):
        raise bad(f"config_groups.{name}.input_activations", group.get("input_activations"),
                  "activations are not quantized")  # fmt: skip
    w = group.get("weights")
    if not isinstance(w, dict) or w.get("type", "int") != "int":
        raise bad(f"config_groups.{name}.weights", w, "expected int weights")
    bits, strategy, sym = w.get("num_bits"), w.get("strategy"), bool(w.get("symmetric", True))
    if (bits, strategy, fmt) == (8, "channel", "int-quantized") and sym:
        mode, group_size = "int8", 64
    elif (bits, strategy, fmt) == (4, "group", "pack-quantized"):
        mode, group_size = "int4", w.get("group_size")
        if group_size not in GROUP_SIZES:
            raise bad(
                f"config_groups.{name}.weights.group_size", group_size, f"one of {GROUP_SIZES}"
            )
    else:
        raise bad(f"config_groups.{name}.weights", w, "8-bit channel symmetric or 4-bit group")
    ignore = raw.get("ignore") or []
    if "lm_head" not in ignore:
        raise bad("ignore", ignore, "expected 'lm_head' (geode quantizes only the decoder)")
    return mode, group_size, sym


def load_quantized(
    root: Path,
    config: ModelConfig,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    check_finite: bool = True,
) -> nn.Module:
    """A compressed-tensors int8/int4 checkpoint (as `geode quantize` writes) as a quantized
    geode model: the stored integers are used as they are, nothing is quantized again.

    dtype applies to the float tensors (embedding, norms); every tensor is checked (present,
    expected, shape, dtype, finite) before the model is returned.
    """
    from ..checkpoint import (
        CONFIG_FILE,
        CheckpointError,
        _index_tensors,
        _weight_files,
        parse_dtype,
    )
    from ..model.transformer import Transformer, check_dtype

    raw = config.extra["quantization_config"]
    mode, group, sym = _read_quantization_config(raw, str(root / CONFIG_FILE))
    plain = dataclasses.replace(
        config, extra={k: v for k, v in config.extra.items() if k != "quantization_config"}
    )
    stored = _index_tensors(_weight_files(root))
    head = f"{HEAD_PREFIX}qweight" in stored
    with torch.device("meta"):
        model = quantize(Transformer(plain), mode, group, head, layout_only=True)
    plain_keys, linears = _keys(model)
    sd = model.state_dict()
    floats = (torch.float32, torch.float16, torch.bfloat16)
    expected = {  # stored key -> (shape, allowed dtypes)
        key: (tuple(sd[name].shape), (sd[name].dtype,) if key.startswith(HEAD_PREFIX) else floats)
        for name, key in plain_keys.items()
    }
    for name, m in linears.items():
        for suffix, spec in _ct_expected(m, sym).items():
            expected[f"model.{name}.{suffix}"] = spec
    missing = [k for k in expected if k not in stored]
    if missing:
        k, more = missing[0], f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{root}: missing tensor {k!r} of the {mode} checkpoint (expected shape "
            f"{list(expected[k][0])}){more}"
        )
    for key, entry in stored.items():
        if key not in expected:
            raise CheckpointError(
                f"{entry.file}: unexpected tensor {key!r}: not part of the {mode} checkpoint "
                "of the model that config.json describes"
            )
        shape, dtypes = expected[key]
        if entry.shape != shape or entry.dtype not in dtypes:
            raise CheckpointError(
                f"{entry.file}: tensor {key!r} is {entry.dtype} {list(entry.shape)}; expected "
                f"{'/'.join(str(d) for d in dtypes)} {list(shape)} for {mode}"
                + (f" with group_size {group}" if mode == "int4" else "")
            )
    target = parse_dtype(dtype) or stored["model.embed_tokens.weight"].dtype
    check_dtype(target)
    raw_t: dict[str, torch.Tensor] = {}
    for file in sorted({e.file for e in stored.values()}):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if check_finite and t.is_floating_point() and not bool(t.isfinite().all()):
                        raise CheckpointError(f"{file}: tensor {key!r} contains NaN or inf values")
                    raw_t[key] = t
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own errors, I/O errors
            raise CheckpointError(f"{file}: cannot read tensors ({e})") from None
    state = {}
    for name, key in plain_keys.items():  # float tensors in `target`; the head as stored
        state[name] = raw_t[key] if key.startswith(HEAD_PREFIX) else raw_t[key].to(target)
    for name, m in linears.items():
        prefix = f"model.{name}."
        ts = {k[len(prefix) :]: v for k, v in raw_t.items() if k.startswith(prefix)}
        if mode == "int4" and ts["weight_shape"].tolist() != [m.out_features, m.in_features]:
            raise CheckpointError(
                f"{root}: tensor {prefix}weight_shape is {ts['weight_shape'].tolist()}, "
                f"expected {[m.out_features, m.in_features]}"
            )
        state.update({f"{name}.{k}": v for k, v in _from_ct(m, ts, sym).items()})
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
