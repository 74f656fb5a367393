"""Check every Triton kernel against its PyTorch reference and time both (run by the one GPU check
command, `python -m redrafter.builder.gpu_check --kernels`; see there).

Random weights only (no model files needed). Shapes follow SmolLM2-135M: hidden 576,
vocab 49152, 9 heads / 3 KV heads of 64, 30 layers; beams W in {1, 4, 16, 64}, L in {4, 5};
contexts 512-2048; batch 1 and 8; drafting with the shared and own heads over the whole
vocabulary and with the shared head over a random draft vocabulary of 8192 tokens. Prints a
table and, with $OUT set (or --out), writes gpu_check.json there. Exits 1 if any kernel
disagrees with its reference.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..runtime.atomic import atomic_file
from ..runtime.loading import SMOLLM2_135M
from ..runtime.tree import PAD


@dataclass(frozen=True)
class Shapes:
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    widths: tuple[int, ...]
    lengths: tuple[int, ...]
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    draft_vocab: int  # Vd of the draft-vocabulary case


_M = SMOLLM2_135M
SMOLLM2 = Shapes(_M["hidden_size"], _M["vocab_size"], _M["num_heads"], _M["num_kv_heads"], _M["head_dim"],
                 _M["num_layers"], (1, 4, 16, 64), (4, 5), (512, 2048), (1, 8), 8192)
TINY = Shapes(32, 61, 4, 2, 16, 2, (2,), (3,), (9,), (2,), 24)


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    check: str  # what was compared and how far apart
    ok: bool
    ref_ms: float
    kernel_ms: float

    @property
    def speedup(self) -> float:
        return self.ref_ms / self.kernel_ms if self.kernel_ms else float("nan")


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time of fn in ms (after one warm-up call that also compiles kernels)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def random_head(s: Shapes, head: str, dtype: torch.dtype, device: torch.device, seed: int = 0,
                draft_vocab_size: int = 0):
    """A random DraftHead (Apple's recipe: RNN, 2 ResBlocks, exit_dim 2H; a random draft
    vocabulary if draft_vocab_size) and base embed / LM head."""
    from ..runtime.drafter import DraftHead, DrafterConfig

    g = torch.Generator().manual_seed(seed)
    vocab = torch.randperm(s.vocab, generator=g)[:draft_vocab_size].sort().values if draft_vocab_size else None
    d = DraftHead(DrafterConfig.for_base(s.vocab, s.hidden, head=head, draft_vocab_size=draft_vocab_size), vocab)
    for p in d.parameters():
        p.data = torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5
    embed = torch.randn(s.vocab, s.hidden, generator=g)
    lm_head = torch.randn(s.vocab, s.hidden, generator=g) * s.hidden ** -0.5 * 4
    return (d.to(device=device, dtype=dtype).eval().requires_grad_(False), embed.to(device, dtype),
            lm_head.to(device, dtype))


def _walk(head, embed: Tensor, base_lm_head: Tensor | None, context: Tensor, beams: Tensor) -> tuple[Tensor, Tensor]:
    """The head, in fp32, along beams [B, W, L] (first token included): each beam's cumulative
    draft log-probability [B, W] (how the beam search ranks beams) and the log-probabilities of
    the token after it [B, W, Vout]. base_lm_head: head.output_weight(lm_head), as for the search."""
    if next(head.parameters()).dtype != torch.float32:
        head = copy.deepcopy(head).float()
    embed, context = embed.float(), context.float()
    lm = base_lm_head.float() if base_lm_head is not None else None
    b, w, l = beams.shape
    state = context.new_zeros(b, w, context.shape[-1])
    total = context.new_zeros(b, w)
    for j in range(l):
        state = head.step(state, embed[beams[:, :, j]])
        logp = torch.log_softmax(head.logits(context[:, None], state, lm), -1)
        if j + 1 < l:
            total += logp.gather(-1, _rows(head, beams[:, :, j + 1 : j + 2]))[..., 0]
    return total, logp


def _rows(head, tokens: Tensor) -> Tensor:
    """Token ids -> rows of the head's output (the draft vocabulary's positions, if it has one)."""
    return tokens if head.draft_vocab is None else torch.searchsorted(head.draft_vocab, tokens.contiguous())


def beam_slack(head, embed: Tensor, base_lm_head: Tensor | None, context: Tensor,
               draft: Callable[[int], Tensor], width: int, length: int) -> float:
    """How far a beam search strayed from exact top-W selection, in nats (max over steps and rows).

    draft(n) runs the search cut at n tokens, which gives the W beams it held after step n - 1.
    At every step each kept beam must extend a beam held before, the kept beams must differ,
    and each one's exact (fp32) score must reach the W-th best exact score among all
    extensions, up to the slack returned (rounding: a few ulps of a score per step; a wrong
    kernel keeps beams whole nats worse). Unlike comparing with a reference search, this holds
    when rounding breaks a near-tie the other way and the two searches part ways."""
    worst = 0.0
    held = draft(2)[:, :1, :1]  # [B, 1, 1]: every beam starts with the guaranteed token
    for n in range(2, length + 1):
        kept = draft(n)  # [B, W, n]
        scores, logp = _walk(head, embed, base_lm_head, context, held)
        cand = scores[:, :, None] + logp  # [B, P, Vout]: every extension of a held beam
        kth = cand.flatten(1).topk(width, dim=-1).values[:, -1]
        match = (kept[:, :, None, :-1] == held[:, None, :, :]).all(-1)  # [B, W, P]
        if not match.any(-1).all() or any(len(set(map(tuple, r.tolist()))) < width for r in kept):
            return float("inf")  # a kept beam extends no held beam, or two kept beams are the same
        got = cand[torch.arange(kept.shape[0], device=kept.device)[:, None], match.int().argmax(-1),
                   _rows(head, kept[:, :, -1])]
        worst = max(worst, (kth[:, None] - got).max().item())
        held = kept
    return worst


def check_beam_draft(s: Shapes, device: torch.device, dtype: torch.dtype, reps: int):
    from . import kernels
    from .ops import REFERENCES, head_weights

    rows = []
    for head_kind, vd in (("shared", 0), ("own", 0), ("shared", s.draft_vocab)):
        head, embed, lm_head = random_head(s, head_kind, dtype, device, draft_vocab_size=vd)
        lm_head = head.output_weight(lm_head)  # the draft vocabulary's rows, gathered once
        weights = head_weights(head, lm_head)
        for b in s.batches:
            g = torch.Generator().manual_seed(b)
            context = torch.randn(b, s.hidden, generator=g).to(device, dtype)
            first = torch.randint(0, s.vocab, (b,), generator=g).to(device)
            for w in s.widths:
                for l in s.lengths:
                    args = (context, first, embed)
                    kw = dict(weights, width=w, length=l)
                    ref = REFERENCES["beam_draft"](*args, **kw)
                    out = kernels.beam_draft(*args, **kw)
                    same = (out == ref).all(-1).float().mean().item()
                    slack = beam_slack(head, embed, lm_head, context,
                                       lambda n: kernels.beam_draft(*args, **(kw | {"length": n})), w, l)
                    # The search tree: the same final beams first, then W kept prefixes per shorter depth.
                    tree = kernels.beam_draft(*args, **kw, keep_prefixes=True)
                    tree_ok = tree.shape[1] == w * max(l - 1, 1) and torch.equal(tree[:, :w], out)
                    ok = slack <= (1e-3 if dtype == torch.float32 else 3e-2) * (l - 1) and tree_ok
                    name = f"{head_kind} Vd={vd}" if vd else head_kind
                    rows.append(Row("beam_draft", f"{name} B={b} W={w} L={l}", str(dtype)[6:],
                                    f"same beams as the reference {same:.0%}, top-W slack {slack:.1e}, "
                                    f"search tree {'ok' if tree_ok else 'WRONG'}", ok,
                                    timed(lambda: REFERENCES["beam_draft"](*args, **kw), device, reps),
                                    timed(lambda: kernels.beam_draft(*args, **kw), device, reps)))
    return rows


def random_beams(b: int, w: int, l: int, device: torch.device, seed: int = 0) -> Tensor:
    """Beams that share prefixes like real drafts: same first token, few choices per step."""
    g = torch.Generator().manual_seed(seed)
    beams = torch.randint(0, 3, (b, w, l), generator=g)
    beams[:, :, 0] = 7
    return beams.to(device)


def check_pack_beams(s: Shapes, device: torch.device, reps: int):
    from . import kernels
    from .ops import REFERENCES

    rows = []
    for b in s.batches:
        for w in s.widths:
            for l in s.lengths:
                beams = random_beams(b, w, l, device, seed=w * 10 + l)
                padded = beams.clone()
                padded[:, :-1, (l + 1) // 2:] = PAD  # drafted beams shorter than a lookup beam
                for name, x in ((f"B={b} W={w} L={l}", beams), (f"B={b} W={w} L={l} (PAD tails)", padded)):
                    ref = REFERENCES["pack_beams"](x)
                    out = kernels.pack_beams(x)
                    ok = all(torch.equal(p, q) for p, q in zip(out, ref))
                    rows.append(Row("pack_beams", name, "int64", "exact" if ok else "MISMATCH", ok,
                                    timed(lambda: REFERENCES["pack_beams"](x), device, reps),
                                    timed(lambda: kernels.pack_beams(x), device, reps)))
    return rows


def check_packed_attention(s: Shapes, device: torch.device, dtype: torch.dtype, reps: int):
    from . import kernels
    from .ops import REFERENCES

    rows = []
    l = max(s.lengths)
    for b in s.batches:
        for ctx in s.contexts:
            for w in s.widths:
                g = torch.Generator().manual_seed(ctx + w)
                beams = random_beams(b, w, l, device, seed=w)
                tokens, depth, unpacker, mask, n_tokens = REFERENCES["pack_beams"](beams)
                t = int(n_tokens.max())
                mask = mask[:, :t, :t].contiguous()
                cap = ctx + t
                kc = torch.randn(b, cap, s.kv_heads, s.head_dim, generator=g).to(device, dtype)
                vc = torch.randn(b, cap, s.kv_heads, s.head_dim, generator=g).to(device, dtype)
                q = torch.randn(b, t, s.heads, s.head_dim, generator=g).to(device, dtype)
                k = torch.randn(b, t, s.kv_heads, s.head_dim, generator=g).to(device, dtype)
                v = torch.randn(b, t, s.kv_heads, s.head_dim, generator=g).to(device, dtype)
                slots = torch.randperm(b, generator=g).to(device)
                starts = torch.randint(ctx // 2, ctx + 1, (b,), generator=g).to(device)  # rows differ
                args = (q, k, v, kc, vc, slots, starts, mask)
                ref = REFERENCES["packed_attention"](*args)
                out = kernels.packed_attention(*args)
                err = (out.float() - ref.float()).abs().max().item()
                tol = 1e-4 if dtype == torch.float32 else 1e-2
                rows.append(Row("packed_attention", f"B={b} ctx={ctx} T={t} (W={w} L={l})", str(dtype)[6:],
                                f"max abs err {err:.1e}", err <= tol,
                                timed(lambda: REFERENCES["packed_attention"](*args), device, reps),
                                timed(lambda: kernels.packed_attention(*args), device, reps)))
    return rows


def check_kv_commit(s: Shapes, device: torch.device, dtype: torch.dtype, reps: int):
    from . import kernels
    from .ops import REFERENCES

    rows = []
    ctx = max(s.contexts)
    for b in s.batches:
        for w in sorted({min(s.widths), max(s.widths)}):
            l = max(s.lengths)
            g = torch.Generator().manual_seed(b * 100 + w)
            shape = (s.layers, b, ctx + w * l, s.kv_heads, s.head_dim)
            k = torch.randn(shape, generator=g).to(device, dtype)
            v = torch.randn(shape, generator=g).to(device, dtype)
            slots = torch.randperm(b, generator=g).to(device)
            starts = torch.randint(ctx // 2, ctx + 1, (b,), generator=g).to(device)
            # Ascending paths through a W*L tree, src[:, i] >= i (as along an accepted beam).
            src = torch.sort(torch.randperm(w * l, generator=g)[:l] if w > 1 else torch.arange(l)).values
            src = torch.maximum(src, torch.arange(l)).expand(b, l).contiguous().to(device)
            k_ref, v_ref = k.clone(), v.clone()
            REFERENCES["kv_commit"](k_ref, v_ref, slots, starts, src)
            kernels.kv_commit(k, v, slots, starts, src)
            ok = torch.equal(k, k_ref) and torch.equal(v, v_ref)
            rows.append(Row("kv_commit", f"layers={s.layers} B={b} n={l} src<{w * l}", str(dtype)[6:],
                            "exact" if ok else "MISMATCH", ok,
                            timed(lambda: REFERENCES["kv_commit"](k_ref, v_ref, slots, starts, src), device, reps),
                            timed(lambda: kernels.kv_commit(k, v, slots, starts, src), device, reps)))
    return rows


def run(device: torch.device, shapes: Shapes, reps: int) -> Iterator[Row]:
    """Every case, one check at a time (so a run cut short still reports the checks it finished)."""
    # fp32 on the smallest shapes (beams match up to near-ties), then fp16 at every shape, timed.
    small = Shapes(**(asdict(shapes) | {"batches": shapes.batches[:1], "widths": shapes.widths[:2],
                                        "lengths": shapes.lengths[-1:], "contexts": shapes.contexts[:1]}))
    yield from check_beam_draft(small, device, torch.float32, 1)
    yield from check_packed_attention(small, device, torch.float32, 1)
    yield from check_kv_commit(small, device, torch.float32, 1)
    yield from check_pack_beams(shapes, device, reps)
    yield from check_beam_draft(shapes, device, torch.float16, reps)
    yield from check_packed_attention(shapes, device, torch.float16, reps)
    yield from check_kv_commit(shapes, device, torch.float16, reps)


def compile_all(arch: int = 90) -> list[str]:
    """Compile every kernel variant the launchers use, for CUDA sm_<arch>, down to a cubin
    (Triton's bundled ptxas): no GPU needed, so CI catches what the interpreter cannot
    (layouts, dot shapes, register allocation). Returns one line per variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernels import attention, commit, draft, tree

    target = GPUTarget("cuda", arch, 32)
    lines = []

    def build(fn, types: dict[str, str], consts: dict[str, object], name: str) -> None:
        sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
        t = time.perf_counter()
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        lines.append(f"sm_{arch} {name}: compiled in {time.perf_counter() - t:.1f} s")

    i32 = "i32"
    for dt in ("fp16", "bf16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        ptrs = {n: f"*{dt}" for n in ("x_ptr", "w_ptr", "x2_ptr", "w2_ptr", "b_ptr", "res_ptr", "out_ptr")}
        ints = {n: i32 for n in ("M", "N", "K", "K2", "stride_x", "stride_w", "stride_x2", "stride_w2",
                                 "stride_res", "stride_out")}
        types = ptrs | ints | {"xrow_ptr": "*i64", "x2row_ptr": "*i64"}
        blocks = dict(PRECISION=prec, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32)
        build(draft._linear_kernel, types, dict(X_ROWS=True, HAS_X2=True, X2_ROWS=True, HAS_BIAS=True, SILU=True,
                                                HAS_RES=False, **blocks), f"linear (RNN step) {dt}")
        build(draft._linear_kernel, types, dict(X_ROWS=False, HAS_X2=False, X2_ROWS=False, HAS_BIAS=True, SILU=True,
                                                HAS_RES=True, **blocks), f"linear (ResBlock) {dt}")
        types = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr", "out_ptr")}
        types |= {"slots_ptr": "*i64", "starts_ptr": "*i64", "mask_ptr": "*i1", "T": i32, "D": i32, "KVH": i32,
                  "scale": "fp32"}
        types |= {n: i32 for n in "sq_b sq_t sq_h sk_b sk_t sk_h sc_s sc_t sc_h so_b so_t so_h".split()}
        build(attention._packed_attention_kernel, types,
              dict(GROUP=3, PRECISION=prec, BLOCK_M=64, BLOCK_N=32, D_PAD=64), f"packed_attention {dt}")
        types = {"k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "slots_ptr": "*i64", "starts_ptr": "*i64", "src_ptr": "*i64",
                 "N": i32, "ROW": i32, "s_layer": "i64", "s_slot": "i64", "s_pos": "i64"}
        build(commit._kv_commit_kernel, types, dict(BLOCK=256), f"kv_commit {dt}")
    types = {"logits_ptr": "*fp32", "scores_ptr": "*fp32", "val_ptr": "*fp32", "tok_ptr": "*i64",
             "R": i32, "V": i32, "K": i32}
    for k_pad in (2, 64):
        build(draft._logsoftmax_topk_kernel, types, dict(K_PAD=k_pad, BLOCK_R=1, BLOCK_V=1024),
              f"logsoftmax_topk K_PAD={k_pad}")
    types = {n: "*i64" for n in ("beams_ptr", "tokens_ptr", "depth_ptr", "unpacker_ptr", "n_ptr")}
    types |= {"mask_ptr": "*i1", "W": i32, "L": i32}
    for w_pad, l_pad in ((1, 1), (64, 8)):
        build(tree._pack_kernel, types, dict(W_PAD=w_pad, L_PAD=l_pad, T_PAD=w_pad * l_pad),
              f"pack_beams W<={w_pad} L<={l_pad}")
    return lines


TABLE_HEAD = f"| op | shape | dtype | check | ok | reference ms | kernel ms | speedup |\n|{'---|' * 8}"


def table_row(r: Row) -> str:
    return (f"| {r.op} | {r.shape} | {r.dtype} | {r.check} | {'yes' if r.ok else 'NO'} | {r.ref_ms:.3f} | "
            f"{r.kernel_ms:.3f} | {r.speedup:.2f}x |")


def write_report(out: Path, device: str, rows: list[Row]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "gpu_check.json") as tmp:
        tmp.write_text(json.dumps({"device": device, "torch": torch.__version__,
                                   "rows": [asdict(r) | {"speedup": r.speedup} for r in rows]}, indent=2))


def check_kernels(device: str, tiny: bool, reps: int | None, out: str | None, compile_only: int | None) -> int:
    """Every case on `device` (tiny shapes or SmolLM2's; gpu_check.json under `out` after each) ->
    exit status: 1 if a kernel disagrees with its reference, 2 if the device cannot run them."""
    if compile_only is not None:
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("--compile-only compiles for a GPU: unset TRITON_INTERPRET", file=sys.stderr)
            return 2
        print("\n".join(compile_all(compile_only)))
        return 0
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or dry-run with TRITON_INTERPRET=1 ... --device cpu --tiny",
              file=sys.stderr)
        return 2
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    reps = reps or (10 if device.type == "cuda" else 1)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}\n\n{TABLE_HEAD}", flush=True)
    rows: list[Row] = []
    with torch.inference_mode():
        for row in run(device, TINY if tiny else SMOLLM2, reps):
            rows.append(row)
            print(table_row(row), flush=True)
            if out:  # after every case: a run cut short keeps what it measured
                write_report(Path(out), name, rows)
    print(f"\n{len(rows)} cases in {time.perf_counter() - t0:.0f} s")
    bad = [r for r in rows if not r.ok]
    if bad:
        print(f"\n{len(bad)} case(s) disagree with the reference", file=sys.stderr)
    return 1 if bad else 0

