"""Prefix caching: reuse the KV of the longest cached prefix of a new prompt.

A prompt is cut into blocks of `block` token ids. Block j is named by a chain hash of (the name
of block j-1, its tokens), so a name stands for the whole prefix up to the block's end (as in
vLLM's automatic prefix caching). Each cached block holds every layer's keys and values for its
positions, global and local layers alike, so the blocks of a prefix [0, n) rebuild what a cold
prefill of [0, n) leaves in a `HybridCache` row: global slots 0..n-1 and the local ring's last
R positions (any R: the ring size of the cache restored into may differ from the one stored
from).

    n, handle = prefix.match(prompt)          # longest cached block-aligned prefix, n < len
    prefix.restore(handle, cache, row)        # the row now holds [0, n) as if prefilled
    ... prefill prompt[n:] in chunks, after each: prefix.insert(prompt, cache, row, start, end)

A row's local ring holds only its last R positions, so `insert` stores a block only while the
row still holds all of its positions; it is called after every prefill chunk, and with
block-aligned chunks of at most R tokens every block is stored. The cached blocks form a tree
(a block is stored only under its cached parent); eviction removes least-recently-used leaves
until the blocks' bytes fit `max_bytes`, so every cached block's prefix stays cached.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import HybridCache


@dataclass(eq=False)
class _Block:
    """One cached block: its chain name, parent's name, tokens and K/V (2, L, H_kv, block, D)."""

    name: int
    parent: int | None
    tokens: tuple[int, ...]
    kv: torch.Tensor
    children: int = 0
    used: int = 0  # logical clock of the last match/insert touching it

    @property
    def nbytes(self) -> int:
        """Bytes of the block's keys and values."""
        return self.kv.numel() * self.kv.element_size()


@dataclass
class PrefixMatch:
    """What `PrefixCache.match` found: the chain of blocks of a prefix of `n` tokens."""

    n: int
    blocks: list[_Block] = field(default_factory=list)


