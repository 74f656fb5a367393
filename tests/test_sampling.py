"""Sampling: parameters, the processed distribution, and exactness of ReDrafter sampling.

Exactness is shown three ways on a tiny model with an 8-token vocabulary:
- seeded ReDrafter sampling emits token for token what seeded plain sampling emits (each
  emitted token consumes the request's next uniform, whatever the beam shape);
- thousands of ReDrafter samples of the first three tokens fit the exact joint distribution
  enumerated from the base model (G-test, threshold fixed in advance: p > 1e-3);
- the same test rejects Apple's accept-if-u<P/Q rule with beam drafts (p < 1e-6).
"""
from __future__ import annotations


import pytest
import torch

from redrafter.runtime.config import DecodeConfig
from conftest import tiny_drafter, tiny_llama
from redrafter.runtime.acceptance import greedy_accept, tree_walk
from redrafter.runtime.beam_search import beam_search
from redrafter.runtime.decoding import Decoder, generate
from redrafter.runtime.model import causal_mask
from redrafter.runtime.sampling import SamplingParams, SlotSampler, draw, processed_probs
from redrafter.runtime.tree import pack_beams

# ---------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("max_new_tokens", -3), ("max_new_tokens", 2.5),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -1.0), ("top_k", -1), ("top_k", 1.5),
    ("seed", -1), ("seed", "7"), ("stop_token_ids", [-2]), ("stop_token_ids", "2"),
    ("stop", [""]), ("stop", [3]), ("ignore_eos", "yes"),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value})


def test_from_dict_rejects_unknown_fields_and_normalizes():
    with pytest.raises(ValueError, match=r"unknown sampling parameter\(s\) \['max_tokens'\]"):
        SamplingParams.from_dict({"max_tokens": 5})
    p = SamplingParams.from_dict({"max_new_tokens": 5, "temperature": 1, "stop": "END", "stop_token_ids": [3, 4]})
    assert p == SamplingParams(max_new_tokens=5, temperature=1.0, stop=("END",), stop_token_ids=(3, 4))
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)
    assert SamplingParams().greedy and not p.greedy


def test_greedy_params_have_no_sampler():
    with pytest.raises(ValueError, match="greedy"):
        SlotSampler(SamplingParams())


# ------------------------------------------------------------- processed distribution


def _probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    n = logits.shape[0]
    return processed_probs(logits, torch.full((n,), float(temperature)), torch.full((n,), top_k),
                           torch.full((n,), float(top_p)))


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(_probs(logits, 0.5), (logits / 0.5).softmax(-1))
    torch.testing.assert_close(_probs(logits, 3.0), (logits / 3.0).softmax(-1))


def test_top_k_keeps_the_k_most_likely_renormalized():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 1.0]])
    p = _probs(logits, top_k=2)
    expected = torch.zeros(1, 5)
    expected[0, [1, 3]] = torch.tensor([3.0, 2.0]).softmax(-1)
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(_probs(logits, top_k=99), logits.softmax(-1))  # k >= V: no filter


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    # Mass before each token in descending order: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95.
    torch.testing.assert_close(_probs(logits, top_p=0.8), torch.tensor([[0, 0.5 / 0.8, 0, 0.3 / 0.8]]))
    torch.testing.assert_close(_probs(logits, top_p=0.81), torch.tensor([[0.15, 0.5, 0, 0.3]]) / 0.95)
    torch.testing.assert_close(_probs(logits, top_p=0.2), torch.tensor([[0.0, 1, 0, 0]]))


def test_filters_apply_per_row():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 3)
    p = processed_probs(logits, torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0, 2, 0]), torch.tensor([1.0, 1.0, 0.5]))
    torch.testing.assert_close(p[0], logits[0].softmax(-1))
    torch.testing.assert_close(p[1], torch.cat((torch.zeros(2), torch.tensor([1.0, 1.5]).softmax(-1))))
    torch.testing.assert_close(p[2], torch.tensor([0.0, 0, 0, 1]))  # softmax puts 0.64 on token 3


def test_draw_is_the_inverse_cdf_and_never_picks_a_filtered_token():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75]]).expand(6, 4)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.9999, 1 - 1e-12], dtype=torch.float64)
    assert draw(probs, u).tolist() == [1, 1, 3, 3, 3, 3]


def test_uniform_stream_depends_only_on_seed_and_position():
    a, b = SlotSampler(SamplingParams(temperature=1.0, seed=5)), SlotSampler(SamplingParams(temperature=1.0, seed=5))
    straight = a.peek(200).clone()
    got = []
    for n in (3, 1, 70, 5, 121):  # consumed in uneven pieces across the refill boundary
        got.append(b.peek(n).clone())
        b.consume(n)
    torch.testing.assert_close(torch.cat(got), straight)
    assert not torch.equal(SlotSampler(SamplingParams(temperature=1.0, seed=6)).peek(8), straight[:8])


