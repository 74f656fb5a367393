"""Packing beams into a tree: checked against the paper's example and a brute-force reference."""
import torch

from redrafter.runtime.tree import PAD, pack_beams, prefix_tree


def brute_force(beams: list[list[int]]):
    """Packed tokens, unpacker, depths and mask by walking prefixes one beam at a time."""
    index: dict[tuple[int, ...], int] = {}
    tokens, depth = [], []
    unpacker = []
    for beam in beams:
        row = []
        for j in range(len(beam)):
            prefix = tuple(beam[: j + 1])
            if prefix not in index:
                index[prefix] = len(tokens)
                tokens.append(beam[j])
                depth.append(j)
            row.append(index[prefix])
        unpacker.append(row)
    n = len(tokens)
    mask = [[False] * n for _ in range(n)]
    for prefix, i in index.items():
        for k in range(1, len(prefix) + 1):
            mask[i][index[prefix[:k]]] = True
    return tokens, depth, unpacker, mask


def test_paper_example():
    beams = torch.tensor([[[101, 102, 103, 104], [101, 102, 203, 204], [101, 102, 303, 104]]])
    p = pack_beams(beams)
    assert p.tokens.tolist() == [[101, 102, 103, 104, 203, 204, 303, 104]]
    assert p.unpacker.tolist() == [[[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6, 7]]]
    assert p.depth.tolist() == [[0, 1, 2, 3, 2, 3, 2, 3]]
    assert p.n_tokens.tolist() == [8]
    # Token 203 (packed 4) sees 101, 102 and itself, not 103/104.
    assert p.mask[0, 4].tolist() == [True, True, False, False, True, False, False, False]


def test_prefix_tree_points_at_first_beam_sharing_the_prefix():
    beams = torch.tensor([[[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 2, 3]]])
    assert prefix_tree(beams).tolist() == [[[0, 0, 0], [0, 0, 1], [0, 2, 2], [0, 0, 0]]]


def test_random_beams_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        b, w, l = 3, int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(1, 6, (1,), generator=gen))
        vocab = 2 + trial % 4  # tiny vocabularies force shared prefixes and duplicate beams
        beams = torch.randint(0, vocab, (b, w, l), generator=gen)
        beams[:, :, 0] = beams[:, :1, 0]  # every beam starts with the guaranteed token
        p = pack_beams(beams)
        for row in range(b):
            tokens, depth, unpacker, mask = brute_force(beams[row].tolist())
            n = len(tokens)
            assert p.n_tokens[row] == n
            assert p.tokens[row, :n].tolist() == tokens
            assert p.depth[row, :n].tolist() == depth
            assert p.unpacker[row].tolist() == unpacker
            assert p.mask[row, :n, :n].tolist() == mask
            # Padding sees only itself and is seen by nobody.
            pad = p.mask[row, n:, :]
            assert torch.equal(pad, torch.eye(p.tokens.shape[1], dtype=torch.bool)[n:])
            assert not p.mask[row, :n, n:].any()


def test_beams_ending_in_pad_pack_only_their_real_tokens():
    """Drafted beams padded to a longer lookup beam: the packed tree is that of the beams cut at
    their PAD tails, and past its end a beam's unpacker (and so its predictions) repeats its last
    token's packed index."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(60):
        b, w, l = 2, int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(2, 7, (1,), generator=gen))
        beams = torch.randint(0, 2 + trial % 3, (b, w, l), generator=gen)
        beams[:, :, 0] = beams[:, :1, 0]
        ends = torch.randint(1, l + 1, (b, w), generator=gen)  # real tokens per beam, the guaranteed one included
        beams[torch.arange(l) >= ends[:, :, None]] = PAD
        p = pack_beams(beams)
        for row in range(b):
            real = [beam[: int(n)] for beam, n in zip(beams[row].tolist(), ends[row])]
            tokens, depth, unpacker, mask = brute_force(real)
            n = len(tokens)
            assert p.n_tokens[row] == n and PAD not in p.tokens[row].tolist()
            assert p.tokens[row, :n].tolist() == tokens and p.depth[row, :n].tolist() == depth
            assert p.unpacker[row].tolist() == [u + [u[-1]] * (l - len(u)) for u in unpacker]
            assert p.mask[row, :n, :n].tolist() == mask


def test_identical_beams_pack_to_one_and_distinct_beams_share_only_the_root():
    same = torch.tensor([[[7, 8, 9]] * 4])
    p = pack_beams(same)
    assert p.n_tokens.tolist() == [3] and p.unpacker.tolist() == [[[0, 1, 2]] * 4]
    distinct = torch.tensor([[[7, 1, 2], [7, 3, 4], [7, 5, 6]]])
    assert pack_beams(distinct).n_tokens.tolist() == [7]
