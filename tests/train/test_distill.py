"""Gemma 3 distillation: the loss against a direct reference, sampling, online == offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geode.train import distill as D
from geode.train import load_train_recipe, train, train_distilled
from geode.train.metrics import curve, read_metrics
from tests.train.helpers import synthetic_dataset, tiny_recipe


def test_distill_loss_equals_soft_target_cross_entropy():
    """-sum_k q_k log p_s[ids_k] equals torch's cross_entropy with the dense target that is q on
    the sampled ids and 0 elsewhere, and CE - H(q) equals KL(q || p_s)."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 50, generator=g) * 2
    student = torch.randn(2, 5, 50, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)
    ids, q = D.sample_targets(teacher, 8, "sample", 1.0, g)
    assert ids.shape == (2, 5, 8) and torch.allclose(q.sum(-1), torch.ones(2, 5))
    dense = D.dense_target(ids, q, 50)  # (2, 5, 50)
    p_teacher = teacher.softmax(-1)
    renorm = p_teacher * (dense > 0) / (p_teacher * (dense > 0)).sum(-1, keepdim=True)
    torch.testing.assert_close(dense, renorm)  # zero off the sample, renormalised on it
    ce = F.cross_entropy(student.reshape(-1, 50), dense.reshape(-1, 50), reduction="none")
    ref = (ce * mask.reshape(-1)).sum()
    torch.testing.assert_close(D.distill_loss_sum(student, ids, q, mask), ref)
    kl = F.kl_div(student.log_softmax(-1), dense, reduction="none").sum(-1)  # KL(q || p_s)
    got = D.distill_loss_sum(student, ids, q, mask) - D.target_entropy_sum(q, mask)
    torch.testing.assert_close(got, (kl * mask).sum(), rtol=1e-5, atol=1e-5)


def test_sampling_follows_teacher_probabilities():
    """K = 1 draws id i with probability p_i (Gumbel-max); K = V keeps the full softmax;
    'top' keeps the K most probable ids; same seed, same sample."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    p = logits.softmax(-1)
    rows = logits.expand(20000, 5)
    ids, q = D.sample_targets(rows, 1, "sample", 1.0, torch.Generator().manual_seed(1))
    freq = torch.bincount(ids.reshape(-1), minlength=5).float() / 20000
    torch.testing.assert_close(freq, p, atol=0.012, rtol=0)
    assert torch.equal(q, torch.ones(20000, 1))
    ids, q = D.sample_targets(logits, 5, "sample", 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(D.dense_target(ids, q, 5), p)
    ids, _ = D.sample_targets(logits, 2, "top")
    assert ids.tolist() == [0, 1]
    ids2, _ = D.sample_targets(logits * 0.5, 2, "sample", 1.0, torch.Generator().manual_seed(3))
    ids3, _ = D.sample_targets(logits, 2, "sample", 2.0, torch.Generator().manual_seed(3))
    assert torch.equal(ids2, ids3)  # temperature 2 == logits / 2
    assert torch.isfinite(q).all()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher trained for 30 steps on the synthetic data: (data dir, model dir)."""
    root = tmp_path_factory.mktemp("distill")
    data = synthetic_dataset(root / "data")
    recipe = tiny_recipe(
        data,
        model={"preset": "nano-1m", "overrides": {**_shape(), "hidden_size": 96}},
        train={"max_steps": 30},
        checkpoint={"export": True},
    )
    train(load_train_recipe(recipe), out=root / "teacher")
    return data, root / "teacher" / "model"


def _shape() -> dict:
    return dict(tiny_recipe(Path("x"))["model"]["overrides"])


@pytest.mark.slow
def test_online_and_offline_distillation_agree_and_log_both_losses(tmp_path, teacher):
    data, model = teacher
    common = dict(train={"max_steps": 6}, eval={"every": 3})
    runs = {}
    for mode in ("online", "offline"):
        d = {"teacher": str(model), "top_k": 16, "mode": mode, "cache": str(tmp_path / "cache")}
        recipe = load_train_recipe(tiny_recipe(data, distill=d, **common))
        result = train_distilled(recipe, out=tmp_path / mode, control=mode == "online")
        runs[mode] = read_metrics(tmp_path / mode / "student" / "metrics.jsonl")
        if mode == "online":
            comparison = json.loads((tmp_path / "online" / "comparison.json").read_text())
            assert set(comparison["comparison"]["final_eval_loss"]) == {"student", "control"}
            assert (tmp_path / "online" / "comparison.png").is_file()
            assert result["control"]["steps"] == 6
    # float16 storage of the cached probabilities is the only difference
    for kind, key in (("train", "distill_loss"), ("eval", "eval_loss"), ("eval", "eval_kl")):
        a, b = curve(runs["online"], kind, key), curve(runs["offline"], kind, key)
        assert list(a) == list(b) and len(a) >= 2
        np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=2e-3)
    kl = list(curve(runs["online"], "eval", "eval_kl").values())
    assert kl[-1] < kl[0]  # the student moves toward the teacher
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert meta["top_k"] == 16 and meta["id_dtype"] == "uint16"
    # the cache now holds every target: offline mode no longer needs the teacher
    d = {"mode": "offline", "cache": str(tmp_path / "cache"), "top_k": 16}
    recipe = load_train_recipe(tiny_recipe(data, distill=d, **common))
    train_distilled(recipe, out=tmp_path / "no-teacher", control=False)


