"""The training loader: packed sequences from prepared streams; deterministic and resumable.

Each stream (one per source) is read as one long array of N tokens cut into S = (N-1) // T
windows of T+1 tokens, window i covering tokens [i*T, i*T + T]: consecutive windows share one
token, so every token but the first is a target exactly once per epoch. Windows are
visited in a fresh permutation each epoch, and epochs follow each other without a break:
the k-th window a stream serves is window perm_e[k mod S] with e = k // S.

A global batch is B * world_size rows. Row j of global batch `step` comes from the source
the mixture draws for it (mixture.py; always source 0 with a single source); the k-th row
any rank takes from a source gets that source's k-th window. Rank r keeps rows
[r*B, (r+1)*B). So ranks never share a window within an epoch, and together they cover every
window of a stream exactly once per epoch. The whole state is the step and one counter per
source (`state_dict()`); restoring it on any rank replays the same batches.

Documents are packed back to back; each row carries `positions` that restart at 0 at every
document start (and at the row start) and `segment_ids` numbering the documents in the row,
which the model uses to keep attention inside a document, and `loss_mask` for targets that
begin a new document.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import DataError
from .mixture import MixtureConfig, MixtureSchedule
from .pack import PackedDataset, TokenStream, open_dataset


@dataclass
class Batch:
    """One rank's batch; every tensor row is one window (or sequence) of T+1 tokens.

    The packed loader fills the first five fields; other producers (SFT conversations,
    preference pairs, rollouts) fill the same fields and the optional ones their objective
    reads. `loss_mask` is always set: when not given, it is derived from `segment_ids`.
    """

    tokens: torch.Tensor  # (B, T+1) int64 token ids
    positions: torch.Tensor  # (B, T+1) int64 position inside the document, 0 at its start
    segment_ids: torch.Tensor  # (B, T+1) int64 document number inside the row, from 0
    sources: torch.Tensor  # (B,) int64 index of the source of each row (DataLoader.sources)
    windows: torch.Tensor  # (B,) int64 window index of each row inside its source
    # (B, T) bool: True where target t (token t+1) is trained on. Default: False only where
    # the target starts a new document (not predictable from the one before).
    loss_mask: torch.Tensor | None = None
    # (B,) int64 pair id: rows of a preference pair are adjacent, chosen first (row 2k
    # chosen, row 2k+1 rejected, pair[2k] == pair[2k+1]); None outside preference batches
    pair: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # (B,) float per-row weight (None: 1)
    advantages: torch.Tensor | None = None  # (B,) or (B, T) float (policy-gradient rows)
    old_logps: torch.Tensor | None = None  # (B, T) float log p of targets under the rollout policy
    # (B, T) int64 model turn of each target in a multi-turn episode, from 1 (0: not the model's)
    turns: torch.Tensor | None = None
    # (N, C, S, S) float images of the rows' image placeholders, row-major (a VLM's batch), and
    # (N,) int64 the row of each; None without images
    pixel_values: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = self.segment_ids[:, 1:] == self.segment_ids[:, :-1]

    @property
    def input_ids(self) -> torch.Tensor:
        """Model inputs (B, T)."""
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        """Next-token targets (B, T)."""
        return self.tokens[:, 1:]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for `model(**batch.model_inputs())`: ids, positions, segments (B, T)."""
        return {
            "input_ids": self.input_ids,
            "positions": self.positions[:, :-1],
            "segment_ids": self.segment_ids[:, :-1],
            **({} if self.pixel_values is None else {"pixel_values": self.pixel_values}),
        }

    def _map(self, fn: Any) -> Batch:
        return Batch(**{k: None if t is None else fn(t) for k, t in vars(self).items()})

    def rows(self, rows: slice | torch.Tensor) -> Batch:
        """The rows `rows` of every field (a micro-batch); images follow their rows."""
        skip = ("pixel_values", "image_rows")
        out = Batch(
            **{k: None if t is None or k in skip else t[rows] for k, t in vars(self).items()}
        )
        if self.image_rows is not None:
            kept = torch.arange(len(self))[rows]  # (B',) old row of each new row
            hit = self.image_rows[:, None] == kept[None, :]  # (N, B')
            new_row = hit.int().argmax(1)[hit.any(1)]  # (N',) new row of each kept image
            order = torch.sort(new_row, stable=True).indices  # row-major, image order kept
            if len(order):
                out.pixel_values = self.pixel_values[hit.any(1)][order]
                out.image_rows = new_row[order]
        return out

    def to(self, device: torch.device | str) -> Batch:
        """A copy on `device`."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def __len__(self) -> int:
        return self.tokens.shape[0]


class Windows:
    """Fixed-length windows over one stream, visited in a per-epoch shuffled order."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int):
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.num_windows = max(0, (stream.num_tokens - 1) // seq_len)
        self._salt = zlib.crc32(stream.name.encode())
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Permutation (S,) of window indices for `epoch` (two epochs are kept cached)."""
        if epoch not in self._orders:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch, self._salt]))
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = rng.permutation(self.num_windows)
        return self._orders[epoch]

    def index(self, k: int) -> int:
        """Window index of the k-th window served (k counts over all epochs)."""
        epoch, i = divmod(k, self.num_windows)
        return int(self.order(epoch)[i])

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Window i: tokens, positions, segment ids, each (T+1,) int64."""
        T = self.seq_len
        start = i * T
        tokens = self.stream.read(start, T + 1)  # (T+1,)
        ds = self.stream.doc_starts
        lo = np.searchsorted(ds, start, side="right")
        hi = np.searchsorted(ds, start + T + 1, side="left")
        cuts = ds[lo:hi] - start  # (k,) document starts strictly inside the window
        seg = np.zeros(T + 1, np.int64)
        seg[cuts] = 1
        seg = np.cumsum(seg)  # (T+1,) 0 for the first (partial) document, then 1, 2, ...
        first = np.concatenate([[0], cuts])  # (k+1,) row offset where each segment starts
        positions = np.arange(T + 1) - first[seg]  # (T+1,)
        return tokens, positions, seg


class DataLoader:
    """Deterministic, resumable, rank-sharded batches (B, T+1) from a prepared dataset."""

    def __init__(
        self,
        data: PackedDataset | str | Path,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mixture: MixtureConfig | dict[str, float] | None = None,
        sources: list[str] | None = None,
    ):
        self.data = data if isinstance(data, PackedDataset) else open_dataset(data)
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        names = sources if sources is not None else list(self.data.streams)
        missing = [n for n in names if n not in self.data.streams]
        if missing:
            raise DataError(
                f"{self.data.path}: no stream {', '.join(map(repr, missing))} "
                f"(streams: {', '.join(self.data.streams)})"
            )
        self.sources = names
        self.windows = [Windows(self.data.streams[n], seq_len, seed) for n in names]
        self.schedule = self._schedule(mixture)
        for name, w in zip(names, self.windows):
            if w.num_windows == 0 and self.schedule.table[:, names.index(name)].any():
                raise DataError(
                    f"{self.data.path}: stream {name!r} has {w.stream.num_tokens} tokens, "
                    f"fewer than seq_len + 1 = {seq_len + 1}"
                )
        self.step = 0
        self.consumed = np.zeros(len(names), np.int64)  # windows served per source, all ranks

    def _schedule(self, mixture: MixtureConfig | dict[str, float] | None) -> MixtureSchedule:
        if isinstance(mixture, dict):
            return MixtureSchedule.constant(mixture, self.sources)
        if mixture is None:
            recipe_mix = self.data.manifest.get("recipe", {}).get("mixture")
            if recipe_mix:
                from ..recipe import load_recipe

                mixture = load_recipe(MixtureConfig, recipe_mix)
        if mixture is None:  # natural proportions: by windows available
            sizes = {n: float(w.num_windows) for n, w in zip(self.sources, self.windows)}
            if not any(sizes.values()):
                tokens = {n: w.stream.num_tokens for n, w in zip(self.sources, self.windows)}
                raise DataError(
                    f"{self.data.path}: every stream has fewer than seq_len + 1 = "
                    f"{self.seq_len + 1} tokens ({tokens})"
                )
            return MixtureSchedule.constant(sizes, self.sources)
        return MixtureSchedule(mixture, self.sources)

    @property
    def rows_per_step(self) -> int:
        """Rows of one global batch (batch_size * world_size)."""
        return self.batch_size * self.world_size

    def _plan(self, step: int, consumed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source (G,), serve counter (G,)) of every row of global batch `step`."""
        src = self.schedule.sample(step, self.rows_per_step, self.seed)  # (G,)
        k = np.empty_like(src)
        for s in np.unique(src):
            rows = np.nonzero(src == s)[0]
            k[rows] = consumed[s] + np.arange(len(rows))
            consumed[s] += len(rows)
        return src, k

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch."""
        src, k = self._plan(self.step, self.consumed)
        self.step += 1
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        rows = [(int(s), self.windows[s].index(int(c))) for s, c in zip(src[mine], k[mine])]
        parts = [self.windows[s].window(i) for s, i in rows]
        tokens, positions, segments = (np.stack(x) for x in zip(*parts))  # each (B, T+1)
        return Batch(
            tokens=torch.from_numpy(tokens),
            positions=torch.from_numpy(positions),
            segment_ids=torch.from_numpy(segments),
            sources=torch.tensor([s for s, _ in rows], dtype=torch.int64),
            windows=torch.tensor([i for _, i in rows], dtype=torch.int64),
        )

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def epoch(self, source: str | None = None) -> float:
        """Epochs of `source` (default: the first) served so far, over all ranks."""
        i = self.sources.index(source) if source else 0
        n = self.windows[i].num_windows
        return float(self.consumed[i]) / n if n else 0.0

    def state_dict(self) -> dict[str, Any]:
        """The loader's position: a few integers (identical on every rank)."""
        return {
            "step": self.step,
            "consumed": {n: int(c) for n, c in zip(self.sources, self.consumed)},
            "seed": self.seed,
            "seq_len": self.seq_len,
            "windows": {n: w.num_windows for n, w in zip(self.sources, self.windows)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; the data, seed and seq_len must match (world size may not)."""
        for key in ("seed", "seq_len"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"loader state has {key}={state.get(key)!r}, this loader {getattr(self, key)!r}"
                )
        mine = {n: w.num_windows for n, w in zip(self.sources, self.windows)}
        if state.get("windows") != mine:
            raise DataError(
                f"loader state was saved on other data (windows per source {state.get('windows')}, "
                f"now {mine})"
            )
        self.step = int(state["step"])
        self.consumed = np.array([int(state["consumed"][n]) for n in self.sources], np.int64)
