"""Beam drafting with the recurrent head.

Convention: beam_length L counts the guaranteed token (Apple's convention), so each beam
holds the base model's own next token followed by L-1 drafted tokens. TensorRT-LLM's
draft_len_per_beam is L-1.

The search tree: beam search keeps W prefixes at every depth, and the W final beams mostly
share their first tokens, so the candidates it pruned on the way (the drafter's second- or
third-best first token, say) are never verified. `keep_prefixes` returns every kept prefix as a
PAD-ended beam, so verification covers the top-W first tokens, the top-W two-token prefixes,
...: 1 + W(L-1) packed tokens, where the final beams alone pack to between L and 1 + W(L-1).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .drafter import DraftHead
from .tree import PAD

# Scores of beams that must not be expanded on the first step: low enough that no real
# candidate loses to them, finite so sums stay finite.
DEAD = -1e9


def beam_search(head: DraftHead, embed: Tensor, base_lm_head: Tensor | nn.Module | None, context: Tensor,
                first_token: Tensor, width: int, length: int,
                return_log_probs: bool = False, keep_prefixes: bool = False) -> tuple[Tensor, Tensor | None]:
    """Propose `width` beams of `length` tokens for each sequence.

    embed: base input embedding [V, H]; base_lm_head: head.output_weight(base LM head)
    [Vd, H] for a shared head (computed once by the caller), or a module multiplying by it;
    context: hidden state at the last accepted token [B, H]; first_token: the guaranteed
    next token [B]. Scores are cumulative log-probabilities (no length normalisation);
    the first step expands beam 0 only, since all beams start identical.
    Returns beams [B, W, L] (vocabulary token ids) and, if asked, the per-step draft
    log-probs [B, W, L-1, Vd] over the head's draft vocabulary (aligned with each returned
    beam's own history). keep_prefixes: beams [B, search_tree_beams(W, L), L], the final W
    first, then the W prefixes kept at each shorter depth (longest first), ended with PAD.
    """
    if keep_prefixes and return_log_probs:
        raise ValueError("keep_prefixes returns the search tree's beams without log-probs: ask for one of them")
    b, w = first_token.shape[0], width
    beams = first_token[:, None, None].expand(b, w, 1)
    scores = torch.full((b, w), DEAD, device=context.device)
    scores[:, 0] = 0.0
    state = context.new_zeros(b, w, context.shape[-1])
    tokens = beams[:, :, 0]
    ctx = context[:, None, :]
    history: list[Tensor] = []
    kept: list[Tensor] = []  # [B, W, d+1] at each depth d < L-1
    for _ in range(length - 1):
        if keep_prefixes and beams.shape[2] > 1:
            kept.append(beams)
        state = head.step(state, embed[tokens])
        logp = torch.log_softmax(head.logits(ctx, state, base_lm_head), dim=-1)  # [B, W, Vd]
        vocab = logp.shape[-1]
        cand = (scores[:, :, None] + logp).view(b, w * vocab)
        scores, flat = cand.topk(w, dim=-1)  # [B, W]
        parent, tokens = flat // vocab, head.token_ids(flat % vocab)
        state = state.gather(1, parent[:, :, None].expand_as(state))
        beams = torch.cat((beams.gather(1, parent[:, :, None].expand_as(beams)), tokens[:, :, None]), dim=2)
        if return_log_probs:
            history = [h.gather(1, parent[:, :, None].expand_as(h)) for h in history]
            history.append(logp.gather(1, parent[:, :, None].expand_as(logp)))
    log_probs = torch.stack(history, dim=2) if return_log_probs and history else None
    return (search_tree(beams, kept) if keep_prefixes else beams), log_probs


def search_tree(final: Tensor, kept: list[Tensor]) -> Tensor:
    """The search tree's beams: the final ones [B, W, L], then the prefixes kept at shorter depths
    (`kept`: [B, W, d+1] for d = 1..L-2, shallowest first), longest first, each ended with PAD."""
    length = final.shape[2]
    return torch.cat([final, *(nn.functional.pad(k, (0, length - k.shape[2]), value=PAD) for k in kept[::-1])], 1)


def search_tree_beams(width: int, length: int) -> int:
    """Beams of beam_search(..., keep_prefixes=True): W kept at each of the L-1 drafted depths."""
    return width * max(length - 1, 1)
