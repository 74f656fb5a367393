"""The decode loop: prefill, plain steps and ReDrafter steps over batch slots.

Per slot the decoder keeps the committed KV length, the next token (already emitted,
not yet in the cache) and the final-norm hidden state of the last committed token.
A ReDrafter step: draft W beams from (hidden, next token) -> pack them into a tree ->
one base forward over the packed tokens -> accept the longest correct prefix -> commit
the accepted path's KV entries -> continue from the last accepted token's hidden state
with the bonus token as the next token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .acceptance import greedy_accept
from .beam_search import beam_search
from .drafter import DraftHead, check_compatible
from .model import Llama, causal_mask
from .tree import pack_beams


@dataclass
class StepOutput:
    tokens: Tensor  # [B, L] emitted tokens; row b is valid up to counts[b]
    counts: Tensor  # [B] tokens emitted this step (accepted drafts + bonus)


class Decoder:
    """Owns the KV cache for `max_batch` slots of up to `max_seq_len` tokens each."""

    def __init__(self, model: Llama, drafter: DraftHead | None = None, *, max_batch: int = 1,
                 max_seq_len: int = 2048, beam_width: int = 4, beam_length: int = 4):
        if beam_width < 1 or beam_length < 1:
            raise ValueError(f"beam width and length must be >= 1, got W={beam_width}, L={beam_length}")
        if drafter is not None:
            check_compatible(drafter.cfg, model.cfg.vocab_size, model.cfg.hidden_size)
        self.model, self.drafter = model, drafter
        self.beam_width, self.beam_length = beam_width, beam_length
        self.max_seq_len = max_seq_len
        self.cache = model.new_cache(max_batch, max_seq_len + beam_width * beam_length)
        dev = model.embed.weight.device
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.next_token = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(max_batch, model.cfg.hidden_size, dtype=model.embed.weight.dtype, device=dev)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def speculative(self) -> bool:
        return self.drafter is not None and self.beam_length > 1

    @torch.inference_mode()
    def prefill(self, slot: int, prompt: list[int]) -> int:
        """Fill `slot` with a prompt; returns the first generated token (greedy)."""
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_seq_len={self.max_seq_len}")
        ids = torch.tensor([prompt], device=self.device)
        n = ids.shape[1]
        slots = torch.tensor([slot], device=self.device)
        start = torch.zeros(1, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(n, device=self.device)[None], self.cache, slots, start,
                            causal_mask(1, n, self.device))[:, -1]
        token = self.model.logits(hidden).argmax(-1)
        self.lengths[slot], self.next_token[slot], self.hidden[slot] = n, token[0], hidden[0]
        return int(token)

    @torch.inference_mode()
    def step(self, slots: Tensor) -> StepOutput:
        """Advance every slot in `slots` ([B] long) by one plain or ReDrafter step."""
        return self._speculative_step(slots) if self.speculative else self._plain_step(slots)

    def _plain_step(self, slots: Tensor) -> StepOutput:
        b = slots.shape[0]
        starts = self.lengths[slots]
        tokens = self.next_token[slots][:, None]
        hidden = self.model(tokens, starts[:, None], self.cache, slots, starts, causal_mask(b, 1, self.device))
        new = self.model.logits(hidden[:, 0]).argmax(-1)
        self.lengths[slots] = starts + 1
        self.next_token[slots], self.hidden[slots] = new, hidden[:, 0]
        return StepOutput(new[:, None], torch.ones_like(new))

    def _speculative_step(self, slots: Tensor) -> StepOutput:
        m, head = self.model, self.drafter
        starts = self.lengths[slots]
        base_head = m.lm_head.weight if head.cfg.head == "shared" else None
        beams, _ = beam_search(head, m.embed.weight, base_head, self.hidden[slots], self.next_token[slots],
                               self.beam_width, self.beam_length)
        packed = pack_beams(beams)
        positions = starts[:, None] + packed.depth
        hidden = m(packed.tokens, positions, self.cache, slots, starts, packed.mask)  # [B, T, H]
        predicted_packed = m.logits(hidden).argmax(-1)  # [B, T]
        b, w, l = beams.shape
        predicted = predicted_packed.gather(1, packed.unpacker.view(b, w * l)).view(b, w, l)
        acc = greedy_accept(beams, predicted)
        rows = torch.arange(b, device=self.device)
        path = packed.unpacker[rows, acc.beam]  # [B, L] packed indices along the chosen beam
        self.cache.commit(slots, starts, path)
        last = path[rows, acc.accepted]
        self.lengths[slots] = starts + acc.accepted + 1
        self.next_token[slots] = acc.bonus
        self.hidden[slots] = hidden[rows, last]
        # Emitted: drafts 1..accepted of the chosen beam, then the bonus token.
        emitted = torch.cat((beams[rows, acc.beam, 1:], acc.bonus[:, None]), dim=1)
        emitted[rows, acc.accepted] = acc.bonus
        return StepOutput(emitted, acc.accepted + 1)


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