def test_distilling_from_itself_keeps_the_teacher_loss(tmp_path, teacher):
    """Full-vocabulary targets from a student's own weights give zero KL at step 0."""
    data, model = teacher
    recipe = tiny_recipe(
        data,
        model={"init": str(model), "overrides": {}},
        train={"max_steps": 1},
        optim={"lr": 1e-9, "warmup_steps": 0},
        distill={"teacher": str(model), "top_k": 64, "sampling": "top"},
    )
    train_distilled(load_train_recipe(recipe), out=tmp_path / "self", control=False)
    records = read_metrics(tmp_path / "self" / "student" / "metrics.jsonl")
    train_rec = next(r for r in records if r["kind"] == "train")
    assert abs(train_rec["distill_kl"]) < 1e-5


def test_student_rollout_rewrites_the_tail_with_engine_samples():
    """On-policy rows: the kept prefix is untouched, the tail is exactly what the engine
    samples from the open document with the same seed, positions and segments continue it,
    and only targets inside the prefix count as real data."""
    from geode.config import get_preset
    from geode.data.loader import Batch
    from geode.infer import Engine, Request
    from geode.model import build_model

    model = build_model(get_preset("nano-1m"), seed=0)
    engine = Engine(model, max_batch=2, optimize=False, max_seq_len=12)
    tokens = torch.randint(3, 2000, (2, 12))
    segments = torch.tensor([[0] * 12, [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
    positions = torch.tensor([list(range(12)), [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]])
    batch = Batch(tokens, positions, segments, torch.zeros(2, dtype=torch.long), torch.arange(2))
    out, real = D.student_rollout(engine, batch, 4, 1.0, [11, 12])
    assert torch.equal(out.tokens[:, :8], tokens[:, :8])
    for b, start in ((0, 0), (1, 4)):  # row 1's open document starts at index 4
        ref = engine.generate(
            Request(tokens[b, start:8].tolist(), max_new_tokens=4, ignore_eos=True, seed=11 + b)
        )[0]
        assert out.tokens[b, 8:].tolist() == ref.token_ids
    assert out.positions[1, 8:].tolist() == [4, 5, 6, 7] and out.segment_ids[1, 8:].eq(1).all()
    assert out.positions[0].tolist() == list(range(12))
    assert real.shape == (2, 11) and real[:, :7].all() and not real[:, 7:].any()


def test_on_policy_recipe_errors(tmp_path):
    from geode.recipe import RecipeError

    base = {"teacher": "t", "on_policy_tokens": 8}
    for extra, field in (
        ({"on_policy_tokens": 32}, "distill.on_policy_tokens"),  # = seq_len
        ({"mode": "offline", "cache": "c"}, "distill.on_policy_tokens"),
        ({"on_policy_temperature": 0.0}, "distill.on_policy_temperature"),
    ):
        with pytest.raises(RecipeError, match=field):
            load_train_recipe(tiny_recipe(tmp_path, distill={**base, **extra}))


@pytest.mark.slow
def test_on_policy_distillation_self_kl_zero_and_student_moves_to_teacher(tmp_path, teacher):
    """The student scores its own samples: distilling a model from itself gives zero KL on
    those rows, and a fresh student's KL to the teacher falls."""
    data, model = teacher
    d = {"teacher": str(model), "top_k": 64, "sampling": "top", "on_policy_tokens": 12}
    recipe = tiny_recipe(
        data,
        model={"init": str(model), "overrides": {}},
        train={"max_steps": 1},
        optim={"lr": 1e-9, "warmup_steps": 0},
        distill=d,
    )
    train_distilled(load_train_recipe(recipe), out=tmp_path / "self", control=False)
    rec = next(
        r
        for r in read_metrics(tmp_path / "self" / "student" / "metrics.jsonl")
        if r["kind"] == "train"
    )
    assert abs(rec["distill_kl"]) < 1e-5 and np.isfinite(rec["loss"])
    recipe = tiny_recipe(
        data, train={"max_steps": 8}, eval={"every": 4}, distill={**d, "sampling": "sample"}
    )
    train_distilled(load_train_recipe(recipe), out=tmp_path / "fresh", control=False)
    records = read_metrics(tmp_path / "fresh" / "student" / "metrics.jsonl")
    kl = list(curve(records, "train", "distill_kl").values())
    assert len(kl) == 8 and np.mean(kl[-3:]) < np.mean(kl[:3])
