"""Writing a Triton model repository that serves a redrafter engine.

    REPO/<name>/config.pbtxt   Python backend, decoupled transaction policy, the tensors of
                               serving/protocol.py, and what to serve (engine or base+drafter)
    REPO/<name>/1/model.py     imports redrafter.serving.model.TritonPythonModel

The model code stays in the installed package, so a repository never holds a stale copy
of it; the repository only says what to serve.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from redrafter.runtime.atomic import atomic_dir
from redrafter.runtime.config import DecodeConfig

from .protocol import INPUTS, OUTPUTS, TensorSpec

MODEL_PY = '''"""Triton Python backend entry point written by `redrafter triton-repo`."""
from redrafter.serving.model import TritonPythonModel  # noqa: F401
'''
BEAM_POLICIES = ("fixed", "adaptive")


@dataclass(frozen=True)
class ModelSource:
    """What a model instance serves: an engine built by `redrafter build`, or (to develop
    without building) a base model and drafter loaded directly with the decoding options."""

    engine: str = ""
    base: str = ""
    drafter: str = "default"  # "none": plain decoding
    max_batch_size: int = 0  # decoder slots; 0: the engine's (8 for base + drafter)
    max_seq_len: int = 2048  # base + drafter only; an engine has its own
    # None: an engine's built setting, or the CPU's default (DecodeConfig.for_device); an engine
    # runs any setting within its built one.
    decode: DecodeConfig | None = None
    # "adaptive": plain decoding and beam shapes up to W x L, the fastest per batch size as measured
    # (runtime/scheduler.py): on a CPU a fixed shape loses to plain decoding at larger batches.
    beam_policy: str = "adaptive"

    def __post_init__(self) -> None:
        if bool(self.engine) == bool(self.base):
            raise ValueError("serve either an engine (--engine DIR) or a base model and drafter (--base, --drafter)")
        if self.beam_policy not in BEAM_POLICIES:
            raise ValueError(f"beam policy {self.beam_policy!r} is unknown: choose one of {', '.join(BEAM_POLICIES)}")
        for name in ("max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            least = 1 if name == "max_seq_len" else 0
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r} is invalid: give a positive integer"
                                 + ("" if least else " (or 0 for the default)"))
        if self.decode is not None and self.decode.speculative and self.drafter == "none" and not self.engine:
            raise ValueError("drafting (a beam length above 1, a lookup beam or a search tree) needs a drafter: "
                             "drop the decoding options or give --drafter")
        if self.engine and not (Path(self.engine) / "config.json").is_file():
            raise FileNotFoundError(f"{self.engine!r} is not an engine directory (no config.json): "
                                    "build one with `redrafter build`")

    def __str__(self) -> str:
        if self.engine:
            return f"engine {self.engine}"
        d = self.decode or DecodeConfig.for_device("cpu")
        beams = f"{d.beam_width}x{d.beam_length}"
        lookup = f", lookup {d.lookup_ngram}" if d.lookup_ngram else ""
        lookup += f" x {d.lookup_length}" if d.lookup_length else ""
        tree = ", search tree" if d.tree == "search" else ""
        return (f"base {self.base} + drafter {self.drafter} (max_seq_len {self.max_seq_len}, "
                f"beams {beams}{tree}{lookup}, {self.beam_policy})")

    @classmethod
    def create(cls, engine: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
               drafter: str | os.PathLike | None = "default", **options) -> "ModelSource":
        """Paths made absolute (the server runs elsewhere); "default" and "none" kept as names."""
        def spec(p: str | os.PathLike | None) -> str:
            if p is None:
                return ""
            return str(p) if str(p) in ("default", "none") else str(Path(p).resolve())

        return cls(engine=spec(engine), base=spec(base), drafter=spec(drafter) or "none", **options)

    def parameters(self) -> dict[str, str]:
        """Triton parameters (strings): the decode setting's fields flat, where one is given."""
        own = {f.name: str(getattr(self, f.name)) for f in fields(self) if f.name != "decode"}
        return own | {k: str(v) for k, v in (self.decode.to_json() if self.decode else {}).items()}

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "ModelSource":
        kinds = {f.name: f.type for f in fields(cls) if f.name != "decode"}
        decode = {f.name: f.type for f in fields(DecodeConfig)}
        given = {k: int(v) if decode[k] == "int" else v for k, v in params.items() if k in decode}
        return cls(decode=DecodeConfig(**given) if given else None,
                   **{k: int(v) if kinds[k] == "int" else v for k, v in params.items() if k in kinds})

    def check(self) -> None:
        """What can be checked without loading: an engine's directory, schema and the checksum
        of every file, so a damaged or missing engine is refused before a server starts on it."""
        if self.engine:
            from redrafter.builder.engine import read_config

            read_config(Path(self.engine), verify=True)

    def open_session(self):
        from redrafter.runtime.session import Session

        policy = None if self.beam_policy == "fixed" else self.beam_policy
        if self.engine:
            from redrafter.builder.engine import open_session

            return open_session(self.engine, max_batch_size=self.max_batch_size or None, decode=self.decode,
                                beam_policy=policy)
        return Session.load(self.base, None if self.drafter == "none" else self.drafter,
                            max_batch_size=self.max_batch_size or 8, max_seq_len=self.max_seq_len,
                            decode=self.decode, beam_policy=policy)


