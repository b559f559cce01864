"""Native runner: the whole decoder stack for the new tokens of several sequences in one C call.

`NativeDecoder.build(model)` collects, once, pointers to every weight (in the kernel formats of
kernels.WeightSpec: float32, bfloat16, int8, int4), norm, RoPE table and the model's constants
into a C struct (`geode_model` in kernels.c); `run(rows, ids, pos, cache, want)` binds the
engine's `HybridCache` buffers (when the cache object changes) and calls `geode_run` over
flattened tokens (token i -> cache row rows[i] at position pos[i]; prefill chunks of any length
and decode tokens of other rows in one call), which returns float32 logits of the tokens in
`want` only. `step(ids, pos, cache)` is the one-token-per-row case. `NativeRunner` is the
engine's `Runner` entry over it: run(rows, ids[B, T], positions[B, T], cache, select).

Per layer the C run does what geode/model does: input RMSNorm, fused q/k/v projection (a
register-blocked GEMM over all tokens from 6 of them, any weight format), QK-norm, RoPE (local /
global base frequency and linear scaling: the model's own inverse-frequency tables), attention
of each token over its row's cached positions before the call and the call's own keys up to its
position (the same mask as `attention_mask`: not in the future, inside the sliding window of a
local layer), then the cache write (global layers: slot p; local layers: the last R tokens of a
row, ring slot p mod R, R = W + slack; slot-position tables after the last layer),
o-projection, post-attention norm, residual, pre-FF norm, gate/up, gelu(gate) * up, down,
post-FF norm, residual; then the final norm, the head (tied embedding, lm_head or an installed
quantized head) and final logit soft-capping for the wanted tokens. Activations stay float32 in
C (a bfloat16 model's torch path rounds them to bfloat16 after every op; the C run rounds only
the scaled embedding and the stored keys/values, which are in the model dtype).

Anything else (GPU, other dtypes or module types, biases, kernels unavailable) is not
supported: `build` returns None with the reason in `NativeDecoder.why_not(model)`, and the
engine keeps its torch path.
"""

from __future__ import annotations

import ctypes
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.optim.optimizer as _optim
from torch import nn

from ..config import FULL, SLIDING
from ..family import runner_refusal
from ..model.attention import Attention
from ..model.layers import GatedMLP, RMSNorm, ScaledEmbedding
from ..model.transformer import DecoderLayer, Transformer
from . import kernels

_FLOAT_KINDS = {torch.float32: 0, torch.bfloat16: 1}
_MAXW = kernels.MAX_WEIGHTS
RUN_MAX_TOKENS = 512  # tokens per geode_run call (its workspace grows with them)


class _Linear(ctypes.Structure):
    """Mirror of `geode_linear` (kernels.c): nw weights of one kind sharing x."""

    _fields_ = [
        ("kind", ctypes.c_int),
        ("K", ctypes.c_int),
        ("G", ctypes.c_int),
        ("nw", ctypes.c_int),
        ("N", ctypes.c_int * _MAXW),
        ("W", ctypes.c_void_p * _MAXW),
        ("aux", ctypes.c_void_p * _MAXW),
        ("aux2", ctypes.c_void_p * _MAXW),
        ("P", ctypes.c_void_p * _MAXW),
    ]


class _Layer(ctypes.Structure):
    """Mirror of `geode_layer` (kernels.c)."""

    _fields_ = [
        ("qkv", _Linear),
        ("o", _Linear),
        ("gate_up", _Linear),
        ("down", _Linear),
        ("norm", ctypes.c_void_p * 4),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("slots", ctypes.c_int),
        ("window", ctypes.c_int),
    ]


