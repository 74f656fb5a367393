"""The redrafter:: custom ops: contracts, graph capture, and lossless decoding with them.

Their default (CPU) implementations are the runtime's own code; the Triton kernels are
checked against them in test_plugins_kernels.py.
"""
from __future__ import annotations

from redrafter.plugins.ops import PluginSteps
from redrafter.runtime.config import DecodeConfig

import pytest
import torch

from conftest import tiny_drafter, tiny_llama
from redrafter.plugins import ops
from redrafter.runtime.beam_search import beam_search
from redrafter.runtime.decoding import Decoder, generate
from redrafter.runtime.model import causal_mask
from redrafter.runtime.sampling import SamplingParams, SlotSampler
from redrafter.runtime.tree import pack_beams


def test_pack_beams_op_pads_to_w_times_l_and_agrees_with_the_runtime():
    beams = torch.tensor([[[101, 102, 103, 104], [101, 102, 203, 204], [101, 102, 303, 104]],
                          [[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 9]]])
    tokens, depth, unpacker, mask, n = torch.ops.redrafter.pack_beams(beams)
    assert tokens.shape == depth.shape == (2, 12) and mask.shape == (2, 12, 12)
    assert n.tolist() == [8, 5]
    assert tokens[0, :8].tolist() == [101, 102, 103, 104, 203, 204, 303, 104]
    assert depth[0, :8].tolist() == [0, 1, 2, 3, 2, 3, 2, 3]
    assert unpacker[0].tolist() == [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6, 7]]
    ref = pack_beams(beams)
    t = ref.tokens.shape[1]
    assert torch.equal(tokens[:, :t], ref.tokens) and torch.equal(mask[:, :t, :t], ref.mask)
    assert torch.equal(unpacker, ref.unpacker)
    # Padding (past each row's n_tokens) is token 0 at depth 0 and sees only itself.
    for row, count in enumerate(n.tolist()):
        pad = torch.arange(count, 12)
        assert (tokens[row, pad] == 0).all() and (depth[row, pad] == 0).all()
        assert torch.equal(mask[row, pad][:, :], torch.eye(12, dtype=torch.bool)[pad])
        assert not mask[row, :count, count:].any()


def test_pack_helper_cuts_to_the_longest_row():
    beams = torch.tensor([[[1, 2], [1, 3]], [[1, 2], [1, 2]]])
    p = ops.pack(beams)
    ref = pack_beams(beams)
    for name in ("tokens", "depth", "unpacker", "mask", "n_tokens"):
        assert torch.equal(getattr(p, name), getattr(ref, name)), name


@pytest.mark.parametrize("head,rnn,draft_vocab_size", [("own", True, 0), ("shared", False, 0), ("own", True, 40),
                                                       ("shared", True, 40)])
def test_beam_draft_op_is_the_runtime_beam_search(head, rnn, draft_vocab_size):
    model = tiny_llama()
    drafter = tiny_drafter(model, head=head, rnn=rnn, draft_vocab_size=draft_vocab_size)
    lm_head = drafter.output_weight(model.lm_head.weight)
    context, first = torch.randn(3, 64), torch.tensor([1, 5, 9])
    beams = ops.draft(drafter, model.embed.weight, lm_head, context, first, 4, 3)
    ref, _ = beam_search(drafter, model.embed.weight, lm_head, context, first, 4, 3)
    assert beams.shape == (3, 4, 3) and torch.equal(beams, ref)
    tree = ops.draft(drafter, model.embed.weight, lm_head, context, first, 4, 3, keep_prefixes=True)
    ref_tree, _ = beam_search(drafter, model.embed.weight, lm_head, context, first, 4, 3, keep_prefixes=True)
    assert tree.shape == (3, 8, 3) and torch.equal(tree, ref_tree)
    assert len({tuple(b) for b in beams[0].tolist()}) == 4  # distinct beams, all from the guaranteed token
    assert (beams[:, :, 0] == first[:, None]).all()
    if draft_vocab_size:  # drafted tokens are vocabulary ids from the draft vocabulary, not its row numbers
        assert torch.isin(beams[:, :, 1:], drafter.draft_vocab).all()
        assert (beams[:, :, 1:] >= draft_vocab_size).any()


