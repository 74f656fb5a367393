"""The engine's programs as exportable modules, and the runtime adapters that run them.

- forward: the base model over new tokens against the KV cache, used for prefill, plain steps
  and the verification of sampling steps. Inputs: tokens/positions [B, T], the caches k/v
  (mutated in place for AOTInductor), slots/starts [B] and the visibility mask [B, T, S] over
  cache positions [0, S) (S = longest committed length + T). B, T and S are dynamic dimensions.
- draft: beam drafting with the recurrent head, context [B, H] + guaranteed token [B] ->
  beams [B, W, L] (W and L fixed at build time).
- step: a whole greedy ReDrafter step, draft -> pack -> verify -> accept -> commit, in one
  program. Packing has a data-dependent length, so the step packs with redrafter::pack_beams
  into a fixed 1 + W*(L-1) tokens (padding sees only itself) and commits with
  redrafter::kv_commit; attention runs over the whole cache under a mask built in the program,
  or (plugin_ops) through redrafter::packed_attention. Every shape is static but the batch.

`CompiledSteps` runs the three programs as a `Decoder`'s stages (runtime.decoding.Steps).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from redrafter.runtime.acceptance import greedy_verify
from redrafter.runtime.beam_search import beam_search
from redrafter.runtime.config import DecodeConfig
from redrafter.runtime.decoding import FusedStep, Steps
from redrafter.runtime.drafter import DraftHead
from redrafter.runtime.model import KVCache, Llama, TreeMask, attention_mask, lm_head_weight

# Signature of a forward program: (tokens, positions, k, v, slots, starts, mask) -> hidden,
# writing the new keys/values into k and v.
ForwardProgram = Callable[..., Tensor]
DraftProgram = Callable[[Tensor, Tensor], Tensor]

FORWARD_INPUTS = ("tokens", "positions", "k_cache", "v_cache", "slots", "starts", "mask")
DRAFT_INPUTS = ("context", "first_token")
STEP_INPUTS = ("context", "first_token", "k_cache", "v_cache", "slots", "starts")


def cache_view(k: Tensor, v: Tensor) -> KVCache:
    """A KVCache over existing tensors (no allocation)."""
    cache = KVCache.__new__(KVCache)
    cache.k, cache.v = k, v
    return cache


class BaseForward(nn.Module):
    """Exportable base forward. functional=False writes the cache in place (AOTInductor);
    functional=True (ONNX, which has no in-place inputs) leaves the inputs alone and also
    returns the new keys/values [layers, B, T, kv_heads, head_dim] for the host to write."""

    def __init__(self, model: Llama, functional: bool = False):
        super().__init__()
        self.model, self.functional = model, functional
        self.train(False)

    def forward(self, tokens: Tensor, positions: Tensor, k: Tensor, v: Tensor, slots: Tensor,
                starts: Tensor, mask: Tensor):
        if self.functional:
            k, v = k.clone(), v.clone()
        hidden = self.model.forward_masked(tokens, positions, cache_view(k, v), slots, starts, mask)
        if not self.functional:
            return hidden
        rows, pos = new_rows(slots, starts, tokens.shape[1])
        return hidden, k[:, rows, pos], v[:, rows, pos]


class DraftBeams(nn.Module):
    """Exportable beam drafting: the recurrent head plus the base embedding (and LM head for
    a shared-head drafter), which the engine shares with the base model. With quantize (int8
    or int4; not with plugin_ops, whose op takes float weights) it drafts with a quantized
    copy of the head and of its projection (builder.quantize.quantize_drafter), made from the
    engine's weights at build and at load alike. keep_prefixes: the search tree's beams
    (runtime.beam_search)."""

    def __init__(self, model: Llama, head: DraftHead, width: int, length: int, plugin_ops: bool = False,
                 quantize: str = "none", keep_prefixes: bool = False):
        super().__init__()
        self.embed, self.plugin_ops = model.embed, plugin_ops
        shared = head.cfg.head == "shared"
        rows = head.output_weight(lm_head_weight(model)) if shared else None
        self.lm_head = self.draft_proj = None
        if quantize != "none" and not plugin_ops:
            from .quantize import quantize_drafter

            head, self.draft_proj = quantize_drafter(head, rows, quantize)
        self.head = head
        if shared and self.draft_proj is None and head.draft_vocab is None and isinstance(model.lm_head, nn.Linear):
            self.lm_head = model.lm_head
        if shared and self.draft_proj is None and self.lm_head is None:
            # The draft vocabulary's rows (or a quantized head's float weights), gathered here
            # once (at build and at load, from the engine's weights) rather than at every call.
            self.register_buffer("draft_lm_head", rows, persistent=False)
        else:
            self.draft_lm_head = None
        self.width, self.length, self.keep_prefixes = width, length, keep_prefixes
        self.train(False)

    def forward(self, context: Tensor, first_token: Tensor) -> Tensor:
        if self.draft_proj is not None:
            base_head = self.draft_proj
        else:
            base_head = self.lm_head.weight if self.lm_head is not None else self.draft_lm_head
        if self.plugin_ops:  # one redrafter::beam_draft node (AOTInductor calls the registered op)
            from redrafter.plugins import ops

            return ops.draft(self.head, self.embed.weight, base_head, context, first_token, self.width, self.length,
                             keep_prefixes=self.keep_prefixes)
        beams, _ = beam_search(self.head, self.embed.weight, base_head, context, first_token,
                               self.width, self.length, keep_prefixes=self.keep_prefixes)
        return beams


class SpeculativeStep(nn.Module):
    """Exportable greedy ReDrafter step: (context [B, H], guaranteed token [B], caches k/v,
    slots [B], committed lengths [B]) -> emitted tokens [B, L] (valid up to counts), counts
    [B], hidden [B, H] at the last accepted token. The accepted path's K/V are committed in
    place (redrafter::kv_commit); the caller advances lengths by counts and takes the last
    emitted token as the next guaranteed one. functional=True (ONNX) leaves the inputs alone
    and also returns the updated caches."""

    def __init__(self, model: Llama, head: DraftHead, width: int, length: int, plugin_ops: bool = False,
                 functional: bool = False, quantize: str = "none", keep_prefixes: bool = False):
        super().__init__()
        from redrafter.plugins import ops  # noqa: F401  (registers pack_beams, packed_attention, kv_commit)

        self.model, self.functional = model, functional
        self.draft = DraftBeams(model, head, width, length, plugin_ops, quantize, keep_prefixes)
        self.train(False)

    def forward(self, context: Tensor, first_token: Tensor, k: Tensor, v: Tensor, slots: Tensor,
                starts: Tensor) -> tuple[Tensor, ...]:
        if self.functional:
            k, v = k.clone(), v.clone()
        beams = self.draft(context, first_token)  # [B, W, L] (the search tree: [B, W * (L - 1), L])
        tokens, depth, unpacker, tree, _ = torch.ops.redrafter.pack_beams(beams)  # [B, beams * L], ...
        # Every beam starts with the guaranteed token and a depth holds at most W tokens (W beams, or
        # the W prefixes beam search kept there), so a tree holds at most 1 + W * (L - 1) tokens:
        # verify only those (what lies past a row's n_tokens is padding).
        t = 1 + self.draft.width * (beams.shape[2] - 1)
        tokens, depth, tree = tokens[:, :t], depth[:, :t], tree[:, :t, :t]
        # plugin_ops: attention through redrafter::packed_attention (a Triton kernel on CUDA).
        # Otherwise the compiler fuses attention over the whole cache (static span: the
        # capacity), which on CPU beats an op boundary per layer.
        mask = TreeMask(starts, tree) if self.draft.plugin_ops else attention_mask(starts, tree, k.shape[2])
        hidden = self.model.forward_masked(tokens, starts[:, None] + depth, cache_view(k, v), slots, starts,
                                           mask)  # [B, T, H]
        out = greedy_verify(beams, unpacker, self.model.logits(hidden).argmax(-1))
        torch.ops.redrafter.kv_commit(k, v, slots, starts, out.path)
        rows = torch.arange(beams.shape[0], device=beams.device)
        result = (out.tokens, out.counts, hidden[rows, out.last])
        return (*result, k, v) if self.functional else result


def dense(program: Callable) -> Callable:
    """Call `program` with contiguous inputs: compiled code assumes dense row-major tensors."""
    return lambda *args: program(*(a.contiguous() for a in args))


def new_rows(slots: Tensor, starts: Tensor, t: int) -> tuple[Tensor, Tensor]:
    """Cache coordinates [B, T] (slot, position) of T new tokens written after `starts`."""
    rows = slots[:, None].expand(-1, t)
    return rows, starts[:, None] + torch.arange(t, device=slots.device)


def static_span(device: torch.device, capacity: int) -> int | None:
    """The key span a forward program attends over: on CUDA always capacity - 1 (the whole
    cache, masked), since export cannot prove the stride guards that a dynamic span puts on
    GPU attention (torch 2.11, H100); elsewhere None: the span follows the sequence, which the
    CPU measured cheaper."""
    return capacity - 1 if device.type == "cuda" else None


def forward_examples(model: Llama, max_batch: int, capacity: int) -> tuple[tuple, dict]:
    """Example inputs (batch 2 where the engine allows, so the batch stays dynamic) and the
    dynamic shapes of the forward program."""
    from torch.export import Dim

    b, t, start = min(2, max_batch), 3, 2
    dev = model.embed.weight.device
    cache = model.new_cache(max_batch, capacity)
    tokens = torch.zeros(b, t, dtype=torch.long, device=dev)
    starts = torch.full((b,), start, dtype=torch.long, device=dev)
    positions = starts[:, None] + torch.arange(t, device=dev)
    slots = torch.arange(b, device=dev)
    tree = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None].expand(b, t, t)
    static = static_span(dev, capacity)
    mask = attention_mask(starts, tree, static or start + t)
    batch = Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    tokens_dim = Dim("tokens", min=1, max=capacity - 1)
    # One below the capacity: at S == capacity the slice of the cache is the whole cache, which
    # export would specialise; the decoder never needs it (S <= max_seq_len - 1 + W * L).
    span = None if static else Dim("span", min=1, max=capacity - 1)
    bt = {0: batch, 1: tokens_dim} if batch else {1: tokens_dim}
    shapes = (bt, bt, None, None, {0: batch} if batch else None, {0: batch} if batch else None,
              {0: batch, 1: tokens_dim, 2: span} if batch else {1: tokens_dim, 2: span})
    return (tokens, positions, cache.k, cache.v, slots, starts, mask), shapes


def draft_examples(model: Llama, max_batch: int) -> tuple[tuple, dict]:
    from torch.export import Dim

    b = min(2, max_batch)
    w = model.embed.weight
    context = torch.zeros(b, model.cfg.hidden_size, dtype=w.dtype, device=w.device)
    first = torch.zeros(b, dtype=torch.long, device=w.device)
    batch = Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    return (context, first), (({0: batch}, {0: batch}) if batch else (None, None))


def step_examples(model: Llama, max_batch: int, capacity: int) -> tuple[tuple, dict]:
    """Example inputs and dynamic shapes of the step program (only the batch is dynamic)."""
    (context, first), draft_shapes = draft_examples(model, max_batch)
    b = context.shape[0]
    cache = model.new_cache(max_batch, capacity)
    slots = torch.arange(b, device=context.device)
    starts = torch.full((b,), 2, dtype=torch.long, device=context.device)
    batch = draft_shapes[0]
    return (context, first, cache.k, cache.v, slots, starts), (*draft_shapes, None, None, batch, batch)


class CompiledSteps(Steps):
    """A decoder's stages through an engine's compiled programs: every base forward through the
    forward program; drafting through the draft program and greedy steps through the step program
    while the decoder's setting is the one they were built for (`built`), the eager runtime code
    otherwise. The embedding and LM head stay eager modules over the engine's weights (the drafter
    and the logits use them); the blocks run only inside the programs."""

    def __init__(self, model: Llama, forward: ForwardProgram, cache_shape: tuple[int, int], built: DecodeConfig,
                 draft: DraftProgram | None = None, step: FusedStep | None = None):
        super().__init__(model)
        self.program, self.cache_shape, self.built = forward, tuple(cache_shape), built
        self.draft_program, self.step_program = draft, step

    def _built_for(self, config: DecodeConfig) -> bool:
        b = self.built
        return (config.beam_width, config.beam_length, config.tree) == (b.beam_width, b.beam_length, b.tree)

    def new_cache(self, slots: int, capacity: int) -> KVCache:
        """The cache the programs were compiled for, whose positions cover `capacity` (a plain
        decoder of an engine built with a lookup beam asks for fewer)."""
        if capacity > self.cache_shape[1]:
            raise ValueError(f"a cache of {capacity} positions exceeds the engine's {self.cache_shape[1]}")
        return super().new_cache(slots, self.cache_shape[1])

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, slots: Tensor, starts: Tensor,
                tree_mask: Tensor) -> Tensor:
        span = int(starts.max()) + tokens.shape[1]
        if span >= cache.capacity:
            raise ValueError(f"sequence needs {span} cache positions but the engine's cache holds "
                             f"{cache.capacity - 1}: raise --max-seq-len when building the engine")
        mask = attention_mask(starts, tree_mask, static_span(cache.k.device, cache.capacity) or span)
        # Compiled code assumes dense row-major inputs (callers pass expanded views).
        args = (tokens, positions, cache.k, cache.v, slots, starts, mask)
        return self.program(*(a.contiguous() for a in args))

    def draft(self, head: DraftHead, base_head: Tensor | None, context: Tensor, first: Tensor,
              config: DecodeConfig) -> Tensor:
        if self.draft_program is not None and self._built_for(config):
            return self.draft_program(context, first)
        return super().draft(head, base_head, context, first, config)

    def fused(self, config: DecodeConfig) -> FusedStep | None:
        # The step program has no lookup beam: the host adds it.
        return self.step_program if self._built_for(config) and not config.lookup_ngram else None
