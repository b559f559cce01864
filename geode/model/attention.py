"""Grouped-query attention with QK-norm, dual RoPE, sliding windows and a pluggable KV cache.

`Attention` is Gemma 3's; `Gemma4Attention` and `LocalAttention` (RecurrentGemma) are the other
families' token mixers, full-sequence and through the engine's cache alike.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SLIDING, ModelConfig
from .layers import RMSNorm, ScaleRMSNorm, apply_partial_rope, apply_rope

# SDPA learned grouped-query attention (enable_gqa) in torch 2.5; before, repeat the kv heads.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class KVCache(Protocol):
    """What the model asks of a cache; the inference engine provides the implementations.

    `update` stores the new keys/values of one layer and returns everything the new queries
    may attend to, together with the absolute position of every returned key slot. Slots
    that hold nothing have position -1. A ring buffer for a local layer returns its W slots
    in any order: the mask is built from positions, not from slot indices.
    """

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, T, D) at positions (B, T) -> keys, values (B, Hkv, S, D), key_pos (B, S)."""
        ...


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
    q_img: torch.Tensor | None = None,
    k_img: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): key j is visible to query i iff it is a real key, not in the
    future, within the last `window` positions (the query's own included), and in the same
    document when segment ids are given. Padding queries (position < 0) see every key so that
    their rows stay finite (an all-masked row would be NaN and poison later layers).

    Image group ids q_img (B, T), k_img (B, S) (`image_group_ids`: the image index, -1 for
    text) make one image's tokens see each other, later ones included (Gemma 3's
    bidirectional image attention): (causal or same image >= 0) and, on local layers, within
    the window (transformers' AND(sliding_window, OR(causal, blockwise)))."""
    q = q_pos[:, :, None]  # (B, T, 1)
    k = k_pos[:, None, :]  # (B, 1, S)
    visible = k <= q
    if q_img is not None and k_img is not None:
        same = q_img[:, :, None] == k_img[:, None, :]  # (B, T, S)
        visible = visible | (same & (q_img[:, :, None] >= 0))
    mask = (k >= 0) & visible
    if window is not None:
        mask &= q - k < window
    if q_seg is not None and k_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    mask |= q < 0
    return mask[:, None]


# Masks built in the current forward pass, per thread: the server drives the engine from a
# worker thread while other threads may run forwards of their own.
_MASK_MEMO = threading.local()


def _memo_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    seg: torch.Tensor | None = None,
    img: torch.Tensor | None = None,
) -> torch.Tensor:
    """`attention_mask`, reused across the layers of one forward pass.

    `img` (B, T): the queries' image group ids; the keys' are `key_image_groups`.

    A cache may return the same key-position tensor to every layer of a kind (local/global),
    and without a cache every layer of a kind sees the same positions and segments, so the
    mask is built once per kind instead of once per layer. Reuse requires the same forward
    pass (`Transformer.hidden` clears the memo), the very same tensor objects, unmodified
    since (version counters; inference tensors have none), and the same window.
    """
    if torch.compiler.is_compiling():  # a compiled layer fuses the mask into its graph
        return attention_mask(q_pos, k_pos, window, seg, seg, *_image_pair(q_pos, k_pos, img))
    memo = getattr(_MASK_MEMO, "masks", None)
    if memo is None:
        memo = _MASK_MEMO.masks = {}
    tensors = (q_pos, k_pos, seg, img)
    versions = tuple(None if t is None or torch.is_inference(t) else t._version for t in tensors)
    key = (*(None if t is None else id(t) for t in tensors), window)
    hit = memo.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], tensors)) and hit[1] == versions:
        return hit[2]
    mask = attention_mask(q_pos, k_pos, window, seg, seg, *_image_pair(q_pos, k_pos, img))
    memo[key] = (tensors, versions, mask)
    return mask


