"""`build_engine`: base model + drafter -> an engine directory, written atomically.

Stages: load -> convert (dtype, int8) -> write weights and tokenizer -> compile programs
(backend) -> checksums + config.json -> fsync -> rename. Everything is written into a
temporary directory beside the output; only a finished engine is renamed into place, and
any failure or interruption (KeyboardInterrupt included) removes the temporary directory.
A build killed outright (SIGKILL, power loss) leaves the old engine in place and its
temporary directory behind, which the next build of the same output removes: the finished
engine replaces the old one in one atomic exchange of the two directories
(runtime.atomic.replace_dir), so no moment exists at which the output holds no engine or half of one.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from redrafter.runtime.atomic import atomic_dir, out_of_space
from redrafter.runtime.config import DecodeConfig

from .engine import (BASE_WEIGHTS, CONFIG, DRAFTER_WEIGHTS, PROGRAMS_DIR, TOKENIZER_DIR, EngineOptions,
                     engine_config, file_checksums, read_config)


@dataclass
class BuildOptions(EngineOptions):
    """What to build. base: HF dir | .gguf | "default"; drafter: dir | "default" | "none".
    decode None: the device's default (DecodeConfig.for_device)."""
    decode: DecodeConfig | None = None  # type: ignore[assignment]
    output: str | os.PathLike = ""
    base: str | os.PathLike = "default"
    drafter: str | os.PathLike = "default"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.decode is None:
            self.decode = DecodeConfig.for_device(self.device)

    def engine_options(self) -> EngineOptions:
        opts = EngineOptions(**{f.name: getattr(self, f.name) for f in fields(EngineOptions)})
        if opts.draft_quantize is None:
            opts.draft_quantize = "none" if opts.plugin_ops or opts.backend != "aoti" else opts.quantize
        return opts


class Stages:
    """Progress over the build's stages (a tqdm bar on stderr; silent when disabled)."""

    def __init__(self, names: list[str], enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), disable=not enabled, desc="redrafter build",
                        bar_format="{desc} [{n_fmt}/{total_fmt} stages, {elapsed}]")
        self.t0 = time.perf_counter()

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.bar.set_description_str(f"redrafter build: {name}")
        t = time.perf_counter()
        out = fn()
        self.bar.update(1)
        if not self.bar.disable:
            self.bar.write(f"  {name}: {time.perf_counter() - t:.1f}s")
        return out

    def close(self) -> None:
        self.bar.set_description_str(f"redrafter build: done in {time.perf_counter() - self.t0:.1f}s")
        self.bar.close()


