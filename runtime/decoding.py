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
from .config import DecodeConfig
from .drafter import DraftHead, check_compatible
from .lookup import lookup_beam
from .model import KVCache, Llama, causal_mask, lm_head_weight
from .sampling import BatchSampling, SlotSampler, draw, processed_probs
from .tree import PAD, PackedBeams, pack_beams

# A whole greedy step in one call: (context [B, H], first token [B], cache k, cache v, slots, starts) ->
# emitted tokens [B, L], counts [B], hidden [B, H] of the last accepted token; the accepted K/V committed.
FusedStep = Callable[..., tuple[Tensor, Tensor, Tensor]]


@dataclass
class StepOutput:
    tokens: Tensor  # [B, L] emitted tokens; row b is valid up to counts[b]
    counts: Tensor  # [B] tokens emitted this step (accepted drafts + bonus)


class Steps:
    """How a decoder runs the stages of a step: propose (draft) -> pack -> verify (the base forward)
    -> accept (acceptance.py, shared by all) -> commit. This class is the eager runtime code; the
    redrafter:: custom ops (plugins.ops.PluginSteps) and an engine's compiled programs
    (builder.programs.CompiledSteps) replace stages. The implementation is chosen once, when the
    decoder is made: nothing below it asks which one runs."""

    def __init__(self, model: Llama):
        self.model = model  # its embedding and LM head serve every implementation

    def new_cache(self, slots: int, capacity: int) -> KVCache:
        return self.model.new_cache(slots, capacity)

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, slots: Tensor, starts: Tensor,
                tree_mask: Tensor) -> Tensor:
        """The base model over new tokens against the cache (Llama.forward) -> hidden [B, T, H]."""
        return self.model(tokens, positions, cache, slots, starts, tree_mask)

    def draft(self, head: DraftHead, base_head: Tensor | None, context: Tensor, first: Tensor,
              config: DecodeConfig) -> Tensor:
        """Beams [B, W, L] (the search tree: [B, W(L-1), L]) from (hidden, guaranteed token)."""
        return beam_search(head, self.model.embed.weight, base_head, context, first, config.beam_width,
                           config.beam_length, keep_prefixes=config.keep_prefixes)[0]

    def pack(self, beams: Tensor) -> PackedBeams:
        return pack_beams(beams)

    def commit(self, cache: KVCache, slots: Tensor, starts: Tensor, path: Tensor) -> None:
        cache.commit(slots, starts, path)

    def fused(self, config: DecodeConfig) -> FusedStep | None:
        """A compiled whole greedy step for `config`, where there is one."""
        return None