# ------------------------------------------------------------------- the tree walk


def test_walk_with_argmax_emits_exactly_what_greedy_acceptance_emits():
    """On random trees and base predictions: the walk's argmax path is greedy acceptance."""
    torch.manual_seed(0)
    b, w, l, v = 64, 4, 5, 3  # a tiny vocabulary makes shared prefixes and long matches common
    beams = torch.randint(0, v, (b, w, l))
    beams[:, :, 0] = beams[:, :1, 0]  # every beam starts with the guaranteed token
    packed = pack_beams(beams)
    table = torch.randint(0, v, packed.tokens.shape)  # base argmax at each packed node
    rows = torch.arange(b)
    walk = tree_walk(packed, l, lambda node, d: table[rows, node])
    predicted = table.gather(1, packed.unpacker.view(b, w * l)).view(b, w, l)
    acc = greedy_accept(beams, predicted)
    assert torch.equal(walk.counts, acc.accepted + 1)
    path = packed.unpacker[rows, acc.beam]
    for r in range(b):
        n = int(acc.accepted[r])
        assert walk.tokens[r, :n + 1].tolist() == beams[r, acc.beam[r], 1:n + 1].tolist() + [int(acc.bonus[r])]
        assert walk.path[r, :n + 1].tolist() == path[r, :n + 1].tolist()
        assert walk.path[r, n + 1:].tolist() == list(range(n + 1, l))  # padding: no-op commits
    assert (acc.accepted > 0).any() and (acc.accepted == 0).any()


# ----------------------------------------------------------------- exact sampling

V = 8
PROMPT = [1, 2, 3, 4, 5]
FILTERS = [dict(temperature=0.9), dict(temperature=1.3, top_k=5, top_p=0.9)]


@pytest.fixture(scope="module")
def small_vocab():
    model = tiny_llama(vocab=V)
    return model, tiny_drafter(model)


def _sample(decoder: Decoder, seeds: list[int], n_tokens: int, **filters) -> list[list[int]]:
    """The first n_tokens of one seeded request per slot, all slots decoded together."""
    slots = list(range(len(seeds)))
    samplers = [SlotSampler(SamplingParams(seed=s, **filters)) for s in seeds]
    out = [[t] for t in decoder.prefill_batch(slots, [PROMPT] * len(seeds), samplers)]
    while min(len(o) for o in out) < n_tokens:
        step = decoder.step(torch.tensor(slots))
        for o, row, c in zip(out, step.tokens.tolist(), step.counts.tolist()):
            o += row[:c]
    return [o[:n_tokens] for o in out]


@pytest.mark.parametrize("filters", FILTERS, ids=["t0.9", "t1.3-k5-p0.9"])
@pytest.mark.parametrize("shape", [(3, 4, 0, 0, "beams"), (8, 3, 0, 0, "beams"), (2, 6, 0, 0, "beams"),
                                   (1, 5, 3, 0, "beams"), (2, 2, 3, 7, "beams"), (3, 4, 0, 0, "search"),
                                   (2, 3, 3, 6, "search")],
                         ids=lambda s: f"W{s[0]}L{s[1]}" + (f"+lookup{s[2]}" if s[2] else "")
                         + (f"L{s[3]}" if s[3] else "") + ("-search" if s[4] == "search" else ""))
def test_seeded_redrafter_sampling_equals_seeded_plain_sampling(small_vocab, shape, filters):
    model, drafter = small_vocab
    seeds = list(range(64))
    plain = _sample(Decoder(model, None, max_batch=64, max_seq_len=32), seeds, 16, **filters)
    spec_decoder = Decoder(model, drafter, max_batch=64, max_seq_len=32, decode=DecodeConfig(beam_width=shape[0], beam_length=shape[1], tree=shape[4], lookup_ngram=shape[2], lookup_length=shape[3]))
    spec = _sample(spec_decoder, seeds, 16, **filters)
    assert spec == plain
    assert len({tuple(s) for s in spec}) > 32  # the seeds really give different samples