def build_engine(options: BuildOptions) -> Path:
    """Build an engine directory at options.output; returns its path."""
    opts = options.engine_options()
    opts.validate()
    if not options.output:
        raise ValueError("give an output directory for the engine (--output ENGINE_DIR)")
    out = Path(options.output).resolve()
    _check_output(out)
    dev = torch.device(opts.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU, and torch sees none: build with --device cpu")
    if opts.backend in ("onnx", "tensorrt") and opts.quantize != "none":
        raise ValueError(f"{opts.quantize} engines use torch's weight-only {opts.quantize} matmul, which has no "
                         f"ONNX export: use --backend aoti or eager with --quantize {opts.quantize}")
    try:
        with atomic_dir(out) as tmp:
            missing_trt = _build_into(tmp, options, opts)
            _fsync_tree(tmp)
    except Exception as e:  # the safetensors writer wraps the system's error in its own
        if out_of_space(e):
            raise ValueError(f"out of disk space writing the engine beside {str(out)!r} ({e}): free space or "
                             "build to another --output; any engine already there is unchanged") from e
        raise
    if missing_trt:
        from .tensorrt import TensorRTUnavailable, unavailable_message

        raise TensorRTUnavailable(unavailable_message(missing_trt, out))
    return out


def _build_into(tmp: Path, options: BuildOptions, opts: EngineOptions) -> list[str]:
    """Fill tmp with a complete engine; returns what TensorRT lacks (empty unless tensorrt)."""
    from redrafter.runtime.loading import load_base, load_tokenizer
    from redrafter.runtime.pipeline import default_drafter_dir
    from redrafter.runtime.drafter import check_compatible, load_drafter

    compile_names = {"eager": [], "aoti": ["compile forward (AOTInductor)", "verify forward against eager",
                                           "compile draft (AOTInductor)", "compile step (AOTInductor)"],
                     "onnx": ["export forward (ONNX)", "export draft (ONNX)", "export step (ONNX, plugin nodes)"],
                     "tensorrt": ["export forward (ONNX)", "export draft (ONNX)", "export step (ONNX, plugin nodes)",
                                  "build TensorRT plans"]}
    names = ["load base model", "load drafter", "convert weights", "select tactics", "write weights", "write tokenizer",
             *compile_names[opts.backend], "checksums and config"]
    stages = Stages(names, options.progress)
    dev, dtype = torch.device(opts.device), opts.torch_dtype

    model, base_dir = stages.run("load base model", lambda: load_base(options.base, dtype=torch.float32, device=dev))
    head = None
    if str(options.drafter) != "none":
        path = default_drafter_dir() if str(options.drafter) == "default" else Path(options.drafter)
        if not path.exists():
            raise FileNotFoundError(f"drafter directory {str(path)!r} does not exist (train one with "
                                    "`redrafter train`, or build without one with --drafter none)")
        head = stages.run("load drafter", lambda: load_drafter(path, dtype=dtype, device=dev))
        check_compatible(head.cfg, model.cfg.vocab_size, model.cfg.hidden_size)
    else:
        stages.run("load drafter", lambda: None)
    model = stages.run("convert weights", lambda: _convert(model, opts))
    plan = stages.run("select tactics", lambda: _select_tactics(model, opts, stages))

    def write_weights() -> None:
        state = model.state_dict()
        if model.lm_head.weight is model.embed.weight:  # tied (and not quantized): stored once
            state.pop("lm_head.weight")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / BASE_WEIGHTS))
        if head is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()},
                      str(tmp / DRAFTER_WEIGHTS))

    stages.run("write weights", write_weights)
    stages.run("write tokenizer", lambda: load_tokenizer(base_dir).save_pretrained(str(tmp / TOKENIZER_DIR)))
    programs, missing_trt = {}, []
    if opts.backend != "eager":
        (tmp / PROGRAMS_DIR).mkdir()
        programs = _compile(tmp, model, head, opts, stages)
    if opts.backend == "tensorrt":
        from .tensorrt import missing_requirements

        missing_trt = missing_requirements()
        if missing_trt:
            opts = EngineOptions(**{**opts.__dict__, "backend": "onnx"})
            stages.run("build TensorRT plans", lambda: None)
        else:
            programs |= stages.run("build TensorRT plans", lambda: _tensorrt_plans(tmp, programs, opts, model))

    def finish() -> None:
        cfg = engine_config(model.cfg, head.cfg if head else None, opts, programs, plugin_versions(opts, programs),
                            file_checksums(tmp))
        cfg["tactics"] = plan.to_json() if plan is not None else None
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2))
        read_config(tmp)  # the engine must pass its own loader's checks

    stages.run("checksums and config", finish)
    stages.close()
    return missing_trt


def _convert(model, opts: EngineOptions):
    """Quantization from the fp32 weights first, then the rest to the engine dtype."""
    if opts.quantize != "none":
        from .quantize import quantize_model

        quantize_model(model, opts.quantize)
    if opts.exact_attention:
        model.exact_attention()
    return model.to(opts.torch_dtype)


def _select_tactics(model, opts: EngineOptions, stages: Stages):
    """Each linear shape's fastest row-invariant tactic on this machine (runtime.tactics), for
    the rows the engine runs: 1 (plain steps) up to max_batch_size times its largest tree. Set
    on the model before compiling, so that traced programs use the plan's compiled tactic."""
    if torch.device(opts.device).type != "cpu":
        return None
    from redrafter.runtime.tactics import use_plan

    tree = opts.decode.tree_tokens
    return use_plan(model, max_rows=opts.max_batch_size * tree, tree_sizes=[tree],
                    progress=stages.bar.write if not stages.bar.disable else None)


