"""ONNX mapping of the redrafter:: ops: one custom-domain node per op, for TensorRT plugins.

Each op becomes a node in domain "redrafter" (opset 1) whose op_type names the TensorRT
plugin that implements it (TensorRT's ONNX parser falls back to the plugin registry for
unknown op types, using the plugin_version / plugin_namespace attributes):

  BeamDraft(context, first_token, embed, [rnn_w, rnn_u_weight, rnn_u_bias],
            [input_proj_weight, input_proj_bias], out_weight, [base_lm_head], [draft_vocab],
            res_w0, res_b0, res_w1, res_b1, ...) -> beams
            attrs: width, length, rnn, input_proj, shared, draft_vocab (default 0),
            num_draft_layers (the 0/1 flags say which bracketed groups are present: a
            flat input list, as a TensorRT plugin takes it)
  PackBeams(beams) -> tokens, depth, unpacker, mask, n_tokens
  PackedAttention(q, k, v, k_cache, v_cache, slots, starts, tree_mask) -> out
  KvCommit(k_cache, v_cache, slots, starts, src) -> k_cache, v_cache   (functional:
            outputs are the updated caches; an engine aliases them to the inputs)

Semantics, shapes and dtypes are those of plugins.ops. `register_schemas` makes them known
to onnx (checker, shape inference, onnxscript); `export` runs torch.onnx.export with the
mapping. `ort_session` runs such a graph in ONNX Runtime with each node implemented in
Python by the ops' PyTorch reference (onnxruntime-extensions PyOp), to check the graph.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import onnx
import torch
from onnx import defs

from . import ops

DOMAIN = "redrafter"
VERSION = 1
PLUGIN_VERSION = "3"  # 2: BeamDraft's optional draft_vocab input; 3: its keep_prefixes attribute

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_INT = defs.OpSchema.AttrType.INT
_Opt = defs.OpSchema.FormalParameterOption


def _param(name: str, type_str: str, doc: str) -> defs.OpSchema.FormalParameter:
    return defs.OpSchema.FormalParameter(name, type_str, doc)


def _schema(name: str, doc: str, inputs, outputs, attributes=(), types=_FLOATS) -> defs.OpSchema:
    plugin_attrs = [
        defs.OpSchema.Attribute("plugin_version", onnx.helper.make_attribute("plugin_version", PLUGIN_VERSION),
                                "TensorRT plugin version"),
        defs.OpSchema.Attribute("plugin_namespace", onnx.helper.make_attribute("plugin_namespace", DOMAIN),
                                "TensorRT plugin namespace")]
    return defs.OpSchema(name, DOMAIN, VERSION, doc, inputs=inputs, outputs=outputs,
                         type_constraints=[("T", types, "activations and weights")],
                         attributes=[*attributes, *plugin_attrs])


def _i64(name: str, doc: str) -> defs.OpSchema.FormalParameter:
    return _param(name, "tensor(int64)", doc)


SCHEMAS = [
    _schema("BeamDraft", "The draft head's W x L beam search (redrafter::beam_draft).", inputs=[
        defs.OpSchema.FormalParameter(
            "inputs", "T", "context [B, H], first_token [B] (int64), embed [V, H], then the head's weights "
            "(see plugins/onnx.py)", param_option=_Opt.Variadic, is_homogeneous=False, min_arity=5),
    ], outputs=[_i64("beams", "[B, W, L]; keep_prefixes: [B, W * max(L-1, 1), L], PAD-ended")], attributes=[
        defs.OpSchema.Attribute("width", _INT, "beams W"),
        defs.OpSchema.Attribute("length", _INT, "tokens per beam L, guaranteed token included"),
        defs.OpSchema.Attribute("rnn", _INT, "1: rnn_w, rnn_u_weight, rnn_u_bias follow embed"),
        defs.OpSchema.Attribute("input_proj", _INT, "1: input_proj_weight, input_proj_bias follow"),
        defs.OpSchema.Attribute("shared", _INT, "1: shared head, base_lm_head follows out_weight"),
        defs.OpSchema.Attribute("draft_vocab", onnx.helper.make_attribute("draft_vocab", 0),
                                "1: draft_vocab [Vd] (int64 token id of each output row) follows "
                                "out_weight / base_lm_head, which then have Vd rows"),
        defs.OpSchema.Attribute("num_draft_layers", _INT, "ResBlock (weight, bias) pairs at the end"),
        defs.OpSchema.Attribute("keep_prefixes", onnx.helper.make_attribute("keep_prefixes", 0),
                                "1: the search tree: the W final beams, then the W prefixes beam search kept at "
                                "each shorter depth (longest first), each ended with PAD (-1)"),
    ], types=[*_FLOATS, "tensor(int64)"]),
    _schema("PackBeams", "Prefix dedup of beams into a tree (redrafter::pack_beams).",
            inputs=[_i64("beams", "[B, W, L]; a beam may end in a PAD (-1) tail, which is not packed")],
            outputs=[_i64("tokens", "[B, W*L]"), _i64("depth", "[B, W*L]"),
                     _i64("unpacker", "[B, W, L]; past a beam's end, its last token's index"),
                     _param("mask", "tensor(bool)", "[B, W*L, W*L]"), _i64("n_tokens", "[B]")]),
    _schema("PackedAttention", "Tree-masked GQA attention over the KV cache (redrafter::packed_attention).",
            inputs=[_param("q", "T", "[B, T, heads, d]"), _param("k", "T", "[B, T, kv_heads, d]"),
                    _param("v", "T", "[B, T, kv_heads, d]"), _param("k_cache", "T", "[slots, capacity, kv_heads, d]"),
                    _param("v_cache", "T", "[slots, capacity, kv_heads, d]"), _i64("slots", "[B]"),
                    _i64("starts", "[B] committed lengths"), _param("tree_mask", "tensor(bool)", "[B, T, T]")],
            outputs=[_param("out", "T", "[B, T, heads, d]")]),
    _schema("KvCommit", "Move the accepted path's K/V into place (redrafter::kv_commit).",
            inputs=[_param("k_cache", "T", "[layers, slots, capacity, kv_heads, d]"),
                    _param("v_cache", "T", "[layers, slots, capacity, kv_heads, d]"),
                    _i64("slots", "[B]"), _i64("starts", "[B]"), _i64("src", "[B, n] scratch offsets, src[:, i] >= i")],
            outputs=[_param("k_cache_out", "T", "updated k_cache"), _param("v_cache_out", "T", "updated v_cache")]),
]


def register_schemas() -> None:
    """Make the redrafter ops known to onnx (idempotent)."""
    for s in SCHEMAS:
        try:
            defs.get_schema(s.name, VERSION, DOMAIN)
        except defs.SchemaError:
            defs.register_schema(s)


def beam_draft_inputs(context, first_token, embed, rnn_w, rnn_u_weight, rnn_u_bias, input_proj_weight,
                      input_proj_bias, res_weights, res_biases, out_weight, base_lm_head, draft_vocab) -> list:
    """beam_draft's arguments in BeamDraft's flat input order (absent groups left out)."""
    flat = [context, first_token, embed]
    if rnn_w is not None:
        flat += [rnn_w, rnn_u_weight, rnn_u_bias]
    if input_proj_weight is not None:
        flat += [input_proj_weight, input_proj_bias]
    flat.append(out_weight)
    if base_lm_head is not None:
        flat.append(base_lm_head)
    if draft_vocab is not None:
        flat.append(draft_vocab)
    return flat + [x for pair in zip(res_weights, res_biases) for x in pair]


def beam_draft_args(inputs: Iterable[Any], rnn: int, input_proj: int, shared: int,
                    num_draft_layers: int, draft_vocab: int = 0) -> dict[str, Any]:
    """The inverse of beam_draft_inputs: BeamDraft's flat inputs -> beam_draft's arguments."""
    it = iter(inputs)
    args: dict[str, Any] = dict(context=next(it), first_token=next(it), embed=next(it))
    args |= dict(zip(("rnn_w", "rnn_u_weight", "rnn_u_bias"), (next(it), next(it), next(it)) if rnn else (None,) * 3))
    args |= dict(zip(("input_proj_weight", "input_proj_bias"), (next(it), next(it)) if input_proj else (None,) * 2))
    args["out_weight"] = next(it)
    args["base_lm_head"] = next(it) if shared else None
    args["draft_vocab"] = next(it) if draft_vocab else None
    res = list(it)
    if len(res) != 2 * num_draft_layers:
        raise ValueError(f"BeamDraft has {len(res)} ResBlock inputs, expected 2 x num_draft_layers "
                         f"= {2 * num_draft_layers}")
    return args | dict(res_weights=res[0::2], res_biases=res[1::2])


def _translations() -> dict[Any, Any]:
    """torch op -> onnxscript function emitting the custom node (for torch.onnx.export)."""
    import onnxscript

    register_schemas()
    r = onnxscript.values.Opset(DOMAIN, VERSION)

    def beam_draft(context, first_token, embed, rnn_w, rnn_u_weight, rnn_u_bias, input_proj_weight,
                   input_proj_bias, res_weights, res_biases, out_weight, base_lm_head, draft_vocab, width,
                   length, keep_prefixes=False):
        inputs = beam_draft_inputs(context, first_token, embed, rnn_w, rnn_u_weight, rnn_u_bias,
                                   input_proj_weight, input_proj_bias, res_weights, res_biases, out_weight,
                                   base_lm_head, draft_vocab)
        return r.BeamDraft(*inputs, width=width, length=length, rnn=int(rnn_w is not None),
                           input_proj=int(input_proj_weight is not None), shared=int(base_lm_head is not None),
                           draft_vocab=int(draft_vocab is not None), num_draft_layers=len(res_weights),
                           keep_prefixes=int(keep_prefixes))

    def pack_beams(beams):
        return r.PackBeams(beams)

    def packed_attention(q, k, v, k_cache, v_cache, slots, starts, tree_mask):
        return r.PackedAttention(q, k, v, k_cache, v_cache, slots, starts, tree_mask)

    def kv_commit(k_cache, v_cache, slots, starts, src):
        return r.KvCommit(k_cache, v_cache, slots, starts, src)

    o = torch.ops.redrafter
    return {o.beam_draft.default: beam_draft, o.pack_beams.default: pack_beams,
            o.packed_attention.default: packed_attention, o.kv_committed.default: kv_commit}


@torch.library.custom_op(f"{DOMAIN}::kv_committed", mutates_args=())
def kv_committed(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
                 src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place kv_commit: what an exported graph computes (ONNX has no in-place ops)."""
    k, v = k_cache.clone(), v_cache.clone()
    ops.kv_commit(k, v, slots, starts, src)
    return k, v