class PrefixCache:
    """Chain-hashed blocks of `block` tokens with every layer's K/V, LRU-evicted by bytes."""

    def __init__(self, max_bytes: int, block: int = 16):
        if max_bytes < 0:
            raise ValueError(f"prefix cache max_bytes must be >= 0, got {max_bytes}")
        if block < 1:
            raise ValueError(f"prefix cache block must be >= 1 token, got {block}")
        self.max_bytes = max_bytes
        self.block = block
        self.clear()

    def clear(self) -> None:
        """Drop every block and reset the counters."""
        self._blocks: dict[int, _Block] = {}
        self._leaves: list[tuple[int, int]] = []  # heap of (used, name); stale entries skipped
        self._clock = 0
        self._bytes = 0
        self._counts = dict(hits=0, misses=0, hit_tokens=0, evictions=0)

    @property
    def stats(self) -> dict[str, int]:
        """hits / misses (matches with / without a cached prefix), hit_tokens, bytes, blocks,
        evictions."""
        return {**self._counts, "bytes": self._bytes, "blocks": len(self._blocks)}

    # ------------------------------------------------------------------ lookup
    def _chain(self, tokens: list[int], n_blocks: int) -> Iterator[tuple[int, tuple[int, ...]]]:
        """(name, tokens) of the first n_blocks blocks of `tokens`, lazily (lookups stop early)."""
        parent, b = None, self.block
        for j in range(n_blocks):
            toks = tuple(tokens[j * b : (j + 1) * b])
            parent = hash((parent, toks))
            yield parent, toks

    def _get(self, name: int, parent: int | None, toks: tuple[int, ...]) -> _Block | None:
        """The cached block of that name and content (a hash collision is a miss)."""
        blk = self._blocks.get(name)
        if blk is None or blk.tokens != toks or blk.parent != parent:
            return None
        return blk

    def _touch(self, blk: _Block) -> None:
        """Mark a block used now."""
        self._clock += 1
        blk.used = self._clock
        if blk.children == 0:
            heapq.heappush(self._leaves, (blk.used, blk.name))
            if len(self._leaves) > 2 * len(self._blocks) + 64:  # drop the stale entries
                self._leaves = [(b.used, b.name) for b in self._blocks.values() if not b.children]
                heapq.heapify(self._leaves)

    def match(self, tokens: list[int] | torch.Tensor) -> tuple[int, PrefixMatch]:
        """(n_cached, handle): the longest cached block-aligned prefix with n_cached <=
        len(tokens) - 1 (one token must still run to give logits)."""
        tokens = _as_list(tokens)
        found, parent = [], None
        for name, toks in self._chain(tokens, max(0, len(tokens) - 1) // self.block):
            blk = self._get(name, parent, toks)
            if blk is None:
                break
            found.append(blk)
            parent = name
        for blk in found:  # parents first: a child is always more recent than its parent
            self._touch(blk)
        n = len(found) * self.block
        self._counts["hits" if n else "misses"] += 1
        self._counts["hit_tokens"] += n
        return n, PrefixMatch(n, found)

    # ------------------------------------------------------------------ restore / insert
    def restore(self, handle: PrefixMatch, cache: HybridCache, row: int) -> int:
        """Write a matched prefix into `row` (global slots p, ring slots p mod R of the last R
        positions, slot tables); the row is then exactly as if [0, n) had been prefilled."""
        cache.write_kv(row, [b.kv for b in handle.blocks])  # blocks (2, L, Hkv, block, D)
        return handle.n

    def insert(
        self, tokens: list[int] | torch.Tensor, cache: HybridCache, row: int, start: int, end: int
    ) -> int:
        """Store the complete blocks inside [0, end) of `tokens` (what `row` holds) that are not
        cached yet and whose positions the row still holds; returns the number stored.

        Called after each prefill chunk [start, end): blocks ending after `start` are new; earlier
        ones are stored again only if they were evicted meanwhile (and are still held).
        """
        tokens = _as_list(tokens)
        if not 0 <= start <= end <= len(tokens):
            raise ValueError(
                f"prefix insert range [{start}, {end}) is outside the {len(tokens)} tokens"
            )
        have = cache.length(row)
        if end > have:
            raise ValueError(f"prefix insert up to {end} but cache row {row} holds {have} tokens")
        n_blocks = end // self.block
        if n_blocks == 0 or self.max_bytes == 0:
            return 0
        held = cache.held(row, n_blocks * self.block).view(n_blocks, self.block).all(1)
        held = held.tolist()
        new, parent = [], None  # new: (index, name, parent's name, tokens) of blocks to store
        for j, (name, toks) in enumerate(self._chain(tokens, n_blocks)):
            blk = self._get(name, parent, toks)
            if blk is not None and not new:
                self._touch(blk)
            elif blk is None and held[j] and name not in self._blocks:
                new.append((j, name, parent, toks))
            else:  # gone from the ring (children cannot chain), or a hash collision
                break
            parent = name
        if not new:
            return 0
        b, j0 = self.block, new[0][0]
        kv = cache.read_kv(row, j0 * b, (new[-1][0] + 1) * b)  # (2, L, Hkv, m * b, D)
        stored = 0
        for j, name, parent, toks in new:
            blk = _Block(name, parent, toks, kv[:, :, :, (j - j0) * b : (j - j0 + 1) * b].clone())
            if not self._make_room(blk):
                break
            self._add(blk)
            stored += 1
        return stored

    # ------------------------------------------------------------------ eviction
    def _add(self, blk: _Block) -> None:
        """Put a block under its (cached) parent."""
        self._blocks[blk.name] = blk
        self._bytes += blk.nbytes
        if blk.parent is not None:
            self._blocks[blk.parent].children += 1
        self._touch(blk)

    def _make_room(self, blk: _Block) -> bool:
        """Evict least-recently-used leaves until `blk` fits; False if it cannot (it alone is too
        big, or only its own parent is left to evict)."""
        if blk.nbytes > self.max_bytes:
            return False
        while self._bytes + blk.nbytes > self.max_bytes:
            victim = self._oldest_leaf()
            if victim is None or victim.name == blk.parent:
                return False
            heapq.heappop(self._leaves)
            self._evict(victim)
        return True

    def _oldest_leaf(self) -> _Block | None:
        """The least recently used block without cached children (stale heap entries dropped)."""
        while self._leaves:
            used, name = self._leaves[0]
            blk = self._blocks.get(name)
            if blk is not None and blk.children == 0 and blk.used == used:
                return blk
            heapq.heappop(self._leaves)
        return None

    def _evict(self, blk: _Block) -> None:
        """Remove a leaf; its parent may become a leaf."""
        del self._blocks[blk.name]
        self._bytes -= blk.nbytes
        self._counts["evictions"] += 1
        if blk.parent is not None:
            parent = self._blocks[blk.parent]
            parent.children -= 1
            if parent.children == 0:
                heapq.heappush(self._leaves, (parent.used, parent.name))


def _as_list(tokens: list[int] | torch.Tensor) -> list[int]:
    """Token ids as a list of ints."""
    return tokens.tolist() if isinstance(tokens, torch.Tensor) else list(map(int, tokens))
