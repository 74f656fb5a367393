"""Which beam shape each step drafts, and which waiting requests join the batch.

Speculation trades compute for steps: a step verifies up to B*W*L tokens. While the base
forward is bound by reading the weights, extra tree tokens are almost free; once it is
compute-bound (large batches, or small machines) every verified token costs its share.
`BeamPolicy` is a fixed table by batch size (e.g. shrinking W, then L, down to plain
decoding, L=1); `MeasuredBeamPolicy` picks the fastest shape per batch size from the step
times it observes. A policy is called with the batch size before each step and told the
step's tokens and seconds after it.

Measuring costs steps, and most where drafting loses (at large batches on a small CPU a wide
tree costs several plain steps for few more tokens). `MeasuredBeamPolicy` therefore explores by
successive elimination: a shape
measured (over enough rows) clearly slower than the best stops being measured, and trees
containing a shape that lost to the best are not tried until re-exploration finds that shape
competitive again.
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


@dataclass
class _ShapeStats:
    """Step measurements of one beam shape at one batch size (decayed: recent steps weigh more)."""

    steps: int = 0  # steps taken, timed or not
    timed: int = 0  # steps whose seconds count
    tokens: float = 0.0  # decayed sums over all steps...
    token_weight: float = 0.0
    seconds: float = 0.0  # ...and over the timed ones
    second_weight: float = 0.0
    last: int = -1  # index of its last step among the steps at this batch size
    lost: tuple[tuple[int, int], float] | None = None  # (incumbent, its rate) when it last lost to one

    @property
    def rate(self) -> float:
        """Tokens per second: mean tokens per step / mean seconds per step."""
        return (self.tokens / self.token_weight) / max(self.seconds / self.second_weight, 1e-9)


def _within(small: tuple[int, int], big: tuple[int, int]) -> bool:
    """Whether a W x L tree is no wider and no longer than another."""
    return small[0] <= big[0] and small[1] <= big[1]


class MeasuredBeamPolicy:
    """Per batch size, the candidate shape with the best measured throughput, found cheaply.

    Whether drafting pays depends on the machine (how the forward's cost grows with the
    tokens it verifies), the drafter's acceptance on the traffic, and the load, so no table
    fits everywhere. This policy times the steps it chooses and learns each batch size on its
    own (step costs are not monotonic in the batch on a CPU; pruning across batch sizes was
    tried and pruned the best shape of batch 2 after noisy batch-1 steps).

    Throughput of a (batch size, shape) = mean tokens per step / mean seconds per step, both
    means with exponentially decaying weights (`decay` per step of that shape): a ratio of
    sums, since one step's tokens vary from 1 to L per row and averaging per-step ratios lets
    a lucky step pick the shape. A shape's first step at a batch size pays one-time costs:
    its tokens count, its seconds do not (unless warmup == 1).

    Exploration is successive elimination, because a losing shape's step is expensive exactly
    where drafting does not pay (at batch 16 on the 2-core CPU a 4x5 step costs 3.9 plain
    steps for 1.6x the tokens):
    - Candidates are warmed up in order of tree size W*L (plain first: the cheap baseline),
      each for `warmup` steps (the first one untimed).
    - The best shape is an *incumbent*, compared with each other shape within one period: a
      shape takes its place if faster on its own step; one that lost then is judged against
      the incumbent's rate at that step until it is measured again. The incumbent's estimate
      is refreshed every step and dips in a noisy or loaded stretch while the others' are old:
      no evidence for a shape that lost (plain at batch 8 used to hand its place to a 4x2 at
      0.8x, un-pruning 4x5). A shape that did not lose to the incumbent (e.g. the one it
      replaced after a possibly lucky warm-up) takes over on the incumbent's step if faster
      now; the incumbent has then lost to it. Cost: a shape that lost waits for its
      re-measurement even if the incumbent truly slows down.
    - A shape's rate is *known* once it has a timed step and its tokens were counted over
      `min_rows` rows (batch x steps, its first step included). Tokens per row vary from 1
      to L (relative spread 0.3-0.6 for the trees here), so 16 rows put the standard error
      of its mean at 8-14%; a row or two decides nothing. At batch 16 a shape is known
      after two steps; at batch 1-2 not within its warm-up, so there every shape is warmed
      up, which is cheap at small batches.
    - A known shape below (1 - margin) * the incumbent's rate (as judged above) is
      *eliminated*: it is not warmed up further. The margin covers what is left of the noise
      (and ~10% timing jitter on a quiet machine); a wrong elimination costs at most
      `explore_every` steps, since the next re-exploration re-measures the shape.
    - With `prune`, a shape is not tried while it contains (W and L no smaller) a known
      shape X that contains the incumbent and lost to it. Why: tokens per step grow
      concavely with the tree (acceptance falls with depth and with each extra beam) while a
      step's cost grows convexly (flat while the forward is bound by reading weights, then
      linear), so the rate along a chain of growing trees rises, then falls; growing the
      incumbent to X already lost, so every tree beyond X loses more. Where that fails (a
      GEMM size the machine handles badly), the shapes beyond X are reached again through X.
    - After warm-up it takes the incumbent, and every `explore_every` steps re-measures the
      least recently measured other shape that is not pruned, so a shape comes back when
      load or acceptance change: an eliminated shape whose rate is again within the margin
      is warmed up again, and once X is the incumbent, the shapes pruned behind it are tried.
    margin=1 and prune=False warm up every candidate. Outputs do not depend on the shape
    (greedy is lossless; sampled tokens use the n-th uniform of their request), so only
    speed is at stake.
    """

    def __init__(self, candidates: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 4), (2, 4), (4, 4)),
                 warmup: int = 4, explore_every: int = 64, decay: float = 0.9, margin: float = 0.2,
                 min_rows: int = 16, prune: bool = True):
        if not candidates or any(w < 1 or l < 1 for w, l in candidates):
            raise ValueError(f"candidate beam shapes must have W, L >= 1, got {candidates}")
        if warmup < 1 or explore_every < 2 or not 0 < decay < 1:
            raise ValueError("need warmup >= 1, explore_every >= 2 and 0 < decay < 1")
        if not isinstance(min_rows, int) or min_rows < 1:
            raise ValueError(f"min_rows (rows x steps measured before a shape can be eliminated) must be an "
                             f"integer >= 1, got {min_rows!r}")
        if not isinstance(prune, bool):
            raise ValueError(f"prune must be True or False, got {prune!r}")
        if not 0 <= margin <= 1:
            raise ValueError(f"margin is the fraction of the best rate a shape may lose before it is "
                             f"eliminated: it must be in [0, 1] (1 eliminates nothing), got {margin}")
        self.candidates = tuple(sorted(dict.fromkeys(candidates), key=lambda s: s[0] * s[1]))
        self.warmup, self.explore_every, self.decay, self.margin = warmup, explore_every, decay, margin
        self.min_rows, self.prune = min_rows, prune
        self._stats: dict[tuple[int, tuple[int, int]], _ShapeStats] = {}
        self._steps: dict[int, int] = {}  # steps taken per batch size
        self._best: dict[int, tuple[int, int]] = {}  # the incumbent per batch size, once a step was timed

    def _judged(self, batch: int, best: tuple[int, int]
                ) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], float]]:
        """Rates of the timed shapes, and the incumbent rate each is judged against: the one it lost to,
        if it last lost to this incumbent (a comparison within one period), else the incumbent's rate now."""
        stats = {s: st for s in self.candidates if (st := self._stats.get((batch, s))) and st.timed}
        rates = {s: st.rate for s, st in stats.items()}
        bars = {s: st.lost[1] if st.lost and st.lost[0] == best else rates[best] for s, st in stats.items()}
        return rates, bars

    def __call__(self, batch: int) -> tuple[int, int]:
        stats = {s: self._stats.get((batch, s), _ShapeStats()) for s in self.candidates}
        best = self._best.get(batch, self.candidates[0])
        rates, bars = self._judged(batch, best)
        known = {s: r for s, r in rates.items() if stats[s].steps * batch >= self.min_rows}
        eliminated = {s for s, r in known.items() if r < (1 - self.margin) * bars[s]}
        pruned = {s for s in self.candidates if self.prune and any(
            r < bars[x] and x != s and _within(best, x) and _within(x, s) for x, r in known.items())}
        for shape in self.candidates:
            if shape not in eliminated and shape not in pruned and stats[shape].steps < self.warmup:
                return shape
        step = self._steps.get(batch, 0)
        others = [s for s in self.candidates if s != best and s not in pruned]
        if step % self.explore_every == self.explore_every - 1 and others:
            return min(others, key=lambda s: stats[s].last)
        return best

    def observe(self, batch: int, shape: tuple[int, int], tokens: int, seconds: float) -> None:
        st = self._stats.setdefault((batch, shape), _ShapeStats())
        st.tokens = self.decay * st.tokens + tokens
        st.token_weight = self.decay * st.token_weight + 1
        if st.steps or self.warmup == 1:  # a shape's first step at a batch size pays one-time costs
            st.seconds = self.decay * st.seconds + seconds
            st.second_weight = self.decay * st.second_weight + 1
            st.timed += 1
        st.steps += 1
        st.last = self._steps.get(batch, 0)
        self._steps[batch] = st.last + 1
        best = self._best.get(batch, shape)  # the first timed shape is the first incumbent
        if not self._stats[(batch, best)].timed:
            return
        rates, bars = self._judged(batch, best)
        st.lost = None
        if shape != best:  # a challenger's step: it takes over, or lost to the incumbent as measured now
            if shape in rates and rates[shape] > rates[best]:
                self._best[batch] = shape
            else:
                st.lost = (best, rates[best])
            return
        # The incumbent's step: a stale shape that did not lose to it takes over if it is now faster;
        # the incumbent then lost to it.
        self._best[batch] = new = max((s for s in rates if s == best or rates[s] > bars[s]),
                                      key=lambda s: (rates[s], s == best))
        if new != best:
            st.lost = (new, rates[new])

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
