"""Mixtures: sampling weights over sources that change with the training step.

Gemini (Gemini Team, 2023, Sec. 5.1; Gemini 1.5, 2024) trains in stages whose mixtures
change, "with the weight of domain-relevant data increased towards the end of training".
A schedule is a list of stages, each starting at a step (counted in loader batches) with
weights per source; between stages the weights either jump (default) or, with `interpolate`,
move linearly from one stage's weights to the next's.

Which source fills each row of a global batch is drawn from the weights of that step with
an RNG seeded by (seed, step) alone, so the draw needs no state, every rank computes the
same draw, and a resumed loader repeats it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import DataError


@dataclass
class StageConfig:
    """Weights of the sources from `start_step` on (missing sources weigh 0)."""

    start_step: int = 0
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class MixtureConfig:
    """A schedule of stages; the first stage must start at step 0."""

    stages: list[StageConfig] = field(default_factory=list)
    interpolate: bool = False  # blend linearly between consecutive stages instead of jumping


class MixtureSchedule:
    """Weights over a fixed list of sources as a function of step, and the per-row draw."""

    def __init__(self, config: MixtureConfig, sources: list[str]):
        if not config.stages:
            raise DataError("mixture: needs at least one stage")
        self.sources = list(sources)
        self.interpolate = config.interpolate
        starts = [s.start_step for s in config.stages]
        if starts[0] != 0:
            raise DataError(f"mixture: the first stage must start at step 0, got {starts[0]}")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise DataError(f"mixture: stage start_step values must increase, got {starts}")
        self.starts = np.array(starts, np.int64)  # (stages,)
        rows = []
        for i, stage in enumerate(config.stages):
            unknown = sorted(set(stage.weights) - set(sources))
            if unknown:
                raise DataError(
                    f"mixture stage {i}: unknown source(s) {', '.join(unknown)} "
                    f"(sources: {', '.join(sources)})"
                )
            w = np.array([float(stage.weights.get(s, 0.0)) for s in sources])  # (S,)
            if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
                raise DataError(f"mixture stage {i}: weights must be >= 0 with a positive sum")
            rows.append(w / w.sum())
        self.table = np.stack(rows)  # (stages, S), rows sum to 1

    @classmethod
    def constant(cls, weights: dict[str, float], sources: list[str]) -> MixtureSchedule:
        """One stage with fixed weights."""
        return cls(MixtureConfig([StageConfig(0, weights)]), sources)

    def weights(self, step: int) -> np.ndarray:
        """Normalised weights (S,) at `step`."""
        i = int(np.searchsorted(self.starts, step, side="right")) - 1
        if not self.interpolate or i + 1 >= len(self.starts):
            return self.table[i]
        a, b = self.starts[i], self.starts[i + 1]
        t = (step - a) / (b - a)
        return (1 - t) * self.table[i] + t * self.table[i + 1]

    def sample(self, step: int, n: int, seed: int) -> np.ndarray:
        """Source index (n,) of each of the n rows of global batch `step`; deterministic."""
        w = self.weights(step)
        if np.count_nonzero(w) == 1:
            return np.full(n, int(np.argmax(w)), np.int64)
        rng = np.random.Generator(np.random.PCG64([seed, step, 0x6D6978]))
        return rng.choice(len(w), size=n, p=w).astype(np.int64)
