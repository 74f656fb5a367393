"""Triton kernel for redrafter::pack_beams: one program packs one batch row in registers
(prefix ownership by comparing against one beam at a time, cumulative packed index,
scatter of tokens / depths / ancestor mask), so the whole packing is a single launch.
A beam ends where its PAD (-1) tail starts, as in runtime.tree."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _pack_kernel(beams_ptr, tokens_ptr, depth_ptr, unpacker_ptr, mask_ptr, n_ptr, W, L,
                 W_PAD: tl.constexpr, L_PAD: tl.constexpr, T_PAD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    T = W * L
    i = tl.arange(0, W_PAD)[:, None]
    j = tl.arange(0, L_PAD)[None, :]
    valid = (i < W) & (j < L)  # [W, L]
    row = beams_ptr + b * T
    bm = tl.load(row + i * L + j, mask=valid, other=-1)
    # owner[i, j]: the first beam k whose first j+1 tokens equal beam i's (k ascending, so
    # the first match sticks). One beam per iteration keeps every tensor [W, L].
    owner = tl.full((W_PAD, L_PAD), W_PAD, tl.int32)
    for k in range(0, W):
        bk = tl.load(row + k * L + j, mask=j < L, other=-1)  # [1, L]
        same = tl.cumsum((bm != bk).to(tl.int32), axis=1) == 0
        owner = tl.where(same & (owner == W_PAD), k, owner)
    real = valid & (bm != -1)
    keep = (owner == i) & real
    index = tl.reshape(tl.cumsum(tl.reshape(keep.to(tl.int32), (W_PAD * L_PAD,)), axis=0),
                       (W_PAD, L_PAD)) - 1  # packed index of each kept token, row-major
    n = tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
    # unpacker[i, j] = index[owner[i, j], j]
    unp = tl.zeros((W_PAD, L_PAD), tl.int32)
    for k in range(0, W):
        index_k = tl.sum(tl.where(i == k, index, 0), axis=0)[None, :]  # row k of index, [1, L]
        unp = tl.where(owner == k, index_k, unp)
    tl.store(tokens_ptr + b * T + unp, bm, mask=keep)
    tl.store(depth_ptr + b * T + unp, (j + tl.zeros_like(unp)).to(tl.int64), mask=keep)
    # Past a beam's end its unpacker repeats the index of its last token.
    last = tl.sum(real.to(tl.int32), axis=1)[:, None] - 1  # [W, 1]
    for jj in range(0, L):
        unp = tl.where((j > last) & (jj == last), tl.sum(tl.where(j == jj, unp, 0), axis=1)[:, None], unp)
    tl.store(unpacker_ptr + b * T + i * L + j, unp.to(tl.int64), mask=valid)
    # Ancestors: packed token unp[i, j] sees unp[i, j'] for j' <= j (one depth j' at a time).
    out = mask_ptr + b * T * T
    for jj in range(0, L):
        anc = tl.sum(tl.where(j == jj, unp, 0), axis=1)[:, None]  # unp[:, jj], [W, 1]
        tl.store(out + unp * T + anc, tl.full((W_PAD, L_PAD), 1, tl.int1), mask=valid & (j >= jj))
    t = tl.arange(0, T_PAD)
    tl.store(out + t * T + t, tl.full((T_PAD,), 1, tl.int1), mask=(t >= n) & (t < T))  # padding sees itself
    tl.store(n_ptr + b, n.to(tl.int64))


def pack_beams(beams: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same contract as redrafter::pack_beams (see plugins.ops)."""
    b, w, l = beams.shape
    t = w * l
    beams = beams.contiguous()
    tokens = beams.new_zeros(b, t)
    depth = beams.new_zeros(b, t)
    unpacker = torch.empty_like(beams)
    mask = torch.zeros(b, t, t, dtype=torch.bool, device=beams.device)
    n_tokens = beams.new_empty(b)
    _pack_kernel[(b,)](beams, tokens, depth, unpacker, mask, n_tokens, w, l,
                       W_PAD=triton.next_power_of_2(w), L_PAD=triton.next_power_of_2(l),
                       T_PAD=triton.next_power_of_2(t))
    return tokens, depth, unpacker, mask, n_tokens
