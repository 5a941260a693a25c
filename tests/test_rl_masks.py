"""Mask arithmetic (rl/masks.py) against values worked out by hand: left, right and no padding, and a row that is
all padding."""

from __future__ import annotations

import torch

from rlhf_cli.rl.masks import as_bool, first_index, last_index, position_ids_from_mask

RIGHT = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
LEFT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
BOTH = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]])   # left-padded prompt, right-padded response


def test_position_ids_count_real_tokens_only():
    # pos_t = max(cumsum(mask)_t - 1, 0)
    assert position_ids_from_mask(RIGHT).tolist() == [[0, 1, 2, 2, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0],
                                                      [0, 0, 0, 0, 0]]
    assert position_ids_from_mask(LEFT).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0],
                                                     [0, 0, 0, 0, 0]]
    assert position_ids_from_mask(BOTH).tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_position_ids_are_the_same_for_any_mask_dtype_and_match_the_old_formula():
    for mask in (LEFT, RIGHT, BOTH):
        expected = (mask.cumsum(-1) - 1).clamp(min=0)   # what models/reward.py and engine/batches.py computed
        for m in (mask, mask.bool(), mask.float(), mask.int()):
            out = position_ids_from_mask(m)
            assert out.dtype == torch.int64 and torch.equal(out, expected)


def test_last_index_under_left_and_right_padding():
    # L - 1 - argmax(flip(mask)); an all-padding row gives 0
    assert last_index(RIGHT).tolist() == [2, 4, 0, 0]
    assert last_index(LEFT).tolist() == [4, 4, 4, 0]
    assert last_index(BOTH).tolist() == [2, 3]
    for m in (RIGHT.bool(), RIGHT.float()):
        assert last_index(m).tolist() == [2, 4, 0, 0]


def test_first_index_under_left_and_right_padding():
    # argmax(mask); an all-padding row gives 0
    assert first_index(RIGHT).tolist() == [0, 0, 0, 0]
    assert first_index(LEFT).tolist() == [2, 0, 4, 0]
    assert first_index(BOTH).tolist() == [1, 2]
    for m in (LEFT.bool(), LEFT.float()):
        assert first_index(m).tolist() == [2, 0, 4, 0]


def test_indices_are_int64_and_match_the_old_formulas_on_rows_with_a_real_token():
    for mask in (RIGHT[:3], LEFT[:3], BOTH):
        length = mask.shape[-1]
        assert torch.equal(last_index(mask), length - 1 - mask.flip(-1).float().argmax(-1))
        assert torch.equal(first_index(mask), mask.float().argmax(-1))
        assert last_index(mask).dtype == first_index(mask).dtype == torch.int64


def test_as_bool():
    assert as_bool(torch.tensor([0.0, 2.0, -1.0])).tolist() == [False, True, True]
    b = torch.tensor([True, False])
    assert as_bool(b) is b
