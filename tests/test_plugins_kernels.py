"""The Triton kernels behind the redrafter:: ops, run on CPU by Triton's interpreter and
checked against the ops' reference implementations (the runtime's code).

Triton decides interpreter vs GPU when a kernel is decorated, so TRITON_INTERPRET is set
before the kernels are first imported (only these plugins use Triton in this project).
Shapes are tiny: the interpreter runs every program instance in numpy.
"""
from __future__ import annotations

from redrafter.plugins.ops import PluginSteps
from redrafter.runtime.config import DecodeConfig

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import tiny_drafter, tiny_llama  # noqa: E402
from redrafter.plugins import kernels, ops  # noqa: E402
from redrafter.plugins.gpu_check import beam_slack  # noqa: E402
from redrafter.runtime.decoding import Decoder, Steps, generate  # noqa: E402
from redrafter.runtime.drafter import DraftHead, DrafterConfig  # noqa: E402

REF = ops.REFERENCES

PACK_CASES = {
    "reference_example": [[[101, 102, 103, 104], [101, 102, 203, 204], [101, 102, 303, 104]]],
    "w1": [[[5, 6, 7, 8]], [[9, 9, 9, 9]]],
    "l1": [[[5], [5], [5]], [[1], [1], [1]]],
    "all_identical": [[[3, 1, 4, 1]] * 4],
    "no_shared_prefix": [[[1, 2, 3], [2, 2, 3], [3, 2, 3]]],
    # Drafted beams padded to a longer lookup beam: PAD (-1) tails are not packed.
    "pad_tails": [[[4, 5, -1, -1], [4, 6, -1, -1], [4, 5, 9, 9]], [[4, -1, -1, -1], [4, -1, -1, -1], [4, 8, 8, 8]]],
}


@pytest.mark.parametrize("case", PACK_CASES)
def test_pack_kernel_edge_cases(case):
    beams = torch.tensor(PACK_CASES[case])
    for got, want in zip(kernels.pack_beams(beams), REF["pack_beams"](beams)):
        assert torch.equal(got, want)


def test_pack_kernel_random_trees():
    g = torch.Generator().manual_seed(0)
    beams = torch.randint(0, 3, (3, 5, 4), generator=g)  # few symbols: many shared prefixes
    beams[:2, :, 0] = 7
    for got, want in zip(kernels.pack_beams(beams), REF["pack_beams"](beams)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_commit_kernel(dtype):
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 4, 24, 2, 16, generator=g).to(dtype)
    v = torch.randn(2, 4, 24, 2, 16, generator=g).to(dtype)
    slots, starts = torch.tensor([3, 0, 1]), torch.tensor([5, 0, 11])
    src = torch.tensor([[0, 2, 3, 7], [0, 1, 2, 3], [0, 4, 8, 9]])  # overlapping moves in row 0
    k_ref, v_ref, before = k.clone(), v.clone(), k.clone()
    REF["kv_commit"](k_ref, v_ref, slots, starts, src)
    kernels.kv_commit(k, v, slots, starts, src)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert not torch.equal(k, before)  # entries did move


