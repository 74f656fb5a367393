"""Lossless ReDrafter decoding: greedy speculative output equals plain greedy output."""
import pytest
import torch

import redrafter.runtime.decoding as decoding
from redrafter.runtime.config import DecodeConfig
from redrafter.runtime.decoding import Decoder, generate

from conftest import tiny_drafter, tiny_llama

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [42]]


def plain(model, prompts, n, eos=()):
    return [g.token_ids for g in generate(Decoder(model, None, max_batch=len(prompts), max_seq_len=128), prompts, n, eos)]


@pytest.mark.parametrize("width,length,head,draft_vocab", [
    (1, 2, "own", 0), (1, 5, "shared", 0), (2, 3, "own", 0), (4, 4, "shared", 0), (8, 5, "own", 0), (3, 1, "own", 0),
    (4, 4, "shared", 24), (2, 3, "own", 24)])
def test_random_drafter_is_lossless(tiny_model, width, length, head, draft_vocab):
    d = tiny_drafter(tiny_model, head=head, draft_vocab_size=draft_vocab)
    ref = plain(tiny_model, PROMPTS, 30)
    dec = Decoder(tiny_model, d, max_batch=4, max_seq_len=128, decode=DecodeConfig(beam_width=width, beam_length=length))
    got = generate(dec, PROMPTS, 30)
    assert [g.token_ids for g in got] == ref


@pytest.mark.parametrize("width,length,head,lookup,lookup_length", [
    (1, 4, "own", 0, 0), (2, 3, "shared", 0, 0), (4, 5, "own", 0, 0), (8, 4, "shared", 0, 0), (3, 3, "own", 2, 0),
    (2, 3, "shared", 2, 7)])
def test_verifying_the_search_tree_is_lossless(tiny_model, width, length, head, lookup, lookup_length):
    d = tiny_drafter(tiny_model, head=head)
    ref = plain(tiny_model, PROMPTS, 30)
    dec = Decoder(tiny_model, d, max_batch=4, max_seq_len=128, decode=DecodeConfig(beam_width=width, beam_length=length, tree="search", lookup_ngram=lookup, lookup_length=lookup_length))
    assert [g.token_ids for g in generate(dec, PROMPTS, 30)] == ref
    with pytest.raises(ValueError, match="tree='bushy': give one of beams, search"):
        Decoder(tiny_model, d, decode=DecodeConfig(tree="bushy"))


@pytest.mark.parametrize("width,length,lookup,lookup_length", [(1, 4, 3, 0), (3, 3, 2, 0), (2, 5, 1, 0),
                                                                 (1, 2, 3, 8), (3, 3, 2, 6)])
def test_context_lookup_is_lossless(tiny_model, width, length, lookup, lookup_length):
    d = tiny_drafter(tiny_model)
    ref = plain(tiny_model, PROMPTS, 30)
    dec = Decoder(tiny_model, d, max_batch=4, max_seq_len=128, decode=DecodeConfig(beam_width=width, beam_length=length, lookup_ngram=lookup, lookup_length=lookup_length))
    assert [g.token_ids for g in generate(dec, PROMPTS, 30)] == ref


@pytest.mark.parametrize("length,lookup_length", [(4, 0), (2, 6)], ids=["same-length", "longer-lookup"])
def test_a_right_lookup_beam_is_accepted_when_every_drafted_beam_is_wrong(monkeypatch, tiny_model, length,
                                                                          lookup_length):
    """The lookup beam is verified and committed like a drafted one: with oracle lookups and
    drafted beams wrong from their first draft on, every step accepts the lookup beam whole,
    also when it is longer than the drafted beams."""
    ref = plain(tiny_model, PROMPTS, 30)
    vocab = tiny_model.cfg.vocab_size
    dec = Decoder(tiny_model, tiny_drafter(tiny_model), max_batch=4, max_seq_len=128, decode=DecodeConfig(beam_width=2, beam_length=length, lookup_ngram=2, lookup_length=lookup_length))
    longest = max(length, lookup_length)
    stepping = []
    step = dec.step
    monkeypatch.setattr(dec, "step", lambda slots: stepping.append(slots) or step(slots))

    def truth() -> torch.Tensor:
        """[B, L]: each stepping slot's true continuation, its guaranteed token first."""
        rows = []
        for slot in stepping[-1].tolist():
            emitted = int(dec.lengths[slot]) - len(PROMPTS[slot])  # ref index of the guaranteed token
            rows.append((ref[slot][emitted:] + [0] * longest)[:longest])
        return torch.tensor(rows)

    def wrong_beams(head, embed, base_lm_head, context, first_token, width, length, return_log_probs=False,
                    keep_prefixes=False):
        beams = truth()[:, :length]
        beams[:, 1:] = (beams[:, 1:] + 1) % vocab
        return beams[:, None].repeat(1, width, 1), None

    monkeypatch.setattr(decoding, "beam_search", wrong_beams)
    monkeypatch.setattr(decoding, "lookup_beam", lambda history, ends, length, max_ngram, fallback: truth())
    got = generate(dec, PROMPTS, 30)
    assert [g.token_ids for g in got] == ref
    assert all(a == longest - 1 for g in got for a in g.accepted_per_step[:-1])