def _image_pair(
    q_pos: torch.Tensor, k_pos: torch.Tensor, img: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(query, key) image group ids for `attention_mask`, or (None, None) without images."""
    if img is None:
        return None, None
    return img, img if k_pos is q_pos else key_image_groups(q_pos, k_pos, img)


def key_image_groups(q_pos: torch.Tensor, k_pos: torch.Tensor, q_img: torch.Tensor) -> torch.Tensor:
    """Image group ids of cached keys (B, S): a key at the position of one of this pass's
    tokens (q_pos (B, T), groups q_img (B, T)) takes its group; earlier keys are -1.

    The cache keeps positions, not groups, so at prefill the bidirectional rule holds among
    the chunk's own tokens: an image must lie inside one prefill chunk."""
    hit = (k_pos[:, :, None] == q_pos[:, None, :]) & (k_pos[:, :, None] >= 0)  # (B, S, T)
    groups = (hit * (q_img[:, None, :] + 1)).sum(-1) - 1  # (B, S); positions are unique
    return torch.where(hit.any(-1), groups, torch.full_like(groups, -1))


def clear_mask_memo() -> None:
    """Forget the memoised masks (called at the start of every forward pass)."""
    _MASK_MEMO.masks = None


class Attention(nn.Module):
    """Gemma 3 self-attention for one layer (local or global)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.is_local = config.layer_types[layer] == SLIDING
        self.window = config.sliding_window if self.is_local else None
        self.scale = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping
        bias = config.attention_bias
        hd = self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        causal_default: bool = False,
        image_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden), cos/sin (B, T, D), positions (B, T) -> (B, T, hidden).

        `causal_default` says positions are 0..T-1 in every row with no cache and no
        segments, so the plain causal kernel can be used when the window covers T.
        `image_groups` (B, T): image group ids, bidirectional within an image (see
        `attention_mask`); None: no images.
        """
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)  # (B, T, H*D), (B, T, Hkv*D), (B, T, Hkv*D)
        q, k = self.norm_rope(q, k, cos, sin)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)

        mask = None
        if cache is not None:
            k, v, k_pos = cache.update(self.layer, k, v, positions)  # (B, Hkv, S, D), (B, S)
            mask = _memo_mask(positions, k_pos, self.window, None, image_groups)
        elif image_groups is not None or not (
            causal_default and (self.window is None or T <= self.window)
        ):
            mask = _memo_mask(positions, positions, self.window, segment_ids, image_groups)
        out = self._attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, hidden) -> q (B, T, H*D), k, v (B, T, Hkv*D); inference may fuse the three."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def norm_rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """QK-norm (Dehghani et al. 2023) over head_dim, then RoPE, as in Gemma 3.

        q (B, T, H*D), k (B, T, Hkv*D), cos/sin (B, T, D) -> q (B, H, T, D), k (B, Hkv, T, D).
        """
        B, T, _ = q.shape
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """softmax(q k^T * scale [softcapped] + mask) v with GQA; mask None means causal."""
        groups = self.num_heads // self.num_kv_heads
        if self.softcap is None and _SDPA_GQA:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                enable_gqa=groups > 1,
            )  # fmt: skip
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(groups, dim=1)
        if self.softcap is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale
            )
        # Logit soft-capping (Gemma 2): s = c * tanh(s / c); SDPA has no hook for it.
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (B, H, T, S)
        scores = self.softcap * torch.tanh(scores / self.softcap)
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


class _FamilyAttention(Attention):
    """An attention mixer of another family: the forward around its own `qkv`.

    Subclasses set the fields `_attend` reads and implement `qkv` (and `query` where the layer
    reads another layer's K/V: `source`). With a cache, a layer owning K/V stores them there
    and attends to what it returns; `shared` hands (keys, values, key positions or None) of a
    layer to the kv-shared layers after it, so those keep no copy (Gemma 4).
    """

    family = ""
    source: int | None = None  # the layer whose K/V this one reads (kv sharing), None: its own

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        causal_default: bool = False,
        shared: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden); `shared`: producer layer -> (k, v, key_pos)."""
        B, T, _ = x.shape
        k_pos = None  # (B, S) positions of cached keys; None: the keys are this call's tokens
        if self.source is not None:
            if shared is None or self.source not in shared:
                raise RuntimeError(f"layer {self.layer}: k/v of layer {self.source} not computed")
            q = self.query(x, cos, sin)  # (B, H, T, D)
            k, v, k_pos = shared[self.source]  # (B, Hkv, S, D) x 2, normed and rotated
        else:
            q, k, v = self.qkv(x, cos, sin)  # (B, H, T, D), (B, Hkv, T, D) x 2
            if cache is not None:
                k, v, k_pos = cache.update(self.layer, k, v, positions)  # (B, Hkv, S, D)
            if shared is not None:
                shared[self.layer] = (k, v, k_pos)
        mask = None
        if k_pos is not None:
            mask = _memo_mask(positions, k_pos, self.window)
        elif not (causal_default and (self.window is None or T <= self.window)):
            mask = _memo_mask(positions, positions, self.window, segment_ids)
        out = self._attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, hidden) -> q (B, H, T, D), k and v (B, Hkv, T, D), positions applied."""
        raise NotImplementedError

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, hidden) -> q (B, H, T, D) alone (a kv-shared layer)."""
        raise NotImplementedError