@kv_committed.register_fake
def _(k_cache, v_cache, slots, starts, src):
    return torch.empty_like(k_cache), torch.empty_like(v_cache)


def _functional_kv_commit(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Rewrite torch.export's auto_functionalized_v2(kv_commit, bases=[k, v]) nodes, whose
    results (None, new k, new v) feed the cache write-back, into kv_committed(k, v, ...)."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.higher_order.auto_functionalized_v2:
            continue
        if node.args[0] is not torch.ops.redrafter.kv_commit.default:
            raise ValueError(f"no ONNX mapping for the mutating op {node.args[0]}")
        kw = node.kwargs
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.redrafter.kv_committed.default,
                                      (*kw["_all_bases"], kw["slots"], kw["starts"], kw["src"]))
            new.meta["val"] = node.meta["val"][1:]
        for user in list(node.users):  # getitem(node, 1 | 2) -> getitem(new, 0 | 1)
            user.args = (new, user.args[1] - 1)
        graph.erase_node(node)
    ep.graph_module.recompile()
    return ep


def export(module: torch.nn.Module, args: tuple, path: str | Path | None = None, dynamic_shapes=None,
           **kwargs) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) with the redrafter ops mapped to their custom nodes;
    writes `path` if given and returns the checked ModelProto."""
    ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    ep = _functional_kv_commit(ep.run_decompositions({}))  # functionalise
    program = torch.onnx.export(ep, args, dynamo=True, custom_translation_table=_translations(),
                                optimize=False, **kwargs)
    model = program.model_proto
    onnx.checker.check_model(model)
    if path is not None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        onnx.save(model, tmp)
        tmp.replace(path)
    return model


# --- ONNX Runtime reference: each custom node runs the op's PyTorch reference -------------

_ORT_DOMAIN = "ai.onnx.contrib"  # the domain onnxruntime-extensions serves Python ops from
_registered: set[str] = set()
_LAYOUT = ("rnn", "input_proj", "shared", "draft_vocab", "num_draft_layers")  # BeamDraft's input flags


def _beam_draft_signature(node: onnx.NodeProto) -> str:
    """A BeamDraft node's input dtypes, "i" (int64) or "f" (float) per input, from its layout
    flags: a PyOp has a fixed list of input dtypes."""
    flags = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name in _LAYOUT}
    args = beam_draft_args(range(len(node.input)), **flags)
    ints = {args["first_token"], args["draft_vocab"]}
    return "".join("i" if i in ints else "f" for i in range(len(node.input)))


def _register_pyops(beam_draft_signatures: set[str]) -> None:
    """Register onnxruntime-extensions PyOps once per op type (BeamDraft once per input
    signature, see _beam_draft_signature)."""
    from onnxruntime_extensions import PyCustomOpDef as D
    from onnxruntime_extensions import onnx_op

    def t(x):
        return torch.from_numpy(x.copy())

    i64, f32, b = D.dt_int64, D.dt_float, D.dt_bool
    plugin = {"plugin_version": D.dt_string, "plugin_namespace": D.dt_string}

    if "PackBeams" not in _registered:
        @onnx_op(op_type="PackBeams", domain=_ORT_DOMAIN, inputs=[i64], outputs=[i64, i64, i64, b, i64], attrs=plugin)
        def _pack(beams, **_):
            return tuple(x.numpy() for x in ops.REFERENCES["pack_beams"](t(beams)))

        @onnx_op(op_type="PackedAttention", domain=_ORT_DOMAIN, inputs=[f32] * 5 + [i64, i64, b], outputs=[f32],
                 attrs=plugin)
        def _attn(q, k, v, kc, vc, slots, starts, mask, **_):
            return ops.REFERENCES["packed_attention"](*map(t, (q, k, v, kc, vc, slots, starts, mask))).numpy()

        @onnx_op(op_type="KvCommit", domain=_ORT_DOMAIN, inputs=[f32, f32, i64, i64, i64], outputs=[f32, f32],
                 attrs=plugin)
        def _commit(kc, vc, slots, starts, src, **_):
            k, v = t(kc), t(vc)
            ops.REFERENCES["kv_commit"](k, v, t(slots), t(starts), t(src))
            return k.numpy(), v.numpy()

        _registered.add("PackBeams")

    for sig in beam_draft_signatures - _registered:
        @onnx_op(op_type=f"BeamDraft_{sig}", domain=_ORT_DOMAIN, inputs=[i64 if c == "i" else f32 for c in sig],
                 outputs=[i64], attrs=plugin | {k: D.dt_int64 for k in ("width", "length", "keep_prefixes", *_LAYOUT)})
        def _draft(*inputs, width, length, rnn, input_proj, shared, draft_vocab, num_draft_layers, keep_prefixes=0,
                   **_):
            args = beam_draft_args([t(x) for x in inputs], rnn, input_proj, shared, num_draft_layers, draft_vocab)
            return ops.REFERENCES["beam_draft"](**args, width=width, length=length,
                                               keep_prefixes=bool(keep_prefixes)).numpy()

        _registered.add(sig)


def ort_session(model: onnx.ModelProto):
    """An onnxruntime InferenceSession running `model` (fp32) with every redrafter node
    computed by the ops' PyTorch reference through onnxruntime-extensions PyOps: checks an
    exported graph's wiring and attributes end to end. Needs onnxruntime-extensions."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    model = onnx.ModelProto.FromString(model.SerializeToString())
    signatures = set()
    for node in model.graph.node:
        if node.domain == DOMAIN:
            node.domain = _ORT_DOMAIN
            if node.op_type == "BeamDraft":
                sig = _beam_draft_signature(node)
                signatures.add(sig)
                node.op_type = f"BeamDraft_{sig}"
    for imp in model.opset_import:
        if imp.domain == DOMAIN:
            imp.domain = _ORT_DOMAIN
    _register_pyops(signatures)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about nodes it cannot constant-fold
    options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
