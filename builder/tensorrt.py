"""TensorRT: build serialized engines from the ONNX programs where TensorRT and an NVIDIA GPU
exist. Nowhere in this project's CI or dev machines do they: there the build writes the ONNX
engine and stops with `TensorRTUnavailable`, saying what is missing. The build function below
has never been executed (no TensorRT here); it uses only the documented TensorRT 10 Python API.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch


class TensorRTUnavailable(ValueError):
    """The tensorrt backend cannot build here; the engine directory holds the ONNX programs."""


def missing_requirements() -> list[str]:
    """What this machine lacks for a TensorRT build (empty when it can build)."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the `tensorrt` Python package (pip install tensorrt)")
    if not torch.cuda.is_available():
        missing.append("an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
    return missing


def unavailable_message(missing: list[str], engine_dir: Path) -> str:
    return (f"TensorRT engine not built: this machine lacks {' and '.join(missing)}. "
            f"The ONNX programs were written instead and {str(engine_dir)!r} is a complete engine "
            f"with backend 'onnx' (runs on ONNX Runtime); rebuild with --backend tensorrt where "
            f"TensorRT and a GPU are present.")


def build_plans(onnx_files: dict[str, Path], out_dir: Path, profiles: dict[str, dict[str, tuple]],
                fp16: bool) -> dict[str, Path]:
    """Parse each ONNX file and serialize a TensorRT plan. profiles[name][input] = (min, opt, max)
    shapes of that program's dynamic inputs."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    plans = {}
    for name, onnx_file in onnx_files.items():
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"TensorRT could not parse {onnx_file.name}: {errors}")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for inp, (lo, opt, hi) in profiles[name].items():
            profile.set_shape(inp, lo, opt, hi)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ValueError(f"TensorRT failed to build {onnx_file.name} (see the log above)")
        plan = out_dir / f"{name}.plan"
        plan.write_bytes(bytes(serialized))
        plans[name] = plan
    return plans


def load_tensorrt(engine: Any) -> Any:
    raise ValueError("running TensorRT plans is not implemented in this runtime (TensorRT was never "
                     "available to test it): use the engine's ONNX programs with --backend onnx")
