"""A compact Llama-family decoder with a static KV cache and tree-masked forward.

One forward serves prefill (causal mask), plain decoding (one token) and packed
verification (a tree mask over the candidate tokens): the caller passes the tokens,
their position ids and a [B, T, T] mask among the new tokens; every new token also
sees the committed context of its sequence. New keys/values are written into the
cache right after the committed context (a scratch area); `KVCache.commit` later
moves the accepted ones into place, so rejected entries are never visible.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias, as in Qwen2
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Read a transformers config.json (llama, mistral, qwen2 model types)."""
        arch = hf.get("model_type", "llama")
        if arch not in ("llama", "mistral", "qwen2"):
            raise ValueError(
                f"unsupported base model type {arch!r}: redrafter runs Llama-family models "
                "(llama, mistral, qwen2)"
            )
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(hf),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", arch == "qwen2"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    return None if kind == "default" else dict(rs, rope_type=kind)


def rope_inv_freq(cfg: LlamaConfig) -> Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3 or linear scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.float()
    kind = rs["rope_type"]
    if kind == "linear":
        return (inv / rs["factor"]).float()
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    orig = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / lo, inv / factor, inv)
    smooth = (orig / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / hi) & (wavelen <= orig / lo)
    return torch.where(medium, smoothed, scaled).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, heads, d]; cos/sin [B, T, 1, d] (rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys/values for every layer and batch slot.

    k, v: [layers, slots, capacity, kv_heads, head_dim]. Committed lengths are kept by
    the caller; positions past a sequence's committed length are scratch space.
    """

    def __init__(self, cfg: LlamaConfig, slots: int, capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_layers, slots, capacity, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # gather's buffers (one layer's worth), made with the cache so that both are normal tensors
        # or both inference tensors: one made lazily under inference_mode could not be written outside it.
        self._gathered = (torch.empty_like(self.k[0]), torch.empty_like(self.v[0])) if self.k.device.type == "cpu" \
            else None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def gather(self, layer: int, slots: Tensor, span: int) -> tuple[Tensor, Tensor]:
        """Keys and values [B, span, kv_heads, head_dim] of one layer for the given slots.

        Eager CPU decoding gathers into two buffers kept for the cache's lifetime (every layer
        reuses them: attention has read the previous layer's before the next gather). A fresh
        allocation of this size per layer (10 MB at batch 32 x 400 positions) came from the OS
        each time: the page faults made a batch-32 step 1.7x slower on the main thread.
        """
        k, v = self.k[layer, :, :span], self.v[layer, :, :span]
        if torch.compiler.is_compiling() or torch.compiler.is_exporting() or self.k.device.type != "cpu":
            return k.index_select(0, slots), v.index_select(0, slots)
        n = slots.shape[0] * span
        outs = tuple(buf.view(-1, *buf.shape[2:])[:n].view(slots.shape[0], span, *buf.shape[2:])
                     for buf in self._gathered)
        torch.index_select(k, 0, slots, out=outs[0])
        torch.index_select(v, 0, slots, out=outs[1])
        return outs

    def commit(self, slots: Tensor, starts: Tensor, src: Tensor) -> None:
        """Move scratch entries starts+src[:, i] to starts+i for every layer (see commit_kv)."""
        commit_kv(self.k, self.v, slots, starts, src)


def commit_kv(k: Tensor, v: Tensor, slots: Tensor, starts: Tensor, src: Tensor) -> None:
    """Move scratch entries starts+src[:, i] to starts+i in every layer of caches k and v.

    k, v: [layers, slots, capacity, kv_heads, head_dim]; slots, starts: [B]; src: [B, n]
    offsets into the scratch area (src[:, i] >= i). Gathering before scattering makes the
    overlapping move safe.
    """
    n = src.shape[1]
    rows = slots[:, None].expand(-1, n)
    src_pos = starts[:, None] + src
    dst_pos = starts[:, None] + torch.arange(n, device=src.device)
    for cache in (k, v):
        cache[:, rows, dst_pos] = cache[:, rows, src_pos]


@dataclass
class TreeMask:
    """Visibility in compact form for the packed_attention plugin: each new token sees
    the committed context [0, starts) of its row plus its row of `mask` [B, T, T]."""
    starts: Tensor
    mask: Tensor


def attend(q: Tensor, keys: Tensor, vals: Tensor, mask: Tensor, work: torch.dtype | None = None) -> Tensor:
    """Masked GQA attention: q [B, T, heads, d], keys/vals [B, S, kv_heads, d], mask [B, T, S]
    -> [B, T, heads, d], computed in `work` (Llama.exact_attention: float64).

    By default it runs in float32 on the CPU whatever the model dtype. Measured on the project's
    CPU (torch 2.13, 2 threads, SmolLM2's 9/3 heads): bfloat16 attention takes 195 us for one query
    over 300 keys against 29 us in float32 (350 vs 51 at 600 keys), and is no faster for 2-4
    queries. Over 30 layers that is most of a bf16 decode step's cost beyond its matmuls."""
    work = work or (torch.float32 if q.device.type == "cpu" else q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).to(work), keys.transpose(1, 2).to(work), vals.transpose(1, 2).to(work),
        attn_mask=mask[:, None], enable_gqa=q.shape[2] != keys.shape[2],
    )
    return out.transpose(1, 2).to(q.dtype)


def rows_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """layer(x) for a linear layer (float or quantized), computed with the tactic its machine's
    plan gives for x's row count (runtime.tactics: `layer.tactics`, set by tactics.apply_plan).

    The fastest form of a product of a few rows depends on the CPU's BLAS (x @ W.T, W @ x.T,
    padded rows, fixed blocks, oneDNN), so it is measured on the machine that runs it, never
    hard-coded. Every tactic a plan holds passed a gate on that machine: each row of an m-row
    product has the bits it gets alone, so verifying T tokens at once computes what decoding
    them one by one does. Traced programs (torch.export keeps the row count symbolic) use the
    plan's one `compiled` tactic for every count. A layer without a plan, or off the CPU, or
    given more rows than the plan's largest bucket (long prefills), runs layer(x).
    """
    plan = getattr(layer, "tactics", None)
    if plan is None or x.device.type != "cpu":
        return layer(x)
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        tactic = plan.compiled
    else:
        tactic = plan.for_rows(x.numel() // x.shape[-1])
        if tactic is None:
            return layer(x)
    out = tactic(layer, x.reshape(-1, x.shape[-1]))
    return out.reshape(*x.shape[:-1], out.shape[-1])


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.wq = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.wk = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.wv = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.work_dtype: torch.dtype | None = None  # attend's; Llama.exact_attention sets float64

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], layer: int, cache: KVCache,
                rows: Tensor, write_pos: Tensor, mask: Tensor | TreeMask) -> Tensor:
        """x [B, T, H]; rows/write_pos [B, T] cache coordinates; mask [B, T, S], or a
        TreeMask to run the redrafter::packed_attention op (redrafter.plugins)."""
        b, t, _ = x.shape
        c = self.cfg
        q = apply_rope(rows_linear(self.wq, x).view(b, t, c.num_heads, c.head_dim), *rope)
        k = apply_rope(rows_linear(self.wk, x).view(b, t, c.num_kv_heads, c.head_dim), *rope)
        v = rows_linear(self.wv, x).view(b, t, c.num_kv_heads, c.head_dim)
        # One index_put_ on the whole cache (layer as an index tensor): the same write as
        # cache.k[layer, rows, write_pos] = k, but torch.export sees a mutation of the cache
        # input itself, which AOTInductor does in place instead of copying the layer's slice.
        at = (torch.full_like(rows, layer), rows, write_pos)
        cache.k.index_put_(at, k.to(cache.k.dtype))
        cache.v.index_put_(at, v.to(cache.v.dtype))
        if isinstance(mask, TreeMask):
            out = torch.ops.redrafter.packed_attention(
                q, k.to(cache.k.dtype), v.to(cache.v.dtype), cache.k[layer], cache.v[layer], rows[:, 0],
                mask.starts, mask.mask)
            return rows_linear(self.wo, out.reshape(b, t, -1))
        keys, vals = cache.gather(layer, rows[:, 0], mask.shape[-1])  # [B, S, kv, d] each
        return rows_linear(self.wo, attend(q, keys, vals, mask, self.work_dtype).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return rows_linear(self.down, F.silu(rows_linear(self.gate, x)) * rows_linear(self.up, x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope, layer: int, cache: KVCache, rows, write_pos, mask) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, layer, cache, rows, write_pos, mask)
        return x + self.mlp(self.mlp_norm(x))


def attention_mask(starts: Tensor, tree_mask: Tensor, span: int) -> Tensor:
    """[B, T, span] visibility: the committed context [0, start) plus the new tokens'
    own tree mask placed at [start, start + T). Stale scratch entries stay hidden."""
    t = tree_mask.shape[-1]
    rel = torch.arange(span, device=starts.device)[None, :] - starts[:, None]  # [B, S]
    in_new = (rel >= 0) & (rel < t)
    idx = rel.clamp(0, t - 1)[:, None, :].expand(-1, tree_mask.shape[1], -1)
    new = torch.gather(tree_mask, 2, idx) & in_new[:, None, :]
    return (rel < 0)[:, None, :] | new


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def exact_attention(self) -> "Llama":
        """Attend in float64 from now on, so that verifying T tokens at once gives each token the
        bits it gets decoded alone wherever the matmuls do too (builder.quantize's packed int8 and
        int4 CPU matmuls): a bf16 engine's ReDrafter output then equals its own plain decoding.
        In float32 the attention of 1 and of T queries differs by a few ulps, which bf16 rounding
        of the hidden states turns into different tokens. Costs 20% of plain decoding speed on
        the int4 SmolLM2 engine (BENCHMARKS.md). Not for the redrafter::packed_attention op."""
        for block in self.layers:
            block.attn.work_dtype = torch.float64
        return self

    def _apply(self, fn, recurse: bool = True):
        """.to(dtype) and friends leave the RoPE frequencies in float32 (as transformers does):
        bfloat16 would round them and shift every position's angle, and a compiled program
        must see the same constant whether the model was converted or loaded."""
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    def new_cache(self, slots: int, capacity: int) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, slots, capacity, p.dtype, p.device)

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, slots: Tensor,
                starts: Tensor, tree_mask: Tensor) -> Tensor:
        """Run new tokens against the cache and return final-norm hidden states [B, T, H].

        tokens, positions: [B, T]; slots, starts: [B] (cache row, committed length);
        tree_mask: [B, T, T] bool, which new tokens each new token sees (itself included).
        The new keys/values land at starts + [0, T) of each slot.
        """
        span = self.check_span(starts, tokens.shape[1], cache)
        return self.forward_masked(tokens, positions, cache, slots, starts, attention_mask(starts, tree_mask, span))

    @staticmethod
    def check_span(starts: Tensor, t: int, cache: KVCache) -> int:
        """The cache positions T new tokens after `starts` reach (a host sync); too many for the cache: an error."""
        span = int(starts.max()) + t
        if span > cache.capacity:
            raise ValueError(f"sequence needs {span} cache positions but the cache holds {cache.capacity}")
        return span

    def forward_masked(self, tokens: Tensor, positions: Tensor, cache: KVCache, slots: Tensor,
                       starts: Tensor, mask: Tensor | TreeMask) -> Tensor:
        """`forward` given the full visibility mask [B, T, S] over cache positions [0, S)
        (see attention_mask) or a TreeMask: no host sync, so torch.export can trace it with
        dynamic T and S (redrafter.builder compiles it)."""
        b, t = tokens.shape
        rows = slots[:, None].expand(b, t)
        write_pos = starts[:, None] + torch.arange(t, device=tokens.device)
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        x = self.embed(tokens)
        rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, i, cache, rows, write_pos, mask)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return rows_linear(self.lm_head, hidden).float()


def lm_head_weight(model: nn.Module) -> Tensor:
    """The base LM head as a float matrix [V, H] (the drafter's shared head reads its rows).
    A quantized head gives the float weights it was made from where it was tied to the embedding,
    and otherwise what its `dequantized_weight()` returns (the method every quantized linear has)."""
    if isinstance(model.lm_head, nn.Linear):
        return model.lm_head.weight
    if model.cfg.tie_word_embeddings:
        return model.embed.weight
    return model.lm_head.dequantized_weight()


def causal_mask(b: int, t: int, device: torch.device | str | None = None) -> Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()[None].expand(b, t, t)