def model_config(name: str, source: ModelSource, instances: int = 1) -> str:
    """config.pbtxt text. Triton's max_batch_size is the number of decoder slots; each
    request carries one sequence (batch dimension 1) and the model batches requests in flight."""
    if not name or not all(c.isalnum() or c in "_-." for c in name):
        raise ValueError(f"model name {name!r} is invalid: use letters, digits, '_', '-' or '.'")
    if instances < 1:
        raise ValueError(f"instances={instances} must be >= 1")
    batch = source.max_batch_size or 8
    if source.engine:
        built = _engine_batch_size(source.engine)
        if source.max_batch_size > built:
            raise ValueError(f"max_batch_size {source.max_batch_size} exceeds the engine's {built}: "
                             "rebuild the engine with a larger --max-batch-size")
        batch = source.max_batch_size or built

    def tensor(spec: TensorSpec, optional: bool) -> str:
        dims = ", ".join(map(str, spec.dims))
        return (f'  {{ name: "{spec.name}" data_type: {spec.dtype} dims: [ {dims} ]'
                f'{" optional: true" if optional else ""} }}')

    params = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{_escape(v)}" }} }}'
                        for k, v in replace(source, max_batch_size=batch).parameters().items())
    return "\n".join([
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {batch}",
        "model_transaction_policy { decoupled: true }",
        "input [", ",\n".join(tensor(s, True) for s in INPUTS), "]",
        "output [", ",\n".join(tensor(s, False) for s in OUTPUTS), "]",
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]",
        "parameters [", params, "]",
        "",
    ])


def write_repository(output: str | os.PathLike, source: ModelSource, *, name: str = "redrafter",
                     instances: int = 1) -> Path:
    """Write the repository atomically; an existing repository at `output` is replaced,
    any other non-empty directory is left alone."""
    out = Path(output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not any(out.glob("*/config.pbtxt")))):
        raise ValueError(f"{str(out)!r} exists and is not a Triton model repository: choose another --output")
    config = model_config(name, source, instances)
    with atomic_dir(out) as tmp:
        (tmp / name / "1").mkdir(parents=True)
        (tmp / name / "config.pbtxt").write_text(config)
        (tmp / name / "1" / "model.py").write_text(MODEL_PY)
    return out


def read_repository(repository: str | os.PathLike) -> dict[str, ModelSource]:
    """What each model of a repository written by `write_repository` serves, by model name."""
    sources = {}
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        model_py = config.parent / "1" / "model.py"
        if not model_py.is_file() or model_py.read_text(errors="replace") != MODEL_PY:
            continue  # not a redrafter model: Triton checks it itself
        text = config.read_text()
        params = {k: re.sub(r"\\(.)", r"\1", v) for k, v in
                  re.findall(r'key: "([^"]+)" value: \{ string_value: "((?:[^"\\]|\\.)*)" \}', text)}
        sources[config.parent.name] = ModelSource.from_parameters(params)
    return sources


def _engine_batch_size(engine: str) -> int:
    from redrafter.builder.engine import EngineOptions, read_config

    return EngineOptions.from_json(read_config(Path(engine), verify=False)["build"]).max_batch_size


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
