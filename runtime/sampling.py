"""Per-request sampling parameters and the base model's processed next-token distribution.

Every sampled token is drawn by inverse CDF from one uniform number, and a request's
uniforms come from its own seeded stream in output order: the n-th generated token
always uses the n-th uniform. The speculative tree walk (acceptance.tree_walk) draws
exactly one token per emitted token, so a seeded request gives the same output with
or without speculation, whatever the beam shape.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

_CHUNK = 64  # uniforms drawn per refill; fixed, so u_n depends only on (seed, n)


@dataclass(frozen=True)
class SamplingParams:
    """What to generate for one request. temperature 0 is greedy (argmax); top_k 0 and
    top_p 1.0 disable those filters. `stop` strings end the text before the match;
    `stop_token_ids` (and EOS unless ignore_eos) end it at that token."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, want: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={value!r} is invalid: {want}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "give an integer >= 1")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "give a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", self.top_k, "give an integer >= 0 (0 = no top-k filter)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "give a number in (0, 1] (1 = no nucleus filter)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "give an integer in [0, 2**63) or None")
        stop_ids = (self.stop_token_ids,) if _is_int(self.stop_token_ids) else self.stop_token_ids
        if isinstance(stop_ids, (str, bytes)) or not all(_is_int(t) and t >= 0 for t in stop_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "give a list of token ids >= 0")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", self.stop, "give a string or a list of non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", self.ignore_eos, "give true or false")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop_ids))
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        """Build from a JSON-like dict; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class SlotSampler:
    """A request's sampling state inside the decoder: its filters and its uniform stream."""

    def __init__(self, params: SamplingParams):
        if params.greedy:
            raise ValueError("greedy requests need no sampler")
        self.temperature, self.top_k, self.top_p = params.temperature, params.top_k, params.top_p
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        self._buffer = torch.empty(0, dtype=torch.float64)

    def peek(self, n: int) -> Tensor:
        """The next n uniforms in [0, 1) (float64, CPU), not yet consumed."""
        while self._buffer.numel() < n:
            more = torch.rand(_CHUNK, generator=self.generator, dtype=torch.float64)
            self._buffer = torch.cat((self._buffer, more))
        return self._buffer[:n]

    def consume(self, n: int) -> None:
        self._buffer = self._buffer[n:]


@dataclass
class BatchSampling:
    """The sampling rows of one decoder call, stacked: filters and this call's uniforms."""

    temperature: Tensor  # [N]
    top_k: Tensor  # [N] long, 0 = off
    top_p: Tensor  # [N]
    uniforms: Tensor  # [N, n] float64: column d is the draw for the d-th emitted token

    @classmethod
    def gather(cls, samplers: list[SlotSampler], n: int, device: torch.device) -> "BatchSampling":
        return cls(
            torch.tensor([s.temperature for s in samplers], device=device),
            torch.tensor([s.top_k for s in samplers], dtype=torch.long, device=device),
            torch.tensor([s.top_p for s in samplers], device=device),
            torch.stack([s.peek(n) for s in samplers]).to(device),
        )


def processed_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """The distribution P that sampling draws from, per row: softmax(logits / temperature)
    restricted to the top_k most likely tokens (ties at the k-th value kept) and then to the
    smallest most-likely set whose mass reaches top_p (renormalized).

    logits [N, V]; temperature (> 0), top_k, top_p: [N]. Returns [N, V] float32.
    """
    scaled = logits.float() / temperature[:, None]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        v = scaled.shape[-1]
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        k = torch.where(top_k > 0, top_k.clamp(max=v), v)
        kth = sorted_logits.gather(1, (k - 1)[:, None])
        keep_sorted = sorted_logits >= kth
        p = torch.where(keep_sorted, sorted_logits, -math.inf).softmax(-1)
        mass_before = p.cumsum(-1) - p
        keep_sorted &= mass_before < top_p[:, None]  # the most likely token always stays
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        scaled = scaled.masked_fill(~keep, -math.inf)
    return scaled.softmax(-1)


def draw(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw per row: the token whose CDF interval holds u. probs [N, V],
    uniforms [N] in [0, 1). Zero-probability tokens have empty intervals, so are never drawn."""
    cdf = probs.double().cumsum(-1)
    target = (uniforms.double() * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)