def test_beam_draft_op_rejects_bad_arguments():
    model = tiny_llama()
    drafter = tiny_drafter(model)
    context, first = torch.randn(1, 64), torch.tensor([1])
    with pytest.raises(ValueError, match="width >= 1"):
        ops.draft(drafter, model.embed.weight, None, context, first, 0, 3)
    weights = ops.head_weights(drafter, None) | {"out_weight": torch.randn(97, 32)}
    with pytest.raises(ValueError, match="do not fit"):
        torch.ops.redrafter.beam_draft(context, first, model.embed.weight, **weights, width=2, length=2)
    partial = ops.head_weights(drafter, None) | {"rnn_u_bias": None}
    with pytest.raises(ValueError, match="rnn_u.bias missing"):
        torch.ops.redrafter.beam_draft(context, first, model.embed.weight, **partial, width=2, length=2)
    shared = tiny_drafter(model, head="shared", draft_vocab_size=40)
    with pytest.raises(ValueError, match=r"base_lm_head is \[97, 64\], expected \[40, 64\].*output_weight"):
        ops.draft(shared, model.embed.weight, model.lm_head.weight, context, first, 2, 2)  # the whole LM head
    unsorted = ops.head_weights(shared, shared.output_weight(model.lm_head.weight))
    unsorted["draft_vocab"] = unsorted["draft_vocab"].flip(0)
    with pytest.raises(ValueError, match="increasing token ids"):
        torch.ops.redrafter.beam_draft(context, first, model.embed.weight, **unsorted, width=2, length=2)


def test_packed_attention_in_the_model_matches_dense_masked_attention():
    """The forward through PluginSteps (redrafter::packed_attention per layer) equals the
    dense-mask forward, for rows with different committed lengths and a packed tree."""
    model = tiny_llama()
    torch.manual_seed(0)
    cache_a, cache_b = model.new_cache(3, 40), model.new_cache(3, 40)
    slots, starts = torch.tensor([2, 0]), torch.tensor([7, 3])
    for cache in (cache_a, cache_b):  # committed prefixes of different lengths
        for slot, n in zip(slots.tolist(), starts.tolist()):
            ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(slot))
            model(ids, torch.arange(n)[None], cache, torch.tensor([slot]), torch.tensor([0]), causal_mask(1, n))
    beams = torch.tensor([[[4, 5, 6], [4, 5, 7], [4, 8, 9]], [[1, 2, 3], [1, 2, 3], [1, 3, 2]]])
    p = pack_beams(beams)
    positions = starts[:, None] + p.depth
    dense = model(p.tokens, positions, cache_a, slots, starts, p.mask)
    plug = PluginSteps(model).forward(p.tokens, positions, cache_b, slots, starts, p.mask)
    torch.testing.assert_close(plug, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache_b.k, cache_a.k)  # the new entries were written the same way


def test_kv_commit_op_is_kv_cache_commit():
    model = tiny_llama()
    cache, ref = model.new_cache(3, 16), model.new_cache(3, 16)
    torch.manual_seed(0)
    cache.k.normal_(), cache.v.normal_()
    ref.k.copy_(cache.k), ref.v.copy_(cache.v)
    before = cache.v.clone()
    slots, starts, src = torch.tensor([1, 2]), torch.tensor([3, 0]), torch.tensor([[0, 2, 5], [0, 1, 2]])
    ops.commit(cache, slots, starts, src)
    ref.commit(slots, starts, src)
    assert torch.equal(cache.k, ref.k) and torch.equal(cache.v, ref.v)
    # Slot 1 (committed length 3): entries 3+2 and 3+5 moved to 3+1 and 3+2.
    assert torch.equal(cache.v[:, 1, 4], before[:, 1, 5]) and torch.equal(cache.v[:, 1, 5], before[:, 1, 8])
    assert torch.equal(cache.v[:, 2], before[:, 2])  # identity path: nothing moves


class _Verify(torch.nn.Module):
    """One draft-pack-attend-commit round, as an exporter sees it."""

    def forward(self, context, first, embed, rnn_w, rnn_u_w, rnn_u_b, r0w, r0b, r1w, r1b, out_w,
                q, k, v, k_cache, v_cache, slots, starts):
        beams = torch.ops.redrafter.beam_draft(context, first, embed, rnn_w, rnn_u_w, rnn_u_b, None, None,
                                               [r0w, r1w], [r0b, r1b], out_w, None, None, 3, 2)
        tokens, depth, unpacker, mask, n = torch.ops.redrafter.pack_beams(beams)
        out = torch.ops.redrafter.packed_attention(q, k, v, k_cache[0], v_cache[0], slots, starts, mask)
        torch.ops.redrafter.kv_commit(k_cache, v_cache, slots, starts, unpacker[:, -1])
        return out, tokens, depth, n, k_cache, v_cache


