"""Engine builder: tiny engines per backend, agreement with eager, int8, corrupted engines,
atomic builds. Each backend compiles once per session (AOTInductor takes ~30-60 s on 2 cores)."""
from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import Tensor
from safetensors.torch import load_file, save_file

from redrafter.runtime.config import DecodeConfig
from redrafter.builder import build as build_mod
from redrafter.builder.build import BuildOptions, build_engine
from redrafter.builder.engine import SCHEMA_VERSION, file_checksums, load_engine, open_session
from redrafter.builder.programs import CompiledSteps, DraftBeams
from conftest import tiny_drafter, tiny_llama
from redrafter.builder.quantize import GROUP, Int4Linear, Int8Linear, quantize_int4, quantize_model, quantize_weight
from redrafter.builder.tensorrt import TensorRTUnavailable, missing_requirements
from redrafter.runtime.decoding import Decoder, Steps, generate
from redrafter.runtime.model import causal_mask, lm_head_weight

MAX_SEQ_LEN = 64
PROMPTS = ["Hello there", "Write a short poem about the sea and the wind"]


@pytest.fixture(scope="session")
def build(tiny_hf_dir, tmp_path_factory):
    """build(backend, quantize) -> engine dir, built once per session."""
    base, drafter = tiny_hf_dir
    root = tmp_path_factory.mktemp("engines")
    built: dict[tuple[str, str], Path] = {}

    def get(backend: str, quantize: str = "none", plugin_ops: bool = False, dtype: str = "float32",
            exact_attention: bool = False, lookup_ngram: int = 0, lookup_length: int = 0, tree: str = "beams") -> Path:
        key = (backend, quantize, plugin_ops, dtype, exact_attention, lookup_ngram, lookup_length, tree)
        if key not in built:
            built[key] = build_engine(BuildOptions(output=root / "-".join(map(str, key)), base=base, drafter=drafter, backend=backend, quantize=quantize, max_batch_size=2, max_seq_len=MAX_SEQ_LEN, plugin_ops=plugin_ops, dtype=dtype, exact_attention=exact_attention, progress=False, decode=DecodeConfig(beam_width=3, beam_length=4, tree=tree, lookup_ngram=lookup_ngram, lookup_length=lookup_length)))
        return built[key]

    return get


def greedy(engine_dir: Path, speculative: bool = True, n: int = 24, fused_step: bool | None = None) -> list[list[int]]:
    e = load_engine(engine_dir)
    prompts = [e.encode_chat(p) for p in PROMPTS]
    decoder = e.decoder(fused_step=fused_step, decode=None if speculative else DecodeConfig.plain())
    return [g.token_ids for g in generate(decoder, prompts, n, e.eos_ids)]


def test_engine_directory_is_complete_and_checksummed(build):
    path = build("aoti")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["format"] == "redrafter-engine" and cfg["schema_version"] == SCHEMA_VERSION
    assert cfg["base"]["vocab_size"] == cfg["drafter"]["vocab_size"] == 49152
    assert cfg["build"]["backend"] == "aoti" and cfg["build"]["quantize"] == cfg["build"]["draft_quantize"] == "none"
    assert cfg["build"]["decode"]["beam_width"] == 3 and cfg["build"]["max_seq_len"] == MAX_SEQ_LEN
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"config.json"}
    assert set(cfg["files"]) == files
    assert {"base.safetensors", "drafter.safetensors", "programs/forward.pt2", "programs/draft.pt2",
            "programs/step.pt2"} <= files
    assert any(f.startswith("tokenizer/") for f in files)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_compiled_programs_run_without_the_source_model(build, tmp_path, monkeypatch):
    """A copied engine runs with the checkpoint loaders disabled: it reads only its own files."""
    import redrafter.runtime.loading as loading

    moved = tmp_path / "engine"
    shutil.copytree(build("aoti"), moved)
    eager_tokens = greedy(build("eager"))

    def no_checkpoints(*args, **kwargs):
        raise AssertionError("an engine must not read the source checkpoint")

    for name in ("load_base", "resolve_base", "load_tokenizer"):
        monkeypatch.setattr(loading, name, no_checkpoints)
    e = load_engine(moved)
    assert isinstance(e.decoder().steps, CompiledSteps)  # every forward through the compiled program
    assert greedy(moved) == eager_tokens


def test_eager_aoti_onnx_agree_and_equal_plain_greedy(build):
    eager = greedy(build("eager"))
    assert greedy(build("eager"), speculative=False) == eager
    assert greedy(build("aoti")) == eager
    assert greedy(build("onnx")) == eager
    assert all(len(t) == 24 for t in eager)


def test_an_aoti_engine_with_a_lookup_beam_decodes_like_eager(build):
    """Built with a lookup beam longer than the drafted ones, the compiled cache has room for W
    beams of L and the lookup beam; the engine's ReDrafter and plain decoders both use it (the
    fused step program, which has no lookup beam, is passed over)."""
    path = build("aoti", lookup_ngram=3, lookup_length=6)
    e = load_engine(path)
    assert e.options.decode.lookup_ngram == 3 and e.decoder().config.lookup_ngram == 3
    assert e.options.decode.lookup_length == 6 and e.decoder().config.step_length == 6
    assert e.options.cache_capacity == MAX_SEQ_LEN + 3 * 4 + 6
    eager = greedy(build("eager"))
    assert greedy(path) == eager == greedy(path, speculative=False) == greedy(path, fused_step=True)


