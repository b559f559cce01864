"""RecurrentGemma's (Griffin's) recurrent token mixer: RG-LRU, causal Conv1D, recurrent block.

De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient
Language Models" (arXiv:2402.19427), section 2.4, numerically transformers'
`RecurrentGemmaRecurrentBlock` (5.25). The block has two branches on the normed input x:

    y = gelu(linear_y(x))                                   gate branch
    h = rg_lru(conv1d(linear_x(x)))                         recurrent branch
    out = linear_out(h * y)

and the Real-Gated Linear Recurrent Unit (eq. 1-4), with c = 8 and a = sigma(Lambda) kept in
log space (`recurrent_param` = -Lambda, so log a = -softplus(recurrent_param)):

    r_t = sigma(W_a x_t + b_a)                recurrence gate           (1)
    i_t = sigma(W_x x_t + b_x)                input gate                (2)
    a_t = a^(c r_t)                                                     (3)
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)                 (4)

W_a and W_x are block-diagonal: one (W/H, W/H) block per head. At a token whose position is
0 the recurrence restarts: h_t = i_t * x_t (no carry, no normalisation). h is accumulated in
float32 whatever the activations' dtype. A padding token (position < 0, after a row's real
tokens in a batched call) leaves h and the conv window as they were.

The state that incremental decoding carries is constant in size, whatever the length: the
conv's last (width - 1) inputs and h, `RecurrentState`. Running T tokens at once equals
running them one at a time (or in any chunks) through the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError

C = 8.0  # Griffin's fixed exponent c in a_t = a^(c r_t) (eq. 3)
MAX_SQRT_GRADIENT = 1000.0  # transformers/Griffin clip the gradient of sqrt(1 - a^2) at this
ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF name -> F.gelu approximate
DIRECT_CONV_MAX_T = 8  # chunks up to this many tokens compute the conv without F.conv1d


@dataclass(frozen=True)
class RecurrentConfig:
    """Shape of a recurrent block; field names follow transformers' RecurrentGemmaConfig."""

    hidden_size: int  # residual stream width d
    num_attention_heads: int  # H: blocks of the RG-LRU's block-diagonal gates
    lru_width: int | None = None  # W, the recurrence width; None -> hidden_size (as HF)
    conv1d_width: int = 4  # temporal conv taps
    hidden_activation: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        if self.lru_width is None:
            object.__setattr__(self, "lru_width", self.hidden_size)
        for name in ("hidden_size", "num_attention_heads", "lru_width", "conv1d_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"RecurrentConfig.{name} must be a positive integer, got {value!r}"
                )
        for name in ("lru_width", "hidden_size"):
            value = getattr(self, name)
            if value % self.num_attention_heads:
                raise ConfigError(
                    f"RecurrentConfig.num_attention_heads ({self.num_attention_heads}) does not "
                    f"divide {name} ({value}): the RG-LRU gates are one block per head "
                    "(and attention's head_dim is hidden_size / heads)"
                )
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(
                f"RecurrentConfig.hidden_activation {self.hidden_activation!r} is not "
                f"supported; use one of {sorted(ACTIVATIONS)}"
            )

    @property
    def width(self) -> int:
        """The recurrence width W (lru_width, resolved)."""
        assert self.lru_width is not None
        return self.lru_width

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> RecurrentConfig:
        """The recurrent-block part of a RecurrentGemmaConfig dict (HF defaults when omitted)."""
        try:
            return cls(
                hidden_size=config.get("hidden_size", 2560),
                num_attention_heads=config.get("num_attention_heads", 10),
                lru_width=config.get("lru_width"),
                conv1d_width=config.get("conv1d_width", 4),
                hidden_activation=config.get("hidden_activation") or "gelu_pytorch_tanh",
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


class RecurrentState(NamedTuple):
    """A recurrent layer's decode state: constant size, whatever the number of tokens seen."""

    conv: torch.Tensor  # (B, W, conv1d_width - 1): the conv's last inputs, activations' dtype
    lru: torch.Tensor  # (B, W) float32: h_t of the RG-LRU

    @property
    def nbytes(self) -> int:
        """Bytes the state holds."""
        return sum(t.numel() * t.element_size() for t in self)


class _SqrtBoundDerivative(torch.autograd.Function):
    """sqrt(x) whose gradient is clipped at MAX_SQRT_GRADIENT (finite at x = 0, as Griffin's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt(torch.clip(4.0 * x, min=1 / MAX_SQRT_GRADIENT**2))


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit (Griffin eq. 1-4) with block-diagonal gates."""

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        h, w = config.num_attention_heads, config.width
        self.heads, self.block = h, w // h
        self.recurrent_param = nn.Parameter(torch.empty(w))  # -Lambda: log a = -softplus(.)
        self.input_gate_weight = nn.Parameter(torch.empty(h, w // h, w // h))  # (H, W/H, W/H)
        self.input_gate_bias = nn.Parameter(torch.zeros(h, w // h))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(h, w // h, w // h))
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(h, w // h))
        nn.init.normal_(self.input_gate_weight, std=(0.01 / (w // h)) ** 0.5)
        nn.init.normal_(self.recurrent_gate_weight, std=(0.01 / (w // h)) ** 0.5)
        with torch.no_grad():  # transformers' init: a^2 ~ U(0.9^2, 0.999^2)
            a = torch.empty(w).uniform_(0.9**2 + 1e-8, 0.999**2 + 1e-8).sqrt()
            self.recurrent_param.copy_(torch.log(1.0 / a - 1.0))  # softplus^-1(-log a)

    def _gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """sigma(x W + b) per head: x (B, T, W) -> (B, T, W)."""
        b, t, w = x.shape
        xh = x.reshape(b * t, self.heads, self.block).transpose(0, 1)  # (H, B*T, W/H)
        z = torch.baddbmm(bias[:, None, :], xh, weight)  # (H, B*T, W/H): x W_h + b_h per head
        return torch.sigmoid(z.transpose(0, 1).reshape(b, t, w))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, W), positions (B, T), h (B, W) float32 or None -> (y (B, T, W), h_T).

        Padding (positions < 0) carries h unchanged (a = 1, no input)."""
        reset = (positions == 0)[..., None]  # (B, T, 1): restart the recurrence here
        pad = (positions < 0)[..., None]  # (B, T, 1)
        input_gate = self._gate(x, self.input_gate_weight, self.input_gate_bias)  # i_t (2)
        gate = self._gate(x, self.recurrent_gate_weight, self.recurrent_gate_bias)  # r_t (1)
        log_a = -C * gate * F.softplus(self.recurrent_param)  # log a_t (3), (B, T, W)
        a = torch.exp(log_a) * ~reset  # no carry across a reset
        one_minus = 1 - torch.exp(2 * log_a)  # 1 - a_t^2
        grad = torch.is_grad_enabled() and one_minus.requires_grad
        norm = _SqrtBoundDerivative.apply(one_minus) if grad else torch.sqrt(one_minus)
        norm = torch.where(reset, torch.ones_like(norm), norm)
        u = x * input_gate * norm.to(x.dtype)  # (B, T, W): sqrt(1 - a_t^2) * (i_t * x_t)
        a = torch.where(pad, torch.ones_like(a), a)
        u = torch.where(pad, torch.zeros_like(u), u)
        if h is None:
            h = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float32, device=x.device)
        a32, u32 = a.float(), u.float()
        ys = []
        for t in range(x.shape[1]):  # (4), sequential in float32
            h = a32[:, t] * h + u32[:, t]  # (B, W)
            ys.append(h)
        return torch.stack(ys, dim=1).to(x.dtype), h


class RecurrentBlock(nn.Module):
    """Griffin's recurrent block: gelu(linear_y(x)) * rg_lru(conv1d(linear_x(x))) -> linear_out.

    Parameter names equal transformers' `temporal_block` names (HF_KEYS).
    """

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        d, w = config.hidden_size, config.width
        self.config = config
        self.linear_y = nn.Linear(d, w)
        self.linear_x = nn.Linear(d, w)
        self.linear_out = nn.Linear(w, d)
        # Depthwise causal conv; the left context comes from the state, so no padding here.
        self.conv_1d = nn.Conv1d(w, w, kernel_size=config.conv1d_width, groups=w)
        self.rg_lru = RGLRU(config)
        self.approximate = ACTIVATIONS[config.hidden_activation]

    def initial_state(
        self, batch: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> RecurrentState:
        """The state before the first token: zeros (conv in `dtype`, h in float32)."""
        w, k = self.config.width, self.config.conv1d_width
        dtype = dtype or self.linear_x.weight.dtype
        device = device or self.linear_x.weight.device
        return RecurrentState(
            torch.zeros(batch, w, k - 1, dtype=dtype, device=device),
            torch.zeros(batch, w, dtype=torch.float32, device=device),
        )

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, state: RecurrentState | None = None
    ) -> tuple[torch.Tensor, RecurrentState]:
        """x (B, T, d), positions (B, T), state of the tokens before -> (y (B, T, d), new state)."""
        b, t, _ = x.shape
        if positions.shape != (b, t):
            raise ValueError(f"positions has shape {tuple(positions.shape)}, expected {(b, t)}")
        if state is None:
            state = self.initial_state(b, x.dtype, x.device)
        elif state.lru.shape != (b, self.config.width):
            raise ValueError(
                f"state is for batch {state.lru.shape[0]} and width {state.lru.shape[-1]}, "
                f"the input for batch {b} and width {self.config.width}"
            )
        y = F.gelu(self.linear_y(x), approximate=self.approximate)  # (B, T, W)
        xs = self.linear_x(x).transpose(1, 2)  # (B, W, T)
        window = torch.cat([state.conv.to(xs.dtype), xs], dim=-1)  # (B, W, k-1+T)
        if t <= DIRECT_CONV_MAX_T:  # decode: k multiply-adds beat conv1d's call overhead
            taps = window.unfold(-1, self.config.conv1d_width, 1)  # (B, W, T, k)
            conv = (taps * self.conv_1d.weight[:, 0, None, :]).sum(-1)  # (B, W, T)
            conv = conv + self.conv_1d.bias[:, None]
        else:
            conv = F.conv1d(window, self.conv_1d.weight, self.conv_1d.bias, groups=xs.shape[1])
        keep = self.config.conv1d_width - 1
        # the last k-1 inputs before each row's padding: window columns n_b .. n_b + k - 2
        n_real = (positions >= 0).sum(1)  # (B,)
        idx = n_real[:, None] + torch.arange(keep, device=x.device)  # (B, k-1)
        new_conv = window.gather(-1, idx[:, None, :].expand(-1, window.shape[1], -1))  # (B, W, k-1)
        h, lru = self.rg_lru(conv.transpose(1, 2), positions, state.lru)  # (B, T, W)
        return self.linear_out(h * y), RecurrentState(new_conv, lru)


# Parameter names of RecurrentBlock == transformers' names below `model.layers.<i>.temporal_block.`
HF_KEYS: dict[str, str] = {
    name: name
    for name in (
        "linear_y.weight",
        "linear_y.bias",
        "linear_x.weight",
        "linear_x.bias",
        "linear_out.weight",
        "linear_out.bias",
        "conv_1d.weight",
        "conv_1d.bias",
        "rg_lru.recurrent_param",
        "rg_lru.input_gate_weight",
        "rg_lru.input_gate_bias",
        "rg_lru.recurrent_gate_weight",
        "rg_lru.recurrent_gate_bias",
    )
}

__all__ = [
    "HF_KEYS",
    "RGLRU",
    "RecurrentBlock",
    "RecurrentConfig",
    "RecurrentMixer",
    "RecurrentState",
]


class RecurrentMixer(RecurrentBlock):
    """`RecurrentBlock` as a decoder layer's token mixer: the attention mixers' call signature.

    Without a cache the forward starts from the zero state; with the engine's cache it runs on
    from the layer's state there (`cache.recurrent(layer, positions)`) and writes the new state
    back in place. A row whose tokens start at position 0 starts from the zero state.
    """

    def __init__(self, config: Any, layer: int):
        from ..family import recurrent_config

        super().__init__(recurrent_config(config))
        self.layer = layer

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        positions: torch.Tensor,
        cache: Any = None,
        segment_ids: torch.Tensor | None = None,
        causal_default: bool = False,
        shared: dict | None = None,
    ) -> torch.Tensor:
        """x (B, T, d), positions (B, T) -> (B, T, d); the recurrence restarts at position 0."""
        if cache is None:
            return RecurrentBlock.forward(self, x, positions)[0]
        state = cache.recurrent(self.layer, positions)  # views of rows 0..B-1
        fresh = positions[:, :1] == 0  # (B, 1): a sequence starts here
        start = RecurrentState(
            torch.where(fresh[:, :, None], torch.zeros_like(state.conv), state.conv),
            torch.where(fresh, torch.zeros_like(state.lru), state.lru),
        )
        y, new = RecurrentBlock.forward(self, x, positions, start)
        state.conv.copy_(new.conv)
        state.lru.copy_(new.lru)
        return y