def test_mixed_batch_keeps_greedy_rows_exactly_greedy(small_vocab):
    model, drafter = small_vocab
    prompts = [[1, 2, 3], [4, 5, 6, 7], [2, 2], [7, 1, 3, 3, 0]]
    greedy = [g.token_ids for g in generate(Decoder(model, None, max_batch=4, max_seq_len=40), prompts, 20)]
    dec = Decoder(model, drafter, max_batch=4, max_seq_len=40, decode=DecodeConfig(beam_width=3, beam_length=4))
    samplers = [None, SlotSampler(SamplingParams(temperature=1.0, seed=1)), None,
                SlotSampler(SamplingParams(temperature=1.0, seed=2))]
    out = [[t] for t in dec.prefill_batch([0, 1, 2, 3], prompts, samplers)]
    while min(len(o) for o in out) < 20:
        step = dec.step(torch.arange(4))
        for o, row, c in zip(out, step.tokens.tolist(), step.counts.tolist()):
            o += row[:c]
    assert out[0][:20] == greedy[0] and out[2][:20] == greedy[2]
    assert out[1][:20] != greedy[1] or out[3][:20] != greedy[3]


def _exact_joint(model, filters: dict) -> torch.Tensor:
    """P(t1, t2, t3 | PROMPT) [V, V, V] by enumeration: one causal forward over all V^2 continuations."""
    seqs = torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])
    n, (rows, t) = len(PROMPT), seqs.shape
    cache = model.new_cache(rows, t)
    hidden = model(seqs, torch.arange(t)[None].expand(rows, t), cache, torch.arange(rows),
                   torch.zeros(rows, dtype=torch.long), causal_mask(rows, t))
    p = _probs(model.logits(hidden[:, n - 1:]).reshape(-1, V), filters.get("temperature", 1.0),
               filters.get("top_k", 0), filters.get("top_p", 1.0)).view(V, V, 3, V).double()
    return p[0, 0, 0][:, None, None] * p[:, 0, 1][:, :, None] * p[:, :, 2]


def _g_test(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of the G-test that counts were drawn from probs; cells expecting fewer than
    min_expected samples are pooled into one (zero-probability cells must stay empty)."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    assert counts[probs == 0].sum() == 0, "a token outside the support was sampled"
    expected = probs * counts.sum()
    small = expected < min_expected
    obs = torch.cat((counts[~small], counts[small].sum()[None]))
    exp = torch.cat((expected[~small], expected[small].sum()[None]))
    obs, exp = obs[exp > 0], exp[exp > 0]
    g = 2 * (obs[obs > 0] * (obs[obs > 0] / exp[obs > 0]).log()).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), g / 2))


def _histogram(samples: list[list[int]], dims: int) -> torch.Tensor:
    counts = torch.zeros((V,) * dims)
    for s in samples:
        counts[tuple(s[:dims])] += 1
    return counts


def apple_rule_first_token(decoder: Decoder, slots: torch.Tensor, filters: dict, gen: torch.Generator) -> torch.Tensor:
    """KNOWN-BIASED REFERENCE, not product code: Apple's rule for one step (accept drafted
    token x if u < P(x)/Q(x), Q = the drafter's beam-search distribution; keep the beam with
    the most accepted tokens; on rejection resample from relu(P - Q)). Returns the first
    token the step emits. Beam drafts are the deterministic top-W paths, not draws from Q,
    so P/Q acceptance does not reproduce P."""
    m, head = decoder.model, decoder.drafter
    w, l = decoder.config.beam_width, decoder.config.beam_length
    starts = decoder.lengths[slots]
    beams, log_q = beam_search(head, m.embed.weight, None, decoder.hidden[slots], decoder.next_token[slots],
                               w, l, return_log_probs=True)
    packed = pack_beams(beams)
    hidden = m(packed.tokens, starts[:, None] + packed.depth, decoder.cache, slots, starts, packed.mask)
    b, t, _ = hidden.shape
    p = _probs(m.logits(hidden).view(b * t, V), filters.get("temperature", 1.0), filters.get("top_k", 0),
               filters.get("top_p", 1.0)).view(b, t, V)
    p = p.gather(1, packed.unpacker.view(b, w * l, 1).expand(-1, -1, V)).view(b, w, l, V)
    q = log_q.exp()  # [B, W, L-1, V]
    drafts = beams[:, :, 1:, None]
    ratio = p[:, :, :-1].gather(-1, drafts)[..., 0] / q.gather(-1, drafts)[..., 0]
    accepted = (torch.rand(ratio.shape, generator=gen) < ratio).int().cumprod(-1).sum(-1)  # [B, W]
    n, beam = accepted.max(-1)
    rows = torch.arange(b)
    residual = (p[rows, beam, 0] - q[rows, beam, 0]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, beam, 0])
    resampled = torch.multinomial(residual, 1, generator=gen)[:, 0]
    return torch.where(n >= 1, beams[rows, beam, 1], resampled)


