"""DPO-family losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.rl.dpo import LOSSES, dpo_loss, implicit_rewards, nll_loss

BETA = 0.1
H = [0.5, -1.0]


def _softplus(x: float) -> float:
    """log(1 + e^x) = −log σ(−x)."""
    return math.log1p(math.exp(x))


def _h(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sigmoid_hand_values(eps):
    # -(1-ε) log σ(βh) - ε log σ(-βh) = (1-ε) log(1 + e^{-βh}) + ε log(1 + e^{βh})
    want = [(1 - eps) * _softplus(-BETA * h) + eps * _softplus(BETA * h) for h in H]
    assert LOSSES["sigmoid"](_h(H), BETA, eps).tolist() == pytest.approx(want, abs=1e-12)
    if eps == 0.0:  # plain DPO: log(1 + e^-0.05) = 0.66846, log(1 + e^0.1) = 0.74440
        assert want == pytest.approx([0.668460, 0.744397], abs=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_robust_hand_values(eps):
    # [(1-ε) log(1 + e^{-βh}) - ε log(1 + e^{βh})] / (1 - 2ε)
    want = [((1 - eps) * _softplus(-BETA * h) - eps * _softplus(BETA * h)) / (1 - 2 * eps) for h in H]
    assert LOSSES["robust"](_h(H), BETA, eps).tolist() == pytest.approx(want, abs=1e-12)


def test_robust_is_unbiased_under_label_flips():
    # (1-ε) L(h) + ε L(-h) = -log σ(βh): the expectation over a flip at rate ε is the clean DPO loss
    h, eps = _h([0.5, -1.0, 30.0]), 0.2
    mixed = (1 - eps) * LOSSES["robust"](h, BETA, eps) + eps * LOSSES["robust"](-h, BETA, eps)
    assert mixed.tolist() == pytest.approx(LOSSES["sigmoid"](h, BETA, 0.0).tolist(), abs=1e-12)


def test_hinge_hand_values():
    # max(0, 1 - βh): 1 - 0.05, 1 + 0.1, and 0 once βh = 2 > 1
    assert LOSSES["hinge"](_h(H + [20.0]), BETA, 0.0).tolist() == pytest.approx([0.95, 1.1, 0.0], abs=1e-12)
    assert LOSSES["hinge"](_h(H), BETA, 0.1).tolist() == pytest.approx([0.95, 1.1], abs=1e-12)  # ε unused


def test_ipo_hand_values():
    # (h - 1/(2β))² with 1/(2β) = 5: (0.5 - 5)² = 20.25, (-1 - 5)² = 36, and 0 at h = 5
    assert LOSSES["ipo"](_h(H + [5.0]), BETA, 0.0).tolist() == pytest.approx([20.25, 36.0, 0.0], abs=1e-12)
    assert LOSSES["ipo"](_h(H), BETA, 0.1).tolist() == pytest.approx([20.25, 36.0], abs=1e-12)  # ε unused


def test_label_smoothing_zero_makes_sigmoid_equal_robust():
    h = _h([0.5, -1.0, 3.0, -40.0])
    assert LOSSES["robust"](h, BETA, 0.0).tolist() == pytest.approx(LOSSES["sigmoid"](h, BETA, 0.0).tolist(),
                                                                     abs=1e-12)


def test_all_losses_share_one_signature_and_shape():
    assert set(LOSSES) == {"sigmoid", "ipo", "hinge", "robust"}
    for fn in LOSSES.values():
        assert fn(_h(H), BETA, 0.1).shape == (2,)


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "hinge", "ipo"])
def test_gradients_raise_chosen_and_lower_rejected(kind):
    # at h = 0.5 - (-0.5) = 1 every loss still wants a larger h: d/d logπ(y_c) < 0 < d/d logπ(y_r)
    pc = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-12.0], dtype=torch.float64, requires_grad=True)
    loss, _ = dpo_loss(pc, pr, _h([-10.5]), _h([-11.5]), torch.tensor([4]), kind, BETA, 0.1)
    loss.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()
    assert pc.grad.item() == pytest.approx(-pr.grad.item())


def test_sigmoid_gradient_hand_value():
    # d/dh -log σ(βh) = -β σ(-βh); at h = 0.5: -0.1 / (1 + e^{0.05})
    h = _h([0.5]).requires_grad_()
    LOSSES["sigmoid"](h, BETA, 0.0).sum().backward()
    assert h.grad.item() == pytest.approx(-BETA / (1 + math.exp(0.05)), abs=1e-12)


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_stable_for_huge_log_ratio_differences(kind, eps):
    h = torch.tensor([1e4, -1e4], requires_grad=True)  # float32, β·h = ±1000
    loss = LOSSES[kind](h, BETA, eps)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(h.grad).all()


def test_sigmoid_huge_values_are_right():
    loss = LOSSES["sigmoid"](torch.tensor([1e4, -1e4]), BETA, 0.0)
    # -log σ(1000) ≈ 0, -log σ(-1000) ≈ 1000
    assert loss.tolist() == pytest.approx([0.0, 1000.0], abs=1e-3)


def test_implicit_rewards_and_stats():
    pc, pr, rc, rr = _h([-10.0, -20.0]), _h([-12.0, -15.0]), _h([-11.0, -19.0]), _h([-12.5, -17.0])
    r_c, r_r = implicit_rewards(pc, pr, rc, rr, BETA)
    assert r_c.tolist() == pytest.approx([0.1, -0.1], abs=1e-12)   # 0.1·(1), 0.1·(-1)
    assert r_r.tolist() == pytest.approx([0.05, 0.2], abs=1e-12)   # 0.1·(0.5), 0.1·(2)
    loss, stats = dpo_loss(pc, pr, rc, rr, torch.tensor([3, 5]), "sigmoid", BETA)
    assert set(stats) == {"rewards_chosen", "rewards_rejected", "accuracy", "margin"}
    assert stats["rewards_chosen"].tolist() == pytest.approx([0.1, -0.1], abs=1e-12)
    assert stats["rewards_rejected"].tolist() == pytest.approx([0.05, 0.2], abs=1e-12)
    assert stats["accuracy"].tolist() == [1.0, 0.0]
    assert stats["margin"].tolist() == pytest.approx([0.05, -0.3], abs=1e-12)
    # h = margin / β = [0.5, -3]
    assert loss.tolist() == pytest.approx([_softplus(-0.05), _softplus(0.3)], abs=1e-12)


def test_stats_are_detached():
    pc = _h([-10.0]).requires_grad_()
    pr = _h([-12.0]).requires_grad_()
    loss, stats = dpo_loss(pc, pr, _h([-11.0]), _h([-11.0]), torch.tensor([2]), "sigmoid", BETA)
    assert loss.requires_grad
    assert not any(v.requires_grad for v in stats.values())


def test_nll_term():
    # -logπ(y_c) / n_c: 6/3 = 2, 10/4 = 2.5; a row with no token divides by 1
    assert nll_loss(_h([-6.0, -10.0, -1.0]), torch.tensor([3, 4, 0])).tolist() == pytest.approx([2.0, 2.5, 1.0])
    pc, pr, rc, rr = _h([-6.0, -10.0]), _h([-7.0, -9.0]), _h([-6.5, -9.0]), _h([-7.0, -9.5])
    n = torch.tensor([3, 4])
    plain, _ = dpo_loss(pc, pr, rc, rr, n, "sigmoid", BETA)
    with_nll, _ = dpo_loss(pc, pr, rc, rr, n, "sigmoid", BETA, nll_coef=0.5)
    assert (with_nll - plain).tolist() == pytest.approx([0.5 * 2.0, 0.5 * 2.5], abs=1e-12)


def test_dpo_loss_uses_the_chosen_kind_and_smoothing():
    pc, pr, rc, rr = _h([-10.0, -20.0]), _h([-12.0, -15.0]), _h([-10.5, -19.0]), _h([-11.5, -16.0])
    h = _h([1.0, -2.0])  # 0.5 - (-0.5), -1 - 1
    assert ((pc - rc) - (pr - rr)).tolist() == h.tolist()
    for kind in LOSSES:
        loss, _ = dpo_loss(pc, pr, rc, rr, torch.tensor([1, 1]), kind, BETA, 0.1)
        assert loss.tolist() == pytest.approx(LOSSES[kind](h, BETA, 0.1).tolist(), abs=1e-12)


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(_h([0.0]), _h([0.0]), _h([0.0]), _h([0.0]), torch.tensor([1]), "kto", BETA)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_needs_smoothing_below_one_half(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        LOSSES["robust"](_h(H), BETA, eps)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(_h([0.0]), _h([0.0]), _h([0.0]), _h([0.0]), torch.tensor([1]), "robust", BETA, eps)
