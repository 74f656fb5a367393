"""The decode loop: prefill, plain steps and ReDrafter steps over batch slots.

Per slot the decoder keeps the committed KV length, the next token (already emitted,
not yet in the cache) and the final-norm hidden state of the last committed token.
A ReDrafter step: draft W beams from (hidden, next token) -> pack them into a tree ->
one base forward over the packed tokens -> accept the longest correct prefix -> commit
the accepted path's KV entries -> continue from the last accepted token's hidden state
with the bonus token as the next token.

With `lookup_ngram` > 0 a step adds one more beam: the continuation of the latest earlier
occurrence of the sequence's last tokens (runtime/lookup.py), verified like the drafted ones.
It may be longer than the drafted beams (`lookup_length`): they are padded to its length.

`tree="search"` verifies every prefix the beam search kept (W per depth, runtime/beam_search.py)
instead of only the W final beams: more candidates near the root, where most steps stop.

Slots prefilled with a `SlotSampler` sample instead of taking the argmax: their steps walk
the packed tree (acceptance.tree_walk), which keeps the output distribution exactly that
of plain sampling. A batch may mix greedy and sampling slots.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .acceptance import greedy_verify, tree_walk
from .beam_search import beam_search
from .drafter import DraftHead, check_compatible
from .lookup import lookup_beam
from .model import Llama, causal_mask, lm_head_weight
from .sampling import BatchSampling, SlotSampler, draw, processed_probs
from .tree import PAD, PackedBeams, pack_beams

# What a step verifies: the W final beams ("beams", as in the paper and TensorRT-LLM), or every
# prefix the beam search kept on the way ("search": 1 + W(L-1) tokens).
TREES = ("beams", "search")


def step_length(length: int, lookup_ngram: int = 0, lookup_length: int = 0) -> int:
    """The longest beam of a step drafting beams of `length`: the lookup beam's may be longer."""
    return max(length, lookup_length) if lookup_ngram else length


def tree_tokens(width: int, length: int, lookup_ngram: int = 0, lookup_length: int = 0) -> int:
    """The most tokens a step verifies: `width` drafted beams of `length` (or their search tree, which has
    1 + width * (length - 1) tokens, no more), and the lookup beam."""
    return width * length + (step_length(length, lookup_ngram, lookup_length) if lookup_ngram else 0)


@dataclass
class StepOutput:
    tokens: Tensor  # [B, L] emitted tokens; row b is valid up to counts[b]
    counts: Tensor  # [B] tokens emitted this step (accepted drafts + bonus)


