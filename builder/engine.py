"""The engine directory format and its loader.

An engine directory (written by `redrafter build`, read by `load_engine` / `open_session`):

    config.json            format, schema_version, base (LlamaConfig), drafter (DrafterConfig
                           or null), build options, programs, plugin versions, and the sha256
                           of every other file
    base.safetensors       base weights in the engine dtype (runtime.model names; with int8,
                           block projections as int8 `weight` + per-channel `scale`; with
                           int4, torch's CPU int4 packing `weight` + `scales_and_zeros`)
    drafter.safetensors    draft head weights (absent for an engine without drafter)
    tokenizer/             tokenizer files and chat template
    programs/              compiled programs: forward.pt2 + draft.pt2 (aoti) or
                           forward.onnx + draft.onnx (onnx, tensorrt); none for eager

Programs never hold weights of their own on the aoti path: the loader feeds them the
tensors read from the safetensors files, shared with the eager embedding and LM head.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from redrafter.runtime import pipeline
from redrafter.runtime.config import DecodeConfig
from redrafter.runtime.decoding import Decoder
from redrafter.runtime.drafter import DraftHead, DrafterConfig
from redrafter.runtime.model import Llama, LlamaConfig, rope_inv_freq

from . import BACKENDS, DTYPE_NAMES, MAX_BATCH_SIZE, QUANTIZE

FORMAT = "redrafter-engine"
SCHEMA_VERSION = 1
CONFIG = "config.json"
BASE_WEIGHTS = "base.safetensors"
DRAFTER_WEIGHTS = "drafter.safetensors"
TOKENIZER_DIR = "tokenizer"
PROGRAMS_DIR = "programs"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class EngineOptions:
    """Build options recorded in config.json["build"]. `decode`: the engine's built limits (its draft
    and step programs' setting; the cache holds its tree), any setting within which runs."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    max_batch_size: int = MAX_BATCH_SIZE
    max_seq_len: int = 2048
    dtype: str = "float32"
    quantize: str = "none"
    device: str = "cpu"
    backend: str = "aoti"
    plugin_ops: bool = False  # aoti: the draft program calls redrafter::beam_draft (Triton on CUDA)
    # The draft head's quantization in the aoti draft and step programs. None when building:
    # the engine's quantize (none with plugin_ops, whose op takes float weights). Engines built
    # before it existed lack it: their programs draft in float.
    draft_quantize: str | None = None
    exact_attention: bool = False  # attention in float64 (Llama.exact_attention)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"unknown quantization {self.quantize!r}: choose one of {', '.join(QUANTIZE)}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.exact_attention and self.plugin_ops:
            raise ValueError("exact attention (float64) is not available with plugin ops, whose packed_attention "
                             "op attends in the model dtype: drop one of them")
        if self.draft_quantize not in ((None, "none") if self.plugin_ops else (None, "none", self.quantize)):
            raise ValueError(f"draft_quantize {self.draft_quantize!r} must be 'none' or, without plugin ops, the "
                             f"engine's quantize ({self.quantize!r})")
        if self.plugin_ops and self.backend != "aoti":
            raise ValueError(f"plugin ops inside programs need the aoti backend, not {self.backend!r} "
                             "(ONNX exports of the plugin ops are in redrafter.plugins.onnx)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def cache_capacity(self) -> int:
        """Positions per slot: max_seq_len plus the largest tree a step verifies (the lookup beam's too)."""
        return self.max_seq_len + self.decode.tree_tokens

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EngineOptions":
        """config.json["build"]; engines before DecodeConfig held its fields at this level."""
        known = {f.name for f in fields(cls)} - {"decode"}
        return cls(decode=DecodeConfig.from_json(d.get("decode", d)), **{k: v for k, v in d.items() if k in known})


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under root except config.json, keyed by POSIX relative path."""
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() != CONFIG}


def read_config(path: Path, verify: bool = True) -> dict[str, Any]:
    """Read and validate config.json; with verify, check every listed file's checksum."""
    if not path.is_dir():
        raise FileNotFoundError(f"engine directory {str(path)!r} does not exist: build one with `redrafter build`")
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {CONFIG}: not an engine directory "
                                "(build one with `redrafter build`)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(cfg_file)!r} is not valid JSON ({e}): rebuild the engine") from None
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{str(cfg_file)!r} has format {cfg.get('format')!r}, expected {FORMAT!r}: "
                         "not a redrafter engine")
    version = cfg.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"engine schema_version {version!r} is invalid: rebuild the engine")
    if version > SCHEMA_VERSION:
        raise ValueError(f"engine schema_version {version} is newer than this redrafter supports "
                         f"({SCHEMA_VERSION}): upgrade redrafter or rebuild the engine with this version")
    for key in ("base", "build", "files"):
        if key not in cfg:
            raise ValueError(f"{str(cfg_file)!r} lacks the {key!r} section: rebuild the engine")
    if verify:
        for rel, digest in cfg["files"].items():
            f = path / rel
            if not f.is_file():
                raise FileNotFoundError(f"engine file {rel!r} is missing from {str(path)!r}: "
                                        "the engine is incomplete, rebuild it")
            if sha256(f) != digest:
                raise ValueError(f"checksum mismatch for engine file {rel!r} in {str(path)!r}: "
                                 "the file is corrupted or was modified, rebuild the engine")
    base, drafter = cfg["base"], cfg.get("drafter")
    if drafter is not None and (drafter["vocab_size"] != base["vocab_size"]
                                or drafter["hidden_size"] != base["hidden_size"]):
        raise ValueError(f"engine drafter (vocab {drafter['vocab_size']}, hidden {drafter['hidden_size']}) "
                         f"does not fit its base model (vocab {base['vocab_size']}, hidden "
                         f"{base['hidden_size']}): rebuild with a drafter trained for this base")
    return cfg