def _verify_inputs():
    model = tiny_llama()
    d = tiny_drafter(model)
    w = ops.head_weights(d, None)
    b, t = 2, 6  # t = W * L
    cache = model.new_cache(2, 20)
    cache.k.normal_(), cache.v.normal_()
    return (torch.randn(b, 64), torch.tensor([1, 2]), model.embed.weight, w["rnn_w"], w["rnn_u_weight"],
            w["rnn_u_bias"], *(x for pair in zip(w["res_weights"], w["res_biases"]) for x in pair), w["out_weight"],
            torch.randn(b, t, 4, 16), torch.randn(b, t, 2, 16), torch.randn(b, t, 2, 16), cache.k, cache.v,
            torch.tensor([1, 0]), torch.tensor([4, 9]))


def test_torch_export_sees_each_op_as_one_node():
    ep = torch.export.export(_Verify(), _verify_inputs())
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    for name in ("beam_draft", "pack_beams", "packed_attention"):
        assert targets.count(getattr(torch.ops.redrafter, name).default) == 1, name
    # kv_commit mutates its inputs: export functionalises it into one node whose results
    # are written back to the cache buffers.
    assert sum("kv_commit" in str(t) for t in targets) == 1
    assert not any("aten.topk" in str(t) or "aten._scaled_dot_product" in str(t) for t in targets)


def test_torch_compile_captures_the_ops_in_one_graph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    inputs = _verify_inputs()
    compiled = torch.compile(_Verify(), backend=backend, fullgraph=True)
    eager = _Verify()(*[x.clone() for x in inputs])
    out = compiled(*inputs)
    assert len(graphs) == 1
    names = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    for name in ("beam_draft", "pack_beams", "packed_attention", "kv_commit"):
        assert sum(name in n for n in names) == 1, (name, names)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b)


PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43], [2, 71]]


@pytest.mark.parametrize("head,draft_vocab_size,lookup,lookup_length,tree", [
    ("own", 0, 0, 0, "beams"), ("shared", 0, 0, 0, "beams"), ("own", 40, 0, 0, "beams"), ("shared", 40, 0, 0, "beams"),
    ("shared", 40, 2, 0, "beams"), ("shared", 40, 2, 7, "beams"), ("shared", 40, 0, 0, "search"),
    ("own", 0, 2, 7, "search")])
def test_greedy_redrafter_is_lossless_with_plugins_on_and_off(head, draft_vocab_size, lookup, lookup_length, tree):
    model = tiny_llama(tied=head == "shared")
    drafter = tiny_drafter(model, head=head, draft_vocab_size=draft_vocab_size)
    plain = generate(Decoder(model, None, max_batch=3, max_seq_len=64), PROMPTS, 20)
    off = generate(Decoder(model, drafter, max_batch=3, max_seq_len=64, decode=DecodeConfig(beam_width=3, beam_length=4, tree=tree, lookup_ngram=lookup, lookup_length=lookup_length)), PROMPTS, 20)
    on = generate(Decoder(model, drafter, max_batch=3, max_seq_len=64, decode=DecodeConfig(beam_width=3, beam_length=4, tree=tree, lookup_ngram=lookup, lookup_length=lookup_length), steps=PluginSteps(model)), PROMPTS, 20)
    for p, a, b in zip(plain, off, on):
        assert a.token_ids == p.token_ids == b.token_ids
        assert a.accepted_per_step == b.accepted_per_step  # same drafts, same acceptance
    plain_plug = generate(Decoder(model, None, max_batch=3, max_seq_len=64, steps=PluginSteps(model)), PROMPTS, 20)
    assert [g.token_ids for g in plain_plug] == [g.token_ids for g in plain]


def test_sampling_rows_walk_the_same_tree_with_plugins_on_and_off():
    """Seeded sampling rows next to greedy rows: the same uniforms give the same tokens
    whether the step drafts, packs, attends and commits through the ops or not."""
    model = tiny_llama()
    drafter = tiny_drafter(model)
    outs = []
    for use_plugins in (False, True):
        dec = Decoder(model, drafter, max_batch=3, max_seq_len=64, decode=DecodeConfig(beam_width=3, beam_length=4), steps=PluginSteps(model) if use_plugins else None)
        samplers = [None, SlotSampler(SamplingParams(temperature=1.0, seed=1)),
                    SlotSampler(SamplingParams(temperature=0.7, top_k=20, seed=2))]
        out = [[t] for t in dec.prefill_batch([0, 1, 2], PROMPTS, samplers)]
        for _ in range(6):
            step = dec.step(torch.arange(3))
            for o, row, c in zip(out, step.tokens.tolist(), step.counts.tolist()):
                o += row[:c]
        outs.append(out)
    assert outs[0] == outs[1]
