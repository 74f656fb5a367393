"""Deciding which drafted tokens the base model accepts.

Greedy: beam i accepts its longest prefix of drafts that equals the base model's argmax
chain; the best beam is the one with the most accepted drafts (lowest index on ties).
The step emits those drafts plus the bonus token, the base model's argmax right after
the last accepted one, so every emitted token is exactly what plain greedy decoding
would have produced.

Sampling: `tree_walk` walks the packed tree from the root, drawing each next token from
the base model's distribution at the current node and moving to the child that carries
it; the first draw with no matching child is emitted and ends the step. Every emitted
token is a draw from the base distribution given everything before it, so the output is
distributed exactly as plain autoregressive sampling (the drafts are deterministic given
the context, so they only decide how many draws one verification forward can serve).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .tree import PackedBeams


@dataclass
class Acceptance:
    beam: Tensor  # [B] chosen beam
    accepted: Tensor  # [B] accepted drafted tokens (0..L-1), the guaranteed token not counted
    bonus: Tensor  # [B] the base model's token after the last accepted one


def greedy_accept(beams: Tensor, predicted: Tensor) -> Acceptance:
    """beams [B, W, L]; predicted [B, W, L]: base argmax at each beam position."""
    match = (beams[:, :, 1:] == predicted[:, :, :-1]).long()  # [B, W, L-1]
    # The longest all-match prefix: positions j whose running count of matches is j + 1
    # (a cumsum: unlike cumprod it has an ONNX export).
    run = torch.arange(1, beams.shape[2], device=beams.device)
    per_beam = (match.cumsum(-1) == run).sum(-1)  # [B, W]
    accepted, beam = per_beam.max(dim=-1)
    rows = torch.arange(beams.shape[0], device=beams.device)
    return Acceptance(beam, accepted, predicted[rows, beam, accepted])


@dataclass
class GreedyStep:
    tokens: Tensor  # [B, L] emitted: the accepted drafts, then the bonus; row b valid up to counts[b]
    counts: Tensor  # [B] emitted tokens (accepted drafts + bonus)
    path: Tensor  # [B, L] packed index of each token of the chosen beam (what kv_commit moves)
    last: Tensor  # [B] packed index of the last accepted token: decoding continues from its hidden state


def greedy_verify(beams: Tensor, unpacker: Tensor, predicted_packed: Tensor) -> GreedyStep:
    """One greedy verification from the base argmax at every packed token.

    beams [B, W, L]; unpacker [B, W, L] (packed index of every beam token); predicted_packed
    [B, T]. Pure tensor code with static shapes: the decoder and the compiled step program
    (redrafter.builder) share it.
    """
    b, w, l = beams.shape
    predicted = predicted_packed.gather(1, unpacker.reshape(b, w * l)).view(b, w, l)
    acc = greedy_accept(beams, predicted)
    rows = torch.arange(b, device=beams.device)
    cols = torch.arange(l, device=beams.device)
    # Past the accepted tokens each entry is its own column: a no-op move for kv_commit.
    path = torch.where(cols <= acc.accepted[:, None], unpacker[rows, acc.beam], cols)
    drafts = torch.cat((beams[rows, acc.beam, 1:], acc.bonus[:, None]), dim=1)
    tokens = drafts.scatter(1, acc.accepted[:, None], acc.bonus[:, None])
    return GreedyStep(tokens, acc.accepted + 1, path, path.gather(1, acc.accepted[:, None])[:, 0])


@dataclass
class Walk:
    path: Tensor  # [B, L] packed index of each visited node; past counts[b]: its own column (a no-op commit)
    tokens: Tensor  # [B, L] token drawn at each visited node; row b is valid up to counts[b]
    counts: Tensor  # [B] visited nodes = emitted tokens (1..L)


def tree_parents(unpacker: Tensor, n_packed: int) -> Tensor:
    """[B, W, L] unpacker -> [B, T] packed index of each packed token's parent (-1: root, padding)."""
    b = unpacker.shape[0]
    parent = torch.full((b, n_packed + 1), -1, dtype=torch.long, device=unpacker.device)
    # Beams sharing a prefix write the same parent for the same packed token. Past a beam's end
    # its unpacker repeats the last token's index (tree.pack_beams): those entries write to a spare column.
    child = unpacker[:, :, 1:]
    child = torch.where(child == unpacker[:, :, :-1], n_packed, child)
    return parent.scatter_(1, child.reshape(b, -1), unpacker[:, :, :-1].reshape(b, -1))[:, :n_packed]


def tree_walk(packed: PackedBeams, length: int, choose: Callable[[Tensor, int], Tensor]) -> Walk:
    """Walk every row's packed tree from its root (packed index 0, the guaranteed token).

    choose(nodes [B], d) returns the token drawn at each row's current node, the d-th
    token the row emits this step (argmax for greedy rows, a sample from the processed
    base distribution for sampling rows). Rows stop at the first token no child carries.
    """
    b, t = packed.tokens.shape
    dev = packed.tokens.device
    parent = tree_parents(packed.unpacker, t)
    node = torch.zeros(b, dtype=torch.long, device=dev)
    alive = torch.ones(b, dtype=torch.bool, device=dev)
    path = torch.arange(length, device=dev).repeat(b, 1)
    tokens = torch.zeros(b, length, dtype=torch.long, device=dev)
    counts = torch.zeros(b, dtype=torch.long, device=dev)
    for d in range(length):
        x = choose(node, d)
        path[:, d] = torch.where(alive, node, path[:, d])
        tokens[:, d] = torch.where(alive, x, tokens[:, d])
        counts += alive
        child = (parent == node[:, None]) & (packed.tokens == x[:, None])  # at most one per row
        found = child.any(-1)
        alive &= found
        if not bool(alive.any()):
            break
        node = torch.where(found, child.int().argmax(-1), node)
    return Walk(path, tokens, counts)