def _compile(tmp: Path, model, head, opts: EngineOptions, stages: Stages) -> dict[str, str]:
    from .programs import (DRAFT_INPUTS, FORWARD_INPUTS, BaseForward, DraftBeams, SpeculativeStep, draft_examples,
                           forward_examples, static_span, step_examples)

    capacity = opts.cache_capacity
    dev = model.embed.weight.device
    d = opts.decode  # the draft and step programs' setting
    w, l, keep = d.beam_width, d.beam_length, d.keep_prefixes
    programs = {}
    if opts.backend == "aoti":
        from .export_aoti import compile_aoti, verify_engine_forward

        args, shapes = forward_examples(model, opts.max_batch_size, capacity)
        forward = tmp / PROGRAMS_DIR / "forward.pt2"
        stages.run("compile forward (AOTInductor)", lambda: compile_aoti(BaseForward(model), args, shapes, forward))
        # Against the model as the runtime will load it from the engine's files: the program's
        # constants are bound from those tensors, so a dtype or layout drift shows here.
        stages.run("verify forward against eager", lambda: verify_engine_forward(
            tmp, model.cfg, opts.quantize, opts.torch_dtype, str(dev), forward, opts.max_batch_size,
            capacity, static_span(dev, capacity), opts.exact_attention))
        programs["forward"] = f"{PROGRAMS_DIR}/forward.pt2"
        if head is not None:
            dargs, dshapes = draft_examples(model, opts.max_batch_size)
            stages.run("compile draft (AOTInductor)", lambda: compile_aoti(
                DraftBeams(model, head, w, l, opts.plugin_ops, opts.draft_quantize,
                           keep),
                dargs, dshapes,
                tmp / PROGRAMS_DIR / "draft.pt2"))
            programs["draft"] = f"{PROGRAMS_DIR}/draft.pt2"
            sargs, sshapes = step_examples(model, opts.max_batch_size, capacity)
            stages.run("compile step (AOTInductor)", lambda: compile_aoti(
                SpeculativeStep(model, head, w, l, opts.plugin_ops,
                                quantize=opts.draft_quantize, keep_prefixes=keep), sargs, sshapes,
                tmp / PROGRAMS_DIR / "step.pt2"))
            programs["step"] = f"{PROGRAMS_DIR}/step.pt2"
        else:
            stages.run("compile draft (AOTInductor)", lambda: None)
            stages.run("compile step (AOTInductor)", lambda: None)
        return programs
    from .export_onnx import DRAFT_OUTPUTS, FORWARD_OUTPUTS, export_onnx, export_step_onnx

    args, shapes = forward_examples(model, opts.max_batch_size, capacity)
    stages.run("export forward (ONNX)", lambda: export_onnx(
        BaseForward(model, functional=True), args, shapes, tmp / PROGRAMS_DIR / "forward.onnx",
        FORWARD_INPUTS, FORWARD_OUTPUTS))
    programs["forward"] = f"{PROGRAMS_DIR}/forward.onnx"
    if head is not None:
        dargs, dshapes = draft_examples(model, opts.max_batch_size)
        stages.run("export draft (ONNX)", lambda: export_onnx(
            DraftBeams(model, head, w, l, keep_prefixes=keep), dargs, dshapes,
            tmp / PROGRAMS_DIR / "draft.onnx", DRAFT_INPUTS, DRAFT_OUTPUTS))
        programs["draft"] = f"{PROGRAMS_DIR}/draft.onnx"
        sargs, sshapes = step_examples(model, opts.max_batch_size, capacity)
        stages.run("export step (ONNX, plugin nodes)", lambda: export_step_onnx(
            SpeculativeStep(model, head, w, l, plugin_ops=True, functional=True,
                            keep_prefixes=keep),
            sargs, sshapes, tmp / PROGRAMS_DIR / "step.onnx"))
        programs["step"] = f"{PROGRAMS_DIR}/step.onnx"
    else:
        stages.run("export draft (ONNX)", lambda: None)
        stages.run("export step (ONNX, plugin nodes)", lambda: None)
    return programs


