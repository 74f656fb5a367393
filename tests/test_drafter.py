"""The draft head: recurrence, Apple checkpoint layout, shared-head variant, beam drafting."""
import json

import pytest
import torch
from safetensors.torch import load_file

from redrafter.runtime.beam_search import beam_search
from redrafter.runtime.drafter import DraftHead, DrafterConfig, load_drafter, save_drafter

from conftest import tiny_drafter, tiny_llama


@pytest.mark.parametrize("head,rnn,exit_dim,draft_vocab", [
    ("own", True, 128, 0), ("own", False, 128, 0), ("own", True, 96, 0), ("shared", True, 128, 0),
    ("own", True, 128, 20), ("shared", True, 128, 20)])
def test_save_load_gives_identical_logits(tmp_path, head, rnn, exit_dim, draft_vocab):
    model = tiny_llama()
    cfg = DrafterConfig(vocab_size=97, hidden_size=64, exit_dim=exit_dim, num_draft_layers=2, rnn=rnn, head=head,
                        draft_vocab_size=draft_vocab)
    torch.manual_seed(3)
    d = DraftHead(cfg, torch.arange(0, 3 * draft_vocab, 3) if draft_vocab else None).eval()
    for p in d.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_drafter(d, tmp_path / "drafter")
    loaded = load_drafter(tmp_path / "drafter")
    h, s = torch.randn(2, 64), torch.randn(2, 64)
    emb = model.embed.weight[:2]
    for m in (d, loaded):
        m.out = m.logits(h, m.step(s, emb), m.output_weight(model.lm_head.weight))
    assert torch.equal(d.out, loaded.out) and d.out.shape[-1] == (draft_vocab or 97)
    if draft_vocab:
        assert torch.equal(loaded.draft_vocab, d.draft_vocab)


def test_checkpoint_uses_apples_layout(tmp_path):
    d = DraftHead(DrafterConfig.for_base(97, 64, head="own"))
    save_drafter(d, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["model_type"] == "recurrent_drafting_drafter"
    assert {cfg[k] for k in ("vocab_size", "hidden_size", "exit_dim", "num_draft_layers")} == {97, 64, 128, 2}
    keys = set(load_file(str(tmp_path / "d" / "model.safetensors")))
    assert keys == {"lm_head.0.linear.weight", "lm_head.0.linear.bias", "lm_head.1.linear.weight",
                    "lm_head.1.linear.bias", "lm_head.2.weight", "rnn_u.weight", "rnn_u.bias", "rnn_w.weight"}
    assert load_file(str(tmp_path / "d" / "model.safetensors"))["lm_head.2.weight"].shape == (97, 128)


def test_shared_head_is_small_and_uses_the_base_lm_head():
    own = DraftHead(DrafterConfig.for_base(49152, 576, head="own"))
    shared = DraftHead(DrafterConfig.for_base(49152, 576, head="shared"))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(shared) < 5_000_000 < 50_000_000 < count(own)
    with pytest.raises(ValueError, match="LM head"):
        shared.logits(torch.zeros(1, 576), torch.zeros(1, 576), None)


def test_recurrence_matches_the_paper():
    d = tiny_drafter(tiny_llama())
    s0, e = torch.zeros(1, 64), torch.randn(1, 64)
    s1 = d.step(s0, e)
    assert torch.allclose(s1, torch.nn.functional.silu(e @ d.rnn_w.weight.t() + d.rnn_u.bias))
    cum = DraftHead(DrafterConfig(97, 64, 128, 2, rnn=False))
    assert torch.equal(cum.step(s1, e), s1 + e)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        load_drafter(tmp_path)
    d = DraftHead(DrafterConfig.for_base(97, 64))
    save_drafter(d, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg | {"hidden_size": 32}))
    with pytest.raises(ValueError, match="do not match its config.json"):
        load_drafter(tmp_path / "d")
    cfg = DrafterConfig.for_base(97, 64, draft_vocab_size=3)
    with pytest.raises(ValueError, match="increasing token ids"):
        DraftHead(cfg, torch.tensor([5, 2, 9]))
    with pytest.raises(ValueError, match="increasing token ids"):
        DraftHead(cfg, torch.tensor([1, 2, 97]))
    with pytest.raises(ValueError, match="has 2 ids"):
        DraftHead(cfg, torch.tensor([1, 2]))


def reference_beam_search(d, model, h, first, w, l):
    """Exhaustive search over all V^(L-1) continuations, keeping the top W by summed log-prob."""
    import itertools

    v = model.cfg.vocab_size
    scored = []
    for seq in itertools.product(range(v), repeat=l - 1):
        s, total, prev = torch.zeros(64), 0.0, first
        for tok in seq:
            s = d.step(s, model.embed.weight[prev])
            total += torch.log_softmax(d.logits(h, s, None), -1)[tok].item()
            prev = tok
        scored.append((total, (first,) + seq))
    scored.sort(key=lambda x: -x[0])
    return [list(seq) for _, seq in scored[:w]]


