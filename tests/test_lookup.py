"""Context lookup: a beam copied from what followed the sequence's last tokens earlier on."""
import torch

from redrafter.runtime.lookup import lookup_beam


def beam(tokens: list[int], length: int, max_ngram: int = 3, fallback: list[int] | None = None) -> list[int]:
    history = torch.tensor([tokens])
    fb = torch.tensor([fallback or [-1] * length])
    return lookup_beam(history, torch.tensor([len(tokens) - 1]), length, max_ngram, fb)[0].tolist()


def test_the_latest_occurrence_of_the_suffix_is_continued():
    #        0  1  2  3  4  5  6  7  8  9 10 11
    seq = [5, 6, 7, 9, 5, 6, 7, 8, 1, 5, 6, 7]
    assert beam(seq, 5) == [7, 8, 1, 5, 6]


def test_a_longer_match_wins_over_a_later_shorter_one():
    seq = [1, 2, 3, 4, 8, 3, 5, 1, 2, 3]  # [1, 2, 3] at 0; [3] alone also at 5
    assert beam(seq, 5) == [3, 4, 8, 3, 5]
    assert beam(seq, 3, max_ngram=1) == [3, 5, 1]


def test_a_continuation_running_into_the_suffix_repeats_with_its_period():
    assert beam([4, 1, 2, 1, 2], 5) == [2, 1, 2, 1, 2]
    assert beam([9, 9, 9], 4) == [9, 9, 9, 9]


def test_no_earlier_occurrence_gives_the_fallback():
    assert beam([1, 2, 3, 4], 3, fallback=[4, 0, 0]) == [4, 0, 0]
    assert beam([7], 3, fallback=[7, 1, 1]) == [7, 1, 1]


def test_rows_see_only_their_own_tokens():
    """Each row's tokens end at its own guaranteed token; what lies beyond is stale and ignored."""
    history = torch.tensor([[3, 1, 2, 3, 0, 0, 0],
                            [5, 4, 6, 5, 4, 6, 5],
                            [8, 9, 4, 2, 2, 8, 9]])  # row 2: [8, 9, 4] then stale tokens
    ends = torch.tensor([3, 6, 2])
    fallback = torch.full((3, 4), -1)
    got = lookup_beam(history, ends, 4, 3, fallback).tolist()
    assert got == [[3, 1, 2, 3], [5, 4, 6, 5], [-1, -1, -1, -1]]