def _prefill(dec: Decoder, filters: dict) -> tuple[torch.Tensor, list[int]]:
    """One seeded request per slot of `dec`, all on PROMPT: (slots, first tokens)."""
    n = dec.cache.slots
    samplers = [SlotSampler(SamplingParams(seed=s, **filters)) for s in range(n)]
    return torch.arange(n), dec.prefill_batch(list(range(n)), [PROMPT] * n, samplers)


def _first_three(dec: Decoder, slots: torch.Tensor, first: list[int]) -> tuple[list[list[int]], list[int]]:
    """Step until every request has three tokens: (tokens, tokens emitted by each step)."""
    out, emitted = [[t] for t in first], []
    while min(len(o) for o in out) < 3:
        step = dec.step(slots)
        emitted += step.counts.tolist()
        for o, row, c in zip(out, step.tokens.tolist(), step.counts.tolist()):
            o += row[:c]
    return out, emitted


@pytest.mark.parametrize("filters", FILTERS, ids=["t0.9", "t1.3-k5-p0.9"])
@pytest.mark.parametrize("length,lookup_length", [(4, 0), (2, 4)], ids=["same-length", "longer-lookup"])
def test_sampling_with_a_lookup_beam_matches_the_exact_distribution(small_vocab, filters, length, lookup_length):
    """W=1 drafts plus the context lookup beam: with 8 tokens most sampled tokens occurred in PROMPT
    before, so the beam copies what followed them there (about 2% more tokens per step than W=1 alone).
    A lookup beam longer than the drafted one ends those in PAD: the walk must stop at their ends."""
    model, drafter = small_vocab
    dec = Decoder(model, drafter, max_batch=4000, max_seq_len=16, decode=DecodeConfig(beam_width=1, beam_length=length, lookup_ngram=2, lookup_length=lookup_length))
    slots, first = _prefill(dec, filters)
    out, emitted = _first_three(dec, slots, first)
    assert {2, 3} <= set(emitted)
    p = _g_test(_histogram(out, 3), _exact_joint(model, filters))
    assert p > 1e-3, f"samples with a lookup beam do not fit the exact distribution (p={p:.2e})"


@pytest.mark.parametrize("filters", FILTERS, ids=["t0.9", "t1.3-k5-p0.9"])
def test_sampling_over_the_search_tree_matches_the_exact_distribution(small_vocab, filters):
    """W=3, L=4 verifying every prefix the beam search kept: the walk may now leave the final
    beams for a pruned prefix (a PAD-ended beam) and must stop at its end."""
    model, drafter = small_vocab
    dec = Decoder(model, drafter, max_batch=4000, max_seq_len=16, decode=DecodeConfig(beam_width=3, beam_length=4, tree="search"))
    slots, first = _prefill(dec, filters)
    out, emitted = _first_three(dec, slots, first)
    assert {1, 2, 3} <= set(emitted)
    p = _g_test(_histogram(out, 3), _exact_joint(model, filters))
    assert p > 1e-3, f"samples over the search tree do not fit the exact distribution (p={p:.2e})"


@pytest.mark.parametrize("filters", FILTERS, ids=["t0.9", "t1.3-k5-p0.9"])
def test_redrafter_sampling_matches_the_exact_distribution_and_apples_rule_does_not(small_vocab, filters):
    """4000 seeded requests decoded together with W=3, L=4 (the walk both follows and leaves
    the tree, at several depths): the joint law of the first three tokens fits the exact one."""
    model, drafter = small_vocab
    exact = _exact_joint(model, filters)
    dec = Decoder(model, drafter, max_batch=4000, max_seq_len=16, decode=DecodeConfig(beam_width=3, beam_length=4))
    slots, first = _prefill(dec, filters)

    # Apple's rule from the same states (its forward only writes scratch KV entries).
    apple_second = apple_rule_first_token(dec, slots, filters, torch.Generator().manual_seed(0))
    apple = _histogram([[a, b] for a, b in zip(first, apple_second.tolist())], 2)

    out, emitted = _first_three(dec, slots, first)
    assert {1, 2, 3} <= set(emitted)  # trees were left at the root, after one and after two drafts
    p_redrafter = _g_test(_histogram(out, 3), exact)
    p_apple = _g_test(apple, exact.sum(-1))
    assert p_redrafter > 1e-3, f"ReDrafter samples do not fit the exact distribution (p={p_redrafter:.2e})"
    assert p_apple < 1e-6, f"the test failed to detect the Apple rule's bias (p={p_apple:.2e})"
    # Same law on the pairs the Apple rule produced, so the comparison is like for like.
    assert _g_test(_histogram(out, 2), exact.sum(-1)) > 1e-3
