"""The engine's cache: per layer the state its token mixer needs, for every family.

Each layer's state comes from its family's factory (`geode.family.layer_states`): keys and
values for global attention, a ring of keys and values for local attention, nothing for a
Gemma 4 kv-shared layer (it attends to its source layer's K/V, handed over within the forward),
and for RecurrentGemma's recurrent layers the conv window (the last conv1d_width - 1 inputs)
and the RG-LRU state h (float32), a constant size per row (`recurrent`).

For K/V: Gemma 3 interleaves local layers (attend to the last W = `sliding_window` positions) with
global layers (attend to everything). A local layer never needs more than W keys, so it keeps a
ring buffer of R = min(capacity, W + slack) slots: position p lives in slot p mod R. Global
layers keep `capacity` slots per sequence, position p in slot p. Memory of one sequence of n
tokens:

    bytes(n) = 2 * H_kv * D * b * (L_global * n + L_local * min(n, W + slack))

(2 = keys and values, b = bytes per element); per layer its own H_kv and D (Gemma 4's full
layers), plus a constant per recurrent layer. `kv_cache_bytes` is the one definition of this
formula (`geode.family.state_bytes`); `geode info` prints it and `HybridCache.nbytes` equals it
for a one-row cache.

Slack is what makes `rollback` possible (speculative decoding forgets rejected draft tokens):
after rolling a row back to length m its next tokens need the window [m - W, m) of local keys,
and a ring of exactly W slots has already overwritten the oldest of them. A ring of W + s slots
still holds them for a rollback of up to s positions (`max_rollback`). `fork` copies a row into
others (n samples of one prompt share its prefill), recurrent states included. A recurrence
cannot be rolled back (its state holds no history), so `rollback`, `read_kv` and `write_kv`
(speculative decoding, the prefix cache) refuse a cache with recurrent layers, naming the family.

The cache implements the model's `KVCache` protocol (geode/model/attention.py): `update` stores
one layer's new keys/values and returns every key the new queries may attend to with the
absolute position of each returned slot (-1 = empty); the model builds the mask from positions,
so the ring buffer may return its slots in any order.

Rows are sequences. The engine keeps its running sequences in rows 0..B-1 (compacting with
`move_row` when one leaves) so a decode step of B sequences works on views of the first B rows
and never copies the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checkpoint import parse_dtype
from ..config import FULL, RECURRENT, SLIDING, ModelConfig
from ..family import SHARED, layer_states, state_bytes
from ..model.recurrent import RecurrentState


def kv_cache_bytes(
    config: ModelConfig,
    n_tokens: int,
    dtype: torch.dtype | str = torch.bfloat16,
    ring_buffer: bool = True,
    slack: int = 0,
) -> int:
    """Cache bytes of one sequence of n tokens, any family (the module docstring's formula).

    bytes(n) = 2 * H_kv * D * b * (L_global * n + L_local * m), m = min(n, W + slack) with a
    ring buffer for local layers and m = n without (per layer its own H_kv, D; kv-shared layers
    nothing), + (conv1d_width - 1) * W * b + 4 W per recurrent layer, whatever n.
    """
    return state_bytes(config, n_tokens, parse_dtype(dtype), ring_buffer, slack=slack)


def recurrent_refusal(config: ModelConfig, feature: str) -> str | None:
    """Why `feature` (which needs positional rollback) cannot run this model, or None."""
    if RECURRENT not in config.layer_types:
        return None
    return (
        f"{feature} is not supported for family {config.family!r}: its recurrent layers keep "
        "one state per row, which cannot be rolled back to an earlier position"
    )


def kv_block_refusal(config: ModelConfig, feature: str) -> str | None:
    """Why `feature` cannot copy blocks of K/V (2, L, H_kv, n, D) in and out of a row, or None:
    it needs every layer to own K/V of one shape and no recurrent layer."""
    why = recurrent_refusal(config, feature)
    shapes = {(s.kind == SHARED, s.kv_heads, s.head_dim) for s in layer_states(config)}
    if why is None and len(shapes) > 1:
        why = (
            f"{feature} is not supported for family {config.family!r}: its layers' K/V differ "
            "in shape or are shared between layers"
        )
    return why


class HybridCache:
    """Preallocated cache of `batch` rows x `capacity` positions (see module docstring).

    Global layers: keys/values (batch, H_kv, capacity, D), position p in slot p.
    Local layers: keys/values (batch, H_kv, R, D), R = min(capacity, W + slack), position p in
    slot p mod R (with ring_buffer=False, R = capacity and slot p, as a baseline).
    kv-shared and recurrent layers: keys/values None. Recurrent layers: `conv` (batch, W,
    conv1d_width - 1) in the cache dtype and `lru` (batch, W) float32 (None elsewhere).
    Slot positions: `global_pos` (batch, capacity) and `local_pos` (batch, R), -1 = empty,
    shared by all layers of a kind (every layer stores the same positions).

    `static=True` (CUDA graphs): single-token steps return full-size views and never read
    tensors on the host; multi-token (prefill) steps work as usual.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        ring_buffer: bool = True,
        static: bool = False,
        slack: int = 0,
    ):
        if batch <= 0 or capacity <= 0:
            raise ValueError(f"cache needs batch > 0 and capacity > 0, got {batch}, {capacity}")
        if slack < 0:
            raise ValueError(f"cache slack must be >= 0, got {slack}")
        self.config = config
        self.batch = batch
        self.capacity = capacity
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.ring_buffer = ring_buffer
        self.static = static
        self.slack = slack
        self.window = config.sliding_window
        self.ring = min(capacity, self.window + slack) if ring_buffer else capacity
        self.is_local = [t == SLIDING for t in config.layer_types]
        self.states = layer_states(config)
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.conv: list[torch.Tensor | None] = []
        self.lru: list[torch.Tensor | None] = []
        for st in self.states:
            kv = conv = lru = None
            if st.kind in (FULL, SLIDING):
                slots = self.ring if st.kind == SLIDING else capacity
                kv = (batch, st.kv_heads, slots, st.head_dim)
            elif st.kind == RECURRENT:
                conv = torch.zeros(batch, st.width, st.conv - 1, dtype=dtype, device=self.device)
                lru = torch.zeros(batch, st.width, dtype=torch.float32, device=self.device)
            for out in (self.keys, self.values):
                out.append(None if kv is None else torch.zeros(kv, dtype=dtype, device=self.device))
            self.conv.append(conv)
            self.lru.append(lru)
        kw = dict(dtype=torch.long, device=self.device)
        self.global_pos = torch.full((batch, capacity), -1, **kw)  # (batch, capacity)
        self.local_pos = torch.full((batch, self.ring), -1, **kw)  # (batch, R)
        self._last_layer = len(self.is_local)  # > any layer: the next update starts a forward
        self._step: dict[str, object] = {}

    # ------------------------------------------------------------------ facts
    def tensors(self) -> list[torch.Tensor]:
        """Every per-row state tensor (keys, values, recurrent conv and h), each (batch, ...)."""
        return [t for t in self.keys + self.values + self.conv + self.lru if t is not None]

    def _kv(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(layer, keys, values) of the layers that own K/V."""
        return [(i, k, v) for i, (k, v) in enumerate(zip(self.keys, self.values)) if k is not None]

    @property
    def nbytes(self) -> int:
        """Bytes held by the layers' states (positions are bookkeeping, not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _refuse(self, feature: str) -> None:
        """ValueError naming the family when `feature` needs a rollback the states cannot do."""
        why = recurrent_refusal(self.config, feature)
        if why is not None:
            raise ValueError(why)

    def length(self, row: int) -> int:
        """Number of positions stored in a row (1 + its largest position, 0 when empty)."""
        self._check_row(row)
        return int(self.global_pos[row].max().item()) + 1

    row_length = length  # the name before fork/rollback

    def max_rollback(self, row: int) -> int:
        """The most positions `rollback(row, k)` can forget (see the module docstring).

        Rolling back to length m needs the local window [m - W, m) in the ring; the ring holds
        the contiguous run [lo, L) of positions below the row's length L (lo = 0: nothing
        overwritten yet, any rollback works), so the limit is L - (lo + W).
        """
        n = self.length(row)
        if recurrent_refusal(self.config, "rollback"):
            return 0
        lo = self._ring_start(row, n)
        if lo == 0 or not any(self.is_local):
            return n
        return max(0, n - lo - self.window)

    def _ring_start(self, row: int, n: int) -> int:
        """Smallest lo such that the ring of `row` holds every position in [lo, n)."""
        held = self.local_pos[row]
        held = held[held >= 0].sort(descending=True).values  # (h,)
        want = n - 1 - torch.arange(held.numel(), device=held.device)  # n-1, n-2, ...
        run = int((held == want).long().cumprod(0).sum().item())  # leading matches
        return n - run

    # ------------------------------------------------------------------ rows
    def _check_row(self, row: int) -> None:
        """ValueError unless `row` names one of this cache's rows."""
        if not 0 <= row < self.batch:
            raise ValueError(f"row {row} is outside the cache's rows 0..{self.batch - 1}")

    def fork(self, row: int, n: int, to: int) -> list[int]:
        """Copy row `row` into rows to..to+n-1 (n samples share one prefill); those rows."""
        self._check_row(row)
        if n < 0:
            raise ValueError(f"fork needs n >= 0 copies, got {n}")
        dst = list(range(to, to + n))
        if n and (to < 0 or to + n > self.batch):
            raise ValueError(
                f"fork of row {row} into rows {to}..{to + n - 1}: outside the cache's rows "
                f"0..{self.batch - 1}"
            )
        if row in dst:
            raise ValueError(f"fork of row {row} into rows {to}..{to + n - 1} overlaps the source")
        if not n:
            return dst
        length = self.length(row)
        for i, k, v in self._kv():
            used = k.shape[2] if self.is_local[i] else length  # global slots >= length: nothing
            for t in (k, v):
                t[to : to + n, :, :used] = t[row, :, :used]  # (n, Hkv, used, D) <- (Hkv, used, D)
        for t in self.conv + self.lru:
            if t is not None:
                t[to : to + n] = t[row]  # the recurrent state: (n, W[, k-1]) <- (W[, k-1])
        self.global_pos[to : to + n] = self.global_pos[row]
        self.local_pos[to : to + n] = self.local_pos[row]
        return dst

    def rollback(self, row: int, k: int) -> None:
        """Forget the last k positions of `row` (rejected draft tokens); see `max_rollback`."""
        n = self.length(row)
        if k < 0 or k > n:
            raise ValueError(f"rollback of row {row} by k={k}: k must be in 0..{n} (its length)")
        limit = self.max_rollback(row)
        if k > limit and not recurrent_refusal(self.config, "rollback"):
            raise ValueError(
                f"rollback of row {row} by k={k} exceeds its limit of {limit}: the local ring "
                f"({self.ring} slots, window {self.window}) has overwritten positions the window "
                f"of position {n - k - 1} needs (create the cache with slack >= {k})"
            )
        if k == 0:
            return
        self._refuse("rollback")
        m = n - k
        g, loc = self.global_pos[row], self.local_pos[row]  # views: (capacity,), (R,)
        g[g >= m] = -1
        loc[loc >= m] = -1

    def held(self, row: int, n: int) -> torch.Tensor:
        """(n,) bool: position p < n is stored in `row` (global slot p and, with local layers,
        its ring slot: the ring keeps only the last R positions)."""
        self._check_row(row)
        pos = torch.arange(n, device=self.device)  # (n,)
        ok = self.global_pos[row, :n] == pos
        if any(self.is_local):
            ok &= self.local_pos[row, pos % self.ring] == pos
        return ok.cpu()

    def read_kv(self, row: int, start: int, stop: int) -> torch.Tensor:
        """Every layer's keys and values of positions [start, stop) of `row` (which must hold
        them, see `held`): (2, L, H_kv, stop - start, D), 2 = keys, values."""
        self._check_row(row)
        k0 = self._uniform_kv("reading a row's K/V (the prefix cache)")
        out = k0.new_empty((2, len(self.keys), k0.shape[1], stop - start, k0.shape[3]))
        slots = torch.arange(start, stop, device=self.device) % self.ring  # (stop - start,)
        for i, local in enumerate(self.is_local):
            for j, t in enumerate((self.keys[i], self.values[i])):
                out[j, i] = t[row][:, slots] if local else t[row, :, start:stop]
        return out

    def write_kv(self, row: int, kv: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Make `row` hold positions [0, n) with keys and values kv (2, L, H_kv, n, D), or with
        consecutive chunks of it, as a prefill of them leaves it: global slots p, ring slots
        p mod R of the last R positions (only those are copied). Row unchanged on error."""
        self._check_row(row)
        chunks = [kv] if isinstance(kv, torch.Tensor) else list(kv)
        k0 = self._uniform_kv("writing a row's K/V (the prefix cache)")
        want = (2, len(self.keys), k0.shape[1], k0.shape[3])
        for c in chunks:
            if c.dim() != 5 or (c.shape[0], c.shape[1], c.shape[2], c.shape[4]) != want:
                raise ValueError(
                    f"K/V of shape {tuple(c.shape)} does not fit a cache of (2, layers, kv "
                    f"heads, positions, head dim) = (2, {want[1]}, {want[2]}, n, {want[3]})"
                )
            if c.dtype != self.dtype:
                raise ValueError(f"K/V in {c.dtype} does not fit a cache in {self.dtype}")
        n = sum(c.shape[3] for c in chunks)
        if n > self.capacity:
            raise ValueError(f"{n} positions do not fit the cache's capacity of {self.capacity}")
        lo = max(0, n - self.ring)  # the ring keeps positions [lo, n)
        p0 = 0
        for c in chunks:
            p1 = p0 + c.shape[3]
            c = c.to(self.device)
            a = min(max(p0, lo), p1)  # this chunk's positions [a, p1) go to the ring
            slots = torch.arange(a, p1, device=self.device) % self.ring  # (p1 - a,)
            for i, local in enumerate(self.is_local):
                for j, t in enumerate((self.keys[i], self.values[i])):
                    if not local:
                        t[row, :, p0:p1] = c[j, i]  # (Hkv, p1 - p0, D)
                    elif a < p1:
                        t[row][:, slots] = c[j, i, :, a - p0 :]  # (Hkv, p1 - a, D)
            p0 = p1
        self.reset_rows(row)
        pos = torch.arange(n, device=self.device)  # (n,)
        self.global_pos[row, :n] = pos
        self.local_pos[row, pos[lo:] % self.ring] = pos[lo:]

    def _uniform_kv(self, what: str) -> torch.Tensor:
        """The first layer's keys, after checking blocks of every layer's K/V can be moved."""
        why = kv_block_refusal(self.config, what)
        if why is not None:
            raise ValueError(why)
        return self.keys[0]  # type: ignore[return-value]

    def reset_rows(self, rows: slice | list[int] | int | None = None) -> None:
        """Mark rows empty (all rows when None); keys/values are left as garbage, masked out,
        recurrent states zeroed (the state before a sequence's first token)."""
        rows = slice(None) if rows is None else rows
        self.global_pos[rows] = -1
        self.local_pos[rows] = -1
        for t in self.conv + self.lru:
            if t is not None:
                t[rows] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (the engine compacts running sequences this way)."""
        if src == dst:
            return
        for t in (*self.tensors(), self.global_pos, self.local_pos):
            t[dst].copy_(t[src])

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange rows a and b, every state and slot table."""
        for t in (*self.tensors(), self.global_pos, self.local_pos):
            tmp = t[a].clone()
            t[a].copy_(t[b])
            t[b].copy_(tmp)

    def resized(self, batch: int, capacity: int, rows: int) -> HybridCache:
        """A new cache of the given size holding the first `rows` rows of this one."""
        if capacity < self.capacity and rows and self.global_pos[:rows].max() >= capacity:
            raise ValueError("cannot shrink the capacity below a stored position")
        new = HybridCache(
            self.config,
            batch,
            capacity,
            self.dtype,
            self.device,
            self.ring_buffer,
            self.static,
            self.slack,
        )
        rows = min(rows, batch)
        if rows:
            c = min(capacity, self.capacity)
            r = min(new.ring, self.ring)
            if new.ring != self.ring and self.local_pos[:rows].max() >= r:
                raise ValueError("cannot change the ring size after it has wrapped around")
            for i, k, v in self._kv():
                n = r if self.is_local[i] else c
                new.keys[i][:rows, :, :n] = k[:rows, :, :n]
                new.values[i][:rows, :, :n] = v[:rows, :, :n]
            for mine, theirs in zip(self.conv + self.lru, new.conv + new.lru, strict=True):
                if mine is not None:
                    theirs[:rows] = mine[:rows]
            new.global_pos[:rows, :c] = self.global_pos[:rows, :c]
            new.local_pos[:rows, :r] = self.local_pos[:rows, :r]
        return new

    def rows(self, start: int, stop: int) -> HybridCache:
        """A cache over rows [start, stop) sharing this one's storage (prefill of one sequence)."""
        view = object.__new__(HybridCache)
        view.__dict__.update(self.__dict__)
        view.batch = stop - start
        for name in ("keys", "values", "conv", "lru"):
            setattr(view, name, [None if t is None else t[start:stop] for t in getattr(self, name)])
        view.global_pos = self.global_pos[start:stop]
        view.local_pos = self.local_pos[start:stop]
        view._last_layer = len(self.is_local)
        view._step = {}
        return view

    # ------------------------------------------------------------------ the KVCache protocol
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, T, D) at positions (B, T) -> keys, values (B, Hkv, S, D), key_pos (B, S).

        Rows 0..B-1 of the cache are used. Positions < 0 mark padding: never stored.
        """
        self._enter(layer, positions)
        if self.is_local[layer]:
            return self._update_local(layer, k, v, positions)
        return self._update_global(layer, k, v, positions)

    def recurrent(self, layer: int, positions: torch.Tensor) -> RecurrentState:
        """The recurrent state of `layer` for rows 0..B-1 (views: the mixer writes the new state
        into them in place); positions (B, T) as in `update`."""
        self._enter(layer, positions)
        conv, lru = self.conv[layer], self.lru[layer]
        if conv is None or lru is None:
            raise ValueError(f"layer {layer} is not a recurrent layer of this cache")
        B = positions.shape[0]
        return RecurrentState(conv[:B], lru[:B])

    def _enter(self, layer: int, positions: torch.Tensor) -> None:
        """Start a forward pass's bookkeeping at its first stateful layer (layers run in order)."""
        if layer <= self._last_layer:
            self._begin(positions)
        self._last_layer = layer

    def _begin(self, positions: torch.Tensor) -> None:
        """Per-forward bookkeeping shared by all layers (slots, lengths, position tables)."""
        B, T = positions.shape
        if B > self.batch:
            raise ValueError(f"batch of {B} rows exceeds the cache's {self.batch} rows")
        step: dict[str, object] = {"B": B, "T": T}
        if self.static and T == 1:
            # No host reads (CUDA-graph capturable): full views, where-guarded single-token writes.
            pos = positions[:, 0]  # (B,)
            valid = pos >= 0
            slot_g = pos.clamp(min=0, max=self.capacity - 1)
            slot_l = pos.clamp(min=0) % self.ring
            rows = torch.arange(B, device=pos.device)
            self.global_pos[rows, slot_g] = torch.where(valid, pos, self.global_pos[rows, slot_g])
            self.local_pos[rows, slot_l] = torch.where(valid, pos, self.local_pos[rows, slot_l])
            step.update(rows=rows, slot_g=slot_g, slot_l=slot_l, valid=valid, pad=True)
            step.update(S_g=self.capacity, S_l=self.ring)
            step.update(gpos=self.global_pos[:B], lpos=self.local_pos[:B])
            self._step = step
            return
        top = int(positions.max().item())
        if top >= self.capacity:
            raise ValueError(
                f"position {top} does not fit the cache's capacity of {self.capacity} positions"
            )
        has_pad = bool((positions < 0).any().item())
        length = max(top + 1, int(self.global_pos[:B].max().item()) + 1)  # longest row after
        step.update(pad=has_pad, S_g=length, S_l=min(length, self.ring))
        if T == 1:
            pos = positions[:, 0]  # (B,)
            valid = pos >= 0
            rows = torch.arange(B, device=pos.device)
            slot_g = pos.clamp(min=0)
            slot_l = slot_g % self.ring
            step.update(rows=rows, slot_g=slot_g, slot_l=slot_l, valid=valid)
            if B <= 4 and not has_pad:  # a few rows: plain copies beat index_put
                host = pos.tolist()
                step["host"] = [(b, p, p % self.ring) for b, p in enumerate(host)]
            if has_pad:
                gp = torch.where(valid, pos, self.global_pos[rows, slot_g])
                lp = torch.where(valid, pos, self.local_pos[rows, slot_l])
            else:
                gp = lp = pos
            self.global_pos[rows, slot_g] = gp
            self.local_pos[rows, slot_l] = lp
        else:
            # Prefill chunk: old ring contents are returned next to the chunk's own keys, then the
            # last R real tokens of each row are written to the ring (see _update_local).
            step["old_local_pos"] = self.local_pos[:B, : step["S_l"]].clone()
            writes = []  # per row: (token indices in the chunk, their positions)
            for b in range(B):
                idx = torch.nonzero(positions[b] >= 0).flatten()  # (n_b,)
                writes.append((idx, positions[b, idx]))
                self.global_pos[b, positions[b, idx]] = positions[b, idx]
                keep = idx[-self.ring :]
                self.local_pos[b, positions[b, keep] % self.ring] = positions[b, keep]
            step["writes"] = writes
            step["lpos"] = torch.cat([step["old_local_pos"], positions], dim=1)  # (B, S_l + T)
        # One key-position tensor per kind for all layers: the model reuses the mask it built.
        step["gpos"] = self.global_pos[:B, : step["S_g"]]
        if T == 1:
            step["lpos"] = self.local_pos[:B, : step["S_l"]]
        self._step = step

    def _update_global(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self._step
        B, S = s["B"], s["S_g"]
        kc, vc = self.keys[layer], self.values[layer]  # (batch, Hkv, capacity, D)
        if s["T"] == 1:
            host = s.get("host")
            if host is not None:
                for b, p, _ in host:
                    kc[b, :, p] = k[b, :, 0]
                    vc[b, :, p] = v[b, :, 0]
            else:
                self._write_one(kc, vc, k, v, s["slot_g"])
        else:
            for b, (idx, pos) in enumerate(s["writes"]):
                kc[b, :, pos] = k[b, :, idx]
                vc[b, :, pos] = v[b, :, idx]
        return kc[:B, :, :S], vc[:B, :, :S], s["gpos"]

    def _update_local(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self._step
        B, S = s["B"], s["S_l"]
        kc, vc = self.keys[layer], self.values[layer]  # (batch, Hkv, R, D)
        if s["T"] == 1:
            # Write first: the slot overwritten held position p - R, outside the window of p.
            host = s.get("host")
            if host is not None:
                for b, _, slot in host:
                    kc[b, :, slot] = k[b, :, 0]
                    vc[b, :, slot] = v[b, :, 0]
            else:
                self._write_one(kc, vc, k, v, s["slot_l"])
            return kc[:B, :, :S], vc[:B, :, :S], s["lpos"]
        # A chunk of T tokens: queries need the old ring (earlier positions) and the chunk itself;
        # writing first could overwrite keys that early queries of the chunk still see.
        keys = torch.cat([kc[:B, :, :S], k], dim=2)  # (B, Hkv, S + T, D)
        values = torch.cat([vc[:B, :, :S], v], dim=2)
        key_pos = s["lpos"]  # (B, S + T): old ring positions, then the chunk's
        for b, (idx, pos) in enumerate(s["writes"]):
            keep = idx[-self.ring :]
            slots = pos[-self.ring :] % self.ring
            kc[b, :, slots] = k[b, :, keep]
            vc[b, :, slots] = v[b, :, keep]
        return keys, values, key_pos

    def _write_one(
        self,
        kc: torch.Tensor,
        vc: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """Store one token per row: kc[b, :, slots[b]] = k[b, :, 0] (padding rows unchanged)."""
        s = self._step
        rows = s["rows"]
        k1, v1 = k[:, :, 0], v[:, :, 0]  # (B, Hkv, D)
        if s["pad"]:
            keep = s["valid"][:, None, None]
            k1 = torch.where(keep, k1, kc[rows, :, slots])
            v1 = torch.where(keep, v1, vc[rows, :, slots])
        kc[rows, :, slots] = k1.to(kc.dtype)
        vc[rows, :, slots] = v1.to(vc.dtype)
