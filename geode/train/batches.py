"""Where a trainer's batches come from: the recipe's packed loader, or batches given in code.

The packed `DataLoader` is the default. A post-training verb (SFT conversations, preference
pairs, rollouts from the engine) hands the `Trainer` a `TrainData` instead: a `BatchSource`
(anything with `next_batch()`, optionally `state_dict()` / `load_state_dict()` for an exact
resume) or any iterable of `Batch`es, plus an optional factory of held-out batches.

Each `next_batch()` returns THIS rank's rows of one optimizer step; the trainer cuts them into
micro-batches of `batch.micro_batch_size` rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..data.loader import Batch


@runtime_checkable
class BatchSource(Protocol):
    """A resumable stream of batches (geode.data.loader.DataLoader is one)."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class IterableBatches:
    """A BatchSource over any iterable of Batches (a generator of rollouts or judged pairs).

    Resume replays it: the iterable is restarted by `make()` and the batches already
    consumed are drawn again and dropped, so a deterministic generator resumes exactly.
    """

    def __init__(self, make: Callable[[], Iterable[Batch]]):
        self._make = make
        self._it: Iterator[Batch] = iter(make())
        self.consumed = 0

    def next_batch(self) -> Batch:
        """The next batch; StopIteration is an error naming the step (the run wanted more)."""
        try:
            batch = next(self._it)
        except StopIteration:
            raise RuntimeError(
                f"the batch generator ended after {self.consumed} batches; the recipe's "
                "train.max_steps asks for more"
            ) from None
        self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Batches consumed so far."""
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restart the iterable and skip the batches consumed before."""
        self._it = iter(self._make())
        self.consumed = 0
        for _ in range(int(state["consumed"])):
            self.next_batch()


@dataclass
class TrainData:
    """Batches for a Trainer that do not come from the recipe's packed dataset."""

    batches: BatchSource | Callable[[], Iterable[Batch]]  # a source, or a maker of an iterable
    eval_batches: Callable[[], Iterable[Batch]] | None = None  # fresh held-out batches (rank's)
    vocab_size: int = 0  # ids the data may hold (checked against the model; 0: not checked)
    tokenizer: str = ""  # tokenizer.model copied into the exported model directory
    tokenizer_sha256: str = ""  # identity of the tokenizer (checked against references)
    describe: str = "batches"  # names the data in messages

    def source(self) -> BatchSource:
        """The training batches as a BatchSource."""
        if isinstance(self.batches, BatchSource):
            return self.batches
        return IterableBatches(self.batches)
