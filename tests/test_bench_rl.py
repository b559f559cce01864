"""bench/rl.py's bookkeeping: medians after warm-up, rollout tokens/s, ratios TRL / geode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "rl.py"


@pytest.fixture(scope="module")
def bench():
    """bench/rl.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_rl", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _step(total: float, gen: float, score: float, tokens: int) -> dict:
    return {"step_s": total, "generation": gen, "scoring": score,
            "update": total - gen - score, "sampled_tokens": tokens}  # fmt: skip


def test_summarize_drops_warmup_and_takes_medians(bench):
    steps = [_step(100.0, 90.0, 1.0, 10), _step(10.0, 4.0, 1.0, 800), _step(12.0, 4.0, 2.0, 800),
             _step(11.0, 5.0, 1.0, 1000)]  # fmt: skip
    row = bench.summarize("geode:float32", steps, warmup=1)
    assert row["steps"] == 3
    assert row["step_s"] == 11.0 and row["generation_s"] == 4.0 and row["scoring_s"] == 1.0
    assert row["update_s"] == 5.0  # median of 5, 6, 5
    assert row["sampled_tokens"] == 800
    assert row["rollout_tokens_per_s"] == 200.0  # median tokens / median generation seconds
    assert row["step_s_all"] == [10.0, 12.0, 11.0]


def test_table_ratios_are_trl_over_geode(bench):
    trl = bench.summarize("trl:fp32", [_step(20.0, 8.0, 0.5, 8000)], warmup=0)
    ours = bench.summarize("geode:float32", [_step(5.0, 2.0, 0.5, 8000)], warmup=0)
    text = bench.table([trl, ours], (1.0, 2.0, 3.0))
    ratio = [line for line in text.splitlines() if line.startswith("| **geode")][0]
    cells = [c.strip() for c in ratio.strip("|").split("|")]
    assert cells[1] == "**4.00x**"  # step 20 / 5
    assert cells[2] == "4.00x"  # generation 8 / 2
    assert cells[4] == "4.60x"  # update (20 - 8.5) / (5 - 2.5)
    assert cells[5] == "**4.00x**"  # rollout tokens/s 8000 / 2 over 8000 / 8
    assert "load average at the start: 1.00 2.00 3.00" in text
