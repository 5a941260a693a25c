"""The critic-free estimators, the loss aggregations and the knobs around them, against hand-computed values
(rl/advantages.py, rl/ppo.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.config.schemas import PPOAlgoConfig
from rlhf_cli.rl import advantages as adv
from rlhf_cli.rl import ppo as rl

T = torch.tensor


def test_group_statistics_and_zero_std_groups():
    scores = T([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    assert adv.group_mean(scores, 3).tolist() == [2.0, 2.0, 2.0, 5.0, 5.0, 5.0]
    assert adv.group_std(scores, 3).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # Bessel: ((1 + 0 + 1) / 2) ** .5
    assert adv.zero_std_groups(T([1.0, 1.0, 2.0, 3.0]), 2).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="groups of 4"):
        adv.group_mean(T([1.0, 2.0, 3.0]), 4)


def test_grpo_divides_by_the_group_or_batch_std_or_not_at_all():
    scores = T([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    g = adv.grpo(scores, 3, "group")
    assert g[:3].tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001])
    assert g[3:].tolist() == [0.0, 0.0, 0.0]  # a tie: no signal, not NaN
    batch_std = math.sqrt(15.5 / 5)  # mean 3.5, squared deviations 6.25 + 2.25 + 0.25 + 3 x 2.25
    assert adv.grpo(scores, 3, "batch")[:3].tolist() == pytest.approx([-1 / (batch_std + 1e-4), 0.0,
                                                                       1 / (batch_std + 1e-4)])
    assert adv.grpo(scores, 3, "none").tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # Dr. GRPO
    assert adv.grpo(T([0.0, 4.0]), 2, "group").tolist() == pytest.approx([-2 / (8 ** .5 + 1e-4), 2 / (8 ** .5 + 1e-4)])


def test_rloo_subtracts_the_mean_of_the_others():
    assert adv.rloo(T([1.0, 3.0, 2.0, 2.0]), 2).tolist() == [-2.0, 2.0, 0.0, 0.0]  # k = 2: r_i - r_other
    assert adv.rloo(T([1.0, 2.0, 3.0]), 3).tolist() == [-1.5, 0.0, 1.5]           # 1 - (2 + 3) / 2, ...
    with pytest.raises(ValueError, match="at least 2"):
        adv.rloo(T([1.0, 2.0]), 1)


def _reinforce_pp_by_hand(s0: float, s1: float) -> list[float]:
    """Returns of rows [−0.1·0.5, −0.1·1.0 + s0] and [−0.1·2.0 + s1], whitened over the 3 valid tokens."""
    g = [-0.05 + (-0.1 + s0), -0.1 + s0, -0.2 + s1]
    mean = sum(g) / 3
    var = sum((x - mean) ** 2 for x in g) / 2
    return [(x - mean) / math.sqrt(var + 1e-8) for x in g]


def test_reinforce_pp_whitens_per_token_returns_of_score_and_kl():
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kl = T([[0.5, 1.0, 9.0], [2.0, 9.0, 9.0]])  # padding holds garbage: never read
    a = adv.reinforce_pp_returns(T([1.0, 0.0]), kl, mask, 0.1)
    want = _reinforce_pp_by_hand(1.0, 0.0)
    assert [a[0, 0].item(), a[0, 1].item(), a[1, 0].item()] == pytest.approx(want, abs=1e-5)
    assert a[0, 2].item() == 0.0 and a[1, 1:].tolist() == [0.0, 0.0]


def test_reinforce_pp_baseline_centres_scores_on_their_group_first():
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kl = T([[0.5, 1.0, 0.0], [2.0, 0.0, 0.0]])
    inputs = adv.Inputs(T([1.0, 0.0]), kl, mask, 0.1, 2, None)
    a, returns = adv.ESTIMATORS["reinforce_pp_baseline"].fn(inputs)
    assert returns is None
    assert [a[0, 0].item(), a[0, 1].item(), a[1, 0].item()] == pytest.approx(_reinforce_pp_by_hand(0.5, -0.5),
                                                                             abs=1e-5)


def test_a_sequence_estimator_gives_every_token_of_a_response_the_same_advantage():
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = T([[0.1, 0.1, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    inputs = adv.Inputs(T([1.0, 2.0, 3.0, 3.0]), kl, mask, 1.0, 2, None)
    a, _ = adv.ESTIMATORS["rloo"].fn(inputs)
    # the KL goes into the reward as one sequence term: r = (1 − 0.2, 2 − 0.2, 3, 3) -> RLOO (−1, 1, 0, 0)
    assert torch.allclose(a, T([[-1.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    g, _ = adv.ESTIMATORS["dr_grpo"].fn(inputs)
    assert torch.allclose(g, T([[-0.5, -0.5, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_gae_in_the_table_is_todays_shaping():
    torch.manual_seed(0)
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores, kl, values = torch.randn(2), torch.randn(2, 3) * mask, torch.randn(2, 3)
    a, r = adv.ESTIMATORS["gae"].fn(adv.Inputs(scores, kl, mask, 0.05, 1, values, 1.0, 0.95))
    want_a, want_r = rl.gae(rl.per_token_rewards(scores, kl, mask, 0.05), values, mask, 1.0, 0.95)
    assert torch.equal(a, rl.masked_whiten(want_a, mask)) and torch.equal(r, want_r)


def test_the_schema_knows_the_table():
    assert set(PPOAlgoConfig.CHOICES["advantage"]) == set(adv.ESTIMATORS)
    assert set(PPOAlgoConfig.GROUPED) == {n for n, e in adv.ESTIMATORS.items() if e.grouped}
    assert {n for n, e in adv.ESTIMATORS.items() if e.needs_value} == {"gae"}


def test_k2_and_the_asymmetric_clip():
    assert rl.kl_per_token(T([-1.0]), T([-2.0]), "k2").item() == 0.5
    # ratio e^0.4 = 1.49, advantage 1: clipped at 1 + 0.28 instead of 1 + 0.2
    logp, old, a, m = T([[0.4]]), T([[0.0]]), T([[1.0]]), T([[1.0]])
    assert rl.policy_loss(logp, old, a, m, 0.2)[0].item() == pytest.approx(-1.2)
    assert rl.policy_loss(logp, old, a, m, 0.2, cliprange_high=0.28)[0].item() == pytest.approx(-1.28)
    # the lower clip stays at 1 - 0.2: ratio e^-0.4 = 0.67 with advantage −1 takes the clipped branch at 0.8
    assert rl.policy_loss(-logp, old, -a, m, 0.2, cliprange_high=0.28)[0].item() == pytest.approx(0.8)


def test_loss_aggregations_by_hand():
    x = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert rl.loss_normaliser(m, "token_mean") == 3.0 and rl.loss_normaliser(m, "seq_mean_token_mean") == 2.0
    assert rl.aggregate(x, m, "token_mean", 3.0).item() == pytest.approx(7 / 3)
    assert rl.aggregate(x, m, "seq_mean_token_mean", 2.0).item() == pytest.approx((1.5 + 4.0) / 2)
    assert rl.aggregate(x, m, "seq_mean_token_sum_norm", 2.0, max_len=3).item() == pytest.approx((3 / 3 + 4 / 3) / 2)
    assert rl.aggregate(x, m, "token_mean", 3.0).item() == rl.masked_mean(x, m).item()  # one micro-batch: as today


@pytest.mark.parametrize("how", rl.AGGREGATIONS)
def test_an_aggregated_loss_has_one_gradient_however_the_step_is_split(how):
    """Micro-batches of a step (summed) and processes (averaged, as DDP does) give the whole step's gradient."""
    torch.manual_seed(1)
    lengths = torch.tensor([1, 5, 2, 8, 3, 8, 4, 6])
    mask = (torch.arange(8).unsqueeze(0) < lengths.unsqueeze(1)).float()
    w = torch.randn(8, 8, requires_grad=True)

    def grad(parts, world: int) -> torch.Tensor:
        w.grad = None
        norm = sum(rl.loss_normaliser(mask[p], how) for p in parts) / world
        for rank in range(world):  # each process's micro-batches, its gradient averaged with the others'
            for p in parts[rank::world]:
                (rl.aggregate(w[p] ** 2, mask[p], how, norm, max_len=8) / world).backward()
        return w.grad.clone()

    whole = grad([slice(0, 8)], 1)
    assert torch.allclose(grad([slice(0, 3), slice(3, 8)], 1), whole, atol=1e-6)       # 2 unequal micro-batches
    assert torch.allclose(grad([slice(0, 4), slice(4, 8)], 2), whole, atol=1e-6)       # 2 processes
    assert torch.allclose(grad([slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)], 2), whole, atol=1e-6)
