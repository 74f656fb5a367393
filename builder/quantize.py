"""Weight-only quantization of the base model's (and the draft head's) Linear layers.

int8: per output channel, symmetric. W ~= W_q * scale[:, None] with W_q = round(W / scale) in
[-127, 127] and scale = max|W_row| / 127. CPU and GPU.

int4: per group of 32 input columns, asymmetric (the layout of llama.cpp's Q4_1, in torch's
convention): W ~= (q - 8) * scale + zero with q in [0, 15], scale = (max - min) / 15 and
zero = min + 8 * scale per group. CPU only: torch's int4 matmul for CPUs takes the weight in
its own packed layout, which is what the engine stores. Decoding at batch 1 on a CPU streams
every weight once per step, so bytes per weight set its speed: int4 reads about half what int8
does.

Activations stay in the model dtype; the weight is dequantized inside the matmul. The decoder
blocks' projections are quantized, and the LM head too (quantized_linears); the
embedding (a lookup, whose rows the drafter's shared head also reads) stays in the model
dtype. The compiled draft program drafts with a quantized copy of the draft head
(quantize_drafter). A quantized engine is a model of its own: in fp32, ReDrafter greedy on
it equals plain greedy on it, token for token. The packed CPU matmuls (int8 with bfloat16
activations, int4) even give each row the bits it gets alone (tests check it); in bfloat16
attention still rounds a multi-token verification differently (BENCHMARKS.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QMAX = 127
GROUP = 32  # int4: input columns per scale/zero pair


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """[out, in] float -> (int8 [out, in], scale [out] in the weight's dtype)."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / QMAX
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.to(weight.dtype)


class Int8Linear(nn.Module):
    """y = x @ (W_q * scale)^T + bias, with W_q int8 [out, in] and scale [out].

    bfloat16 activations on CPU use torch's weight-only int8 matmul (aten._weight_int8pack_mm,
    AVX512-BF16 kernels; with float32 activations it takes a scalar path, several times slower than
    dequantizing: BENCHMARKS.md); everything else dequantizes the weight on the fly. Both paths
    are plain aten ops, so torch.export and AOTInductor see them.
    """
    weight_kind = "int8"  # runtime.tactics: which candidate tactics apply

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

    def dequantized_weight(self) -> Tensor:
        """[out, in] in the scale's dtype (the float rows an untied int8 LM head gives the drafter)."""
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

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


def quantize_int4(weight: Tensor) -> tuple[Tensor, Tensor]:
    """[out, in] float -> (q int32 [out, in] in [0, 15], scales_and_zeros [in / GROUP, out, 2]
    float32), with W ~= (q - 8) * scale + zero in each group of GROUP input columns."""
    out_f, in_f = weight.shape
    w = weight.float().view(out_f, in_f // GROUP, GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).view(out_f, in_f)
    zero = lo + 8 * scale
    return q, torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()


class Int4Linear(nn.Module):
    """y = x @ dequant(W)^T + bias with 4-bit weights in groups of GROUP input columns
    (quantize_int4), stored as torch's CPU int4 packing ([out, in / 2] uint8).

    It calls quantized::int4mm_packed_weight_cpu, the kernel behind
    aten._weight_int4pack_mm_for_cpu, with the group size as a tensor of its own: AOTInductor
    turns the aten op's integer into a constant that engines (whose programs get every constant
    from the engine's files) would not hold. It reads half of int8's bytes (BENCHMARKS.md)."""
    weight_kind = "int4"  # runtime.tactics: which candidate tactics apply

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        if not self.supports(in_features, out_features):
            raise ValueError(f"int4 quantization needs input sizes divisible by {GROUP} and output sizes divisible "
                             f"by 16 (torch's packing), got a {in_features} -> {out_features} projection: use "
                             "--quantize int8")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // GROUP, out_features, 2, dtype=dtype,
                                                             device=device))
        self.register_buffer("group_size", torch.tensor(GROUP, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @staticmethod
    def supports(in_features: int, out_features: int) -> bool:
        return in_features % GROUP == 0 and out_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        w = linear.weight.detach()
        if w.device.type != "cpu":
            raise ValueError("int4 engines run on the CPU only (torch's int4 matmul for CUDA takes another "
                             "layout): build with --device cpu, or use --quantize int8 on a GPU")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        q, sz = quantize_int4(w)
        m.weight = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        m.scales_and_zeros = sz.to(w.dtype)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def dequantized_weight(self) -> Tensor:
        """[out, in] in the model dtype: the matmul of the identity (the packing is torch's own)."""
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype, device=self.weight.device)
        y = torch.ops.quantized.int4mm_packed_weight_cpu(eye, self.weight, self.group_size, self.scales_and_zeros)
        return y.t().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.quantized.int4mm_packed_weight_cpu(flat.contiguous(), self.weight, self.group_size,
                                                        self.scales_and_zeros.to(x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"


QUANTIZED = {"int8": Int8Linear, "int4": Int4Linear}


def quantized_linears(model: nn.Module, kind: str, head: bool = True) -> list[str]:
    """Names of the Linear layers that quantization replaces: every projection inside the
    decoder blocks (attention q/k/v/o and MLP gate/up/down), and the LM head.

    The LM head is a fifth of SmolLM2's weights (28M of 135M) and a third of the bytes a step
    reads once the blocks are in 4 bits, so quantizing it pays like a block's (BENCHMARKS.md). Both
    packed kernels work in blocks of 4 rows: 5 rows cost about twice 4.

    A quantized head is untied from the embedding, which stays in the model dtype (a lookup, and
    the rows the drafter's shared head reads: runtime.model.lm_head_weight). A vocabulary that
    torch's int4 packing cannot take (not a multiple of 16) keeps a float head, and head=False
    leaves it out (int8 engines built before 2026-11-27 09:00 UTC kept theirs in the model
    dtype)."""
    def quantized(name: str, mod: nn.Module) -> bool:
        if name == "lm_head":
            return head and (kind == "int8" or Int4Linear.supports(mod.in_features, mod.out_features))
        return name.startswith("layers.")

    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and quantized(name, mod)]


def quantize_drafter(head: nn.Module, rows: Tensor | None, kind: str) -> tuple[nn.Module, nn.Module | None]:
    """A `kind`-quantized copy of a draft head (runtime.drafter.DraftHead) and, for a shared
    head, a quantized projection onto `rows` (head.output_weight of the base LM head, [Vd, H]).

    A draft step is GEMVs over weights read once per step, as a decode step is: in bfloat16
    the shipped SmolLM2 drafter's step reads about 17 MB (ResBlocks 5.3 MB, the 8,192-row
    projection 9.4 MB), more than a fifth of what an int4 decode step reads. Drafts only
    propose; the base model verifies every token, so this changes speed, never the output.
    Layers torch's int4 packing cannot take stay float (int8 takes every shape)."""
    import copy

    cls = QUANTIZED[kind]
    head = copy.deepcopy(head)
    for name, mod in list(head.named_modules()):
        if isinstance(mod, nn.Linear) and (kind == "int8" or Int4Linear.supports(mod.in_features, mod.out_features)):
            _replace(head, name, cls.from_linear(mod))
    if rows is None:
        return head, None
    out_f, in_f = rows.shape
    if kind == "int4" and not Int4Linear.supports(in_f, out_f):
        return head, None
    proj = nn.Linear(in_f, out_f, bias=False, device=rows.device, dtype=rows.dtype)
    proj.weight = nn.Parameter(rows.detach(), requires_grad=False)
    return head, cls.from_linear(proj)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    """Replace the linear layers of `model` that `kind` ("int8" or "int4") quantizes (in
    place); returns it."""
    for name in quantized_linears(model, kind):
        _replace(model, name, QUANTIZED[kind].from_linear(model.get_submodule(name)))
    return model


def empty_quantized(model: nn.Module, kind: str, head: bool = True) -> nn.Module:
    """Swap those layers for empty `kind` modules (to load a quantized state dict)."""
    for name in quantized_linears(model, kind, head):
        lin = model.get_submodule(name)
        dtype = lin.weight.dtype if lin.weight.dtype.is_floating_point else torch.float32
        _replace(model, name, QUANTIZED[kind](lin.in_features, lin.out_features, lin.bias is not None, dtype,
                                              lin.weight.device))
    return model