def load_base_weights(path: Path, cfg: LlamaConfig, quantize: str, dtype: torch.dtype,
                      device: torch.device, exact_attention: bool = False) -> Llama:
    """The base model from base.safetensors (quantized block projections when built so)."""
    from .quantize import empty_quantized

    # safetensors places tensors at arbitrary byte offsets; torch's int8 weight-only matmul
    # (AVX-512 kernels) reads its weight with aligned loads and crashed on such a tensor, so
    # unaligned CPU tensors are copied into fresh (64-byte aligned) memory.
    state = {k: v.clone() if v.device.type == "cpu" and v.data_ptr() % 64 else v
             for k, v in load_file(str(path / BASE_WEIGHTS), device=str(device)).items()}
    with torch.device("meta"):
        model = Llama(cfg)
        if quantize != "none":  # a quantized head stores scales besides its weight (older int8 engines: float)
            head = any(k.startswith("lm_head.") and k != "lm_head.weight" for k in state)
            empty_quantized(model, quantize, head=head)
    tied = cfg.tie_word_embeddings and isinstance(model.lm_head, nn.Linear)  # a quantized head is untied
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{BASE_WEIGHTS} does not match the engine's base config (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}): rebuild the engine")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype != dtype:
            raise ValueError(f"{BASE_WEIGHTS} holds {p.dtype} weights but the engine says {dtype}: rebuild it")
    if exact_attention:
        model.exact_attention()
    return model.eval().requires_grad_(False)


def load_drafter_weights(path: Path, cfg: DrafterConfig, device: torch.device) -> DraftHead:
    with torch.device("meta"):
        head = DraftHead(cfg)
    try:
        head.load_state_dict(load_file(str(path / DRAFTER_WEIGHTS), device=str(device)), assign=True)
    except RuntimeError as e:
        raise ValueError(f"{DRAFTER_WEIGHTS} does not match the engine's drafter config: {e}") from None
    return head.eval().requires_grad_(False)