def _attention_case(b, t, heads, kv, d, starts, mask, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cap = max(starts) + t + 3
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return (rnd(b, t, heads, d), rnd(b, t, kv, d), rnd(b, t, kv, d), rnd(b + 1, cap, kv, d), rnd(b + 1, cap, kv, d),
            torch.arange(b, 0, -1), torch.tensor(starts), mask)


ATTN_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv,d", [(4, 2, 16), (6, 2, 24), (2, 2, 16)], ids=["gqa2", "gqa3_d24", "mha"])
def test_packed_attention_kernel_on_a_packed_tree(dtype, heads, kv, d):
    beams = torch.tensor([[[4, 5, 6], [4, 5, 7], [4, 8, 9]], [[1, 2, 3], [1, 2, 3], [1, 2, 3]]])
    tokens, depth, unpacker, mask, n = REF["pack_beams"](beams)  # row 1 is mostly padding
    args = _attention_case(2, 9, heads, kv, d, [45, 0], mask, dtype)  # context > one key block; empty
    torch.testing.assert_close(kernels.packed_attention(*args), REF["packed_attention"](*args), **ATTN_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_attention_kernel_single_token_and_long_causal(dtype):
    one = _attention_case(3, 1, 4, 2, 16, [3, 17, 40], torch.ones(3, 1, 1, dtype=torch.bool), dtype)
    torch.testing.assert_close(kernels.packed_attention(*one), REF["packed_attention"](*one), **ATTN_TOL[dtype])
    causal = torch.ones(37, 37, dtype=torch.bool).tril().expand(2, 37, 37)  # prefill: several query blocks
    pre = _attention_case(2, 37, 4, 2, 16, [0, 6], causal, dtype, seed=1)
    torch.testing.assert_close(kernels.packed_attention(*pre), REF["packed_attention"](*pre), **ATTN_TOL[dtype])


def _draft_args(head: str, rnn: bool, dtype=torch.float32, exit_dim: int | None = None, draft_vocab_size: int = 0):
    """A drafter, embed, its output weight (head.output_weight(lm_head)), context, first tokens."""
    model = tiny_llama(tied=head == "shared")
    if exit_dim is None:
        drafter = tiny_drafter(model, head=head, rnn=rnn, draft_vocab_size=draft_vocab_size)
    else:  # an input_proj to a narrower exit_dim
        torch.manual_seed(3)
        drafter = DraftHead(DrafterConfig(97, 64, exit_dim, 2, rnn, head))
        for p in drafter.parameters():
            torch.nn.init.normal_(p, std=0.2)
        drafter = drafter.eval().requires_grad_(False)
    drafter = drafter.to(dtype)
    g = torch.Generator().manual_seed(2)
    context = torch.randn(2, 64, generator=g).to(dtype)
    first = torch.tensor([3, 50])
    embed, lm_head = model.embed.weight.to(dtype), drafter.output_weight(model.lm_head.weight.to(dtype))
    return drafter, embed, lm_head, context, first


@pytest.mark.parametrize("head,rnn,width,length,exit_dim,draft_vocab_size", [
    ("own", True, 4, 3, None, 0), ("shared", True, 3, 4, None, 0), ("own", False, 2, 3, None, 0),
    ("shared", False, 1, 4, None, 0), ("own", True, 4, 1, None, 0), ("own", True, 3, 3, 48, 0),
    ("own", True, 4, 3, None, 40), ("shared", True, 3, 4, None, 40),
], ids=["own_rnn", "shared_rnn", "own_sum", "shared_w1", "l1", "input_proj", "own_draft_vocab",
        "shared_draft_vocab"])
def test_beam_draft_kernel_fp32_selects_the_same_beams(head, rnn, width, length, exit_dim, draft_vocab_size):
    drafter, embed, lm_head, context, first = _draft_args(head, rnn, exit_dim=exit_dim,
                                                          draft_vocab_size=draft_vocab_size)
    weights = ops.head_weights(drafter, lm_head)
    got = kernels.beam_draft(context, first, embed, **weights, width=width, length=length)
    want = REF["beam_draft"](context, first, embed, **weights, width=width, length=length)
    assert got.shape == (2, width, length) and torch.equal(got, want)
    tree = kernels.beam_draft(context, first, embed, **weights, width=width, length=length, keep_prefixes=True)
    want_tree = REF["beam_draft"](context, first, embed, **weights, width=width, length=length, keep_prefixes=True)
    assert tree.shape == (2, width * max(length - 1, 1), length) and torch.equal(tree, want_tree)
    if draft_vocab_size:  # vocabulary ids, mapped from the head's output rows
        assert torch.isin(got[:, :, 1:], drafter.draft_vocab).all() and (got[:, :, 1:] >= draft_vocab_size).any()


def test_beam_draft_kernel_fp16_keeps_the_top_beams_up_to_rounding():
    """In fp16 near-ties may break the other way; at every step the kernel must still keep
    beams whose exact scores reach the W-th best, within rounding."""
    drafter, embed, lm_head, context, first = _draft_args("shared", True, torch.float16)
    weights = ops.head_weights(drafter, lm_head)
    got = kernels.beam_draft(context, first, embed, **weights, width=4, length=3)
    assert (got[:, :, 0] == first[:, None]).all()
    slack = beam_slack(drafter, embed, lm_head, context,
                       lambda n: kernels.beam_draft(context, first, embed, **weights, width=4, length=n), 4, 3)
    assert slack <= 2e-2


def test_beam_slack_measures_how_far_a_search_strays_from_the_top_beams():
    """The GPU check's criterion: an exact search has no slack; a search that ranks by another
    context, or keeps one beam twice, is caught."""
    drafter, embed, lm_head, context, first = _draft_args("own", True)
    weights = ops.head_weights(drafter, lm_head)

    def search(ctx):
        return lambda n: REF["beam_draft"](ctx, first, embed, **weights, width=4, length=n)

    assert beam_slack(drafter, embed, lm_head, context, search(context), 4, 4) <= 1e-5
    assert beam_slack(drafter, embed, lm_head, context, search(context.flip(-1)), 4, 4) > 0.1
    twice = lambda n: search(context)(n)[:, [0, 0, 1, 2]]  # noqa: E731
    assert beam_slack(drafter, embed, lm_head, context, twice, 4, 4) == float("inf")


def test_logsoftmax_topk_kernel_streams_the_vocabulary_in_blocks():
    """Many vocabulary blocks (most skip the merge), ties broken to the lower token id,
    padded rows, and a dead beam's score carried through."""
    from redrafter.plugins.kernels.draft import logsoftmax_topk

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 300, generator=g)
    logits[2, 250] = logits[2, 7] = 9.0  # a tie at the top, in different blocks
    scores = torch.tensor([0.0, -1.5, 0.0, -1e9, 2.0])
    vals, toks = logsoftmax_topk(logits, scores, 3, block_v=32)
    want = scores[:, None] + torch.log_softmax(logits, -1)
    ref_vals, ref_toks = want.topk(3, dim=-1)
    torch.testing.assert_close(vals, ref_vals)
    assert torch.equal(toks[[0, 1, 4]], ref_toks[[0, 1, 4]])
    assert toks[2, :2].tolist() == [7, 250]
    # -1e9 + log p rounds to -1e9 in fp32 for every token; the kernel still ranks by logit.
    assert torch.equal(toks[3], logits[3].topk(3).indices)


@pytest.fixture
def kernels_on_cpu():
    """Route the ops' CPU dispatch to what they run on CUDA (the Triton kernels, here
    interpreted) for one test."""
    for name, op in ops.OPS.items():
        op.register_kernel("cpu", ops.triton_kernel(name))
    yield
    for name, op in ops.OPS.items():
        op.register_kernel("cpu", REF[name])


PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43]]


