"""Context lookup: a draft beam copied from the sequence's own earlier tokens.

Small models repeat themselves and copy from their prompts. When the last n tokens (the
guaranteed token last) occurred earlier in the sequence, the tokens that followed them there
are a likely continuation. That continuation joins the drafter's beams in the same packed
tree, so verification accepts it only where it equals what the base model would emit:
greedy output is unchanged, and sampling stays exact because the tree walk never uses draft
probabilities (acceptance.tree_walk). A row with no match repeats the drafter's first beam,
which packing dedups away: it costs no verified token.
"""
from __future__ import annotations

import torch
from torch import Tensor


def lookup_beam(history: Tensor, ends: Tensor, length: int, max_ngram: int, fallback: Tensor) -> Tensor:
    """One beam per row continuing the latest earlier occurrence of its longest matching suffix.

    history [B, S]: each row's tokens, the guaranteed token at index ends[b] (ends [B]);
    suffixes of max_ngram tokens down to 1 are tried, longest first, and the latest earlier
    occurrence wins. fallback [B, L]: the beam of rows with no match. Returns [B, L], the
    guaranteed token first. A continuation that runs into the suffix itself repeats with the
    match's period (the sequence ...abcab proposes c, a, b, c, ...).
    """
    b = history.shape[0]
    dev = history.device
    span = int(ends.max()) + 1
    history = history[:, :span]
    starts = torch.full((b,), -1, dtype=torch.long, device=dev)  # continuation's first index
    for n in range(max_ngram, 0, -1):
        if span <= n:
            continue
        suffix = history.gather(1, (ends[:, None] - n + 1 + torch.arange(n, device=dev)).clamp(min=0))  # [B, n]
        match = (history.unfold(1, n, 1) == suffix[:, None, :]).all(-1)  # [B, span - n + 1]
        at = torch.arange(match.shape[1], device=dev)
        # An earlier occurrence at i has at least one token after it: i + n <= ends.
        latest = torch.where(match & (at[None, :] + n <= ends[:, None]), at, -1).amax(-1)
        found = (starts < 0) & (latest >= 0) & (ends >= n - 1)
        starts = torch.where(found, latest + n, starts)
    period = torch.where(starts >= 0, ends + 1 - starts, 1)  # [B]; rows without a match read index 0
    i = torch.arange(length - 1, device=dev)
    index = starts[:, None].clamp(min=0) + i[None, :] % period[:, None]  # [B, L-1]
    beam = torch.cat((history.gather(1, ends[:, None]), history.gather(1, index)), dim=1)
    return torch.where((starts >= 0)[:, None], beam, fallback)