def test_an_aoti_engine_verifying_the_search_tree_decodes_like_eager(build):
    """Built with --tree search, the draft and step programs draft every prefix the beam search
    kept; the step verifies its 1 + W(L-1) tokens in the cache's W*L scratch. Outputs stay plain
    decoding's, and the engine accepts more per step than with its final beams alone."""
    path = build("aoti", tree="search")
    e = load_engine(path)
    assert e.options.decode.tree == "search" and e.decoder().config.tree == "search"
    assert e.options.cache_capacity == MAX_SEQ_LEN + 3 * 4
    eager = greedy(build("eager"))
    assert greedy(path) == eager == greedy(path, fused_step=True)
    prompts = [e.encode_chat(p) for p in PROMPTS]
    ctx, first = torch.randn(2, e.model.cfg.hidden_size), torch.tensor([5, 7])
    assert e.programs().draft(ctx, first).shape == (2, 3 * 3, 4)  # W beams kept at each of L-1 depths
    steps = {tree: sum(g.steps for g in generate(load_engine(build("aoti", tree=tree)).decoder(fused_step=True),
                                                 prompts, 24, e.eos_ids)) for tree in ("beams", "search")}
    assert steps["search"] <= steps["beams"]


def test_aoti_draft_program_can_call_the_beam_draft_plugin_op(build, monkeypatch):
    """With plugin_ops the compiled draft and step programs draft with one redrafter::beam_draft
    node and the step program attends with redrafter::packed_attention, which AOTInductor runs
    through the registered ops (their CPU implementations here)."""
    engine_dir = build("aoti", plugin_ops=True)
    cfg = json.loads((engine_dir / "config.json").read_text())
    assert cfg["build"]["plugin_ops"] is True
    assert cfg["plugins"]["used_in_programs"] == {
        "step": ["beam_draft", "pack_beams", "packed_attention", "kv_commit"], "draft": ["beam_draft"]}
    from redrafter.plugins import ops
    from redrafter.runtime.model import attend

    calls = []
    reference = ops._beam_search
    monkeypatch.setattr(ops, "_beam_search", lambda *a, **k: calls.append(1) or reference(*a, **k))
    assert greedy(engine_dir) == greedy(build("eager"))
    assert calls, "the draft program did not call redrafter::beam_draft"
    calls.clear()
    attention = []
    monkeypatch.setattr(ops, "attend", lambda *a, **k: attention.append(1) or attend(*a, **k))
    assert greedy(engine_dir, fused_step=True) == greedy(build("eager"))
    assert calls, "the step program did not call redrafter::beam_draft"
    assert attention, "the step program did not call redrafter::packed_attention"
    with pytest.raises(ValueError, match="need the aoti backend"):
        BuildOptions(output="x", backend="onnx", plugin_ops=True).validate()


def test_aoti_greedy_steps_run_as_one_compiled_program(build):
    """With fused_step the aoti engine's greedy steps are one call of the step program (draft ->
    pack -> verify -> accept -> commit, with the plugin ops inside) and decode exactly as eager."""
    path = build("aoti")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["programs"]["step"] == "programs/step.pt2"
    assert cfg["plugins"]["used_in_programs"] == {"step": ["pack_beams", "kv_commit"]}
    e = load_engine(path)
    programs = e.programs()
    calls, step = [], programs.step
    programs.step = lambda *a: calls.append(a[0].shape[0]) or step(*a)
    prompts = [e.encode_chat(p) for p in PROMPTS]
    assert [g.token_ids for g in generate(e.decoder(), prompts, 24, e.eos_ids)] == greedy(build("eager"))
    assert not calls  # a CPU engine's default: draft + forward programs (no faster fused on CPU)
    out = generate(e.decoder(fused_step=True), prompts, 24, e.eos_ids)
    assert [g.token_ids for g in out] == greedy(build("eager"))
    assert len(calls) == max(g.steps for g in out) and calls[0] == 2
    with pytest.raises(ValueError, match="no step program"):
        load_engine(build("eager")).decoder(fused_step=True)


def test_a_static_key_span_engine_decodes_like_eager(build, tiny_hf_dir, tmp_path, monkeypatch):
    """CUDA engines compile the forward program over the whole (masked) cache, since export
    cannot prove the stride guards a dynamic span puts on GPU attention (torch 2.11, H100).
    Forced here on the CPU: the build verifies it and it decodes exactly as eager."""
    from redrafter.builder import programs

    monkeypatch.setattr(programs, "static_span", lambda device, capacity: capacity - 1)
    base, drafter = tiny_hf_dir
    path = build_engine(BuildOptions(output=tmp_path / "static", base=base, drafter=drafter, backend="aoti", max_batch_size=2, max_seq_len=MAX_SEQ_LEN, progress=False, decode=DecodeConfig(beam_width=3, beam_length=4)))
    assert greedy(path) == greedy(path, speculative=False) == greedy(build("eager"))