class Engine:
    """A loaded engine: weights, tokenizer, and the compiled programs of its backend."""

    def __init__(self, path: Path, config: dict[str, Any], model: Llama, drafter: DraftHead | None,
                 tokenizer: Any):
        self.path, self.config = path, config
        self.options = EngineOptions.from_json(config["build"])
        self.model, self.drafter, self.tokenizer = model, drafter, tokenizer
        self._programs: Programs | None = None
        # The setting the programs were built for and the cache holds: the limits of any decoder's.
        self.built = self.options.decode if drafter is not None else DecodeConfig.plain()
        self.tactics = None  # runtime.tactics.Plan its eager linears run (CPU engines; set by load_engine)

    @property
    def eos_ids(self) -> list[int]:
        return pipeline.eos_ids(self.model, self.tokenizer)

    def encode_chat(self, text: str) -> list[int]:
        return pipeline.encode_chat(self.tokenizer, text)

    def programs(self) -> "Programs":
        """The compiled programs for the engine's backend (none for eager). Loaded once and
        shared by every decoder of this engine."""
        if self._programs is None:
            self._programs = _load_programs(self)
        return self._programs

    def decoder(self, max_batch_size: int | None = None, decode: DecodeConfig | None = None,
                fused_step: bool | None = None) -> Decoder:
        """A Decoder over this engine. Compiled programs take the cache of the built batch
        size, so a compiled engine's decoder always has max_batch_size slots.
        decode: any setting within the engine's built one (default: that one; DecodeConfig.plain():
        plain decoding of the same engine, the baseline). Other settings than the built one draft
        with the eager beam search (the draft program holds the built W, L and tree).
        fused_step: run greedy steps as the step program (where the engine has one). None: on CUDA
        only. On a CPU the host work it removes is a small part of a step, and it attends over the
        whole cache, so it is no faster (BENCHMARKS.md); on a GPU it removes every step's host round trips."""
        o = self.options
        n = max_batch_size or o.max_batch_size
        if n > o.max_batch_size:
            raise ValueError(f"max_batch_size {n} exceeds the engine's {o.max_batch_size}: "
                             "rebuild with a larger --max-batch-size")
        built, decode = self.built, decode or self.built
        decode.check_within(built, f"this engine ({self.path})")
        speculative = decode.speculative and self.drafter is not None
        programs = self.programs()
        if fused_step is None:
            fused_step = (speculative and programs.step is not None
                          and self.model.embed.weight.device.type == "cuda")
        if fused_step and programs.step is None:
            raise ValueError(f"this {o.backend} engine has no step program (aoti and onnx engines with a "
                             "drafter have one): rebuild it, or use fused_step=False")
        steps = None
        if programs.forward is not None:
            from .programs import CompiledSteps

            n = o.max_batch_size
            steps = CompiledSteps(self.model, programs.forward, (n, o.cache_capacity), built, programs.draft,
                                  programs.step if fused_step else None)
        return Decoder(self.model, self.drafter if speculative else None, decode, max_batch=n,
                       max_seq_len=o.max_seq_len, limits=built, steps=steps)


@dataclass
class Programs:
    """An engine's compiled programs as callables (see builder.programs); None where absent."""
    forward: Any = None
    draft: Any = None
    step: Any = None


def _load_programs(engine: Engine) -> Programs:
    o, progs = engine.options, engine.config.get("programs") or {}
    if o.backend == "eager":
        return Programs()
    from .programs import BaseForward, DraftBeams, SpeculativeStep, dense

    def path(name: str) -> Path | None:
        return engine.path / progs[name] if progs.get(name) and engine.drafter is not None else None

    fwd_file = engine.path / progs["forward"]
    if o.backend == "aoti":
        from .export_aoti import load_aoti

        import redrafter.plugins.ops  # noqa: F401  (registers the ops the programs call)

        m, head, d = engine.model, engine.drafter, o.decode
        w, l, keep = d.beam_width, d.beam_length, d.keep_prefixes
        out = Programs(forward=load_aoti(fwd_file, BaseForward(m)))
        q = o.draft_quantize or "none"
        if path("draft"):
            out.draft = dense(load_aoti(path("draft"), DraftBeams(m, head, w, l, o.plugin_ops, q, keep)))
        if path("step"):
            out.step = dense(load_aoti(path("step"), SpeculativeStep(m, head, w, l, o.plugin_ops, quantize=q,
                                                                     keep_prefixes=keep)))
        return out
    if o.backend == "onnx":
        from .export_onnx import OrtDraft, OrtForward, OrtStep

        return Programs(OrtForward(fwd_file), dense(OrtDraft(path("draft"))) if path("draft") else None,
                        dense(OrtStep(path("step"))) if path("step") else None)
    from .tensorrt import load_tensorrt

    return load_tensorrt(engine)


