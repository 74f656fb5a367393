"""Triton kernels for redrafter::beam_draft.

The beam search itself stays a short host loop over the L-1 draft steps; each step runs
- `_linear_kernel` for the RNN update, fused: embedding-row gather of the previous tokens,
  parent-beam gather of the previous states, both GEMMs, bias and SiLU in one launch;
- `_linear_kernel` for every ResBlock (GEMM + bias + SiLU + residual), the optional
  input_proj and the shared head's projection to the hidden size;
- a cuBLAS matmul (torch) for the vocab projection, the one large GEMM;
- `_logsoftmax_topk_kernel`: per beam, one pass over the vocabulary computing the
  log-softmax normaliser (online logsumexp) and the beam's own top-W candidates
  (bitonic top-k over packed value/index keys, ties to the lower token id);
- a W x W merge and the beam-history gather (torch; W^2 elements); with a draft
  vocabulary the vocabulary projection has Vd rows and the W picked rows map to token ids
  here (rows are increasing in token id, so row ties break like token-id ties).
The global top-W over W*V is always among the per-beam top-W lists, so the two-stage
top-k selects exactly what runtime.beam_search selects.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...runtime.beam_search import DEAD, search_tree


@triton.jit
def _accumulate(acc, x_ptr, xr, stride_x, w_ptr, stride_w, rn, K, m_ok, n_ok,
                PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[xr] @ w[rn]^T over K, in BLOCK_K chunks (rows xr of x, rows rn of w)."""
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(x_ptr + xr[:, None].to(tl.int64) * stride_x + k[None, :],
                    mask=m_ok[:, None] & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_w + k[:, None],
                    mask=n_ok[None, :] & (k[:, None] < K), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _linear_kernel(x_ptr, xrow_ptr, w_ptr, x2_ptr, x2row_ptr, w2_ptr, b_ptr, res_ptr, out_ptr,
                   M, N, K, K2, stride_x, stride_w, stride_x2, stride_w2, stride_res, stride_out,
                   X_ROWS: tl.constexpr, HAS_X2: tl.constexpr, X2_ROWS: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_RES: tl.constexpr,
                   PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = res + act(x[xrow] @ w^T + x2[x2row] @ w2^T + b); weights are [N, K] (nn.Linear)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    xr = tl.load(xrow_ptr + rm, mask=m_ok, other=0) if X_ROWS else rm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(acc, x_ptr, xr, stride_x, w_ptr, stride_w, rn, K, m_ok, n_ok, PRECISION, BLOCK_K)
    if HAS_X2:
        x2r = tl.load(x2row_ptr + rm, mask=m_ok, other=0) if X2_ROWS else rm
        acc = _accumulate(acc, x2_ptr, x2r, stride_x2, w2_ptr, stride_w2, rn, K2, m_ok, n_ok, PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + rm[:, None] * stride_res + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def fused_linear(x: Tensor, w: Tensor, bias: Tensor | None = None, *, x_rows: Tensor | None = None,
                 x2: Tensor | None = None, w2: Tensor | None = None, x2_rows: Tensor | None = None,
                 silu: bool = False, residual: Tensor | None = None) -> Tensor:
    """act(x[x_rows] @ w.T + x2[x2_rows] @ w2.T + bias) + residual, for 2-D x/x2 and
    [N, K] weights; x_rows / x2_rows ([M] int) gather input rows inside the kernel."""
    m = x.shape[0] if x_rows is None else x_rows.shape[0]
    n, k = w.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if x2 is not None:
        x2, w2 = x2.contiguous(), w2.contiguous()
    x, w = x.contiguous(), w.contiguous()
    if residual is not None:
        residual = residual.contiguous()
    block_m, block_n, block_k = 32, 64, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    dummy = out
    _linear_kernel[grid](
        x, x_rows if x_rows is not None else dummy, w,
        x2 if x2 is not None else dummy, x2_rows if x2_rows is not None else dummy,
        w2 if w2 is not None else dummy, bias if bias is not None else dummy,
        residual if residual is not None else dummy, out,
        m, n, k, w2.shape[1] if w2 is not None else 0,
        x.stride(0), w.stride(0), x2.stride(0) if x2 is not None else 0,
        w2.stride(0) if w2 is not None else 0, residual.stride(0) if residual is not None else 0,
        out.stride(0),
        X_ROWS=x_rows is not None, HAS_X2=x2 is not None, X2_ROWS=x2_rows is not None,
        HAS_BIAS=bias is not None, SILU=silu, HAS_RES=residual is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


# Below every real key (its high half would be a negative NaN's).
_NO_KEY: tl.constexpr = tl.constexpr(-(2**63))


@triton.jit
def _float_key(x, idx):
    """Order-preserving int64 key of (fp32 value, index): larger value first, then lower index."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _logsoftmax_topk_kernel(logits_ptr, scores_ptr, val_ptr, tok_ptr, R, V, K,
                            K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Rows r: top-K of scores[r] + log_softmax(logits[r]) -> val [R, K] (fp32), tok [R, K]."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    row = logits_ptr + r[:, None].to(tl.int64) * V
    offs = tl.arange(0, BLOCK_V)
    run_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_R,), tl.float32)
    best = tl.full((BLOCK_R, K_PAD), _NO_KEY, tl.int64)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + offs[None, :]
        x = tl.load(row + v, mask=r_ok[:, None] & (v < V), other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(x, 1))
        new_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # padding rows
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), 1)
        run_max = new_max
        keys = tl.where(v < V, _float_key(x, v), _NO_KEY)
        # Merge only when some row's block holds a key above that row's current K-th best:
        # after the first blocks this is rare, so most blocks cost one max-reduction.
        if tl.max((tl.max(keys, 1) > tl.min(best, 1)).to(tl.int32), 0) > 0:
            both = tl.reshape(tl.join(best, tl.topk(keys, K_PAD, dim=1)), (BLOCK_R, 2 * K_PAD))
            best = tl.topk(both, K_PAD, dim=1)
    lse = run_max + tl.log(tl.where(run_sum > 0, run_sum, 1.0))  # padding rows: no log(0)
    tok = 0x7FFFFFFF - (best & 0x7FFFFFFF).to(tl.int32)
    ordered = (best >> 32).to(tl.int32)
    logit = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    ok = tok < V
    score = tl.load(scores_ptr + r, mask=r_ok, other=0.0)
    val = tl.where(ok, score[:, None] + (logit - lse[:, None]), float("-inf"))
    j = tl.arange(0, K_PAD)[None, :]
    out = r[:, None] * K + j
    store_ok = r_ok[:, None] & (j < K)
    tl.store(val_ptr + out, val, mask=store_ok)
    tl.store(tok_ptr + out, tl.where(ok, tok, 0).to(tl.int64), mask=store_ok)


def logsoftmax_topk(logits: Tensor, scores: Tensor, k: int, block_v: int | None = None) -> tuple[Tensor, Tensor]:
    """logits [R, V], scores [R] -> top-k of scores + log_softmax(logits) per row: values [R, k]
    (fp32, descending), token ids [R, k]. block_v: vocabulary chunk per loop iteration."""
    r, v = logits.shape
    logits = logits.contiguous()
    vals = torch.empty(r, k, dtype=torch.float32, device=logits.device)
    toks = torch.empty(r, k, dtype=torch.long, device=logits.device)
    k_pad = max(2, triton.next_power_of_2(k))
    block_v = max(k_pad, block_v or min(1024, triton.next_power_of_2(v)))
    # A GPU program keeps one row's keys in registers; the CPU interpreter pays per program,
    # so there one program takes many rows.
    block_r = 1 if logits.is_cuda else min(64, triton.next_power_of_2(r))
    _logsoftmax_topk_kernel[(triton.cdiv(r, block_r),)](
        logits, scores.float().contiguous(), vals, toks, r, v, k, K_PAD=k_pad, BLOCK_R=block_r, BLOCK_V=block_v)
    return vals, toks


def beam_draft(context: Tensor, first_token: Tensor, embed: Tensor,
               rnn_w: Tensor | None, rnn_u_weight: Tensor | None, rnn_u_bias: Tensor | None,
               input_proj_weight: Tensor | None, input_proj_bias: Tensor | None,
               res_weights: list[Tensor], res_biases: list[Tensor], out_weight: Tensor,
               base_lm_head: Tensor | None, draft_vocab: Tensor | None, width: int, length: int,
               keep_prefixes: bool = False) -> Tensor:
    """Same contract as redrafter::beam_draft (see plugins.ops); beams [B, W, L], or with keep_prefixes
    the W final beams and then the W prefixes kept at each shorter depth, PAD-ended."""
    b, hid = context.shape
    w = width
    rows = b * w
    dev = context.device
    beams = first_token[:, None, None].expand(b, w, 1).contiguous()
    scores = torch.full((b, w), DEAD, device=dev)
    scores[:, 0] = 0.0
    state = context.new_zeros(rows, hid)
    tokens = beams.view(rows)
    state_rows = torch.arange(rows, device=dev)  # parent row of each beam's state
    ctx = context.repeat_interleave(w, dim=0)  # [B*W, H]
    kept = []
    for _ in range(length - 1):
        if keep_prefixes and beams.shape[2] > 1:
            kept.append(beams)
        if rnn_w is not None:
            state = fused_linear(embed, rnn_w, rnn_u_bias, x_rows=tokens, x2=state, w2=rnn_u_weight,
                                 x2_rows=state_rows, silu=True)
        else:
            state = state[state_rows] + embed[tokens]
        z = torch.cat((ctx, state), dim=-1)
        if input_proj_weight is not None:
            z = fused_linear(z, input_proj_weight, input_proj_bias)
        for rw, rb in zip(res_weights, res_biases):
            z = fused_linear(z, rw, rb, silu=True, residual=z)
        if base_lm_head is not None:
            z = fused_linear(z, out_weight)
            logits = z @ base_lm_head.t()
        else:
            logits = z @ out_weight.t()
        vocab = logits.shape[-1]
        vals, toks = logsoftmax_topk(logits, scores.view(rows), w)  # [B*W, W]
        # Merge: the global top-W of beam b's W*V candidates are among its W*W finalists.
        vals, toks = vals.view(b, w * w), toks.view(b, w * w)
        flat = (torch.arange(w, device=dev).repeat_interleave(w) * vocab)[None, :] + toks  # parent*V + token
        scores, pick = vals.topk(w, dim=-1)
        flat = flat.gather(1, pick)
        parent, new_tok = flat // vocab, flat % vocab  # new_tok: output rows
        if draft_vocab is not None:
            new_tok = draft_vocab[new_tok]
        beams = torch.cat((beams.gather(1, parent[:, :, None].expand_as(beams)), new_tok[:, :, None]), dim=2)
        state_rows = (parent + torch.arange(b, device=dev)[:, None] * w).view(rows)
        tokens = new_tok.reshape(rows)
    return search_tree(beams, kept) if keep_prefixes else beams
