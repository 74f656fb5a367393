"""Weight-only int8 quantization of the base model's Linear layers (per output channel, symmetric).

W ~= W_q * scale[:, None] with W_q = round(W / scale) in [-127, 127] and scale = max|W_row| / 127.
Activations stay in the model dtype; the weight is dequantized inside the matmul. Only the
decoder blocks' projections are quantized: the embedding (a lookup, which the drafter also
reads) and the LM head (tied to the embedding in SmolLM2; the drafter's shared head reuses
it) stay in the model dtype. A quantized engine is a model of its own: ReDrafter greedy on
it equals plain greedy on it, token for token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QMAX = 127


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """[out, in] float -> (int8 [out, in], scale [out] in the weight's dtype)."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / QMAX
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.to(weight.dtype)


class Int8Linear(nn.Module):
    """y = x @ (W_q * scale)^T + bias, with W_q int8 [out, in] and scale [out].

    bfloat16 activations on CPU use torch's weight-only int8 matmul (aten._weight_int8pack_mm,
    AVX512-BF16 kernels); everything else dequantizes the weight on the fly. Measured on this
    project's CPU (1 thread, 1536x576, one token): fp32 linear 68 us; int8pack with fp32
    activations 716 us (a scalar path); dequantize + fp32 linear 122 us; bf16 linear 83 us;
    int8pack with bf16 activations 47 us. Both paths are plain aten ops, so torch.export and
    AOTInductor see them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        q.weight, q.scale = quantize_weight(w)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            flat = x.reshape(-1, self.in_features)
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantized_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers that int8 quantization replaces: every projection inside
    the decoder blocks (attention q/k/v/o and MLP gate/up/down)."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.startswith("layers.")]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the block projections of `model` (in place) with Int8Linear; returns it."""
    for name in quantized_linears(model):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, Int8Linear.from_linear(getattr(owner, child)))
    return model


def empty_int8(model: nn.Module) -> nn.Module:
    """Swap the block projections for empty Int8Linear modules (to load an int8 state dict)."""
    for name in quantized_linears(model):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        lin = getattr(owner, child)
        dtype = lin.weight.dtype if lin.weight.dtype.is_floating_point else torch.float32
        setattr(owner, child, Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype,
                                         lin.weight.device))
    return model
