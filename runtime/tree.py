"""Packing of beams that share prefixes into one sequence with a tree attention mask.

prefix_tree[b, i, j] is the smallest beam k whose first j+1 tokens equal beam i's; token
(i, j) is kept only where prefix_tree[b, i, j] == i. Each packed token sees its ancestors
(the packed tokens of its own beam at depths <= j), and its position id is the committed
context length plus its depth.

Beams may be shorter than L: a beam ends where its PAD (-1) tail starts (the context lookup
beam can be longer than the drafted ones). PAD tokens are not packed; their unpacker entries
repeat the beam's last real token's, so gathering the base model's prediction there gives the
prediction after that token, and PAD never equals a prediction, so acceptance stops there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PAD = -1  # fills a beam past its last token


@dataclass
class PackedBeams:
    tokens: Tensor  # [B, T] packed tokens, zero-padded past n_tokens
    depth: Tensor  # [B, T] depth of each packed token in its beam (0 = guaranteed token)
    unpacker: Tensor  # [B, W, L] packed index of every beam token (past a beam's end: its last token's)
    mask: Tensor  # [B, T, T] bool: packed token t sees packed token u
    n_tokens: Tensor  # [B] packed length of each row


def prefix_tree(beams: Tensor) -> Tensor:
    """[B, W, L] -> [B, W, L]: for each (i, j) the first beam sharing beam i's prefix up to j."""
    w = beams.shape[1]
    same = (beams[:, :, None, :] == beams[:, None, :, :]).int().cumprod(dim=-1)  # [B, W, W, L]
    k = torch.arange(w, device=beams.device)[None, None, :, None]
    return torch.where(same.bool(), k, w).amin(dim=2)


def pack_beams(beams: Tensor) -> PackedBeams:
    """beams [B, W, L], each a guaranteed token then drafts, optionally ending in PAD."""
    b, w, l = beams.shape
    owner = prefix_tree(beams)
    real = beams != PAD
    keep = ((owner == torch.arange(w, device=beams.device)[None, :, None]) & real).view(b, w * l)
    index = keep.long().cumsum(-1) - 1  # packed index of each kept (i, j), row-major
    n_tokens = keep.sum(-1)
    t = int(n_tokens.max())
    # Token (i, j) is stored at the packed index of (owner[i, j], j); past a beam's end, at its last token's.
    last = (real.sum(-1, keepdim=True) - 1).clamp(min=0)  # [B, W, 1]
    depth_of = torch.minimum(torch.arange(l, device=beams.device).expand(b, w, l), last)  # [B, W, L]
    flat_owner = owner.gather(2, depth_of) * l + depth_of
    unpacker = index.gather(1, flat_owner.view(b, w * l)).view(b, w, l)
    tokens = beams.new_zeros(b, t)
    depth = beams.new_zeros(b, t)
    rows = torch.arange(b, device=beams.device)[:, None].expand(b, w * l)
    tokens[rows, unpacker.view(b, w * l)] = beams.gather(2, depth_of).view(b, w * l)
    depth[rows, unpacker.view(b, w * l)] = depth_of.reshape(b, w * l)
    # Ancestors of packed token unpacker[i, j] are unpacker[i, j'] for j' <= j.
    mask = torch.zeros(b, t, t, dtype=torch.bool, device=beams.device)
    anc = torch.ones(l, l, dtype=torch.bool, device=beams.device).tril()  # [j, j']
    qi = unpacker[:, :, :, None].expand(b, w, l, l)
    ki = unpacker[:, :, None, :].expand(b, w, l, l)
    bi = torch.arange(b, device=beams.device)[:, None, None, None].expand(b, w, l, l)
    sel = anc.expand(b, w, l, l)
    mask[bi[sel], qi[sel], ki[sel]] = True
    pad = torch.arange(t, device=beams.device)[None, :] >= n_tokens[:, None]  # padding sees itself
    mask |= torch.diag_embed(pad)
    return PackedBeams(tokens, depth, unpacker, mask, n_tokens)
