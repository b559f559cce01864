"""Packed token shards: dtypes, the index, validation of the manifest against the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from geode.data import DataError
from geode.data.pack import MANIFEST, StreamWriter, choose_dtype, open_dataset
from tests.data.helpers import ByteTokenizer


def test_choose_dtype() -> None:
    assert choose_dtype(32_000) == "uint16"
    assert choose_dtype(65_536) == "uint16"
    assert choose_dtype(262_144) == "uint32"
    assert choose_dtype(1000, "uint32") == "uint32"
    with pytest.raises(DataError, match="262144 tokens does not fit in uint16"):
        choose_dtype(262_144, "uint16")
    with pytest.raises(DataError, match="'int8'"):
        choose_dtype(10, "int8")


def test_token_id_too_large_for_uint16(tmp_path: Path) -> None:
    w = StreamWriter(tmp_path, "s", "uint16")
    with pytest.raises(DataError) as e:
        w.add([[5, 6], [7, 65_536, 8]], ["doc-a", "doc-b"])
    assert "token id 65536" in str(e.value) and "'doc-b'" in str(e.value)
    assert "uint32" in str(e.value)
    w32 = StreamWriter(tmp_path, "t", "uint32")
    assert w32.add([[7, 65_536, 8]]) == 3


def test_shards_index_and_reads(make_dataset) -> None:
    texts = [f"document number {i} " * (1 + i % 4) for i in range(40)]
    out = make_dataset({"a": texts}, shard_tokens=300)
    ds = open_dataset(out, verify=True)
    m = json.loads((out / MANIFEST).read_text())
    shards = m["streams"]["a"]["shards"]
    assert len(shards) > 3 and m["dtype"] == "uint16" and m["vocab_size"] == 259
    s = ds.streams["a"]
    tok = ByteTokenizer()
    expect = [tok.encode(t, add_bos=True, add_eos=True) for t in texts]
    assert s.num_docs == 40 and s.num_tokens == sum(map(len, expect))
    for i in (0, 13, 39):
        assert s.document(i).tolist() == expect[i]
    flat = np.concatenate([np.array(e) for e in expect])
    for start in (0, 250, 299, 301, s.num_tokens - 50):  # reads across shard boundaries
        assert s.read(start, 50).tolist() == flat[start : start + 50].tolist()
    for shard in shards:  # every shard ends at a document end
        idx = np.fromfile(out / shard["index"], dtype="<i8")
        assert idx[0] == 0 and idx[-1] == shard["num_tokens"] and shard["num_docs"] == len(idx) - 1
    with pytest.raises(IndexError):
        s.read(s.num_tokens - 1, 2)


def test_reader_rejects_bad_directories(make_dataset, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no manifest.json"):
        open_dataset(tmp_path)
    out = make_dataset({"a": ["some text here"] * 3, "b": ["more text"]}, shard_tokens=20)
    m = json.loads((out / MANIFEST).read_text())
    shard = out / m["streams"]["a"]["shards"][0]["tokens"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])  # truncated
    with pytest.raises(DataError, match="00000.bin: .* bytes, but manifest.json implies"):
        open_dataset(out)
    shard.write_bytes(data[:-2] + b"\x00\x00")  # right size, wrong content
    open_dataset(out)
    with pytest.raises(DataError, match="SHA-256"):
        open_dataset(out, verify=True)
    shard.unlink()
    with pytest.raises(DataError, match="00000.bin listed in manifest.json is missing"):
        open_dataset(out)
    m["version"] = 99
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match="version 99"):
        open_dataset(out)
