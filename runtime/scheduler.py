"""Which beam shape each step drafts, and which waiting requests join the batch.

Speculation trades compute for steps: a step verifies up to B*W*L tokens. While the base
forward is bound by reading the weights, extra tree tokens are almost free; once it is
compute-bound (large batches, or small machines) every verified token costs its share.
`BeamPolicy` is a fixed table by batch size (e.g. shrinking W, then L, down to plain
decoding, L=1); `MeasuredBeamPolicy` picks the fastest shape per batch size from the step
times it observes. A policy is called with the batch size before each step and told the
step's tokens and seconds after it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar


@dataclass(frozen=True)
class BeamPolicy:
    """(W, L) per batch size: the entry with the largest batch key <= the current batch.

    table: ((min_batch, W, L), ...) sorted by min_batch, starting at 1. L counts the
    guaranteed token, so L=1 means plain decoding for that batch size.
    """

    table: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        if not self.table or self.table[0][0] != 1:
            raise ValueError(f"a beam policy needs an entry for batch size 1, got {dict(self.as_dict())}")
        for b, w, l in self.table:
            if b < 1 or w < 1 or l < 1:
                raise ValueError(f"beam policy entry {b}: ({w}, {l}) is invalid: batch, W and L must be >= 1")
        if [b for b, _, _ in self.table] != sorted({b for b, _, _ in self.table}):
            raise ValueError("beam policy batch sizes must be distinct and increasing")

    @classmethod
    def fixed(cls, width: int, length: int) -> "BeamPolicy":
        return cls(((1, width, length),))

    @classmethod
    def from_table(cls, table: dict[int, tuple[int, int]]) -> "BeamPolicy":
        """{min_batch: (W, L)}, e.g. {1: (4, 4), 4: (2, 4), 8: (1, 1)}."""
        return cls(tuple((int(b), int(w), int(l)) for b, (w, l) in sorted(table.items())))

    @classmethod
    def token_budget(cls, budget: int, max_width: int, max_length: int, max_batch: int) -> "BeamPolicy":
        """Largest tree with B*W*L <= budget: keep L while W can shrink, then shorten L;
        plain decoding once even one drafted token per sequence would exceed the budget."""
        rows = []
        for b in range(1, max_batch + 1):
            per_seq = budget // b
            length = max(1, min(max_length, per_seq))
            width = max(1, min(max_width, per_seq // length))
            shape = (width, length) if length > 1 else (1, 1)
            if not rows or rows[-1][1:] != shape:
                rows.append((b, *shape))
        return cls(tuple(rows))

    def __call__(self, batch: int) -> tuple[int, int]:
        shape = self.table[0][1:]
        for b, w, l in self.table:
            if b <= batch:
                shape = (w, l)
        return shape

    @property
    def largest_shape(self) -> tuple[int, int]:
        """The (W, L) with the most tree tokens: the decoder's scratch area must fit it."""
        return max(((w, l) for _, w, l in self.table), key=lambda s: s[0] * s[1])

    def as_dict(self) -> dict[int, tuple[int, int]]:
        return {b: (w, l) for b, w, l in self.table}


    def observe(self, batch: int, shape: tuple[int, int], tokens: int, seconds: float) -> None:
        """A fixed table learns nothing from step timings."""


