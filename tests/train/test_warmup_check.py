"""A warmup as long as the run is refused: the schedule would never decay."""

from __future__ import annotations

from pathlib import Path

import pytest

from geode.recipe import RecipeError
from geode.train import load_train_recipe
from geode.train.optim import lr_at
from tests.train.helpers import tiny_recipe


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_as_long_as_the_run_is_refused(schedule):
    data = Path("unused-data-dir")  # tiny_recipe: train.max_steps = 8
    for warmup in (8, 9):
        with pytest.raises(
            RecipeError, match=rf"warmup_steps = {warmup}: must be <= train.max_steps - 1 \(7\)"
        ):
            load_train_recipe(
                tiny_recipe(data, optim={"warmup_steps": warmup, "schedule": schedule})
            )
    ok = load_train_recipe(tiny_recipe(data, optim={"warmup_steps": 6, "schedule": schedule}))
    lrs = [lr_at(s, ok.optim, 8) for s in range(8)]
    assert max(lrs) == pytest.approx(ok.optim.lr)
    if schedule != "constant":  # two steps after the warmup: the last is at the minimum
        assert lrs[-1] == pytest.approx(ok.optim.lr * ok.optim.min_lr_ratio)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_one_step_after_the_warmup_is_at_the_minimum(schedule):
    data = Path("unused-data-dir")  # tiny_recipe: train.max_steps = 8
    ok = load_train_recipe(tiny_recipe(data, optim={"warmup_steps": 7, "schedule": schedule}))
    lrs = [lr_at(s, ok.optim, 8) for s in range(8)]
    assert lrs[6] == pytest.approx(ok.optim.lr)
    assert lrs[-1] == pytest.approx(ok.optim.lr * ok.optim.min_lr_ratio)