def load_engine(path: str | os.PathLike, device: str | torch.device | None = None,
                verify: bool = True) -> Engine:
    """Open an engine directory. Checks the schema and every file's checksum first, so a
    missing or corrupted file fails with a clear error before any weight is read."""
    path = Path(path)
    cfg = read_config(path, verify=verify)
    options = EngineOptions.from_json(cfg["build"])
    options.validate()
    dev = torch.device(device or options.device)
    if options.backend in ("aoti", "tensorrt") and dev.type != torch.device(options.device).type:
        raise ValueError(f"this {options.backend} engine was compiled for {options.device}, not {dev}: "
                         f"rebuild it with --device {dev.type}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("this engine runs on cuda but no CUDA device is available: rebuild it with --device cpu")
    base_cfg = LlamaConfig(**cfg["base"])
    model = load_base_weights(path, base_cfg, options.quantize, options.torch_dtype, dev, options.exact_attention)
    drafter = None
    if cfg.get("drafter") is not None:
        drafter = load_drafter_weights(path, DrafterConfig.from_json(cfg["drafter"]), dev)
    plan = None
    if dev.type == "cpu":  # the build's tactic plan where this is the machine it measured, else this one's
        from redrafter.runtime.tactics import engine_plan

        tree = options.decode.tree_tokens if drafter is not None else 1
        plan = engine_plan(cfg.get("tactics"), model, max_rows=options.max_batch_size * tree, tree_sizes=[tree],
                           where=f"engine {str(path)!r}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR))
    engine = Engine(path, cfg, model, drafter, tokenizer)
    engine.tactics = plan
    return engine


def engine_config(base: LlamaConfig, drafter: DrafterConfig | None, options: EngineOptions,
                  programs: dict[str, str], plugins: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("redrafter")
    except PackageNotFoundError:
        ours = None
    return {
        "format": FORMAT, "schema_version": SCHEMA_VERSION,
        "created_by": {"redrafter": ours, "torch": torch.__version__},
        "base": base.to_dict(), "drafter": drafter.to_json() if drafter else None,
        "build": asdict(options), "programs": programs, "plugins": plugins, "files": files,
    }


def open_session(engine_dir: str | os.PathLike, *, max_batch_size: int | None = None,
                 decode: DecodeConfig | None = None, beam_policy: Any = None, prefill_token_budget: int = 8192):
    """A serving Session (runtime.session) over an engine: decode within its built limits (None: the
    built setting), beam_policy as in Session.load, bounded by decode's beam shape."""
    from redrafter.runtime.session import Session, policy_for

    engine = load_engine(engine_dir)
    decode = decode or engine.built
    policy = policy_for(beam_policy, decode)
    decoder = engine.decoder(max_batch_size, decode.with_shape(*policy.largest_shape))
    return Session(decoder, engine.tokenizer, engine.eos_ids, beam_policy=policy,
                   prefill_token_budget=prefill_token_budget)


def built_decode(engine_dir: str | os.PathLike) -> DecodeConfig:
    """The setting an engine was built for (its limits), read from config.json alone."""
    cfg = read_config(Path(engine_dir), verify=False)
    return EngineOptions.from_json(cfg["build"]).decode if cfg.get("drafter") else DecodeConfig.plain()