class Decoder:
    """Owns the KV cache for `max_batch` slots of up to `max_seq_len` tokens each.

    beam_width x beam_length also sizes the scratch area past each sequence, i.e. the
    largest tree a step can verify; `set_beam_shape` picks any shape within it per step.
    lookup_ngram > 0 adds a beam copied from each sequence's earlier tokens after a match of
    its last 1..lookup_ngram tokens (runtime/lookup.py); it needs a drafter. The lookup beam has
    max(lookup_length, L) tokens: a copied continuation is often right for many tokens, and a
    long beam costs verified tokens only where a match exists. tree: one of TREES.
    """

    def __init__(self, model: Llama, drafter: DraftHead | None = None, *, max_batch: int = 1,
                 max_seq_len: int = 2048, beam_width: int = 4, beam_length: int = 4,
                 use_plugins: bool = False, draft: Callable[[Tensor, Tensor], Tensor] | None = None,
                 fused_step: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None, lookup_ngram: int = 0,
                 lookup_length: int = 0, tree: str = "beams"):
        if beam_width < 1 or beam_length < 1:
            raise ValueError(f"beam width and length must be >= 1, got W={beam_width}, L={beam_length}")
        if lookup_ngram < 0 or (lookup_ngram and drafter is None):
            raise ValueError(f"lookup_ngram={lookup_ngram}: give 0 (off) or a positive n-gram length, "
                             "with a drafter (context lookup adds a beam to the drafter's)")
        if lookup_length < 0 or (lookup_length and not lookup_ngram):
            raise ValueError(f"lookup_length={lookup_length}: give 0 (the drafted beams' length) or a positive "
                             "length, with lookup_ngram > 0")
        if tree not in TREES:
            raise ValueError(f"tree={tree!r}: give one of {', '.join(TREES)}")
        if drafter is not None:
            check_compatible(drafter.cfg, model.cfg.vocab_size, model.cfg.hidden_size)
        self.model, self.drafter = model, drafter
        # The shared head's rows of the base LM head, gathered once (draft vocabulary).
        self._draft_lm_head = drafter.output_weight(lm_head_weight(model)) if drafter is not None else None
        self.beam_width, self.beam_length = beam_width, beam_length
        self.lookup_ngram, self.lookup_length, self.tree = lookup_ngram, lookup_length, tree
        self.max_seq_len = max_seq_len
        self.max_tree_tokens = self.tree_tokens(beam_width, beam_length)
        self.cache = model.new_cache(max_batch, max_seq_len + self.max_tree_tokens)
        dev = model.embed.weight.device
        # Every slot's tokens (prompt, emitted, the next token last): kept only for context lookup.
        self.history = (torch.zeros(max_batch, max_seq_len + self.max_tree_tokens, dtype=torch.long, device=dev)
                        if lookup_ngram else None)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.next_token = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(max_batch, model.cfg.hidden_size, dtype=model.embed.weight.dtype, device=dev)
        self.samplers: list[SlotSampler | None] = [None] * max_batch  # None: greedy
        # use_plugins: draft, pack, attend and commit through the redrafter:: custom ops
        # (Triton kernels on CUDA, this runtime's code elsewhere).
        self.use_plugins = use_plugins
        if use_plugins:
            from ..plugins import ops as plugin_ops  # registers the ops

            self.plugin_ops = plugin_ops
        # Compiled programs for the initial beam shape (redrafter.builder), used while that shape
        # holds. draft: (context [B, H], first token [B]) -> beams [B, W, L]. fused_step: a whole
        # greedy step, (context, first token, cache k, cache v, slots, starts) -> emitted tokens
        # [B, L], counts [B], hidden [B, H] of the last accepted token, committing the accepted
        # K/V in place; used when no row of the batch samples. Both draft the decoder's `tree`.
        self.draft, self.fused_step, self._draft_shape = draft, fused_step, (beam_width, beam_length)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def speculative(self) -> bool:
        return self.drafter is not None and self.beam_length > 1

    def tree_tokens(self, width: int, length: int) -> int:
        """The most tokens a step with `width` drafted beams of `length` verifies (lookup's beam included)."""
        return tree_tokens(width, length, self.lookup_ngram, self.lookup_length)

    def step_length(self) -> int:
        """The most tokens the next step can emit: the longest beam's length."""
        return step_length(self.beam_length, self.lookup_ngram, self.lookup_length)

    def set_beam_shape(self, width: int, length: int) -> None:
        """Draft `width` beams of `length` tokens from the next step on (length 1: plain steps)."""
        if width < 1 or length < 1:
            raise ValueError(f"beam width and length must be >= 1, got W={width}, L={length}")
        if self.tree_tokens(width, length) > self.max_tree_tokens:
            raise ValueError(f"beam shape {width}x{length} exceeds the decoder's scratch area of "
                             f"{self.max_tree_tokens} tokens: build the decoder with a larger beam shape")
        self.beam_width, self.beam_length = width, length

    @torch.inference_mode()
    def prefill(self, slot: int, prompt: list[int], sampler: SlotSampler | None = None) -> int:
        """Fill `slot` with a prompt; returns the first generated token (greedy, or drawn by
        `sampler`, which stays with the slot for its later steps)."""
        return self.prefill_batch([slot], [prompt], [sampler])[0]

    @torch.inference_mode()
    def prefill_batch(self, slots: list[int], prompts: list[list[int]],
                      samplers: list[SlotSampler | None] | None = None) -> list[int]:
        """Fill several slots in one forward (prompts right-padded to the longest; padding
        comes after each prompt, so the causal mask hides it). Returns the first tokens."""
        for prompt in prompts:
            if not prompt:
                raise ValueError("empty prompt: give at least one token")
            if len(prompt) >= self.max_seq_len:
                raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_seq_len={self.max_seq_len}")
        b, dev = len(prompts), self.device
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        t = max(len(p) for p in prompts)
        ids = torch.tensor([p + [0] * (t - len(p)) for p in prompts], device=dev)
        slot_t = torch.tensor(slots, device=dev)
        start = torch.zeros(b, dtype=torch.long, device=dev)
        hidden = self.model(ids, torch.arange(t, device=dev)[None].expand(b, t), self.cache, slot_t, start,
                            causal_mask(b, t, dev), use_plugins=self.use_plugins)
        hidden = hidden[torch.arange(b, device=dev), lengths - 1]  # [B, H] at each prompt's last token
        for slot, sampler in zip(slots, samplers or [None] * b):
            self.samplers[slot] = sampler
        sampling = self._sampling(slots, 1)
        token = self._pick(self.model.logits(hidden), sampling, 0)
        self._consume(slots, [1] * b)
        self.lengths[slot_t], self.next_token[slot_t], self.hidden[slot_t] = lengths, token, hidden
        if self.history is not None:
            self.history[slot_t, :t] = ids
            self.history[slot_t, lengths] = token
        return token.tolist()

    @torch.inference_mode()
    def step(self, slots: Tensor) -> StepOutput:
        """Advance every slot in `slots` ([B] long) by one plain or ReDrafter step."""
        return self._speculative_step(slots) if self.speculative else self._plain_step(slots)

    def _sampling(self, slots: list[int], n: int) -> tuple[Tensor, BatchSampling] | None:
        """Rows of `slots` that sample, with their filters and next n uniforms (None: all greedy)."""
        rows = [i for i, s in enumerate(slots) if self.samplers[s] is not None]
        if not rows:
            return None
        samplers = [self.samplers[slots[i]] for i in rows]
        return torch.tensor(rows, device=self.device), BatchSampling.gather(samplers, n, self.device)

    @staticmethod
    def _pick(logits: Tensor, sampling: tuple[Tensor, BatchSampling] | None, d: int) -> Tensor:
        """logits [B, V] -> tokens [B]: argmax, or for sampling rows a draw with uniform column d."""
        tokens = logits.argmax(-1)
        if sampling is not None:
            rows, s = sampling
            probs = processed_probs(logits[rows], s.temperature, s.top_k, s.top_p)
            tokens[rows] = draw(probs, s.uniforms[:, d])
        return tokens

    def _consume(self, slots: list[int], counts: list[int]) -> None:
        for slot, n in zip(slots, counts):
            if self.samplers[slot] is not None:
                self.samplers[slot].consume(n)

    def _plain_step(self, slots: Tensor) -> StepOutput:
        b = slots.shape[0]
        slot_list = slots.tolist()
        starts = self.lengths[slots]
        tokens = self.next_token[slots][:, None]
        hidden = self.model(tokens, starts[:, None], self.cache, slots, starts, causal_mask(b, 1, self.device),
                            use_plugins=self.use_plugins)
        new = self._pick(self.model.logits(hidden[:, 0]), self._sampling(slot_list, 1), 0)
        self._consume(slot_list, [1] * b)
        return self._advance(slots, starts, new[:, None], torch.ones_like(new), hidden[:, 0])

    def _speculative_step(self, slots: Tensor) -> StepOutput:
        m = self.model
        slot_list = slots.tolist()
        sampling = self._sampling(slot_list, self.step_length())
        starts = self.lengths[slots]
        if sampling is None and self.fused_step is not None and self._built_shape() and not self.lookup_ngram:
            return self._fused_step(slots, starts)
        beams, packed = self._draft_and_pack(slots)
        positions = starts[:, None] + packed.depth
        hidden = m(packed.tokens, positions, self.cache, slots, starts, packed.mask,
                   use_plugins=self.use_plugins)  # [B, T, H]
        if sampling is not None:
            return self._walk_step(slots, slot_list, starts, packed, hidden, sampling)
        out = greedy_verify(beams, packed.unpacker, m.logits(hidden).argmax(-1))
        self._commit(slots, starts, out.path)
        rows = torch.arange(slots.shape[0], device=self.device)
        return self._advance(slots, starts, out.tokens, out.counts, hidden[rows, out.last])

    def _fused_step(self, slots: Tensor, starts: Tensor) -> StepOutput:
        """A greedy step in one compiled program (draft -> pack -> verify -> accept -> commit)."""
        tokens, counts, hidden = self.fused_step(self.hidden[slots], self.next_token[slots], self.cache.k,
                                                 self.cache.v, slots, starts)
        return self._advance(slots, starts, tokens, counts, hidden)

    def _advance(self, slots: Tensor, starts: Tensor, tokens: Tensor, counts: Tensor,
                 hidden: Tensor) -> StepOutput:
        """After a step's commit: each slot's length grows by the tokens it emitted, the last
        one becomes its next (guaranteed) token, hidden [B, H] its context for drafting."""
        rows = torch.arange(slots.shape[0], device=self.device)
        self.lengths[slots] = starts + counts
        self.next_token[slots] = tokens[rows, counts - 1]
        self.hidden[slots] = hidden
        if self.history is not None:
            # Emitted tokens follow the previous next token; columns past counts are overwritten later.
            cols = starts[:, None] + 1 + torch.arange(tokens.shape[1], device=self.device)
            self.history[slots[:, None], cols] = tokens
        return StepOutput(tokens, counts)

    def _built_shape(self) -> bool:
        """Compiled drafting programs hold the beam shape they were built for."""
        return (self.beam_width, self.beam_length) == self._draft_shape

    def _draft_and_pack(self, slots: Tensor) -> tuple[Tensor, PackedBeams]:
        """Beams [B, W, L] (the search tree: [B, W(L-1), L]) and their packed tree; the drafted ones from the
        plugin ops, the engine's compiled drafting program (while the beam shape is the built one) or the
        eager beam search. With context lookup one more beam, all step_length() long, padded with PAD."""
        m, head = self.model, self.drafter
        context, first = self.hidden[slots], self.next_token[slots]
        base_head, keep = self._draft_lm_head, self.tree == "search"
        if self.use_plugins:
            beams = self.plugin_ops.draft(head, m.embed.weight, base_head, context, first,
                                          self.beam_width, self.beam_length, keep_prefixes=keep)
        elif self.draft is not None and self._built_shape():
            beams = self.draft(context, first)
        else:
            beams, _ = beam_search(head, m.embed.weight, base_head, context, first, self.beam_width, self.beam_length,
                                   keep_prefixes=keep)
        if self.lookup_ngram:
            ends = self.lengths[slots]
            history = self.history[slots, : int(ends.max()) + 1]
            beams = torch.nn.functional.pad(beams, (0, self.step_length() - self.beam_length), value=PAD)
            copied = lookup_beam(history, ends, beams.shape[2], self.lookup_ngram, beams[:, 0])
            beams = torch.cat((beams, copied[:, None]), dim=1)
        return beams, self.plugin_ops.pack(beams) if self.use_plugins else pack_beams(beams)

    def _commit(self, slots: Tensor, starts: Tensor, path: Tensor) -> None:
        if self.use_plugins:
            self.plugin_ops.commit(self.cache, slots, starts, path)
        else:
            self.cache.commit(slots, starts, path)

    def _walk_step(self, slots: Tensor, slot_list: list[int], starts: Tensor, packed: PackedBeams, hidden: Tensor,
                   sampling: tuple[Tensor, BatchSampling]) -> StepOutput:
        """Verification for a batch with sampling rows: walk each tree, drawing from the base
        model's distribution at every visited node (logits only where the walk goes)."""
        rows = torch.arange(slots.shape[0], device=self.device)
        walk = tree_walk(packed, self.step_length(),
                         lambda node, d: self._pick(self.model.logits(hidden[rows, node]), sampling, d))
        self._commit(slots, starts, walk.path)
        self._consume(slot_list, walk.counts.tolist())
        return self._advance(slots, starts, walk.tokens, walk.counts, hidden[rows, walk.path[rows, walk.counts - 1]])