class OracleBeams:
    """Replaces beam search with beams cut from the true greedy continuation, each corrupted
    at a random depth (or not at all), so steps accept 0..L-1 drafts on varying beams and
    beams share prefixes of varying length."""

    def __init__(self, decoder: Decoder, prompts, reference, seed=0):
        self.decoder, self.prompts, self.reference = decoder, prompts, reference
        self.gen = torch.Generator().manual_seed(seed)
        self.slots: list[int] = []
        step = decoder.step

        def tracked_step(slots):
            self.slots = slots.tolist()
            return step(slots)

        decoder.step = tracked_step

    def __call__(self, head, embed, base_lm_head, context, first_token, width, length, return_log_probs=False,
                 keep_prefixes=False):
        vocab = embed.shape[0]
        beams = torch.empty(len(self.slots), width, length, dtype=torch.long)
        for row, slot in enumerate(self.slots):
            emitted = int(self.decoder.lengths[slot]) - len(self.prompts[slot])
            truth = self.reference[slot][emitted:] + [0] * length
            assert truth[0] == int(first_token[row]), "decoder state diverged from the reference"
            for i in range(width):
                beam = truth[:length]
                cut = int(torch.randint(1, length + 2, (1,), generator=self.gen))  # length+1: intact
                for j in range(cut, length):
                    beam[j] = int(torch.randint(0, vocab, (1,), generator=self.gen))
                beams[row, i] = torch.tensor(beam)
        return beams, None


@pytest.mark.parametrize("width,length", [(1, 4), (3, 4), (6, 6)])
def test_accepting_drafts_commits_the_right_cache_entries(monkeypatch, tiny_model, width, length):
    ref = plain(tiny_model, PROMPTS, 40)
    dec = Decoder(tiny_model, tiny_drafter(tiny_model), max_batch=4, max_seq_len=128, decode=DecodeConfig(beam_width=width, beam_length=length))
    oracle = OracleBeams(dec, PROMPTS, ref)
    monkeypatch.setattr(decoding, "beam_search", oracle)
    got = generate(dec, PROMPTS, 40)
    assert [g.token_ids for g in got] == ref
    accepted = [a for g in got for a in g.accepted_per_step]
    assert max(accepted) == length - 1 and len(set(accepted)) >= 2  # full and partial acceptance
    if width == 1:
        assert min(accepted) == 0
    assert sum(g.tokens_per_step for g in got) / len(got) > 1.5


def test_eos_and_max_new_tokens_stop_generation(tiny_model):
    ref = plain(tiny_model, PROMPTS[:1], 30)[0]
    eos = ref[10]
    first = ref.index(eos)
    dec = Decoder(tiny_model, tiny_drafter(tiny_model), max_batch=1, max_seq_len=128, decode=DecodeConfig(beam_width=4, beam_length=4))
    assert generate(dec, PROMPTS[:1], 30, eos_ids=[eos])[0].token_ids == ref[: first + 1]
    assert generate(dec, PROMPTS[:1], 7)[0].token_ids == ref[:7]


