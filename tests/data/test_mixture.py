"""Mixture schedules: weights by stage, interpolation, deterministic draws, loader use."""

from __future__ import annotations

import numpy as np
import pytest

from geode.data import DataError
from geode.data.loader import DataLoader
from geode.data.mixture import MixtureConfig, MixtureSchedule, StageConfig

SOURCES = ["web", "code", "tasks"]
LATE_TASKS = MixtureConfig(
    [
        StageConfig(0, {"web": 6, "code": 3, "tasks": 1}),
        StageConfig(100, {"web": 2, "code": 3, "tasks": 5}),
    ]
)


def test_stage_weights() -> None:
    s = MixtureSchedule(LATE_TASKS, SOURCES)
    np.testing.assert_allclose(s.weights(0), [0.6, 0.3, 0.1])
    np.testing.assert_allclose(s.weights(99), [0.6, 0.3, 0.1])
    np.testing.assert_allclose(s.weights(100), [0.2, 0.3, 0.5])
    np.testing.assert_allclose(s.weights(10_000), [0.2, 0.3, 0.5])
    lin = MixtureSchedule(MixtureConfig(LATE_TASKS.stages, interpolate=True), SOURCES)
    np.testing.assert_allclose(lin.weights(50), [0.4, 0.3, 0.3])
    np.testing.assert_allclose(lin.weights(100), [0.2, 0.3, 0.5])


def test_draws_are_deterministic_and_follow_weights() -> None:
    s = MixtureSchedule(LATE_TASKS, SOURCES)
    assert np.array_equal(s.sample(7, 64, seed=1), s.sample(7, 64, seed=1))
    assert not np.array_equal(s.sample(7, 64, seed=1), s.sample(8, 64, seed=1))
    early = np.concatenate([s.sample(i, 100, seed=0) for i in range(50)])
    late = np.concatenate([s.sample(i, 100, seed=0) for i in range(200, 250)])
    np.testing.assert_allclose(
        np.bincount(early, minlength=3) / early.size, [0.6, 0.3, 0.1], atol=0.02
    )
    np.testing.assert_allclose(
        np.bincount(late, minlength=3) / late.size, [0.2, 0.3, 0.5], atol=0.02
    )
    only = MixtureSchedule.constant({"code": 1.0}, SOURCES)
    assert set(only.sample(3, 10, seed=0).tolist()) == {1}


@pytest.mark.parametrize(
    "stages, match",
    [
        ([], "at least one stage"),
        ([StageConfig(5, {"web": 1})], "start at step 0"),
        ([StageConfig(0, {"web": 1}), StageConfig(0, {"code": 1})], "must increase"),
        ([StageConfig(0, {"wbe": 1})], "unknown source.*wbe"),
        ([StageConfig(0, {"web": -1, "code": 2})], ">= 0"),
        ([StageConfig(0, {})], "positive sum"),
    ],
)
def test_bad_schedules(stages, match: str) -> None:
    with pytest.raises(DataError, match=match):
        MixtureSchedule(MixtureConfig(stages), SOURCES)


def test_loader_shifts_toward_tasks(make_dataset) -> None:
    out = make_dataset(
        {
            "web": [f"web page {i} " * 5 for i in range(80)],
            "tasks": [f"task {i}" for i in range(80)],
        }
    )
    mix = MixtureConfig([StageConfig(0, {"web": 0.9, "tasks": 0.1}), StageConfig(20, {"tasks": 1})])
    loader = DataLoader(out, batch_size=8, seq_len=8, seed=0, mixture=mix)
    early = np.concatenate([loader.next_batch().sources.numpy() for _ in range(20)])
    late = np.concatenate([loader.next_batch().sources.numpy() for _ in range(5)])
    assert (early == 0).mean() > 0.75 and set(late.tolist()) == {1}
    assert loader.state_dict()["consumed"] == {
        "web": int((early == 0).sum()),
        "tasks": int((early == 1).sum()) + late.size,
    }
    # a plain dict is a constant mixture; none at all means proportional to data size
    assert set(DataLoader(out, 8, 8, mixture={"web": 1}).next_batch().sources.tolist()) == {0}


def test_recipe_mixture_is_the_loader_default(make_dataset) -> None:
    only_tasks = MixtureConfig([StageConfig(0, {"tasks": 1.0})])
    out = make_dataset(
        {
            "web": [f"web page {i} " * 5 for i in range(20)],
            "tasks": [f"task {i}" for i in range(20)],
        },
        mixture=only_tasks,
    )
    assert set(DataLoader(out, batch_size=4, seq_len=8).next_batch().sources.tolist()) == {1}