@dataclass
class Generation:
    token_ids: list[int]
    steps: int
    prefill_s: float
    total_s: float
    accepted_per_step: list[int] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> float:
        return (len(self.token_ids) - 1) / self.steps if self.steps else 0.0


def generate(decoder: Decoder, prompts: list[list[int]], max_new_tokens: int,
             eos_ids: tuple[int, ...] | list[int] = ()) -> list[Generation]:
    """Greedy-decode a batch of prompts in lockstep (rows leave when done).

    The first token of each output comes from prefill; every later one from a step.
    Output stops after an EOS token (kept, as transformers does) or max_new_tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompts) > decoder.cache.slots:
        raise ValueError(f"{len(prompts)} prompts but the decoder has {decoder.cache.slots} slots")
    for p in prompts:
        if len(p) + max_new_tokens > decoder.max_seq_len:
            raise ValueError(
                f"prompt ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                f"{decoder.max_seq_len}: shorten the prompt or raise max_seq_len")
    eos = set(eos_ids)
    t0 = time.perf_counter()
    results: list[Generation] = []
    for slot, prompt in enumerate(prompts):
        s = time.perf_counter()
        first = decoder.prefill(slot, prompt)
        results.append(Generation([first], 0, time.perf_counter() - s, 0.0))
    active = [i for i, r in enumerate(results) if not _done(r.token_ids, max_new_tokens, eos)]
    while active:
        out = decoder.step(torch.tensor(active, device=decoder.device))
        tokens, counts = out.tokens.tolist(), out.counts.tolist()
        still = []
        for row, slot in enumerate(active):
            r = results[slot]
            r.steps += 1
            r.accepted_per_step.append(counts[row] - 1)
            for tok in tokens[row][: counts[row]]:
                r.token_ids.append(tok)
                if _done(r.token_ids, max_new_tokens, eos):
                    break
            if not _done(r.token_ids, max_new_tokens, eos):
                still.append(slot)
            else:
                r.total_s = time.perf_counter() - t0
        active = still
    for r in results:
        r.total_s = r.total_s or time.perf_counter() - t0
    return results


def _done(ids: list[int], max_new: int, eos: set[int]) -> bool:
    return len(ids) >= max_new or ids[-1] in eos