def test_onnx_step_program_holds_the_plugin_nodes_and_decodes_like_eager(build):
    """step.onnx is the whole greedy step with one custom-domain node per plugin op (what a
    TensorRT engine with our plugins would run); ONNX Runtime runs it with the ops' PyTorch
    references and decodes exactly as eager."""
    import onnx

    from redrafter.plugins.onnx import DOMAIN, register_schemas

    path = build("onnx")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["programs"]["step"] == "programs/step.onnx"
    assert cfg["plugins"]["used_in_programs"] == {"step": ["beam_draft", "pack_beams", "packed_attention", "kv_commit"]}
    model = onnx.load(str(path / "programs" / "step.onnx"))
    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    custom = [n.op_type for n in model.graph.node if n.domain == DOMAIN]
    assert sorted(set(custom)) == ["BeamDraft", "KvCommit", "PackBeams", "PackedAttention"]
    assert custom.count("PackedAttention") == cfg["base"]["num_layers"] and custom.count("BeamDraft") == 1
    e = load_engine(path)
    programs = e.programs()
    calls, step = [], programs.step
    programs.step = lambda *a: calls.append(1) or step(*a)
    prompts = [e.encode_chat(p) for p in PROMPTS]
    assert [g.token_ids for g in generate(e.decoder(fused_step=True), prompts, 24, e.eos_ids)] == \
        greedy(build("eager"))
    assert calls


def test_aoti_engine_samples_through_its_draft_and_forward_programs(build):
    """Sampling steps walk the tree on the host (the step program is greedy only); seeded
    output equals the eager engine's."""
    from redrafter.runtime.session import SamplingParams

    outs = {}
    for backend in ("eager", "aoti"):
        session = open_session(build(backend))
        try:
            outs[backend] = [o.token_ids for o in session.generate(
                PROMPTS, SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=5))]
        finally:
            session.close()
    assert outs["aoti"] == outs["eager"]
    assert outs["aoti"] != greedy(build("eager"), n=16)


def test_a_program_refuses_tensors_unlike_those_it_was_compiled_for(build):
    """A package binds whatever tensors it is given; a dtype or shape drift (another
    redrafter version's model code) must fail clearly instead of computing garbage."""
    e = load_engine(build("aoti"))
    e.model.norm.weight = torch.nn.Parameter(e.model.norm.weight.double(), requires_grad=False)
    with pytest.raises(ValueError, match=r"compiled for model.norm.weight as float32 \[64\] but the engine's "
                                         r"model holds float64 \[64\].*rebuild it"):
        e.programs()


def _segfault(*args) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_crash_loading_a_compiled_program_ends_the_build_with_a_clear_error(tiny_hf_dir, tmp_path, monkeypatch):
    """torch 2.11.0+cu130 on an H100 VM segfaulted loading any AOTInductor CUDA package. The
    build loads its program in a child process, so such a crash ends the build with an error
    naming the fix and leaves no engine (and no half-built directory) behind."""
    from redrafter.builder import export_aoti

    monkeypatch.setattr(export_aoti, "_verify_from_files", _segfault)  # what the child process runs
    base, drafter = tiny_hf_dir
    out = tmp_path / "crashing"
    with pytest.raises(ValueError, match=r"crashed the process \(SIGSEGV\).*--backend eager"):
        build_engine(BuildOptions(output=out, base=base, drafter=drafter, backend="aoti", max_batch_size=2, max_seq_len=MAX_SEQ_LEN, progress=False, decode=DecodeConfig(beam_width=3, beam_length=4)))
    assert list(tmp_path.iterdir()) == []


def test_session_opens_an_engine(build):
    from redrafter.runtime.session import SamplingParams

    session = open_session(build("aoti"))
    try:
        outs = session.generate(PROMPTS, SamplingParams(max_new_tokens=24))
    finally:
        session.close()
    assert [o.token_ids for o in outs] == greedy(build("eager"))