def test_decoder_with_triton_kernels_is_lossless(kernels_on_cpu):
    model = tiny_llama()
    plain = generate(Decoder(model, None, max_batch=2, max_seq_len=48), PROMPTS, 8)
    dec = Decoder(model, tiny_drafter(model), max_batch=2, max_seq_len=48, decode=DecodeConfig(beam_width=2, beam_length=3), steps=PluginSteps(model))
    assert [g.token_ids for g in generate(dec, PROMPTS, 8)] == [g.token_ids for g in plain]


def test_decoder_with_triton_kernels_commits_accepted_drafts(kernels_on_cpu, monkeypatch):
    """Oracle beams (cut from the true continuation) make steps accept 0..L-1 drafts, so the
    kv_commit kernel moves real paths through packed trees."""
    from test_decoding import OracleBeams

    model = tiny_llama()
    ref = [g.token_ids for g in generate(Decoder(model, None, max_batch=2, max_seq_len=48), PROMPTS, 14)]
    dec = Decoder(model, tiny_drafter(model), max_batch=2, max_seq_len=48, decode=DecodeConfig(beam_width=3, beam_length=4), steps=PluginSteps(model))
    oracle = OracleBeams(dec, PROMPTS, ref)
    monkeypatch.setattr(ops, "draft", lambda *a, **kw: oracle(*a, **kw)[0])
    got = generate(dec, PROMPTS, 14)
    assert [g.token_ids for g in got] == ref
    accepted = [a for g in got for a in g.accepted_per_step]
    assert max(accepted) == 3 and len(set(accepted)) >= 2


def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "redrafter.builder.gpu_check", "--kernels", "--device", "cpu",
                           "--tiny", "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| op | shape |" in proc.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["rows"]
    assert {r["op"] for r in rows} == {"beam_draft", "pack_beams", "packed_attention", "kv_commit"}
    assert all(r["ok"] and r["kernel_ms"] > 0 and r["ref_ms"] > 0 for r in rows)
    assert {r["dtype"] for r in rows if r["op"] == "beam_draft"} == {"float32", "float16"}
    assert {r["dtype"] for r in rows if r["shape"].startswith("shared Vd=24 ")} == {"float32", "float16"}


def test_gpu_check_refuses_cpu_without_the_interpreter(monkeypatch, capsys):
    from redrafter.builder import gpu_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert gpu_check.main(["--kernels", "--device", "cpu", "--tiny"]) == 2
    assert "set TRITON_INTERPRET=1" in capsys.readouterr().err


def test_every_kernel_compiles_for_hopper_without_a_gpu():
    """The interpreter skips Triton's compiler; this runs it (to a cubin, via the bundled ptxas)
    for sm_90, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-m", "redrafter.builder.gpu_check", "--compile-only", "90"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 16 and all(line.startswith("sm_90 ") for line in lines)
    for kernel in ("linear (RNN step) bf16", "packed_attention fp16", "kv_commit fp32", "logsoftmax_topk K_PAD=64",
                   "pack_beams W<=64 L<=8"):
        assert any(kernel in line for line in lines), kernel


def test_fused_step_program_with_triton_kernels_is_lossless(kernels_on_cpu):
    """The engine's step program as a CUDA engine runs it with --plugin-ops (every op a Triton
    kernel; compiled there, eager here) decodes exactly like plain decoding."""
    from redrafter.builder.programs import SpeculativeStep

    model = tiny_llama()
    head = tiny_drafter(model)
    plain = generate(Decoder(model, None, max_batch=2, max_seq_len=48), PROMPTS, 8)
    step, calls = SpeculativeStep(model, head, 2, 3, plugin_ops=True), []

    class Fused(Steps):  # what CompiledSteps does with the step program, eager
        def fused(self, config):
            return lambda *a: calls.append(1) or step(*a)

    dec = Decoder(model, head, DecodeConfig(2, 3), max_batch=2, max_seq_len=48, steps=Fused(model))
    assert [g.token_ids for g in generate(dec, PROMPTS, 8)] == [g.token_ids for g in plain]
    assert calls