class MeasuredBeamPolicy:
    """Per batch size, the candidate shape with the best measured throughput.

    Whether drafting pays depends on the machine (how the forward's cost grows with the
    tokens it verifies), the drafter's acceptance on the traffic, and the load, so no table
    fits everywhere. This policy times the steps it chooses: throughput = tokens emitted /
    seconds, each summed with exponentially decaying weights per (batch size, shape) (a ratio
    of sums: one step's tokens vary from 1 to L per row, so averaging per-step ratios lets a
    lucky step pick the shape). It first tries every candidate `warmup` times (not counting
    its first step, which pays one-time costs), then takes the best and re-tries the least
    recently measured other candidate every `explore_every` steps, so it follows changes in
    load and acceptance. Outputs do not depend on the shape (greedy is lossless; sampled tokens use
    the n-th uniform of their request), so only speed is at stake.
    """

    def __init__(self, candidates: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 4), (2, 4), (4, 4)),
                 warmup: int = 4, explore_every: int = 64, decay: float = 0.9):
        if not candidates or any(w < 1 or l < 1 for w, l in candidates):
            raise ValueError(f"candidate beam shapes must have W, L >= 1, got {candidates}")
        if warmup < 1 or explore_every < 2 or not 0 < decay < 1:
            raise ValueError("need warmup >= 1, explore_every >= 2 and 0 < decay < 1")
        self.candidates = tuple(dict.fromkeys(candidates))
        self.warmup, self.explore_every, self.decay = warmup, explore_every, decay
        self._tokens: dict[tuple[int, tuple[int, int]], float] = {}  # decayed sums
        self._seconds: dict[tuple[int, tuple[int, int]], float] = {}
        self._seen: dict[tuple[int, tuple[int, int]], int] = {}  # observations
        self._last: dict[tuple[int, tuple[int, int]], int] = {}  # step index of the last observation
        self._steps: dict[int, int] = {}  # steps taken per batch size

    def __call__(self, batch: int) -> tuple[int, int]:
        step = self._steps.get(batch, 0)
        for shape in self.candidates:
            if self._seen.get((batch, shape), 0) < self.warmup:
                return shape
        best = max(self.candidates, key=lambda s: self._rate(batch, s))
        if step % self.explore_every == self.explore_every - 1 and len(self.candidates) > 1:
            return min((s for s in self.candidates if s != best), key=lambda s: self._last[(batch, s)])
        return best

    def observe(self, batch: int, shape: tuple[int, int], tokens: int, seconds: float) -> None:
        key = (batch, shape)
        seen = self._seen.get(key, 0)
        if seen or self.warmup == 1:  # a shape's first step at a batch size pays one-time costs: not counted
            self._tokens[key] = self.decay * self._tokens.get(key, 0.0) + tokens
            self._seconds[key] = self.decay * self._seconds.get(key, 0.0) + seconds
        self._seen[key] = seen + 1
        self._last[key] = self._steps.get(batch, 0)
        self._steps[batch] = self._steps.get(batch, 0) + 1

    def _rate(self, batch: int, shape: tuple[int, int]) -> float:
        """Measured tokens per second."""
        return self._tokens[(batch, shape)] / max(self._seconds[(batch, shape)], 1e-9)

    @property
    def largest_shape(self) -> tuple[int, int]:
        return max(self.candidates, key=lambda s: s[0] * s[1])

    def as_dict(self) -> dict[int, tuple[int, int]]:
        """The shape each batch size seen so far would use now."""
        return {b: self(b) for b in sorted(self._steps)}

R = TypeVar("R")


class SlotScheduler(Generic[R]):
    """FIFO admission of waiting requests into free decoder slots.

    Each call to `admit` takes waiting requests in arrival order while a slot is free and
    their prompt tokens fit the per-step prefill budget (the first one always fits, so a
    long prompt is never starved). Not thread-safe: the session's loop owns it.
    """

    def __init__(self, slots: int, prefill_token_budget: int):
        if slots < 1:
            raise ValueError(f"a session needs at least one slot, got {slots}")
        if prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget must be >= 1, got {prefill_token_budget}")
        self.free: list[int] = list(range(slots))[::-1]  # pop() hands out slot 0 first
        self.running: dict[int, R] = {}
        self.waiting: deque[R] = deque()
        self.budget = prefill_token_budget

    def admit(self, prompt_len: Callable[[R], int]) -> list[tuple[int, R]]:
        taken: list[tuple[int, R]] = []
        tokens = 0
        while self.free and self.waiting:
            n = prompt_len(self.waiting[0])
            if taken and tokens + n > self.budget:
                break
            slot, req = self.free.pop(), self.waiting.popleft()
            self.running[slot] = req
            taken.append((slot, req))
            tokens += n
        return taken

    def release(self, slot: int) -> None:
        del self.running[slot]
        self.free.append(slot)