def test_int4_engine_is_lossless_wrt_its_own_plain_decoding(build):
    path = build("aoti", "int4")
    state = load_file(str(path / "base.safetensors"))
    w = state["layers.0.mlp.up.weight"]
    assert w.dtype == torch.uint8 and w.shape == (128, 64 // 2)  # two 4-bit weights per byte
    assert state["layers.0.mlp.up.scales_and_zeros"].shape == (64 // GROUP, 128, 2)
    # The LM head is in 4 bits too, untied from the float embedding, whose rows the drafter reads.
    assert state["lm_head.weight"].dtype == torch.uint8 and state["embed.weight"].dtype == torch.float32
    assert greedy(path) == greedy(path, speculative=False)
    e = load_engine(path)
    assert e.options.draft_quantize == "int4"
    model = e.model
    assert isinstance(model.layers[0].mlp.up, Int4Linear) and isinstance(model.lm_head, Int4Linear)
    # The draft program drafts with the int4 copy of the head, made again at load.
    torch.manual_seed(0)
    context, first = torch.randn(2, model.cfg.hidden_size), torch.tensor([5, 7])
    drafts = {q: DraftBeams(model, e.drafter, 3, 4, quantize=q)(context, first) for q in ("int4", "none")}
    assert torch.equal(e.programs().draft(context, first), drafts["int4"])
    assert not torch.equal(drafts["int4"], drafts["none"])
    assert lm_head_weight(model) is model.embed.weight
    deq = model.lm_head.dequantized_weight()
    assert deq.shape == model.embed.weight.shape and 0 < (deq - model.embed.weight).abs().max() < 0.1


def test_an_engine_from_before_quantized_drafting_still_drafts_in_float(tiny_hf_dir, tmp_path):
    """Engines record the draft head's quantization; one without the record (built before it
    existed) has float draft programs and loads them as such."""
    base, drafter = tiny_hf_dir
    path = build_engine(BuildOptions(output=tmp_path / "e", base=base, drafter=drafter, quantize="int8", draft_quantize="none", max_batch_size=2, max_seq_len=MAX_SEQ_LEN, progress=False, decode=DecodeConfig(beam_width=3, beam_length=4)))
    cfg = json.loads((path / "config.json").read_text())
    del cfg["build"]["draft_quantize"]
    (path / "config.json").write_text(json.dumps(cfg))
    e = load_engine(path)
    torch.manual_seed(0)
    context, first = torch.randn(1, e.model.cfg.hidden_size), torch.tensor([5])
    assert torch.equal(e.programs().draft(context, first), DraftBeams(e.model, e.drafter, 3, 4)(context, first))
    assert greedy(path) == greedy(path, speculative=False)
    with pytest.raises(ValueError, match="draft_quantize 'int4' must be 'none' or"):
        BuildOptions(output="x", quantize="int8", draft_quantize="int4").engine_options().validate()


def test_int8_engine_is_lossless_wrt_its_own_plain_decoding(build):
    path = build("aoti", "int8")
    state = load_file(str(path / "base.safetensors"))
    assert state["layers.0.attn.wq.weight"].dtype == torch.int8
    assert state["layers.0.attn.wq.scale"].shape == (state["layers.0.attn.wq.weight"].shape[0],)
    # The LM head is in int8 too, untied from the float embedding, whose rows the drafter reads.
    assert state["lm_head.weight"].dtype == torch.int8 and state["embed.weight"].dtype == torch.float32
    assert greedy(path) == greedy(path, speculative=False)
    # The eager reference of the same int8 weights agrees with the compiled programs.
    e = load_engine(path)
    assert isinstance(e.model.layers[0].mlp.up, Int8Linear) and isinstance(e.model.lm_head, Int8Linear)


def test_an_int8_engine_from_before_int8_heads_loads_its_float_head(build, tmp_path):
    """int8 engines kept a float (tied) LM head until 2026-11-27; such an engine still loads."""
    path = tmp_path / "old"
    shutil.copytree(build("eager", "int8"), path)
    state = load_file(str(path / "base.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("lm_head.")}, str(path / "base.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["files"] = file_checksums(path)
    (path / "config.json").write_text(json.dumps(cfg))
    model = load_engine(path).model
    assert isinstance(model.layers[0].mlp.up, Int8Linear) and model.lm_head.weight is model.embed.weight
    assert greedy(path) == greedy(path, speculative=False)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_bf16_quantized_aoti_engine_computes_what_its_eager_model_computes(build, quantize):
    """The programs bind the tensors the engine loads. Regression: the RoPE frequencies were
    bfloat16 in the converted model the programs were compiled from and float32 once loaded,
    and the compiled forward returned NaN."""
    from redrafter.runtime.model import causal_mask

    e = load_engine(build("aoti", quantize, dtype="bfloat16"))
    assert e.model.inv_freq.dtype == torch.float32
    compiled, eager = e.decoder(), Decoder(e.model, e.drafter, max_batch=1, max_seq_len=MAX_SEQ_LEN)
    ids = torch.tensor([e.encode_chat(PROMPTS[1])])
    positions, zero = torch.arange(ids.shape[1])[None], torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        got, ref = (d.model(ids, positions, d.cache, zero, zero, causal_mask(1, ids.shape[1])).float()
                    for d in (compiled, eager))
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_an_exact_attention_engine_attends_in_float64_and_is_lossless_in_bfloat16(build):
    path = build("aoti", "int4", dtype="bfloat16", exact_attention=True)
    e = load_engine(path)
    assert e.options.exact_attention and all(b.attn.work_dtype == torch.float64 for b in e.model.layers)
    assert greedy(path) == greedy(path, speculative=False)
    with pytest.raises(ValueError, match="exact attention .* plugin ops"):
        BuildOptions(output="x", exact_attention=True, plugin_ops=True).engine_options().validate()


@pytest.mark.parametrize("dtype,quantize", [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8"),
                                           ("bfloat16", "int4")], ids=["fp32", "bf16", "int8", "int4"])
def test_with_gated_tactics_and_exact_attention_every_precision_is_lossless(build, dtype, quantize):
    """Every linear tactic the plan holds gives a row the bits it gets alone (the gate checked
    it on this machine), and float64 attention does too: ReDrafter's greedy output then equals
    the same engine's plain decoding in every precision, on any CPU."""
    path = build("eager", quantize, dtype=dtype, exact_attention=True)
    assert greedy(path) == greedy(path, speculative=False)


def test_int8_quantization_is_per_channel_symmetric():
    torch.manual_seed(0)
    w = torch.randn(32, 48) * torch.linspace(0.01, 3, 32)[:, None]  # rows of very different ranges
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.all((w - q.float() * scale[:, None]).abs() <= scale[:, None] / 2 + 1e-7)
    lin = torch.nn.Linear(48, 32)
    lin.weight.data = w
    x = torch.randn(5, 48)
    ref = x @ (q.float() * scale[:, None]).t() + lin.bias
    assert torch.allclose(Int8Linear.from_linear(lin)(x), ref, atol=1e-4)
    # bfloat16 activations take torch's int8 matmul (aten._weight_int8pack_mm) on CPU
    lin_bf16 = Int8Linear.from_linear(lin.to(torch.bfloat16))
    assert lin_bf16.weight.dtype == torch.int8 and lin_bf16.scale.dtype == torch.bfloat16
    assert torch.allclose(lin_bf16(x.bfloat16()).float(), ref, rtol=0.05, atol=0.1)


def test_int4_quantization_is_groupwise_asymmetric():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * torch.linspace(0.01, 3, 64)[None, :]  # groups of very different ranges
    q, sz = quantize_int4(w)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (64 // GROUP, 32, 2)
    scale, zero = (sz[..., i].t().repeat_interleave(GROUP, dim=1) for i in (0, 1))  # [out, in]
    deq = (q.float() - 8) * scale + zero
    assert torch.all((w - deq).abs() <= scale / 2 + 1e-6)
    lin = torch.nn.Linear(64, 32)
    lin.weight.data = w
    x = torch.randn(5, 64)
    ref = x @ deq.t() + lin.bias
    assert torch.allclose(Int4Linear.from_linear(lin)(x), ref, atol=1e-4)
    # bfloat16 engines keep scales and zeros in bfloat16, as torch's int4 matmul takes them.
    lin_bf16 = Int4Linear.from_linear(lin.to(torch.bfloat16))
    assert lin_bf16.weight.dtype == torch.uint8 and lin_bf16.scales_and_zeros.dtype == torch.bfloat16
    q = quantize_int4(lin.weight)[0]
    scale, zero = (lin_bf16.scales_and_zeros[..., i].float().t().repeat_interleave(GROUP, dim=1) for i in (0, 1))
    ref_bf16 = x.bfloat16().float() @ ((q.float() - 8) * scale + zero).t() + lin_bf16.bias.float()
    assert torch.allclose(lin_bf16(x.bfloat16()).float(), ref_bf16, rtol=0.02, atol=0.1)
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4Linear.from_linear(torch.nn.Linear(48, 16))
    with pytest.raises(ValueError, match="divisible by 16"):
        Int4Linear.from_linear(torch.nn.Linear(64, 8))


@pytest.mark.parametrize("kind,cls", [("int8", Int8Linear), ("int4", Int4Linear)], ids=["int8", "int4"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_quantized_model_drafts_from_float_lm_head_rows_and_stays_lossless(tied, kind, cls):
    model = tiny_llama(tied, vocab=96)  # torch's int4 packing takes multiples of 16
    float_head = model.lm_head.weight.clone()
    head = tiny_drafter(model, head="shared", draft_vocab_size=24)
    quantize_model(model, kind)
    assert isinstance(model.lm_head, cls)
    rows = lm_head_weight(model)
    if tied:  # the embedding it was tied to still holds the float weights
        assert rows is model.embed.weight and torch.equal(rows, float_head)
    else:  # dequantized: within half a quantization step of the float weights
        assert rows.shape == float_head.shape and 0 < (rows - float_head).abs().max() < 0.1
    prompts = [[1, 5, 9, 2], [7, 3]]
    plain = generate(Decoder(model, None, max_batch=2, max_seq_len=40), prompts, 12)
    spec = generate(Decoder(model, head, max_batch=2, max_seq_len=40, decode=DecodeConfig(beam_width=3, beam_length=3)), prompts, 12)
    assert [g.token_ids for g in spec] == [g.token_ids for g in plain]
    # int8 takes any shape; a head that torch's int4 packing cannot take stays float.
    odd = quantize_model(tiny_llama(tied, vocab=97), kind)
    assert isinstance(odd.lm_head, cls if kind == "int8" else torch.nn.Linear) and isinstance(odd.layers[0].mlp.up, cls)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("head_kind,draft_vocab", [("shared", 32), ("shared", 24), ("own", 0)])
def test_a_quantized_engine_drafts_with_a_quantized_copy_of_its_head(kind, head_kind, draft_vocab):
    """Drafts only propose, so a quantized engine drafts with a quantized head (a draft step
    reads the head's weights as a decode step reads the model's): close to the float head's
    logits, and still lossless."""
    model = tiny_llama(True, vocab=96)
    head = tiny_drafter(model, head=head_kind, draft_vocab_size=draft_vocab)
    quantize_model(model, kind)
    draft = DraftBeams(model, head, 3, 3, quantize=kind)
    cls = Int8Linear if kind == "int8" else Int4Linear
    assert all(isinstance(r.linear, cls) for r in list(draft.head.lm_head)[:-1])
    assert isinstance(draft.head.rnn_w, cls) and isinstance(head.rnn_w, torch.nn.Linear)  # the engine's own stays float
    # torch's int4 packing needs 16 | rows: a 24-id draft vocabulary keeps its projection float.
    packable = head_kind == "shared" and (kind == "int8" or draft_vocab % 16 == 0)
    assert isinstance(draft.draft_proj, cls) if packable else draft.draft_proj is None
    torch.manual_seed(2)
    context, state = torch.randn(5, 64), torch.randn(5, 64)
    rows = head.output_weight(lm_head_weight(model))
    ref = head.logits(context, state, rows)
    got = draft.head.logits(context, state, draft.draft_proj if packable else rows)
    # Relative error of the logits: about 1% in 8 bits and 11% in 4 (16 levels over these
    # Gaussian weights' range).
    assert ref.shape == got.shape and 0 < (got - ref).norm() / ref.norm() < {"int8": 0.03, "int4": 0.2}[kind]
    prompts = [[1, 5, 9, 2], [7, 3]]
    plain = generate(Decoder(model, None, max_batch=2, max_seq_len=40), prompts, 12)

    class Drafts(Steps):  # the draft program's module, eager, as CompiledSteps runs the compiled one
        def draft(self, *args):
            return draft(args[2], args[3])

    spec = generate(Decoder(model, head, DecodeConfig(3, 3), max_batch=2, max_seq_len=40, steps=Drafts(model)),
                    prompts, 12)
    assert [g.token_ids for g in spec] == [g.token_ids for g in plain]


@pytest.mark.parametrize("exact", [False, True], ids=["float32", "float64"])
def test_exact_attention_gives_each_verified_token_the_bits_it_gets_decoded_alone(exact):
    """In a bf16 int4 model every matmul is row-invariant, so attention alone decides whether a
    tree verified at once gives its tokens the bits they get decoded one by one. Exact (float64)
    attention guarantees it on every CPU. Float32 attention promises only the same values up to
    rounding: whether its bits differ depends on the CPU's kernels (they did on an AMD EPYC, not
    on an Intel Xeon), so the test asserts closeness there, never a difference."""
    torch.manual_seed(0)
    # SmolLM2's widths (2 layers): narrower models rarely show a float32 difference in bf16.
    model = tiny_llama(True, vocab=96, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                       head_dim=64)
    model = quantize_model(model, "int4").to(torch.bfloat16)
    if exact:
        model.exact_attention()
    zero = torch.zeros(1, dtype=torch.long)

    def prefilled(prompt: Tensor):
        cache = model.new_cache(1, 320)
        model(prompt, torch.arange(prompt.shape[1])[None], cache, zero, zero, causal_mask(1, prompt.shape[1]))
        return cache

    def alone(prompt: Tensor, path: list[int]) -> Tensor:
        """The hidden state of path[-1], decoded one token at a time after the prompt."""
        cache, n = prefilled(prompt), prompt.shape[1]
        for i, tok in enumerate(path):
            h = model(torch.tensor([[tok]]), torch.tensor([[n + i]]), cache, zero, torch.tensor([n + i]),
                      causal_mask(1, 1))
        return h[0, 0]

    with torch.inference_mode():
        for _ in range(6):
            prompt = torch.randint(0, 96, (1, int(torch.randint(100, 300, (1,)))))
            n = prompt.shape[1]
            root, a, b = torch.randint(0, 96, (3,)).tolist()
            # The tree root -> a, root -> b, packed as [root, a, b]: b does not see a.
            tree = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
            h = model(torch.tensor([[root, a, b]]), torch.tensor([[n, n + 1, n + 1]]), prefilled(prompt), zero,
                      torch.tensor([n]), tree)[0]
            for got, want in zip(h, (alone(prompt, [root]), alone(prompt, [root, a]), alone(prompt, [root, b]))):
                if exact:
                    assert torch.equal(got, want)
                else:  # bf16 rounding: well under 1% of the hidden state's norm
                    assert (got.float() - want.float()).norm() <= 0.01 * want.float().norm()


@pytest.mark.parametrize("kind,dtype", [(Int8Linear, torch.bfloat16), (Int4Linear, torch.bfloat16),
                                        (Int4Linear, torch.float32)])
def test_quantized_linears_compute_each_row_on_its_own_under_the_gated_plan(kind, dtype):
    """Verifying many tokens at once must give each row the bits it gets alone, or a near tie can
    flip where plain decoding resolves it the other way. The tactic gate guarantees it on every
    CPU: it admits only tactics whose rows are row-invariant on this machine (torch's packed
    int8/int4 matmuls were, on both CPU kinds measured), and one product per row always is."""
    from redrafter.runtime.model import rows_linear
    from redrafter.runtime.tactics import use_plan

    torch.manual_seed(0)
    lin = kind.from_linear(torch.nn.Linear(576, 1536).to(dtype))
    use_plan(lin, max_rows=13, tree_sizes=[2, 5])
    x = torch.randn(13, 576, dtype=dtype)
    full = rows_linear(lin, x)
    for rows in (slice(0, 1), slice(3, 4), slice(0, 2), slice(5, 8), slice(2, 7)):
        assert torch.equal(rows_linear(lin, x[rows].clone()), full[rows])


def test_request_beyond_max_seq_len_is_rejected(build):
    e = load_engine(build("eager"))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(e.decoder(), [e.encode_chat(PROMPTS[0])], MAX_SEQ_LEN, e.eos_ids)


@pytest.fixture
def copy_of_eager(build, tmp_path) -> Path:
    dst = tmp_path / "engine"
    shutil.copytree(build("eager"), dst)
    return dst


def test_missing_file_is_rejected(copy_of_eager):
    (copy_of_eager / "drafter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="drafter.safetensors.*missing"):
        load_engine(copy_of_eager)


def test_flipped_byte_is_rejected(copy_of_eager):
    f = copy_of_eager / "base.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch.*base.safetensors"):
        load_engine(copy_of_eager)


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_an_engine_records_its_machines_tactic_plan_and_retunes_on_another_machine(copy_of_eager):
    from redrafter.runtime import tactics

    recorded = json.loads((copy_of_eager / "config.json").read_text())["tactics"]
    assert recorded["signature"] == tactics.machine_signature()
    e = load_engine(copy_of_eager)
    groups = tactics.linear_groups(e.model)
    assert set(recorded["shapes"]) == set(groups) and e.tactics.to_json() == recorded
    assert all(layer.tactics is not None for layers in groups.values() for layer in layers)
    # rows up to max_batch_size (2) x the largest tree (W3 x L4)
    assert all(s["buckets"][0] == 1 and s["buckets"][-1] == 24 for s in recorded["shapes"].values())

    def foreign(c):
        c["tactics"]["signature"].update(cpu="Another CPU", flags=["amx_tile"])
        for s in c["tactics"]["shapes"].values():
            s["tactics"] = ["rows alone"] * len(s["buckets"])

    _edit_config(copy_of_eager, foreign)
    with pytest.warns(UserWarning, match="tuned on another machine.*Another CPU.*re-tuning"):
        e = load_engine(copy_of_eager)
    assert e.tactics.signature == tactics.machine_signature()
    assert e.tactics.to_json()["shapes"] == recorded["shapes"]  # this machine's plan, not the recorded one
    assert all(layer.tactics == e.tactics.shapes[k].bind() for k, layers in tactics.linear_groups(e.model).items()
               for layer in layers)


def test_schema_version_from_the_future_is_rejected(copy_of_eager):
    _edit_config(copy_of_eager, lambda c: c.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(ValueError, match=f"schema_version {SCHEMA_VERSION + 1} is newer"):
        load_engine(copy_of_eager)


def test_drafter_vocab_mismatch_is_rejected(copy_of_eager):
    _edit_config(copy_of_eager, lambda c: c["drafter"].update(vocab_size=1000))
    with pytest.raises(ValueError, match="drafter .*vocab 1000.* does not fit"):
        load_engine(copy_of_eager)


def test_not_an_engine_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_engine(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_engine(tmp_path)


@pytest.mark.parametrize("exc", [RuntimeError("compiler crashed"), KeyboardInterrupt()])
def test_failed_build_leaves_no_engine_directory(tiny_hf_dir, tmp_path, monkeypatch, exc):
    base, drafter = tiny_hf_dir

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(build_mod, "_fsync_tree", boom)  # the last stage before the rename
    out = tmp_path / "engine"
    with pytest.raises(type(exc)):
        build_engine(BuildOptions(output=out, base=base, drafter=drafter, backend="eager",
                                  max_seq_len=MAX_SEQ_LEN, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_old_engine(copy_of_eager, tiny_hf_dir, monkeypatch):
    base, drafter = tiny_hf_dir
    before = (copy_of_eager / "config.json").read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("tokenizer stage failed")

    monkeypatch.setattr(build_mod, "_fsync_tree", boom)
    with pytest.raises(RuntimeError):
        build_engine(BuildOptions(output=copy_of_eager, base=base, drafter=drafter, backend="eager",
                                  max_seq_len=MAX_SEQ_LEN, progress=False))
    assert (copy_of_eager / "config.json").read_text() == before
    assert sorted(p.name for p in copy_of_eager.parent.iterdir()) == ["engine"]
    load_engine(copy_of_eager)


def test_tensorrt_without_tensorrt_writes_onnx_and_says_what_is_missing(tiny_hf_dir, tmp_path):
    if not missing_requirements():
        pytest.fail("this test describes machines without TensorRT or a GPU; this one has both")
    base, drafter = tiny_hf_dir
    out = tmp_path / "engine"
    with pytest.raises(TensorRTUnavailable, match="TensorRT engine not built: this machine lacks") as info:
        build_engine(BuildOptions(output=out, base=base, drafter="none", backend="tensorrt",
                                  max_seq_len=MAX_SEQ_LEN, progress=False))
    msg = str(info.value)
    if not torch.cuda.is_available():
        assert "NVIDIA GPU" in msg
    assert "ONNX" in msg and str(out) in msg
    e = load_engine(out)  # a complete ONNX engine (plain decoding: built without a drafter)
    assert e.options.backend == "onnx" and (out / "programs" / "forward.onnx").is_file()
    ids = e.encode_chat(PROMPTS[0])
    eager = Decoder(e.model, None, max_batch=1, max_seq_len=MAX_SEQ_LEN)
    assert generate(e.decoder(), [ids], 8, e.eos_ids)[0].token_ids == \
        generate(eager, [ids], 8, e.eos_ids)[0].token_ids


def test_beams_default_by_device_and_explicit_values_stay():
    """W1 L2 on the CPU, W4 L4 on CUDA (DecodeConfig.for_device); a given setting is kept."""
    shape = lambda o: (o.decode.beam_width, o.decode.beam_length)  # noqa: E731
    assert shape(BuildOptions(output="x")) == (1, 2) and shape(BuildOptions(output="x", device="cuda")) == (4, 4)
    assert BuildOptions(output="x", decode=DecodeConfig(beam_width=3)).decode == DecodeConfig(3, 2)
    with pytest.raises(ValueError, match="beam_width \\(--beam-width\\) must be an integer >= 1, got 0"):
        DecodeConfig(beam_width=0)
    with pytest.raises(ValueError, match="tree='bushy': give one of beams, search"):
        DecodeConfig(tree="bushy")


def test_an_engine_built_with_defaults_serves_concurrent_requests(tiny_hf_dir, tmp_path):
    """`redrafter build` without --max-batch-size: 8 slots, so a served engine batches requests."""
    from redrafter.builder.engine import EngineOptions
    from redrafter.cli import build_parser, main
    from redrafter.runtime.session import SamplingParams

    assert build_parser().parse_args(["build", "--output", "x"]).max_batch_size == 8
    assert BuildOptions(output="x").max_batch_size == EngineOptions().max_batch_size == 8
    base, drafter = tiny_hf_dir
    out = tmp_path / "cli-engine"
    assert main(["build", "--base", str(base), "--drafter", str(drafter), "--output", str(out), "--backend", "eager",
                 "--max-seq-len", "48", "--no-progress"]) == 0
    with open_session(out) as s:
        assert s.max_batch_size == 8
        outs = s.generate(["Hello there", "Hi", "Write a poem"], SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert [len(o.token_ids) for o in outs] == [6, 6, 6]
        assert s.metrics()["batch_size"]["max"] == 3  # all three decoded together


def test_cli_build_records_the_decode_flags_as_the_engines_limits(tiny_hf_dir, tmp_path):
    from redrafter.cli import main

    base, drafter = tiny_hf_dir
    out = tmp_path / "cli-engine"
    assert main(["build", "--base", str(base), "--drafter", str(drafter), "--output", str(out),
                 "--backend", "eager", "--max-seq-len", "32", "--exact-attention", "--lookup", "2",
                 "--lookup-length", "5", "--tree", "search", "--no-progress"]) == 0
    e = load_engine(out)
    assert e.options.max_seq_len == 32 and e.model.layers[0].attn.work_dtype == torch.float64
    # The CPU's default beam shape, with the flags given; the decoder runs the built setting by default.
    assert e.options.decode == DecodeConfig(1, 2, "search", lookup_ngram=2, lookup_length=5)
    assert e.decoder().config == e.options.decode and e.decoder().config.step_length == 5
    assert json.loads((out / "config.json").read_text())["build"]["decode"] == {
        "beam_width": 1, "beam_length": 2, "tree": "search", "lookup_ngram": 2, "lookup_length": 5}


@pytest.mark.parametrize("flags,message", [
    (["--lookup-length", "5"], "lookup_length=5 sets the lookup beam's length: give lookup_ngram > 0"),
    (["--backend", "onnx", "--quantize", "int8"], "int8 engines use torch's weight-only int8 matmul"),
    (["--backend", "onnx", "--quantize", "int4"], "int4 engines use torch's weight-only int4 matmul"),
])
def test_cli_build_refuses_options_that_do_not_go_together(tiny_hf_dir, tmp_path, capsys, flags, message):
    from redrafter.cli import main

    base, _ = tiny_hf_dir
    out = tmp_path / "e"
    assert main(["build", "--base", str(base), "--output", str(out), "--no-progress", *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):  # argparse: a count below the field's minimum
        main(["build", "--base", str(base), "--output", str(out), "--lookup", "-1"])
    assert "argument --lookup: must be >= 0, got -1" in capsys.readouterr().err


def test_device_check_builds_and_runs_engines_on_the_cpu(tmp_path, capsys):
    """The prepared GPU check (builder.gpu_check), CI-sized: a random 2-layer SmolLM2-shaped model,
    engines verifying the search tree; each ReDrafter mode's tokens equal plain decoding's."""
    from redrafter.builder import gpu_check

    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--layers", "2", "--backends", "eager", "--new-tokens", "12",
                           "--prompt-len", "16", "--tree", "search", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and report["info"]["beams"] == "W4 L4 search"
    (r,) = report["results"]
    assert r["engine"] == "eager-none" and r["redrafter_equals_plain"]
    assert r["redrafter"]["steps"] >= 1 and r["plain"]["tok_per_s"] > 0
    assert capsys.readouterr().out.strip().endswith("OK")


def test_engine_options_read_the_decode_setting_of_old_and_new_config_files():
    """Engines before DecodeConfig kept its fields among the build options (tree and lookup only later)."""
    from redrafter.builder.engine import EngineOptions

    old = EngineOptions.from_json({"beam_width": 3, "beam_length": 4, "max_batch_size": 1, "backend": "aoti"})
    assert old.decode == DecodeConfig(3, 4, "beams") and old.max_batch_size == 1 and old.backend == "aoti"
    new = EngineOptions(decode=DecodeConfig(2, 5, "search", lookup_ngram=3))
    assert EngineOptions.from_json(json.loads(json.dumps(asdict(new)))) == new