def _tensorrt_plans(tmp: Path, programs: dict[str, str], opts: EngineOptions, model) -> dict[str, str]:
    """Optimization profiles cover batch 1..max_batch_size and 1..capacity-1 new tokens/keys."""
    from .tensorrt import build_plans

    c = model.cfg
    cap = opts.cache_capacity
    bmax, opt_t = opts.max_batch_size, cap - opts.max_seq_len
    cache = (c.num_layers, bmax, cap, c.num_kv_heads, c.head_dim)
    profiles = {
        "forward": {"tokens": ((1, 1), (1, opt_t), (bmax, cap - 1)),
                    "positions": ((1, 1), (1, opt_t), (bmax, cap - 1)),
                    "k_cache": (cache, cache, cache), "v_cache": (cache, cache, cache),
                    "slots": ((1,), (1,), (bmax,)), "starts": ((1,), (1,), (bmax,)),
                    "mask": ((1, 1, 1), (1, opt_t, cap // 2), (bmax, cap - 1, cap - 1))},
        "draft": {"context": ((1, c.hidden_size), (1, c.hidden_size), (bmax, c.hidden_size)),
                  "first_token": ((1,), (1,), (bmax,))},
    }
    profiles["step"] = {**profiles["draft"], "k_cache": (cache, cache, cache), "v_cache": (cache, cache, cache),
                        "slots": ((1,), (1,), (bmax,)), "starts": ((1,), (1,), (bmax,))}
    onnx_files = {n: tmp / rel for n, rel in programs.items()}
    plans = build_plans(onnx_files, tmp / PROGRAMS_DIR, profiles, fp16=opts.dtype == "float16")
    return {f"{n}_plan": p.relative_to(tmp).as_posix() for n, p in plans.items()}


def plugin_versions(opts: EngineOptions, programs: dict[str, str]) -> dict[str, Any]:
    """The redrafter:: custom ops present at build time and which compiled programs call them
    (the engine needs those ops registered, i.e. redrafter.plugins, to run)."""
    used: dict[str, list[str]] = {}
    if "step" in programs:  # ONNX: always all four nodes (TensorRT plugins would run them)
        if opts.plugin_ops or opts.backend != "aoti":
            used["step"] = ["beam_draft", "pack_beams", "packed_attention", "kv_commit"]
        else:
            used["step"] = ["pack_beams", "kv_commit"]
    if opts.backend == "aoti" and "draft" in programs and opts.plugin_ops:
        used["draft"] = ["beam_draft"]
    try:
        import redrafter.plugins.ops  # noqa: F401  (registers the ops)
    except Exception as e:  # a plugin import failure must not break a build that does not use it
        if used:
            raise
        return {"available": False, "error": f"{type(e).__name__}: {e}", "used_in_programs": used}
    from importlib.metadata import version

    ops = sorted(n for n in ("beam_draft", "pack_beams", "packed_attention", "kv_commit")
                 if hasattr(torch.ops.redrafter, n))
    return {"available": True, "version": version("redrafter"), "ops": ops, "used_in_programs": used}


def _check_output(out: Path) -> None:
    if out.exists() and not (out.is_dir() and ((out / CONFIG).is_file() or not any(out.iterdir()))):
        raise ValueError(f"output {str(out)!r} exists and is not an engine directory: "
                         "choose another --output or remove it")
    if out.is_dir() and (out / CONFIG).is_file():
        try:
            from_json = json.loads((out / CONFIG).read_text())
        except json.JSONDecodeError:
            from_json = {}
        if from_json.get("format") != "redrafter-engine":
            raise ValueError(f"output {str(out)!r} holds a config.json that is not a redrafter engine's: "
                             "choose another --output")


def _fsync_tree(root: Path) -> None:
    for p in [*root.rglob("*"), root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


