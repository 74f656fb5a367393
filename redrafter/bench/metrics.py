"""Figures for one system over all its runs, and output comparisons against plain decoding.

Conventions (the paper's and vLLM's): tokens per step = accepted drafts + the bonus token;
acceptance at draft position k = the fraction of steps that accepted at least k drafts.
Decode-only throughput leaves out the prefill phase: tokens after each prompt's first one,
divided by the time after the group's last first token.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean

from .systems import Run


def figures(runs: list[Run], draft_len: int | None) -> dict:
    """draft_len: L-1 for ReDrafter (acceptance by position is reported), 0 for plain, None for peers."""
    prompts = sum(len(r.outputs) for r in runs)
    tokens = sum(len(o) for r in runs for o in r.outputs)
    seconds = sum(r.seconds for r in runs)
    prefill = sum(max(r.first_token_s) for r in runs)
    decode_s = seconds - prefill
    out = {
        "prompts": prompts, "tokens": tokens, "seconds": seconds, "prefill_seconds": prefill,
        "tok_per_s": tokens / seconds,
        "decode_tok_per_s": (tokens - prompts) / decode_s if tokens > prompts and decode_s > 0 else None,
        "ttft_s": fmean(t for r in runs for t in r.first_token_s),
        "tokens_per_step": None, "mean_accepted": None, "acceptance_by_position": None,
    }
    if draft_len == 0:
        out["tokens_per_step"] = 1.0
    elif draft_len:
        accepted = [a for r in runs for row in r.accepted_per_step for a in row]
        if accepted:
            out["tokens_per_step"] = fmean(a + 1 for a in accepted)
            out["mean_accepted"] = fmean(accepted)
            out["acceptance_by_position"] = [sum(a >= k for a in accepted) / len(accepted)
                                             for k in range(1, draft_len + 1)]
    return out


@dataclass
class Mismatch:
    prompt: int  # index into the benchmark's prompts
    position: int  # first generated token that differs
    expected: list[int]  # reference tokens from `position` (a few)
    got: list[int]

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "position": self.position, "expected": self.expected, "got": self.got}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def mismatches(reference: list[list[int]], outputs: list[list[int]], window: int = 6) -> list[Mismatch]:
    found = []
    for i, (ref, got) in enumerate(zip(reference, outputs, strict=True)):
        pos = first_difference(ref, got)
        if pos is not None:
            found.append(Mismatch(i, pos, ref[pos:pos + window], got[pos:pos + window]))
    return found


def agreement(reference: list[list[int]], outputs: list[list[int]]) -> dict:
    """How closely a peer follows our greedy outputs: exact-match share and mean shared-prefix share."""
    prefix = []
    for ref, got in zip(reference, outputs, strict=True):
        pos = first_difference(ref, got)
        prefix.append(1.0 if pos is None else pos / max(len(ref), len(got)))
    return {"exact": sum(p == 1.0 for p in prefix) / len(prefix), "prefix": fmean(prefix)}
