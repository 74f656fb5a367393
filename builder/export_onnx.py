"""ONNX export of the engine's programs (torch.onnx dynamo exporter), checking with
onnx.checker, and ONNX Runtime adapters with the programs' call convention.

ONNX graphs cannot mutate their inputs, so the ONNX forward returns the new keys/values
and the adapter writes them into the cache. The graphs embed their weights (an ONNX file
is self-contained, as TensorRT's parser wants).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .programs import DRAFT_INPUTS, FORWARD_INPUTS, STEP_INPUTS, new_rows

FORWARD_OUTPUTS = ("hidden", "k_new", "v_new")
DRAFT_OUTPUTS = ("beams",)
STEP_OUTPUTS = ("tokens", "counts", "hidden", "k_cache_out", "v_cache_out")


def export_onnx(module: nn.Module, args: tuple, dynamic_shapes, path: Path,
                input_names: tuple[str, ...], output_names: tuple[str, ...]) -> Path:
    import onnx

    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=True, dynamic_shapes=dynamic_shapes,
                          input_names=list(input_names), output_names=list(output_names),
                          optimize=True, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtForward:
    """Runs forward.onnx with ONNX Runtime (CPU) like an AOTI forward program."""

    def __init__(self, path: Path):
        self.session = _session(path)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, tokens: Tensor, positions: Tensor, k: Tensor, v: Tensor, slots: Tensor,
                 starts: Tensor, mask: Tensor) -> Tensor:
        values = dict(zip(FORWARD_INPUTS, (tokens, positions, k, v, slots, starts, mask)))
        feed = {n: values[n].detach().cpu().numpy() for n in self.inputs}  # unused inputs are pruned
        hidden, k_new, v_new = self.session.run(list(FORWARD_OUTPUTS), feed)
        rows, pos = new_rows(slots, starts, tokens.shape[1])
        k[:, rows, pos] = torch.from_numpy(k_new).to(k.device)
        v[:, rows, pos] = torch.from_numpy(v_new).to(v.device)
        return torch.from_numpy(hidden).to(k.device)


class OrtDraft:
    """Runs draft.onnx with ONNX Runtime (CPU) like an AOTI draft program."""

    def __init__(self, path: Path):
        self.session = _session(path)

    def __call__(self, context: Tensor, first_token: Tensor) -> Tensor:
        feed = dict(zip(DRAFT_INPUTS, (context.detach().cpu().numpy(), first_token.cpu().numpy())))
        (beams,) = self.session.run(list(DRAFT_OUTPUTS), feed)
        return torch.from_numpy(beams).to(context.device)


def export_step_onnx(module: nn.Module, args: tuple, dynamic_shapes, path: Path) -> Path:
    """The fused step program (SpeculativeStep, functional) with the redrafter ops as
    custom-domain nodes (plugins.onnx): the graph a TensorRT engine with our plugins runs."""
    from redrafter.plugins.onnx import export

    export(module, args, path, dynamic_shapes=dynamic_shapes, input_names=list(STEP_INPUTS),
           output_names=list(STEP_OUTPUTS))
    return path


class OrtStep:
    """Runs step.onnx in ONNX Runtime, each plugin node computed by the op's PyTorch reference
    (onnxruntime-extensions PyOps): a check of the exported graph, not a fast path. The graph
    returns whole updated caches, which are copied back into the decoder's cache."""

    def __init__(self, path: Path):
        import onnx

        try:
            from redrafter.plugins.onnx import ort_session

            self.session = ort_session(onnx.load(str(path)))
        except ImportError as e:
            raise ValueError(f"running {path.name} needs onnxruntime-extensions (for the plugin nodes): "
                             f"pip install onnxruntime-extensions ({e})") from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, context: Tensor, first_token: Tensor, k: Tensor, v: Tensor, slots: Tensor,
                 starts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        values = dict(zip(STEP_INPUTS, (context, first_token, k, v, slots, starts)))
        feed = {n: values[n].detach().cpu().numpy() for n in self.inputs}
        tokens, counts, hidden, k_out, v_out = (torch.from_numpy(x).to(k.device)
                                                for x in self.session.run(list(STEP_OUTPUTS), feed))
        k.copy_(k_out)
        v.copy_(v_out)
        return tokens, counts, hidden
