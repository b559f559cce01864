"""A warmup that leaves the schedule no step to decay is refused; the longest accepted one
still ends at the minimum rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from geode.recipe import RecipeError
from geode.train import load_train_recipe
from geode.train.optim import lr_at
from tests.train.helpers import tiny_recipe


@pytest.mark.parametrize("schedule, longest", [("cosine", 6), ("wsd", 7), ("constant", 7)])
def test_warmup_as_long_as_the_run_is_refused(schedule, longest):
    data = Path("unused-data-dir")  # tiny_recipe: train.max_steps = 8
    for warmup in (8, longest + 1):
        with pytest.raises(
            RecipeError,
            match=rf"warmup_steps = {warmup}: must be <= train.max_steps - \d \({longest}\)",
        ):
            load_train_recipe(
                tiny_recipe(data, optim={"warmup_steps": warmup, "schedule": schedule})
            )
    ok = load_train_recipe(tiny_recipe(data, optim={"warmup_steps": longest, "schedule": schedule}))
    lrs = [lr_at(s, ok.optim, 8) for s in range(8)]
    assert max(lrs) == pytest.approx(ok.optim.lr)
    if schedule != "constant":
        assert lrs[-1] == pytest.approx(ok.optim.lr * ok.optim.min_lr_ratio)
