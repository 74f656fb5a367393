"""Triton kernel for redrafter::kv_commit: move the accepted path's K/V entries into place.

One program per (batch row, layer, chunk of the kv_heads*head_dim row) copies entries in
increasing order i: entry i is read from start+src[i] >= start+i, and every earlier write
went to a position < start+i, so the in-place move never reads an overwritten entry.
K and V move in the same program.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _kv_commit_kernel(k_ptr, v_ptr, slots_ptr, starts_ptr, src_ptr, N, ROW, s_layer, s_slot, s_pos,
                      BLOCK: tl.constexpr):
    b, layer, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    start = tl.load(starts_ptr + b).to(tl.int64)
    base = layer.to(tl.int64) * s_layer + slot * s_slot
    e = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = e < ROW
    for i in range(0, N):
        src = start + tl.load(src_ptr + b * N + i).to(tl.int64)
        dst = start + i
        tl.store(k_ptr + base + dst * s_pos + e, tl.load(k_ptr + base + src * s_pos + e, mask=ok), mask=ok)
        tl.store(v_ptr + base + dst * s_pos + e, tl.load(v_ptr + base + src * s_pos + e, mask=ok), mask=ok)


def kv_commit(k_cache: Tensor, v_cache: Tensor, slots: Tensor, starts: Tensor, src: Tensor) -> None:
    """Same contract as redrafter::kv_commit (see plugins.ops); mutates both caches."""
    layers, _, _, kvh, d = k_cache.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("kv_commit needs contiguous [layers, slots, capacity, kv_heads, head_dim] caches")
    b, n = src.shape
    row = kvh * d
    block = min(1024, triton.next_power_of_2(row))
    grid = (b, layers, triton.cdiv(row, block))
    _kv_commit_kernel[grid](k_cache, v_cache, slots, starts, src.contiguous(), n, row,
                            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), BLOCK=block)