class _Model(ctypes.Structure):
    """Mirror of `geode_model` (kernels.c)."""

    _fields_ = [
        ("n_layers", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("heads", ctypes.c_int),
        ("kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("inter", ctypes.c_int),
        ("vocab", ctypes.c_int),
        ("float_kind", ctypes.c_int),
        ("cache_kind", ctypes.c_int),
        ("act", ctypes.c_int),
        ("embed_round", ctypes.c_int),
        ("eps", ctypes.c_float),
        ("embed_scale", ctypes.c_float),
        ("attn_scale", ctypes.c_float),
        ("attn_softcap", ctypes.c_float),
        ("final_softcap", ctypes.c_float),
        ("embed", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("head", _Linear),
        ("inv_freq", ctypes.c_void_p * 2),
        ("pos_table", ctypes.c_void_p * 2),
        ("capacity", ctypes.c_int),
        ("ring", ctypes.c_int),
        ("rows", ctypes.c_int),
        ("layer", ctypes.POINTER(_Layer)),
    ]


class Unsupported(Exception):
    """The model (or cache) has something the native step does not implement."""


# Decoders holding packed weight copies. An optimizer step updates parameters in place, and
# torch's fused AdamW does so without bumping the tensors' version counters, so every
# optimizer step (any optimizer, process-wide hook) marks the decoders whose packed sources
# it touched as stale; other in-place writes are seen through the version counters (see
# NativeDecoder.pack).
_PACKED: weakref.WeakSet[NativeDecoder] = weakref.WeakSet()
_HOOK: list[Any] = []


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _after_optimizer_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Mark packed copies of parameters this optimizer just updated as stale."""
    if not _PACKED:
        return
    ptrs = {p.data_ptr() for g in opt.param_groups for p in g["params"]}
    for dec in list(_PACKED):
        if any(src in ptrs for _, _, src in dec._packed_versions):
            dec.packed_stale = True


def _spec(module: nn.Module | None) -> kernels.WeightSpec:
    """Kernel view of a projection's weight (KernelLinear, QuantLinear, plain Linear)."""
    if module is None:
        raise Unsupported("missing projection")
    if getattr(module, "bias", None) is not None:
        raise Unsupported(f"{type(module).__name__} has a bias")
    get = getattr(module, "kernel_spec", None)
    if get is not None:
        spec = get()
    elif type(module) in (nn.Linear, ScaledEmbedding):
        spec = kernels.float_spec(module.weight)
    else:
        raise Unsupported(f"projection of type {type(module).__name__}")
    if spec is None:
        raise Unsupported(f"{type(module).__name__} weight has no kernel format")
    return spec


def _linear(specs: list[kernels.WeightSpec], k: int) -> _Linear:
    """A `geode_linear` over weights that share x (same kind, input width and group)."""
    if len({(s.kind, s.k, s.group) for s in specs}) != 1 or specs[0].k != k:
        raise Unsupported("weights sharing an input differ in format or width")
    lin = _Linear(kind=specs[0].kind, K=k, G=specs[0].group, nw=len(specs))
    for i, s in enumerate(specs):
        lin.N[i], lin.W[i], lin.aux[i], lin.aux2[i] = s.n, s.ptr, s.aux, s.aux2
    return lin


def _float_param(t: torch.Tensor, kind: int, shape: tuple[int, ...]) -> int:
    """Pointer of a contiguous CPU float parameter of the model's float kind and shape."""
    if (
        t.device.type != "cpu"
        or _FLOAT_KINDS.get(t.dtype) != kind
        or tuple(t.shape) != shape
        or not t.is_contiguous()
    ):
        raise Unsupported(f"parameter {tuple(t.shape)} {t.dtype} is not {shape} of the model dtype")
    return t.data_ptr()


def _head_spec(model: Transformer) -> kernels.WeightSpec:
    """The LM head as the model's `logits` computes it (override, tied embedding or lm_head)."""
    head = model.head_override
    if head is None:
        return _spec(model.embed_tokens if model.lm_head is None else model.lm_head)
    get = getattr(head, "kernel_spec", None)  # KernelHead, QuantLinear
    if get is None:
        raise Unsupported(f"head_override of type {type(head).__name__}")
    spec = get()
    if spec is None:
        raise Unsupported("head weight has no kernel format")
    return spec


class NativeDecoder:
    """Pointers to one model's weights for `geode_run`, plus the bound cache."""

    def __init__(self, model: Transformer):
        """Collect everything the C step reads; raises Unsupported (see `why_not`)."""
        if not kernels.available():
            raise Unsupported(f"kernels unavailable: {kernels.load_error()}")
        if type(model) is not Transformer:
            raise Unsupported(f"model of type {type(model).__name__}")
        refused = runner_refusal(model.config, "native")  # the registry's runner paths
        if refused is not None:
            raise Unsupported(refused)
        cfg = model.config
        if model.device.type != "cpu":
            raise Unsupported(f"model on {model.device}")
        fk = _FLOAT_KINDS.get(model.dtype)
        if fk is None:
            raise Unsupported(f"model dtype {model.dtype}")
        h, V = cfg.hidden_size, cfg.vocab_size
        H, Hkv, D, inter = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                            cfg.intermediate_size)  # fmt: skip
        if D > 256 or (H // Hkv) * D > 4096 or H // Hkv > 64:
            raise Unsupported(f"head_dim {D} with {H // Hkv} query heads per kv head")
        emb = model.embed_tokens
        if type(emb) is not ScaledEmbedding:
            raise Unsupported(f"embedding of type {type(emb).__name__}")
        keep: list[object] = []  # tensors and specs pointed to: alive as long as the plan

        def fp(t: torch.Tensor, shape: tuple[int, ...]) -> int:
            keep.append(t)
            return _float_param(t, fk, shape)

        attn0 = model.layers[0].self_attn if len(model.layers) else None
        linears: list[tuple[_Linear, list[kernels.WeightSpec]]] = []  # views into the plan
        acts = set()
        layers = (_Layer * len(model.layers))()
        for i, layer in enumerate(model.layers):
            if type(layer) is not DecoderLayer:
                raise Unsupported(f"layer of type {type(layer).__name__}")
            a, mlp = layer.self_attn, layer.mlp
            if not isinstance(a, Attention) or not isinstance(mlp, GatedMLP):
                raise Unsupported("attention or MLP of another type")
            norms = (layer.input_layernorm, layer.post_attention_layernorm,
                     layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm,
                     a.q_norm, a.k_norm)  # fmt: skip
            if any(not isinstance(n, RMSNorm) or n.eps != cfg.rms_norm_eps for n in norms):
                raise Unsupported("norm of another type or epsilon")
            if (a.num_heads, a.num_kv_heads, a.head_dim) != (H, Hkv, D):
                raise Unsupported("attention shape differs from the config")
            if a.scale != attn0.scale or a.softcap != attn0.softcap:
                raise Unsupported("attention scale or soft-cap differs between layers")
            if a.is_local != (cfg.layer_types[i] == SLIDING):
                raise Unsupported("layer kind differs from the config")
            specs = [_spec(a.q_proj), _spec(a.k_proj), _spec(a.v_proj)]
            gu = [_spec(mlp.gate_proj), _spec(mlp.up_proj)]
            down, o = _spec(mlp.down_proj), _spec(a.o_proj)
            for s in (*specs, *gu, down, o):
                keep.append(s)
            rows = [s.n for s in (*specs, *gu, o, down)]
            if rows != [H * D, Hkv * D, Hkv * D, inter, inter, h, h]:
                raise Unsupported("projection shapes differ from the config")
            L = layers[i]
            L.qkv, L.o = _linear(specs, h), _linear([o], H * D)
            L.gate_up, L.down = _linear(gu, h), _linear([down], inter)
            linears += [(L.qkv, specs), (L.o, [o]), (L.gate_up, gu), (L.down, [down])]
            for j, n in enumerate(norms[:4]):
                L.norm[j] = fp(n.weight, (h,))
            L.q_norm, L.k_norm = fp(a.q_norm.weight, (D,)), fp(a.k_norm.weight, (D,))
            L.window = cfg.sliding_window if a.is_local else 0
            acts.add(mlp.approximate)
        if not acts <= {"tanh", "none"} or len(acts) > 1:
            raise Unsupported(f"activations {sorted(acts)}")
        head = _head_spec(model)
        keep.append(head)
        if head.n != V:
            raise Unsupported("head shape differs from the vocabulary")
        inv = [model._inv_freq[SLIDING], model._inv_freq[FULL]]
        for t in inv:
            if t.dtype != torch.float32 or t.shape != (D // 2,) or not t.is_contiguous():
                raise Unsupported("RoPE tables")
            keep.append(t)
        scale = torch.tensor(h**0.5, dtype=emb.weight.dtype)  # as ScaledEmbedding rounds it
        m = _Model(
            n_layers=len(model.layers), hidden=h, heads=H, kv_heads=Hkv, head_dim=D,
            inter=inter, vocab=V, float_kind=fk, cache_kind=0, act=0 if "tanh" in acts else 1,
            embed_round=int(fk == 1), eps=cfg.rms_norm_eps, embed_scale=float(scale),
            attn_scale=attn0.scale if attn0 else 1.0,
            attn_softcap=(attn0.softcap or 0.0) if attn0 else 0.0,
            final_softcap=cfg.final_logit_softcapping or 0.0,
            embed=fp(emb.weight, (V, h)), final_norm=fp(model.norm.weight, (h,)),
            head=_linear([head], h),
        )  # fmt: skip
        m.inv_freq[0], m.inv_freq[1] = inv[0].data_ptr(), inv[1].data_ptr()
        m.layer = layers
        linears.append((m.head, [head]))
        self.linears = linears
        self.packed: list[torch.Tensor] | None = None  # see pack()
        self.packed_stale = False
        self.pack_refused: str | None = None  # why packing was skipped (memory), if it was
        # per packed weight: its source tensor, version and storage pointer at packing
        self._packed_versions: list[tuple[torch.Tensor, int, int]] = []
        self.model = m
        self.layers = layers
        self.keep = keep
        self.vocab = V
        self.window = cfg.sliding_window
        self.fingerprint = self._fingerprint(model)
        self.cache = None
        self.work = torch.empty(0)

    @staticmethod
    def _fingerprint(model: Transformer) -> tuple:
        """What the pointers depend on: every parameter/buffer's storage, dtype and shape, the
        head override and module types (checked when requests are admitted, not per step)."""
        tensors = [*model.parameters(), *model.buffers()]
        head = model.head_override
        if head is not None:
            tensors += [*head.parameters(), *head.buffers()]
        return (
            tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in tensors),
            id(head),
            tuple(type(m) for m in model.modules()),
        )

    @classmethod
    def build(cls, model: Transformer) -> NativeDecoder | None:
        """The decoder for this model, or None when it is not supported (see `why_not`)."""
        try:
            return cls(model)
        except Unsupported:
            return None

    @classmethod
    def why_not(cls, model: Transformer) -> str | None:
        """Why the native step cannot run this model (None: it can)."""
        try:
            cls(model)
        except Unsupported as e:
            return str(e)
        return None

    def current(self, model: Transformer) -> bool:
        """True while the model's tensors are the ones this plan points to."""
        return self._fingerprint(model) == self.fingerprint

    def bind(self, cache) -> None:
        """Point the plan at a HybridCache's buffers (rows, capacity, ring, slot tables)."""
        kind = _FLOAT_KINDS.get(cache.dtype)
        if kind is None or cache.device.type != "cpu" or cache.static:
            raise Unsupported(f"cache {cache.dtype} on {cache.device}")
        if cache.window != self.window or len(cache.keys) != len(self.layers):
            raise Unsupported("cache of another model")
        m = self.model
        m.cache_kind = kind
        m.capacity, m.ring, m.rows = cache.capacity, cache.ring, cache.batch
        for t in (cache.global_pos, cache.local_pos, *cache.keys, *cache.values):
            if not t.is_contiguous():
                raise Unsupported("non-contiguous cache")
        m.pos_table[0], m.pos_table[1] = cache.local_pos.data_ptr(), cache.global_pos.data_ptr()
        for L, local, k, v in zip(
            self.layers, cache.is_local, cache.keys, cache.values, strict=True
        ):
            if (L.window > 0) != local or k.shape[1:] != (m.kv_heads, k.shape[2], m.head_dim):
                raise Unsupported("cache layout differs from the model")
            L.k_cache, L.v_cache, L.slots = k.data_ptr(), v.data_ptr(), k.shape[2]
        self.cache = cache

    def pack(self) -> int:
        """Give the C GEMM (batches of 6+ rows) copies of the float32 / bfloat16 projection and
        head weights in its streaming layout (kernels.pack); returns the bytes added.

        The copies follow the weights: `step` packs again after an optimizer step over them or
        any in-place write that bumps their version counter (copy_, mul_ under no_grad,
        load_state_dict). Writes through `.data` bypass both and are not seen.
        """
        if self.pack_refused:
            return 0
        if self.packed is None or self.packed_stale or self._versions_changed():
            need = self._pack_bytes()
            avail = _available_memory()
            if self.packed is None and avail is not None and need > avail // 2:
                self.pack_refused = (
                    f"packing the weights for batched decode needs {need / 2**20:.0f} MiB, more "
                    f"than half of the {avail / 2**20:.0f} MiB available: the GEMM reads them "
                    "in place"
                )
                warnings.warn(self.pack_refused, stacklevel=2)
                return 0
            self.packed, self.packed_stale, self._packed_versions = [], False, []
            for lin, i, spec in self._packable():
                t = kernels.pack(spec)
                self.packed.append(t)
                lin.P[i] = t.data_ptr()
                src = spec.tensors[0]
                self._packed_versions.append((src, src._version, src.data_ptr()))
            _PACKED.add(self)
            if not _HOOK:
                _HOOK.append(_optim.register_optimizer_step_post_hook(_after_optimizer_step))
        return sum(t.numel() * t.element_size() for t in self.packed)

    def _packable(self) -> list[tuple[_Linear, int, kernels.WeightSpec]]:
        """(linear, index, spec) of every weight `pack` copies (float32 / bfloat16 kinds)."""
        return [(lin, i, spec) for lin, specs in self.linears if lin.kind in kernels.PACKABLE
                for i, spec in enumerate(specs)]  # fmt: skip

    def _pack_bytes(self) -> int:
        """Bytes of the packed copies `pack` makes."""
        total = 0
        for _, _, spec in self._packable():
            numel, dtype = kernels.packed_shape(spec)
            total += numel * dtype.itemsize
        return total

    def _unpack(self) -> None:
        """Drop the packed copies: the GEMM reads the weights in place again."""
        for lin, _ in self.linears:
            for i in range(lin.nw):
                lin.P[i] = None
        self.packed, self.packed_stale, self._packed_versions = None, False, []
        _PACKED.discard(self)

    def _versions_changed(self) -> bool:
        """True when a packed weight was written in place (or re-pointed) since packing."""
        return any(t._version != v or t.data_ptr() != p for t, v, p in self._packed_versions)

    def step(self, ids: list[int], pos: list[int], cache, pack: bool = True) -> torch.Tensor:
        """Feed token ids[b] at position pos[b] to cache row b; logits (B, V) float32 (`run`
        with one token per row)."""
        B = len(ids)
        return self.run(range(B), ids, pos, cache, range(B), pack)

    def run(
        self,
        rows: Sequence[int],
        ids: Sequence[int],
        pos: Sequence[int],
        cache,
        want: Sequence[int],
        pack: bool = True,
    ) -> torch.Tensor:
        """Flattened tokens: token i -> cache row rows[i] at position pos[i]; logits (len(want), V)
        float32 of the tokens at indices `want` (in that order).

        A row's tokens are contiguous in the list with consecutive positions that continue what
        the row holds (any number: chunks longer than the ring too); decode rows (one token) and
        prefill rows mix freely. One `geode_run` per RUN_MAX_TOKENS tokens. pack: at
        kernels.GEMM_MIN_ROWS or more tokens, `pack` the float weights for the GEMM.
        """
        n = len(ids)
        if len(rows) != n or len(pos) != n:
            raise ValueError(f"rows, ids, positions differ in length: {len(rows)}, {n}, {len(pos)}")
        want_t = torch.as_tensor(list(want), dtype=torch.long)  # (W,)
        if want_t.numel() and (want_t.min() < 0 or want_t.max() >= n):
            raise ValueError(f"want indices {list(want)} outside the {n} tokens")
        if cache is not self.cache:
            self.bind(cache)
        if pack and n >= kernels.GEMM_MIN_ROWS:
            self.pack()
        elif self.packed is not None and (self.packed_stale or self._versions_changed()):
            self._unpack()
        lib = kernels.load()
        ptr = ctypes.byref(self.model)
        logits = torch.empty(want_t.numel(), self.vocab, dtype=torch.float32)
        threads = kernels._threads[0] or torch.get_num_threads()
        rows_t = torch.as_tensor(list(rows), dtype=torch.int32)
        ids_t = torch.as_tensor(list(ids), dtype=torch.int64)
        pos_t = torch.as_tensor(list(pos), dtype=torch.int64)
        for c0 in range(0, n, RUN_MAX_TOKENS):
            c1 = min(n, c0 + RUN_MAX_TOKENS)
            mine = ((want_t >= c0) & (want_t < c1)).nonzero().flatten()  # into want / logits
            local = (want_t[mine] - c0).to(torch.int32).contiguous()
            out = torch.empty(local.numel(), self.vocab, dtype=torch.float32)
            need = lib.geode_run_workspace(ptr, c1 - c0)
            if self.work.numel() < need:
                self.work = torch.empty(need, dtype=torch.float32)
            r, i, p = rows_t[c0:c1], ids_t[c0:c1], pos_t[c0:c1]
            rc = lib.geode_run(
                ptr, c1 - c0, r.data_ptr(), i.data_ptr(), p.data_ptr(), local.numel(),
                local.data_ptr(), out.data_ptr(), self.work.data_ptr(), threads,
            )  # fmt: skip
            if rc != 0:
                raise ValueError(
                    f"native run failed ({rc}): rows {r.tolist()}, ids {i.tolist()}, positions "
                    f"{p.tolist()} (a row's tokens must be adjacent with consecutive positions "
                    f"below the capacity {cache.capacity}, rows below {cache.batch}, ids below "
                    f"{self.vocab})"
                )
            logits[mine] = out
        return logits


class NativeRunner:
    """The engine's `Runner` over `NativeDecoder`: run(rows, ids[B,T], positions[B,T], cache)."""

    def __init__(self, decoder: NativeDecoder):
        self.decoder = decoder

    @classmethod
    def build(cls, model: Transformer) -> NativeRunner | None:
        """The runner for this model, or None when the native path cannot run it (`why_not`)."""
        dec = NativeDecoder.build(model)
        return None if dec is None else cls(dec)

    @staticmethod
    def why_not(model: Transformer) -> str | None:
        """Why the native path cannot run this model (None: it can)."""
        return NativeDecoder.why_not(model)

    def run(
        self,
        rows: Sequence[int],
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache,
        select: torch.Tensor | None = None,
        pack: bool = True,
    ) -> torch.Tensor:
        """ids, positions (B, T) for cache rows `rows` (positions -1: padding) -> logits float32
        (B, T, V), or (B, K, V) for the columns select (B, K) (padding columns: zeros).
        pack: as in NativeDecoder.run."""
        B, T = ids.shape
        if positions.shape != (B, T) or len(rows) != B:
            raise ValueError(
                f"ids {tuple(ids.shape)}, positions {tuple(positions.shape)} and {len(rows)} rows "
                "disagree"
            )
        if len(set(rows)) != B:
            raise ValueError(f"rows {list(rows)} repeat a cache row")
        valid = positions.cpu() >= 0  # (B, T)
        counts = valid.sum(1)  # (B,)
        flat_rows = torch.repeat_interleave(torch.as_tensor(list(rows)), counts).tolist()
        flat_ids = ids.cpu()[valid].tolist()
        flat_pos = positions.cpu()[valid].tolist()
        index = torch.cumsum(valid.flatten(), 0).view(B, T) - 1  # flat index of (b, t)
        V = self.decoder.vocab
        if select is None:
            cols = torch.arange(T).expand(B, T)
        else:
            cols = select.cpu().long()
            if cols.dim() != 2 or cols.shape[0] != B or (cols < 0).any() or (cols >= T).any():
                raise ValueError(f"select {tuple(select.shape)} must be (B, K) columns below {T}")
        K = cols.shape[1]
        picked = valid.gather(1, cols)  # (B, K): selected columns that hold a token
        # a column selected twice (select rows padded by repeating one) is computed once
        want, again = torch.unique(index.gather(1, cols)[picked], return_inverse=True)
        out = torch.zeros(B, K, V, dtype=torch.float32)
        if flat_ids:
            logits = self.decoder.run(flat_rows, flat_ids, flat_pos, cache, want.tolist(), pack)
            out[picked] = logits[again]
        return out
