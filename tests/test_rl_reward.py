"""Reward-model math against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.rl.reward import pairwise_loss, pool


def test_pairwise_loss_hand_values():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    # -log σ(1) = log(1 + e^-1) = 0.31326; -log σ(0) = log 2 = 0.69315
    assert pairwise_loss(rc, rr).item() == pytest.approx((math.log1p(math.exp(-1)) + math.log(2)) / 2, abs=1e-6)
    assert pairwise_loss(rc, rr, reduction="sum").item() == pytest.approx(math.log1p(math.exp(-1)) + math.log(2),
                                                                          abs=1e-6)


def test_margin_is_subtracted_from_the_difference():
    rc, rr, m = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0])
    # -log σ(2 - 1 - 1) = log 2
    assert pairwise_loss(rc, rr, m).item() == pytest.approx(math.log(2), abs=1e-6)


def test_centering_term():
    rc, rr = torch.tensor([1.0]), torch.tensor([1.0])
    # log 2 + 0.01 * (1 + 1)^2 = 0.69315 + 0.04
    assert pairwise_loss(rc, rr, center_coef=0.01).item() == pytest.approx(math.log(2) + 0.04, abs=1e-6)


def test_loss_is_stable_for_large_differences():
    loss = pairwise_loss(torch.tensor([-100.0]), torch.tensor([100.0]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(200.0, rel=1e-6)
    grad_in = torch.tensor([-100.0], requires_grad=True)
    pairwise_loss(grad_in, torch.tensor([100.0])).backward()
    assert grad_in.grad.item() == pytest.approx(-1.0)


def test_pool_picks_the_right_vectors():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # h[b, t] = [6b + 2t, 6b + 2t + 1]
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert pool(hidden, mask, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert pool(hidden, mask, "first").tolist() == [[0.0, 1.0], [8.0, 9.0]]
    assert pool(hidden, mask, "mean").tolist() == [[1.0, 2.0], [9.0, 10.0]]
    with pytest.raises(ValueError):
        pool(hidden, mask, "max")


def test_pool_of_an_all_padding_row():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[0, 0, 0], [0, 1, 1]])
    # last and first index an all-padding row at 0; the mean over no token is the zero vector
    assert pool(hidden, mask, "last").tolist() == [[0.0, 1.0], [10.0, 11.0]]
    assert pool(hidden, mask, "first").tolist() == [[0.0, 1.0], [8.0, 9.0]]
    assert pool(hidden, mask, "mean").tolist() == [[0.0, 0.0], [9.0, 10.0]]
