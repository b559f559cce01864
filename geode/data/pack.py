"""Packed token files: sharded, memory-mapped token arrays with a document index and manifest.

A prepared dataset directory holds one stream per source:

    manifest.json                 written last; the only entry point for readers
    <source>/00000.bin            tokens, little-endian uint16 (vocab <= 65536) or uint32
    <source>/00000.idx            int64 document start offsets into the shard, plus its end:
                                  (num_docs + 1,), idx[0] == 0, idx[-1] == num_tokens
    decontam.jsonl                (from `prepare`) one line per document dropped as contaminated

A document never spans two shards. Shards are written under temporary names and renamed when
complete; `prepare` builds the whole directory in a staging directory that replaces the
target only after the manifest is written, so an interrupted run leaves nothing a reader
would take for data. `open_dataset` validates the manifest against the files (existence,
byte sizes, index bounds and order; SHA-256 on request).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..fileio import atomic_write_bytes, sha256_file
from . import DataError

FORMAT = "geode-tokens"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
INDEX_DTYPE = np.dtype("<i8")


class TokenizerLike(Protocol):
    """What packing needs from a tokenizer (geode.tokenizer.Tokenizer satisfies it)."""

    @property
    def vocab_size(self) -> int: ...

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]: ...


def choose_dtype(vocab_size: int, requested: str = "auto") -> str:
    """'uint16' if every id of the vocabulary fits in 16 bits (unless uint32 is asked), else 'uint32'."""
    if requested == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if requested not in DTYPES:
        raise DataError(f"pack dtype must be 'auto', 'uint16' or 'uint32', got {requested!r}")
    if requested == "uint16" and vocab_size > 2**16:
        raise DataError(
            f"vocabulary of {vocab_size} tokens does not fit in uint16 (ids up to 65535); "
            "use dtype 'uint32' or 'auto'"
        )
    return requested


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as JSON atomically (temporary file, fsync, rename over `path`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())


# ---------------------------------------------------------------------------- writing
class StreamWriter:
    """Appends tokenized documents of one source to shards of about `shard_tokens` tokens."""

    def __init__(self, root: Path, name: str, dtype: str, shard_tokens: int = 1 << 26):
        if shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.root, self.name, self.dtype = Path(root), name, DTYPES[dtype]
        self.limit = np.iinfo(self.dtype).max
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        (self.root / name).mkdir(parents=True, exist_ok=True)
        self._file = None
        self._tmp: Path | None = None
        self._hash = hashlib.sha256()
        self._offsets: list[int] = [0]  # document starts in the open shard, then its end

    def add(self, docs: Sequence[Sequence[int]], doc_ids: Sequence[str] | None = None) -> int:
        """Append documents (lists of token ids); empty ones are skipped. Returns tokens added."""
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))  # (D,)
        total = int(lengths.sum())
        if not total:
            return 0
        flat = np.fromiter(itertools.chain.from_iterable(docs), np.int64, total)  # (N,)
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi > self.limit:
            bad_pos = int(np.argmax((flat < 0) | (flat > self.limit)))
            doc = int(np.searchsorted(np.cumsum(lengths), bad_pos, side="right"))
            where = f" in document {doc_ids[doc]!r}" if doc_ids else f" in document {doc}"
            raise DataError(
                f"token id {int(flat[bad_pos])}{where} of source {self.name!r} does not fit in "
                f"{self.dtype.name} (0..{self.limit}); use pack dtype 'uint32'"
            )
        lengths = lengths[lengths > 0]
        ends = np.cumsum(lengths)  # (D,) end of each document in `flat`
        data = flat.astype(self.dtype)
        done = j = 0  # tokens and documents written so far
        while j < len(lengths):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._offsets[-1]
            # take documents until the shard reaches `room` tokens (the last may overshoot)
            k = min(int(np.searchsorted(ends[j:] - done, room, side="left")) + 1, len(lengths) - j)
            stop = int(ends[j + k - 1])
            chunk = data[done:stop].tobytes()
            self._file.write(chunk)
            self._hash.update(chunk)
            base = self._offsets[-1]
            self._offsets.extend((base + ends[j : j + k] - done).tolist())
            done, j = stop, j + k
            if self._offsets[-1] >= self.shard_tokens:
                self._close_shard()
        return total

    def _open(self) -> None:
        i = len(self.shards)
        self._tmp = self.root / self.name / f".{i:05d}.bin.tmp"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _close_shard
        self._hash = hashlib.sha256()
        self._offsets = [0]

    def _close_shard(self) -> None:
        assert self._file is not None and self._tmp is not None
        i = len(self.shards)
        rel_bin, rel_idx = f"{self.name}/{i:05d}.bin", f"{self.name}/{i:05d}.idx"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        idx_tmp = self.root / self.name / f".{i:05d}.idx.tmp"
        np.asarray(self._offsets, dtype=INDEX_DTYPE).tofile(idx_tmp)
        os.replace(self._tmp, self.root / rel_bin)
        os.replace(idx_tmp, self.root / rel_idx)
        self.shards.append(
            {
                "tokens": rel_bin,
                "index": rel_idx,
                "num_tokens": self._offsets[-1],
                "num_docs": len(self._offsets) - 1,
                "sha256": self._hash.hexdigest(),
            }
        )

    def close(self) -> dict[str, Any]:
        """Finish the open shard; returns this stream's manifest entry."""
        if self._file is not None:
            self._close_shard()
        return {
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "num_docs": sum(s["num_docs"] for s in self.shards),
            "shards": self.shards,
        }

    def abort(self) -> None:
        """Close and delete the unfinished shard (after an error)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- reading
class TokenStream:
    """One source's shards read as a single array of tokens with document boundaries."""

    def __init__(self, name: str, root: Path, entry: dict[str, Any], dtype: str):
        self.name = name
        self.dtype = DTYPES[dtype]
        self._tokens: list[np.ndarray] = []  # per shard (n_i,) memory-mapped
        starts = []
        base = 0
        for shard in entry["shards"]:
            tok, idx = _open_shard(root, shard, self.dtype)
            self._tokens.append(tok)
            starts.append(idx[:-1] + base)
            base += len(tok)
        self.num_tokens = base
        self._bases = np.cumsum([0] + [len(t) for t in self._tokens])  # (shards+1,)
        # (num_docs + 1,) global document starts, then the end of the stream
        self.doc_starts = np.concatenate([*starts, np.array([base], np.int64)]).astype(np.int64)
        self.num_docs = len(self.doc_starts) - 1
        if self.num_docs != entry["num_docs"] or self.num_tokens != entry["num_tokens"]:
            raise DataError(
                f"stream {name!r}: manifest says {entry['num_docs']} docs / "
                f"{entry['num_tokens']} tokens, shards hold {self.num_docs} / {self.num_tokens}"
            )

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64 (length,), across shard boundaries."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"stream {self.name!r}: [{start}, {start + length}) out of range")
        out = np.empty(length, np.int64)
        pos = 0
        shard = int(np.searchsorted(self._bases, start, side="right")) - 1
        while pos < length:
            off = start + pos - int(self._bases[shard])
            take = min(length - pos, len(self._tokens[shard]) - off)
            out[pos : pos + take] = self._tokens[shard][off : off + take]
            pos += take
            shard += 1
        return out

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i as int64."""
        a, b = int(self.doc_starts[i]), int(self.doc_starts[i + 1])
        return self.read(a, b - a)


def _open_shard(
    root: Path, shard: dict[str, Any], dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one shard and load its index, checking sizes and bounds."""
    tok_path, idx_path = root / shard["tokens"], root / shard["index"]
    n, d = int(shard["num_tokens"]), int(shard["num_docs"])
    for path, want in ((tok_path, n * dtype.itemsize), (idx_path, (d + 1) * INDEX_DTYPE.itemsize)):
        if not path.is_file():
            raise DataError(f"{root}: shard file {path.name} listed in {MANIFEST} is missing")
        size = path.stat().st_size
        if size != want:
            raise DataError(
                f"{path}: {size} bytes, but {MANIFEST} implies {want} "
                "(truncated or from another run; prepare the data again)"
            )
    idx = np.fromfile(idx_path, dtype=INDEX_DTYPE)  # (d+1,)
    if idx[0] != 0 or idx[-1] != n or (d and np.any(np.diff(idx) <= 0)):
        raise DataError(f"{idx_path}: document offsets are not increasing from 0 to {n}")
    tokens = np.memmap(tok_path, dtype=dtype, mode="r", shape=(n,))  # (n,)
    return tokens, idx


