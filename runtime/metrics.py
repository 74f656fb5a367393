"""Per-request and per-session serving metrics.

Tokens per step counts what each decoder step emitted for a sequence (accepted drafts +
the bonus token), so plain decoding scores exactly 1.0. Acceptance by draft position i
is the share of steps whose chosen path reached drafted token i+1 among the steps that
drafted that far (the beam length may change with the batch size).
"""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestMetrics:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0  # decoder steps this request took part in (prefill not counted)
    step_tokens: int = 0  # tokens those steps emitted for it (accepted + bonus)
    accepted_by_position: list[int] = field(default_factory=list)  # steps accepting draft i+1
    drafted_by_position: list[int] = field(default_factory=list)  # steps that drafted position i+1
    queue_s: float = 0.0  # arrival -> prefill start
    ttft_s: float = 0.0  # arrival -> first token
    latency_s: float = 0.0  # arrival -> finish

    @property
    def tokens_per_step(self) -> float:
        return self.step_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / d for a, d in zip(self.accepted_by_position, self.drafted_by_position)]

    @property
    def tok_per_s(self) -> float:
        """Generated tokens over the request's whole latency (queueing included)."""
        return self.generated_tokens / self.latency_s if self.latency_s > 0 else 0.0

    def record_step(self, emitted: int, drafted: int) -> None:
        """One decoder step that emitted `emitted` tokens with `drafted` draft positions."""
        self.steps += 1
        self.step_tokens += emitted
        _count_positions(self.accepted_by_position, self.drafted_by_position, emitted - 1, drafted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tokens_per_step": self.tokens_per_step, "tok_per_s": self.tok_per_s,
                               "acceptance_by_position": self.acceptance_by_position}


def _count_positions(accepted: list[int], drafted: list[int], n_accepted: int, n_drafted: int) -> None:
    while len(drafted) < n_drafted:
        drafted.append(0)
        accepted.append(0)
    for i in range(n_drafted):
        drafted[i] += 1
        accepted[i] += i < n_accepted


class SessionMetrics:
    """Aggregates over a session's lifetime; updated by its loop thread only."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.busy_s = 0.0  # time spent in prefill and steps
        self.iterations = 0  # loop iterations that ran work
        self.steps = 0
        self.prefills = 0
        self.prefill_requests = 0
        self.row_steps = 0  # sum over steps of the batch size
        self.step_tokens = 0
        self.accepted: list[int] = []
        self.drafted: list[int] = []
        self.batch_sizes: Counter[int] = Counter()
        self.beam_shapes: Counter[str] = Counter()
        self.queue_sum, self.queue_max = 0, 0
        self.finished: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.recent_ttft: deque[float] = deque(maxlen=4096)  # for quantiles, bounded memory

    def record_iteration(self, queue_length: int) -> None:
        self.iterations += 1
        self.queue_sum += queue_length
        self.queue_max = max(self.queue_max, queue_length)

    def record_prefill(self, requests: int, seconds: float) -> None:
        self.prefills += 1
        self.prefill_requests += requests
        self.busy_s += seconds

    def record_step(self, counts: list[int], width: int, length: int, drafted: int, seconds: float) -> None:
        """One step of beams W x L (length 1: plain) with `drafted` draft positions (the longest beam's)."""
        self.steps += 1
        self.busy_s += seconds
        self.batch_sizes[len(counts)] += 1
        self.beam_shapes[f"{width}x{length}" if length > 1 else "plain"] += 1
        self.row_steps += len(counts)
        self.step_tokens += sum(counts)
        for c in counts:
            _count_positions(self.accepted, self.drafted, c - 1, drafted)

    def record_finish(self, reason: str, m: RequestMetrics) -> None:
        self.finished[reason] += 1
        self.prompt_tokens += m.prompt_tokens
        self.generated_tokens += m.generated_tokens
        if m.generated_tokens:
            self.ttft_sum += m.ttft_s
            self.ttft_count += 1
            self.recent_ttft.append(m.ttft_s)

    def snapshot(self, running: int, waiting: int) -> dict[str, Any]:
        batch_total = sum(self.batch_sizes.values())
        return {
            "uptime_s": time.perf_counter() - self.started,
            "busy_s": self.busy_s,
            "requests": {"running": running, "waiting": waiting, **dict(self.finished)},
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "tok_per_s": self.generated_tokens / self.busy_s if self.busy_s else 0.0,
            "steps": self.steps,
            "prefills": self.prefills,
            "prefill_batch_mean": self.prefill_requests / self.prefills if self.prefills else 0.0,
            "tokens_per_step": self.step_tokens / self.row_steps if self.row_steps else 0.0,
            "acceptance_by_position": [a / d for a, d in zip(self.accepted, self.drafted)],
            "batch_size": {
                "mean": self.row_steps / batch_total if batch_total else 0.0,
                "max": max(self.batch_sizes, default=0),
                "histogram": dict(sorted(self.batch_sizes.items())),
            },
            "beam_shapes": dict(self.beam_shapes),
            "queue_length": {
                "current": waiting,
                "mean": self.queue_sum / self.iterations if self.iterations else 0.0,
                "max": self.queue_max,
            },
            "ttft_s": {
                "mean": self.ttft_sum / self.ttft_count if self.ttft_count else 0.0,
                "p50": _quantile(self.recent_ttft, 0.5),
                "p90": _quantile(self.recent_ttft, 0.9),
            },
        }


def _quantile(xs: deque[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]
