"""The packed-sequence loader: batch format, resumption, rank sharding, model integration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geode.data import DataError
from geode.data.loader import DataLoader
from geode.data.mixture import MixtureConfig, StageConfig
from geode.data.pack import open_dataset


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + "x" * int(rng.integers(1, 40)) for i in range(n)]


def take(loader: DataLoader, n: int) -> list:
    return [loader.next_batch() for _ in range(n)]


def same(a, b) -> bool:
    """Every field equal; optional fields (pair, weights, advantages) unset in both."""
    return vars(a).keys() == vars(b).keys() and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(vars(a).values(), vars(b).values())
    )


def test_batch_format(make_dataset) -> None:
    out = make_dataset({"a": texts(50)}, shard_tokens=200)
    T = 32
    loader = DataLoader(out, batch_size=4, seq_len=T, seed=1)
    stream = open_dataset(out).streams["a"]
    b = loader.next_batch()
    assert b.tokens.shape == (4, T + 1) and b.tokens.dtype == torch.int64
    assert b.positions.shape == b.segment_ids.shape == (4, T + 1)
    assert b.input_ids.shape == b.targets.shape == b.loss_mask.shape == (4, T)
    starts = set(stream.doc_starts.tolist())
    for row in range(4):
        w = int(b.windows[row])
        assert b.tokens[row].tolist() == stream.read(w * T, T + 1).tolist()
        for t in range(T + 1):
            g = w * T + t  # global token offset
            new_doc = g in starts and t > 0
            if t == 0:
                assert b.positions[row, 0] == 0 and b.segment_ids[row, 0] == 0
            elif new_doc:
                assert b.positions[row, t] == 0  # restart at a document start
                assert b.segment_ids[row, t] == b.segment_ids[row, t - 1] + 1
                assert b.tokens[row, t] == 2  # <bos>
                assert not b.loss_mask[row, t - 1]  # don't predict the next document's <bos>
            else:
                assert b.positions[row, t] == b.positions[row, t - 1] + 1
                assert b.segment_ids[row, t] == b.segment_ids[row, t - 1]
                assert b.loss_mask[row, t - 1]
    inputs = b.model_inputs()
    assert set(inputs) == {"input_ids", "positions", "segment_ids"}
    assert all(v.shape == (4, T) for v in inputs.values())


def test_resume_mid_epoch_gives_same_batches(make_dataset) -> None:
    out = make_dataset({"a": texts(80), "b": texts(30, seed=1)}, shard_tokens=256)
    mix = MixtureConfig([StageConfig(0, {"a": 0.5, "b": 0.5}), StageConfig(4, {"b": 1.0})])
    a = DataLoader(out, batch_size=3, seq_len=16, seed=5, mixture=mix)
    take(a, 3)
    state = a.state_dict()
    assert set(state) == {"step", "consumed", "seed", "seq_len", "windows"}
    expected = take(a, 6)  # crosses the stage change and epoch ends of "b"
    b = DataLoader(out, batch_size=3, seq_len=16, seed=5, mixture=mix)
    b.load_state_dict(state)
    got = take(b, 6)
    assert all(same(x, y) for x, y in zip(expected, got))
    assert b.state_dict() == a.state_dict()
    fresh = DataLoader(out, batch_size=3, seq_len=16, seed=5, mixture=mix)
    assert not same(take(fresh, 1)[0], expected[0])  # it really was mid-epoch
    with pytest.raises(DataError, match="seq_len"):
        DataLoader(out, batch_size=3, seq_len=8, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        DataLoader(out, batch_size=3, seq_len=16, seed=6).load_state_dict(state)


def test_two_ranks_disjoint_and_cover(make_dataset) -> None:
    out = make_dataset({"a": texts(120)})
    T, B, W = 16, 2, 2
    ranks = [DataLoader(out, batch_size=B, seq_len=T, seed=3, rank=r, world_size=W) for r in (0, 1)]
    S = ranks[0].windows[0].num_windows
    steps = -(-S // (B * W))  # enough global batches to finish one epoch
    per_rank = [take(ld, steps) for ld in ranks]
    order, owner = [], []  # global row order: step, then rank, then row
    for step in range(steps):
        for r in range(W):
            order += per_rank[r][step].windows.tolist()
            owner += [r] * B
    assert sorted(order[:S]) == list(range(S))  # one epoch covers every window once
    seen = [{w for w, o in zip(order[:S], owner) if o == r} for r in range(W)]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(S))
    assert ranks[0].state_dict() == ranks[1].state_dict()  # one state for all ranks
    single = DataLoader(out, batch_size=B * W, seq_len=T, seed=3)  # same rows, one rank
    assert [w for b in take(single, steps) for w in b.windows.tolist()] == order


def test_epochs_roll_over_with_new_order(make_dataset) -> None:
    out = make_dataset({"a": texts(30)})
    loader = DataLoader(out, batch_size=1, seq_len=16, seed=0)
    S = loader.windows[0].num_windows
    first = [int(b.windows[0]) for b in take(loader, S)]
    second = [int(b.windows[0]) for b in take(loader, S)]
    assert sorted(first) == sorted(second) == list(range(S))
    assert first != second and loader.epoch() == 2.0


def test_bad_loader_arguments(make_dataset) -> None:
    out = make_dataset({"a": ["tiny"]})
    with pytest.raises(DataError, match="fewer than seq_len"):
        DataLoader(out, batch_size=1, seq_len=64)
    with pytest.raises(DataError, match="rank"):
        DataLoader(out, batch_size=1, seq_len=2, rank=2, world_size=2)
    with pytest.raises(DataError, match="no stream 'zz'"):
        DataLoader(out, batch_size=1, seq_len=2, sources=["zz"])


def test_batches_feed_the_model(make_dataset) -> None:
    """A packed batch runs through the decoder; attention stays inside documents."""
    from geode.config import ModelConfig
    from geode.model import build_model

    out = make_dataset({"a": texts(40)})
    b = DataLoader(out, batch_size=2, seq_len=24, seed=0).next_batch()
    cfg = ModelConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
    )
    model = build_model(cfg, seed=0)
    model.eval()
    with torch.no_grad():
        logits = model(**b.model_inputs())
        assert logits.shape == (2, 24, 259) and torch.isfinite(logits).all()
        # the logits of the last document in row 0 equal those of that document alone
        seg = b.segment_ids[0, :-1]
        last = seg == seg.max()
        alone = model(b.input_ids[0:1, last], positions=b.positions[0:1, :-1][:, last])
        torch.testing.assert_close(logits[0:1, last], alone, atol=1e-4, rtol=1e-4)