@dataclass
class PackedDataset:
    """A prepared dataset directory: manifest plus one TokenStream per source."""

    path: Path
    manifest: dict[str, Any]
    streams: dict[str, TokenStream]

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer the data was packed with."""
        return int(self.manifest["vocab_size"])

    @property
    def num_tokens(self) -> int:
        """Tokens over all streams."""
        return sum(s.num_tokens for s in self.streams.values())


def open_dataset(path: str | Path, verify: bool = False) -> PackedDataset:
    """Open and validate a prepared dataset; `verify` also checks every shard's SHA-256."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise DataError(
            f"{root}: no {MANIFEST}; not a prepared dataset, or `geode data prepare` did not finish"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{mpath}: unreadable manifest: {e}") from e
    if manifest.get("format") != FORMAT:
        raise DataError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise DataError(f"{mpath}: version {manifest.get('version')!r}, this geode reads {VERSION}")
    dtype = manifest.get("dtype")
    if dtype not in DTYPES:
        raise DataError(f"{mpath}: dtype {dtype!r}, expected one of {sorted(DTYPES)}")
    streams = {}
    for name, entry in manifest["streams"].items():
        if verify:
            for shard in entry["shards"]:
                digest = sha256_file(root / shard["tokens"])
                if digest != shard["sha256"]:
                    raise DataError(f"{root / shard['tokens']}: SHA-256 differs from {MANIFEST}")
        streams[name] = TokenStream(name, root, entry, dtype)
    return PackedDataset(root, manifest, streams)
