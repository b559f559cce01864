"""The engine's one admission policy: which sequences run which tokens in a step.

Chunked-prefill scheduling (Agrawal et al. 2024, "Sarathi-Serve", sec. 4): every step runs
  1. every ready sequence's remaining stream (one decode token; forced tokens in one chunk),
     so streams never stall behind a long prompt,
  2. then prompt chunks of sequences still prefilling (admission order), and
  3. then admits waiting sequences into free rows while the step's token budget lasts,
each prompt chunk at most `prefill_chunk` tokens and all chunks together within `token_budget`
(a prefill always makes progress: at least one chunk runs when nothing else does). Chunk ends
are aligned to `align` positions where the prompt goes on (prefix-cache blocks).

Identical prompts admitted in the same step share one prefill: the first is the leader, the
others follow it (no chunks of their own; the engine copies the leader's row into theirs).

Rows: `running[i]` lives in cache row i; the engine keeps ready sequences before prefilling
ones (its `_settle` / `_release` move rows), so a decode step works on rows 0..D-1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .sequence import Sequence


@dataclass
class Chunk:
    """Stream positions [start, end) of one sequence to run this step (its row: `row`)."""

    seq: Sequence
    row: int
    start: int
    end: int

    @property
    def size(self) -> int:
        """Tokens run."""
        return self.end - self.start

    @property
    def completes(self) -> bool:
        """The chunk reaches the end of the stream: its last position's logits are sampled."""
        return self.end == self.seq.total


@dataclass
class StepPlan:
    """One step's work: chunks (decode tokens first) and the sequences admitted in it."""

    chunks: list[Chunk] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Positions the step runs through the model."""
        return sum(c.size for c in self.chunks)


class Scheduler:
    """Waiting queue + running rows + the per-step policy (see the module docstring).

    max_batch: running sequences at most. prefill_chunk: prompt tokens of one sequence per
    step. token_budget: tokens (decode and prefill) run per step. on_admit(seq): called when
    a sequence is admitted (the engine matches the prefix cache there and may advance
    `seq.cached`).
    """

    def __init__(
        self,
        max_batch: int,
        prefill_chunk: int,
        token_budget: int,
        align: int = 1,
        on_admit: Callable[[Sequence], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.token_budget = token_budget
        self.align = max(1, align)
        self.on_admit = on_admit
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i] lives in cache row i

    def has_unfinished(self) -> bool:
        """True while any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def _chunk(self, seq: Sequence, row: int, budget: int) -> Chunk:
        """The next prompt chunk of seq within the budget, end aligned where the stream goes on."""
        start = seq.cached
        end = min(seq.total, start + min(self.prefill_chunk, max(1, budget)))
        if end < seq.total and end - end % self.align > start:
            end -= end % self.align
        if seq.images is not None:  # never cut an image (geode.infer.multimodal)
            end = seq.images.fit(start, end)
        return Chunk(seq, row, start, end)

    def schedule(self) -> StepPlan:
        """Plan one step (admitting waiting sequences into rows)."""
        plan = StepPlan()
        budget = self.token_budget
        prefilling = []
        for row, s in enumerate(self.running):
            if s.leader is not None:
                continue  # rides on its leader's prefill
            if s.ready:
                n = min(s.total - s.cached, self.prefill_chunk)  # 1, or forced tokens
                if n:  # (a guidance row waits while its sequence prefills)
                    plan.chunks.append(Chunk(s, row, s.cached, s.cached + n))
                    budget -= n
            else:
                prefilling.append((row, s))
        for row, s in prefilling:
            if budget <= 0 and any(not c.seq.ready for c in plan.chunks):
                break
            c = self._chunk(s, row, budget)
            plan.chunks.append(c)
            budget -= c.size
        leaders: dict[tuple, Sequence] = {}  # (prompt, images) -> the sequence prefilling it
        while self.waiting and len(self.running) < self.max_batch:
            if budget <= 0 and (plan.admitted or any(not c.seq.ready for c in plan.chunks)):
                break
            s = self.waiting[0]
            if s.uncond is not None and len(self.running) + 2 > self.max_batch:
                break  # a guided sequence needs a second row for its unconditional prompt
            self.waiting.popleft()
            key = (tuple(s.prompt), None if s.images is None else s.images.key)
            lead = leaders.get(key)
            for t in (s.uncond, s) if s.uncond is not None else (s,):
                row = len(self.running)
                self.running.append(t)
                plan.admitted.append(t)
                if t is s and lead is not None and _can_follow(s, lead):
                    s.leader = lead
                    lead.followers.append(s)
                    break
                if self.on_admit is not None:
                    self.on_admit(t)
                if t.uncond is None and t.parent is None and t.prompt_logprobs is None:
                    leaders.setdefault(key, t)
                c = self._chunk(t, row, budget)
                plan.chunks.append(c)
                budget -= c.size
        self._sync_guidance(plan)
        return plan

    @staticmethod
    def _sync_guidance(plan: StepPlan) -> None:
        """A guided sequence samples only in a step that completes its unconditional row too
        (its chunk stops one token short, or waits, until then)."""
        ends = {c.seq.id: c.end for c in plan.chunks}
        keep = []
        for c in plan.chunks:
            u = c.seq.uncond
            if u is not None and c.completes and ends.get(u.id, u.cached) < u.total:
                c.end -= 1
                if c.end == c.start:
                    continue
            keep.append(c)
        plan.chunks = keep

    def drop_waiting(self, seq_id: str) -> bool:
        """Remove a waiting sequence; False if none has that id."""
        for s in self.waiting:
            if s.id == seq_id:
                self.waiting.remove(s)
                return True
        return False


def _can_follow(s: Sequence, lead: Sequence) -> bool:
    """s may share lead's prefill: same prompt, nothing else fed, no prompt logprobs wanted."""
    return (
        not s.pending
        and not lead.pending
        and s.uncond is None
        and s.cached == 0
        and s.params.prompt_logprobs is None
        and lead.params.prompt_logprobs is None
    )