def test_beam_search_keeps_the_best_beams():
    """With a vocabulary of 5 and L=3 every candidate can be enumerated; beam search with
    W >= V^(L-2) is exact, so its beams must be the global top W."""
    model = tiny_llama(vocab=5)
    d = tiny_drafter(model)
    h = torch.randn(1, 64)
    beams, logp = beam_search(d, model.embed.weight, None, h, torch.tensor([3]), width=5, length=3,
                              return_log_probs=True)
    assert beams.shape == (1, 5, 3) and logp.shape == (1, 5, 2, 5)
    assert beams[0].tolist() == reference_beam_search(d, model, h[0], 3, 5, 3)
    # The returned log-probs belong to each beam's own history.
    step1 = torch.log_softmax(d.logits(h, d.step(torch.zeros(1, 64), model.embed.weight[[3]]), None), -1)
    assert torch.allclose(logp[0, :, 0], step1.expand(5, -1))


def test_the_search_tree_holds_the_prefixes_beam_search_kept_at_every_depth():
    """Beam search to length L keeps W prefixes at each depth; they are the final beams of the same
    search stopped there. keep_prefixes returns them all (final beams first), PAD-ended, and they
    pack into 1 + W(L-1) distinct tokens."""
    from redrafter.runtime.beam_search import search_tree_beams
    from redrafter.runtime.tree import PAD, pack_beams

    model = tiny_llama()
    d = tiny_drafter(model)
    h, first, w, length = torch.randn(3, 64), torch.tensor([4, 9, 11]), 4, 5
    tree, _ = beam_search(d, model.embed.weight, None, h, first, w, length, keep_prefixes=True)
    assert tree.shape == (3, search_tree_beams(w, length), length) == (3, 16, 5)
    for i, depth in enumerate(range(length - 1, 0, -1)):
        stopped, _ = beam_search(d, model.embed.weight, None, h, first, w, depth + 1)
        assert torch.equal(tree[:, i * w:(i + 1) * w, :depth + 1], stopped)
        assert (tree[:, i * w:(i + 1) * w, depth + 1:] == PAD).all()
    assert pack_beams(tree).n_tokens.tolist() == [1 + w * (length - 1)] * 3
    assert pack_beams(tree[:, :w]).n_tokens.max() < 1 + w * (length - 1)  # the final beams share prefixes
    with pytest.raises(ValueError, match="without log-probs"):
        beam_search(d, model.embed.weight, None, h, first, w, length, return_log_probs=True, keep_prefixes=True)


def test_first_step_expands_only_the_guaranteed_token():
    model = tiny_llama()
    d = tiny_drafter(model)
    beams, _ = beam_search(d, model.embed.weight, None, torch.randn(2, 64), torch.tensor([4, 9]), width=6, length=2)
    assert beams[:, :, 0].tolist() == [[4] * 6, [9] * 6]
    assert all(len(set(row)) == 6 for row in beams[:, :, 1].tolist())  # six distinct children


@pytest.mark.parametrize("head", ["own", "shared"])
def test_a_draft_vocabulary_restricts_beams_to_its_tokens_and_changes_nothing_else(head):
    """A head over 9 of 97 tokens drafts exactly what the whole-vocabulary head drafts when
    every other token's logit is -inf."""
    model = tiny_llama()
    full = tiny_drafter(model, head)
    vocab = torch.tensor([1, 4, 9, 16, 25, 36, 49, 64, 81])
    sub = DraftHead(DrafterConfig.for_base(97, 64, head=head, draft_vocab_size=9), vocab).eval()
    state = full.state_dict()
    if head == "own":
        state["lm_head.2.weight"] = state["lm_head.2.weight"][vocab]
    sub.load_state_dict(state | {"draft_vocab": vocab})
    mask = torch.full((97,), float("-inf"))
    mask[vocab] = 0.0
    unmasked = full.logits
    full.logits = lambda *args: unmasked(*args) + mask
    h, first = torch.randn(3, 64), torch.tensor([2, 9, 50])
    want, _ = beam_search(full, model.embed.weight, full.output_weight(model.lm_head.weight), h, first, 4, 4)
    got, _ = beam_search(sub, model.embed.weight, sub.output_weight(model.lm_head.weight), h, first, 4, 4)
    assert torch.equal(got, want)
    assert set(got[:, :, 1:].flatten().tolist()) <= set(vocab.tolist())
