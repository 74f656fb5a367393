"""Deciding which drafted tokens the base model accepts.

Greedy: beam i accepts its longest prefix of drafts that equals the base model's argmax
chain; the best beam is the one with the most accepted drafts (lowest index on ties).
The step emits those drafts plus the bonus token, the base model's argmax right after
the last accepted one, so every emitted token is exactly what plain greedy decoding
would have produced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Acceptance:
    beam: Tensor  # [B] chosen beam
    accepted: Tensor  # [B] accepted drafted tokens (0..L-1), the guaranteed token not counted
    bonus: Tensor  # [B] the base model's token after the last accepted one


def greedy_accept(beams: Tensor, predicted: Tensor) -> Acceptance:
    """beams [B, W, L]; predicted [B, W, L]: base argmax at each beam position."""
    match = (beams[:, :, 1:] == predicted[:, :, :-1]).int().cumprod(dim=-1)
    per_beam = match.sum(-1)  # [B, W]
    accepted, beam = per_beam.max(dim=-1)
    rows = torch.arange(beams.shape[0], device=beams.device)
    return Acceptance(beam, accepted, predicted[rows, beam, accepted])
