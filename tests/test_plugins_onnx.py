"""ONNX export of the redrafter:: ops: one custom-domain node per op, checked by onnx, and
run in ONNX Runtime (nodes computed by the ops' PyTorch reference) against PyTorch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from conftest import tiny_drafter, tiny_llama
from redrafter.plugins import ops
from redrafter.plugins import onnx as ronnx
from redrafter.runtime.drafter import DraftHead, DrafterConfig
from redrafter.runtime.tree import PAD
from test_plugins import _Verify, _verify_inputs


def _run_both(module, inputs, model):
    session = ronnx.ort_session(model)
    feeds = {i.name: x.numpy() for i, x in zip(model.graph.input, inputs)}
    return session.run(None, feeds), module(*[x.clone() for x in inputs])


def test_export_maps_each_op_to_one_checked_custom_node(tmp_path):
    inputs = _verify_inputs()
    model = ronnx.export(_Verify(), inputs, tmp_path / "verify.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "verify.onnx"), full_check=True)
    custom = [n for n in model.graph.node if n.domain == ronnx.DOMAIN]
    assert sorted(n.op_type for n in custom) == ["BeamDraft", "KvCommit", "PackBeams", "PackedAttention"]
    assert not [n for n in model.graph.node if n.op_type in ("TopK", "Softmax", "MatMul")]  # nothing inlined
    attrs = {n.op_type: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in custom}
    assert attrs["BeamDraft"] == {
        "width": 3, "length": 2, "rnn": 1, "input_proj": 0, "shared": 0, "draft_vocab": 0, "num_draft_layers": 2,
        "keep_prefixes": 0, "plugin_namespace": b"redrafter", "plugin_version": b"3"}
    draft = next(n for n in custom if n.op_type == "BeamDraft")
    assert attrs["PackBeams"] == {"plugin_namespace": b"redrafter", "plugin_version": b"3"}
    assert list(draft.input) == ["context", "first", "embed", "rnn_w", "rnn_u_w", "rnn_u_b", "out_w",
                                 "r0w", "r0b", "r1w", "r1b"]
    assert {i.domain: i.version for i in model.opset_import}[ronnx.DOMAIN] == ronnx.VERSION


def test_onnx_runtime_runs_the_exported_graph_like_pytorch():
    inputs = _verify_inputs()
    model = ronnx.export(_Verify(), inputs)
    got, want = _run_both(_Verify(), inputs, model)
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-6, atol=1e-6)
    assert not np.array_equal(got[4], inputs[14].numpy())  # KvCommit moved entries of the k cache


class _SharedDraft(torch.nn.Module):
    """A shared-head, rnn=False drafter with an input projection (and a draft vocabulary if
    given): the other BeamDraft layouts; keep_prefixes: the search tree's beams."""

    def __init__(self, keep_prefixes: bool = False):
        super().__init__()
        self.keep_prefixes = keep_prefixes

    def forward(self, context, first, embed, ip_w, ip_b, r0w, r0b, out_w, lm_head, draft_vocab=None):
        return torch.ops.redrafter.beam_draft(context, first, embed, None, None, None, ip_w, ip_b,
                                              [r0w], [r0b], out_w, lm_head, draft_vocab, 4, 3, self.keep_prefixes)


@pytest.mark.parametrize("draft_vocab_size,keep_prefixes", [(0, False), (40, False), (40, True)])
def test_beam_draft_layout_flags_round_trip_through_onnx_runtime(draft_vocab_size, keep_prefixes):
    model = tiny_llama()  # untied: the exporter would name a tied embed / LM head input once
    torch.manual_seed(0)
    vocab = torch.randperm(97)[:draft_vocab_size].sort().values if draft_vocab_size else None
    head = DraftHead(DrafterConfig(97, 64, 48, 1, rnn=False, head="shared", draft_vocab_size=draft_vocab_size), vocab)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    lm_head = head.output_weight(model.lm_head.weight)  # [Vd, H] with a draft vocabulary
    w = ops.head_weights(head.eval().requires_grad_(False), lm_head)
    inputs = (torch.randn(2, 64), torch.tensor([4, 8]), model.embed.weight, w["input_proj_weight"],
              w["input_proj_bias"], w["res_weights"][0], w["res_biases"][0], w["out_weight"], lm_head,
              *([vocab] if draft_vocab_size else []))
    exported = ronnx.export(_SharedDraft(keep_prefixes), inputs)
    onnx.checker.check_model(exported, full_check=True)
    node = next(n for n in exported.graph.node if n.op_type == "BeamDraft")
    flags = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (flags["rnn"], flags["input_proj"], flags["shared"], flags["draft_vocab"], flags["num_draft_layers"],
            flags["keep_prefixes"]) == (0, 1, 1, int(draft_vocab_size > 0), 1, int(keep_prefixes))
    assert list(node.input) == ["context", "first", "embed", "ip_w", "ip_b", "out_w", "lm_head",
                                *(["draft_vocab"] if draft_vocab_size else []), "r0w", "r0b"]
    (got,), want = _run_both(_SharedDraft(keep_prefixes), inputs, exported)
    assert np.array_equal(got, want.numpy()) and got.shape == (2, 8 if keep_prefixes else 4, 3)
    if draft_vocab_size:
        assert np.isin(got[:, :, 1:], [*vocab.tolist(), PAD]).all()


def test_beam_draft_flat_inputs_are_checked():
    model = tiny_llama()
    w = ops.head_weights(tiny_drafter(model), None)
    flat = ronnx.beam_draft_inputs(torch.zeros(1, 64), torch.zeros(1), model.embed.weight, **w)
    args = ronnx.beam_draft_args(flat, rnn=1, input_proj=0, shared=0, num_draft_layers=2)
    assert args["rnn_w"] is w["rnn_w"] and args["res_biases"][1] is w["res_biases"][1]
    with pytest.raises(ValueError, match="num_draft_layers"):
        ronnx.beam_draft_args(flat, rnn=1, input_proj=0, shared=0, num_draft_layers=3)