class Decoder:
    """Owns the KV cache for `max_batch` slots of up to `max_seq_len` tokens each.

    `limits` (default: `decode`) sizes the scratch area past each sequence, i.e. the largest tree a
    step can verify, and keeps the token history a lookup beam needs; `set_config` picks any setting
    within them per step (DecodeConfig.check_within). A lookup beam needs a drafter. Without a
    drafter the decoder decodes plainly. `steps` runs the stages (default: eager runtime code).
    """

    def __init__(self, model: Llama, drafter: DraftHead | None = None, decode: DecodeConfig | None = None, *,
                 max_batch: int = 1, max_seq_len: int = 2048, limits: DecodeConfig | None = None,
                 steps: Steps | None = None):
        decode = decode or DecodeConfig.for_device(model.embed.weight.device)
        if drafter is None:
            if decode.lookup_ngram:
                raise ValueError(f"lookup_ngram={decode.lookup_ngram} needs a drafter (context lookup adds a beam "
                                 "to the drafter's): give one, or lookup 0")
            decode = limits = DecodeConfig.plain()
        else:
            check_compatible(drafter.cfg, model.cfg.vocab_size, model.cfg.hidden_size)
        self.limits = limits or decode
        decode.check_within(self.limits, "the decoder")
        self.model, self.drafter, self.config = model, drafter, decode
        self.steps = steps or Steps(model)
        # The shared head's rows of the base LM head, gathered once (draft vocabulary).
        self._draft_lm_head = drafter.output_weight(lm_head_weight(model)) if drafter is not None else None
        self.max_seq_len = max_seq_len
        self.max_tree_tokens = self.limits.tree_tokens
        self.cache = self.steps.new_cache(max_batch, max_seq_len + self.max_tree_tokens)
        dev = model.embed.weight.device
        # Every slot's tokens (prompt, emitted, the next token last): kept only for context lookup.
        self.history = (torch.zeros(max_batch, max_seq_len + self.max_tree_tokens, dtype=torch.long, device=dev)
                        if self.limits.lookup_ngram else None)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.next_token = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(max_batch, model.cfg.hidden_size, dtype=model.embed.weight.dtype, device=dev)
        self.samplers: list[SlotSampler | None] = [None] * max_batch  # None: greedy

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def speculative(self) -> bool:
        return self.drafter is not None and self.config.speculative

    def set_config(self, config: DecodeConfig) -> None:
        """Decode with `config` from the next step on (within the decoder's limits)."""
        config.check_within(self.limits, "the decoder")
        self.config = config

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
        hidden = self.steps.forward(ids, torch.arange(t, device=dev)[None].expand(b, t), self.cache, slot_t, start,
                                    causal_mask(b, t, dev))
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
        hidden = self.steps.forward(tokens, starts[:, None], self.cache, slots, starts, causal_mask(b, 1, self.device))
        new = self._pick(self.model.logits(hidden[:, 0]), self._sampling(slot_list, 1), 0)
        self._consume(slot_list, [1] * b)
        return self._advance(slots, starts, new[:, None], torch.ones_like(new), hidden[:, 0])

    def _speculative_step(self, slots: Tensor) -> StepOutput:
        m = self.model
        slot_list = slots.tolist()
        sampling = self._sampling(slot_list, self.config.step_length)
        starts = self.lengths[slots]
        fused = self.steps.fused(self.config) if sampling is None else None
        if fused is not None:  # a greedy step in one compiled program (draft -> ... -> commit)
            tokens, counts, hidden = fused(self.hidden[slots], self.next_token[slots], self.cache.k, self.cache.v,
                                           slots, starts)
            return self._advance(slots, starts, tokens, counts, hidden)
        beams, packed = self._draft_and_pack(slots)
        positions = starts[:, None] + packed.depth
        hidden = self.steps.forward(packed.tokens, positions, self.cache, slots, starts, packed.mask)  # [B, T, H]
        if sampling is not None:
            return self._walk_step(slots, slot_list, starts, packed, hidden, sampling)
        out = greedy_verify(beams, packed.unpacker, m.logits(hidden).argmax(-1))
        self.steps.commit(self.cache, slots, starts, out.path)
        rows = torch.arange(slots.shape[0], device=self.device)
        return self._advance(slots, starts, out.tokens, out.counts, hidden[rows, out.last])

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

    def _draft_and_pack(self, slots: Tensor) -> tuple[Tensor, PackedBeams]:
        """Beams [B, W, L] (the search tree: [B, W(L-1), L]) and their packed tree. With context lookup one
        more beam, all config.step_length long, padded with PAD."""
        c = self.config
        beams = self.steps.draft(self.drafter, self._draft_lm_head, self.hidden[slots], self.next_token[slots], c)
        if c.lookup_ngram:
            ends = self.lengths[slots]
            history = self.history[slots, : int(ends.max()) + 1]
            beams = torch.nn.functional.pad(beams, (0, c.step_length - c.beam_length), value=PAD)
            copied = lookup_beam(history, ends, beams.shape[2], c.lookup_ngram, beams[:, 0])
            beams = torch.cat((beams, copied[:, None]), dim=1)
        return beams, self.steps.pack(beams)

    def _walk_step(self, slots: Tensor, slot_list: list[int], starts: Tensor, packed: PackedBeams, hidden: Tensor,
                   sampling: tuple[Tensor, BatchSampling]) -> StepOutput:
        """Verification for a batch with sampling rows: walk each tree, drawing from the base
        model's distribution at every visited node (logits only where the walk goes)."""
        rows = torch.arange(slots.shape[0], device=self.device)
        walk = tree_walk(packed, self.config.step_length,
                         lambda node, d: self._pick(self.model.logits(hidden[rows, node]), sampling, d))
        self.steps.commit(self.cache, slots, starts, walk.path)
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
