"""Triton kernel for redrafter::packed_attention (flash-attention style, one pass).

A program owns one (batch row, KV head) and a block of query rows, where the rows are the
new tokens times the query heads sharing that KV head (GQA: K/V are loaded once per group).
It streams the committed context [0, start) of the row's cache slot (all visible), then
the new tokens' own keys under the tree mask, with an online softmax in fp32. No [T, S]
mask or gathered K/V copy is materialised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _online_block(acc, m_i, l_i, q, kb, vb, visible, scale, PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _packed_attention_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, starts_ptr, mask_ptr, out_ptr,
                             T, D, KVH, scale,
                             sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sc_s, sc_t, sc_h, so_b, so_t, so_h,
                             GROUP: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // KVH
    g = tl.program_id(1) % KVH
    slot = tl.load(slots_ptr + b).to(tl.int64)
    start = tl.load(starts_ptr + b).to(tl.int32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row = token * GROUP + head-in-group
    t = rows // GROUP
    h = g * GROUP + rows % GROUP
    row_ok = t < T
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    scale = scale * 1.4426950408889634  # log2(e): softmax in base 2
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    n = tl.arange(0, BLOCK_N)
    cache_k = kc_ptr + slot * sc_s + g * sc_h
    cache_v = vc_ptr + slot * sc_s + g * sc_h
    for n0 in range(0, start, BLOCK_N):  # committed context: visible to every new token
        pos = n0 + n
        ok = pos < start
        off = pos[:, None].to(tl.int64) * sc_t + d[None, :]
        kb = tl.load(cache_k + off, mask=ok[:, None] & d_ok[None, :], other=0.0)
        vb = tl.load(cache_v + off, mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc, m_i, l_i = _online_block(acc, m_i, l_i, q, kb, vb, ok[None, :], scale, PRECISION)
    for u0 in range(0, T, BLOCK_N):  # the new tokens, under the tree mask
        u = u0 + n
        ok = u < T
        off = b * sk_b + u[:, None] * sk_t + g * sk_h + d[None, :]
        kb = tl.load(k_ptr + off, mask=ok[:, None] & d_ok[None, :], other=0.0)
        vb = tl.load(v_ptr + off, mask=ok[:, None] & d_ok[None, :], other=0.0)
        vis = tl.load(mask_ptr + b * T * T + t[:, None] * T + u[None, :],
                      mask=row_ok[:, None] & ok[None, :], other=0) != 0
        acc, m_i, l_i = _online_block(acc, m_i, l_i, q, kb, vb, vis, scale, PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that sees nothing gets 0, not NaN
    tl.store(out_ptr + b * so_b + t[:, None] * so_t + h[:, None] * so_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def packed_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                     starts: Tensor, tree_mask: Tensor) -> Tensor:
    """Same contract as redrafter::packed_attention (see plugins.ops)."""
    b, t, heads, d = q.shape
    kvh = k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if not q.dtype == k.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"packed_attention needs one dtype for q, k/v and the caches, got {q.dtype}, "
                         f"{k.dtype} and {k_cache.dtype}: build the cache in the model's dtype")
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("packed_attention needs K and V caches with the same layout and a contiguous head_dim")
    tree_mask = tree_mask.contiguous()
    out = torch.empty_like(q)
    group = heads // kvh
    block_m = max(16, min(64, triton.next_power_of_2(t * group)))
    grid = (triton.cdiv(t * group, block_m), b * kvh)
    _packed_attention_kernel[grid](
        q, k, v, k_cache, v_cache, slots, starts, tree_mask, out, t, d, kvh, d ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=32, D_PAD=max(16, triton.next_power_of_2(d)),
    )
    return out