def test_bad_requests_are_rejected_clearly(tiny_model):
    dec = Decoder(tiny_model, tiny_drafter(tiny_model), max_batch=2, max_seq_len=32)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        generate(dec, [[1] * 20], 20)
    with pytest.raises(ValueError, match="3 prompts but the decoder has 2 slots"):
        generate(dec, [[1], [2], [3]], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(dec, [[1]], 0)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(dec, [[]], 4)
    other = tiny_llama(vocab=50)
    with pytest.raises(ValueError, match="does not fit the base model"):
        Decoder(other, tiny_drafter(tiny_model))


@pytest.mark.slow
@pytest.mark.parametrize("width,length", [(1, 4), (4, 4), (8, 5)])
def test_smollm2_lossless_batch_1_and_4(monkeypatch, smollm2, mtbench_prompts, width, length):
    """The real model, four MT-Bench prompts: each alone, and all four batched (different prompt
    lengths), ReDrafter equals plain greedy decoding, with the shipped drafter and with oracle beams."""
    from redrafter.runtime.drafter import load_drafter
    from redrafter.runtime.pipeline import default_drafter_dir

    m = smollm2.model
    prompts = [smollm2.encode_chat(p) for p in mtbench_prompts]
    assert len(prompts) == 4 and len({len(p) for p in prompts}) >= 3
    n = 24
    ref = [plain(m, [p], n, smollm2.eos_ids)[0] for p in prompts]
    drafter = load_drafter(default_drafter_dir())
    solo = Decoder(m, drafter, max_batch=1, max_seq_len=512, decode=DecodeConfig(beam_width=width, beam_length=length))
    assert [generate(solo, [p], n, smollm2.eos_ids)[0].token_ids for p in prompts] == ref
    batched = Decoder(m, drafter, max_batch=4, max_seq_len=512, decode=DecodeConfig(beam_width=width, beam_length=length))
    assert [g.token_ids for g in generate(batched, prompts, n, smollm2.eos_ids)] == ref
    oracle_dec = Decoder(m, drafter, max_batch=4, max_seq_len=512, decode=DecodeConfig(beam_width=width, beam_length=length))
    monkeypatch.setattr(decoding, "beam_search", OracleBeams(oracle_dec, prompts, ref))
    got = generate(oracle_dec, prompts, n, smollm2.eos_ids)
    assert [g.token_ids for g in got] == ref
    assert max(a for g in got for a in g.accepted_per_step) == length - 1


@pytest.mark.slow
def test_smollm2_with_context_lookup_is_lossless_and_takes_fewer_steps(smollm2, mtbench_prompts):
    """The real model repeats phrases of its prompt and of its own answer: the lookup beam is
    accepted often enough to save steps, more so when it is longer than the drafted beam, and the
    output stays plain greedy decoding's."""
    from redrafter.runtime.drafter import load_drafter
    from redrafter.runtime.pipeline import default_drafter_dir

    m, drafter = smollm2.model, load_drafter(default_drafter_dir())
    prompts = [smollm2.encode_chat(p) for p in mtbench_prompts]
    ref = [g.token_ids for g in generate(Decoder(m, None, max_batch=4, max_seq_len=512), prompts, 64, smollm2.eos_ids)]
    steps = {}
    for lookup, lookup_length in ((0, 0), (3, 0), (3, 16)):
        dec = Decoder(m, drafter, max_batch=4, max_seq_len=512, decode=DecodeConfig(beam_width=1, beam_length=4, lookup_ngram=lookup, lookup_length=lookup_length))
        got = generate(dec, prompts, 64, smollm2.eos_ids)
        assert [g.token_ids for g in got] == ref
        steps[lookup, lookup_length] = sum(g.steps for g in got)
    assert steps[3, 0] < 0.95 * steps[0, 0]
    assert steps[3, 16] < steps[3, 0]


@pytest.mark.slow
def test_smollm2_search_tree_is_lossless_and_takes_fewer_steps_than_its_final_beams(smollm2, mtbench_prompts):
    """The prefixes beam search pruned on the way are often the right ones: verifying them too
    (1 + W(L-1) tokens) saves steps over the W final beams, and the output stays plain greedy's."""
    from redrafter.runtime.drafter import load_drafter
    from redrafter.runtime.pipeline import default_drafter_dir

    m, drafter = smollm2.model, load_drafter(default_drafter_dir())
    prompts = [smollm2.encode_chat(p) for p in mtbench_prompts]
    ref = [g.token_ids for g in generate(Decoder(m, None, max_batch=4, max_seq_len=512), prompts, 64, smollm2.eos_ids)]
    steps = {}
    for tree in ("beams", "search"):
        dec = Decoder(m, drafter, max_batch=4, max_seq_len=512, decode=DecodeConfig(beam_width=4, beam_length=4, tree=tree))
        got = generate(dec, prompts, 64, smollm2.eos_ids)
        assert [g.token_ids for g in got] == ref
        steps[tree] = sum(g.steps for g in got)
    assert steps["search"] < 0.95 * steps["beams"]