class Gemma4Attention(_FamilyAttention):
    """Gemma 4 self-attention (transformers' Gemma4TextAttention).

    Scale-weighted q/k norms and a scale-free v_norm, scores scaled by 1 (the norms set the
    magnitude), full layers with their own head_dim / kv heads and proportional RoPE,
    `attention_k_eq_v` (full layers: v is the k projection, normed apart), and kv sharing: a
    layer past `num_hidden_layers - num_kv_shared_layers` has no k/v weights and attends to the
    keys/values of the last earlier layer of its kind (`shared`, filled by that layer).
    """

    def __init__(self, config: ModelConfig, layer: int):
        nn.Module.__init__(self)
        from ..family import kv_source

        self.layer = layer
        self.kind = config.layer_types[layer]
        self.is_local = self.kind == SLIDING
        self.window = config.sliding_window if self.is_local else None
        self.num_heads = config.num_attention_heads
        self.head_dim = config.global_head_dim or config.head_dim
        self.num_kv_heads = config.num_global_key_value_heads or config.num_key_value_heads
        if self.is_local:
            self.head_dim, self.num_kv_heads = config.head_dim, config.num_key_value_heads
        self.scale = 1.0
        self.softcap = None
        self.source = kv_source(config, layer)  # producer layer of the k/v, or None: its own
        h, hd, eps, bias = (
            config.hidden_size,
            self.head_dim,
            config.rms_norm_eps,
            config.attention_bias,
        )
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=bias)
        self.q_norm = ScaleRMSNorm(hd, eps)
        if self.source is None:
            self.k_norm = ScaleRMSNorm(hd, eps)
            self.v_norm = ScaleRMSNorm(hd, eps, with_scale=False)
            self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
            k_eq_v = config.attention_k_eq_v and not self.is_local
            self.v_proj = None if k_eq_v else nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=bias)

    family = "gemma4"

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D): projected, normed, rotated."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim))  # (B, T, H, D)
        return apply_rope(q.transpose(1, 2), cos, sin)

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k normed and rotated, v normed (k_eq_v: v from the k projection)."""
        B, T, _ = x.shape
        hd = self.head_dim
        kx = self.k_proj(x).view(B, T, self.num_kv_heads, hd)
        vx = kx if self.v_proj is None else self.v_proj(x).view(B, T, self.num_kv_heads, hd)
        k = apply_rope(self.k_norm(kx).transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
        v = self.v_norm(vx).transpose(1, 2)  # (B, Hkv, T, D)
        return self.query(x, cos, sin), k, v


class LocalAttention(_FamilyAttention):
    """RecurrentGemma's local multi-query attention (transformers' RecurrentGemmaAttention).

    No q/k norms, scores scaled by head_dim^-1/2, RoPE on the first half of each head only,
    a bias on the output projection, and a window of `sliding_window` (attention_window_size).
    """

    def __init__(self, config: ModelConfig, layer: int):
        nn.Module.__init__(self)
        self.layer = layer
        self.is_local = True
        self.window = config.sliding_window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.softcap = None
        h, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=True)

    family = "recurrent_gemma"

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v with RoPE on the first cos.shape[-1] (= D/2) dims of q and k."""
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).view(B, T, self.num_heads, hd).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, hd).transpose(1, 2)
        return apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin), v
