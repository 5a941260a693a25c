"""PPO math against values worked out by hand (tiny tensors: the whole file runs in about a second)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from rlhf_cli.rl.ppo import (
    adaptive_kl_update, apply_missing_eos_penalty, entropy_from_logits, explained_variance, gae, kl_per_token,
    logprobs_from_logits, masked_mean, masked_sum, masked_var, masked_whiten, normalize_scores,
    per_token_rewards, policy_loss, truncate_after_stop, value_loss,
)
from rlhf_cli.rl.masks import last_index

NAN, INF = float("nan"), float("inf")


def close(actual, expected, abs=1e-6):
    """Elementwise approx comparison of a tensor with nested lists / numbers."""
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float64),
                          torch.as_tensor(expected, dtype=torch.float64), atol=abs, rtol=0)


# ------------------------------------------------------------------------------------------------ masked reductions

def test_masked_sum_mean_ignore_padding_even_when_it_is_garbage():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, INF, -INF]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # sum = 1 + 2 + 4 = 7; mean = 7 / 3
    assert masked_sum(x, mask).item() == pytest.approx(7.0)
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    # per row: [1 + 2, 4] and [3 / 2, 4 / 1]
    assert close(masked_sum(x, mask, dim=1), [3.0, 4.0])
    assert close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    # bool and float masks give the same
    assert masked_mean(x, mask.bool()).item() == pytest.approx(7 / 3)
    assert masked_mean(x, mask.float()).item() == pytest.approx(7 / 3)


def test_masked_mean_of_nothing_is_zero_with_finite_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0]])
    per_row = masked_mean(x, mask, dim=1)
    assert close(per_row.detach(), [1.5, 0.0])
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0
    per_row.sum().backward()
    assert close(x.grad, [[0.5, 0.5], [0.0, 0.0]])


def test_masked_var_unbiased_and_biased():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, -7.0, -7.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # valid 1, 2, 3, 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert masked_var(x, mask).item() == pytest.approx(5 / 3)            # Bessel: 5 / (4 - 1)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(5 / 4)
    # one valid entry: the unbiased variance is undefined → 0 (guard), never NaN
    one = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])
    assert masked_var(x, one).item() == 0.0
    assert masked_var(x, torch.zeros_like(one)).item() == 0.0


def test_whiten_mean_zero_unbiased_std_one_padding_zero():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, NAN, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    w = masked_whiten(x, mask)
    # mean 2.5, unbiased var 5/3 → (x - 2.5) / sqrt(5/3 + 1e-8): 1 → -1.161895, 2 → -0.387298
    s = math.sqrt(5 / 3 + 1e-8)
    assert close(w, [[-1.5 / s, -0.5 / s, 0.5 / s, 0.0], [1.5 / s, 0.0, 0.0, 0.0]])
    assert w[0, 0].item() == pytest.approx(-1.161895, abs=1e-6)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    # shift_mean=False keeps the mean: (x - 2.5)/s + 2.5 on valid tokens, padding still 0
    w2 = masked_whiten(x, mask, shift_mean=False)
    assert close(w2, [[-1.5 / s + 2.5, -0.5 / s + 2.5, 0.5 / s + 2.5, 0.0], [1.5 / s + 2.5, 0.0, 0.0, 0.0]])


def test_whiten_guards_tiny_batches():
    x = torch.tensor([[3.0, 7.0, NAN]])
    one = torch.tensor([[1, 0, 0]])
    # a single valid entry: x - mean = 0 (shift_mean) or x itself (no shift), padding 0, no NaN
    assert close(masked_whiten(x, one), [[0.0, 0.0, 0.0]])
    assert close(masked_whiten(x, one, shift_mean=False), [[3.0, 0.0, 0.0]])
    assert close(masked_whiten(x, torch.zeros_like(one)), [[0.0, 0.0, 0.0]])
    # constant valid entries: var 0 → (x - mean) = 0 exactly, not NaN
    assert close(masked_whiten(torch.tensor([[2.0, 2.0, 5.0]]), torch.tensor([[1, 1, 0]])), [[0.0, 0.0, 0.0]])


# ------------------------------------------------------------------------------------------------------ KL, rewards

def test_kl_estimators_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.3])
    ref = torch.tensor([-1.5, -1.0, -0.3])
    # k1 = logp - ref = [0.5, -1.0, 0]: positive where the policy makes the token MORE likely than the reference
    assert close(kl_per_token(logp, ref, "k1"), [0.5, -1.0, 0.0])
    # k3: log r = ref - logp = [-0.5, 1.0, 0]; (r - 1) - log r = [e^-0.5 - 1 + 0.5, e - 1 - 1, 0]
    #   = [0.6065307 - 0.5, 0.7182818, 0] = [0.1065307, 0.7182818, 0]
    assert close(kl_per_token(logp, ref, "k3"), [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0])


def test_k3_is_nonnegative_and_equals_its_formula():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 5
    ref = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 5
    k3 = kl_per_token(logp, ref, "k3")
    r = torch.exp(ref - logp)
    assert (k3 >= 0).all()
    assert torch.allclose(k3, (r - 1) - torch.log(r), atol=1e-12)


def test_unknown_kl_estimator_raises():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_per_token(torch.zeros(1), torch.zeros(1), "k4")


def test_score_goes_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                       [0.1, 0.2, 0.3, 0.4],
                       [0.4, 9.0, 9.0, NAN]])
    mask = torch.tensor([[1, 1, 0, 0],      # stop token at t=1
                         [1, 1, 1, 1],      # hit the length limit: last real token is t=3
                         [1, 0, 0, 0]])     # stop token as the first token
    score = torch.tensor([1.0, 2.0, 3.0])
    r = per_token_rewards(score, kl, mask, kl_coef=0.5)
    # r_t = -0.5·kl_t on valid tokens, + score at the last valid token, 0 on padding
    # row 0: [-0.05, -0.10 + 1, 0, 0]   (NOT at t=2, the first pad after EOS: TRL's bug)
    # row 1: [-0.05, -0.10, -0.15, -0.20 + 2]
    # row 2: [-0.20 + 3, 0, 0, 0]
    assert close(r, [[-0.05, 0.9, 0.0, 0.0], [-0.05, -0.1, -0.15, 1.8], [2.8, 0.0, 0.0, 0.0]])
    # the index, pinned directly: with no KL the whole reward sits at index 1, 3, 0
    r0 = per_token_rewards(score, torch.zeros(3, 4), mask, kl_coef=0.5)
    assert r0.nonzero().tolist() == [[0, 1], [1, 3], [2, 0]]


def test_row_without_valid_tokens_gets_no_reward():
    r = per_token_rewards(torch.tensor([5.0]), torch.ones(1, 3), torch.zeros(1, 3), kl_coef=0.1)
    assert close(r, [[0.0, 0.0, 0.0]])


# ------------------------------------------------------------------------------------------------------------- GAE

def test_gae_three_tokens_gamma_1_lambda_095_with_a_padded_row():
    rewards = torch.tensor([[0.0, -0.1, 1.0],
                            [0.0, 2.0, 9.0]])     # row 1: last token is padding (reward/value there ignored)
    values = torch.tensor([[0.2, 0.4, 0.5],
                           [1.0, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0 (backwards, V_3 = 0):
    #   δ2 = 1.0 + 1·0   - 0.5 = 0.5             A2 = 0.5
    #   δ1 = -0.1 + 1·0.5 - 0.4 = 0.0            A1 = 0.0 + 0.95·0.5   = 0.475
    #   δ0 = 0.0 + 1·0.4 - 0.2 = 0.2             A0 = 0.2 + 0.95·0.475 = 0.2 + 0.45125 = 0.65125
    #   R = A + V = [0.85125, 0.875, 1.0]
    # row 1 (last valid t=1, so V_2 := 0 and the 7.0 / 9.0 on padding are ignored):
    #   δ1 = 2.0 + 0 - 0.5 = 1.5                 A1 = 1.5
    #   δ0 = 0.0 + 0.5 - 1.0 = -0.5              A0 = -0.5 + 0.95·1.5 = 0.925
    #   R = [1.925, 2.0, 0]; padding 0 in both
    assert close(adv, [[0.65125, 0.475, 0.5], [0.925, 1.5, 0.0]])
    assert close(ret, [[0.85125, 0.875, 1.0], [1.925, 2.0, 0.0]])


def test_gae_discounted_example():
    rewards, values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.5)
    # γ = 0.5, γλ = 0.25
    #   δ2 = 2 + 0.5·0 - 0 = 2                   A2 = 2
    #   δ1 = 0 + 0.5·0 - 1 = -1                  A1 = -1 + 0.25·2 = -0.5
    #   δ0 = 1 + 0.5·1 - 0 = 1.5                 A0 = 1.5 + 0.25·(-0.5) = 1.375
    #   R = A + V = [1.375, 0.5, 2]
    assert close(adv, [[1.375, -0.5, 2.0]])
    assert close(ret, [[1.375, 0.5, 2.0]])


def test_gae_gamma_1_lambda_1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.3, -0.2, 0.5, 1.0], [0.1, 0.4, 2.0, 5.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # reward-to-go: row 0 [1.6, 1.3, 1.5, 1.0]; row 1 (t=3 is padding) [2.5, 2.4, 2.0, 0]
    assert close(adv, [[1.5, 1.1, 1.2, 0.6], [1.5, 1.4, 1.0, 0.0]])
    assert close(ret, [[1.6, 1.3, 1.5, 1.0], [2.5, 2.4, 2.0, 0.0]])   # R_t = reward-to-go (before whitening)


# ---------------------------------------------------------------------------------------------------------- losses

def test_policy_loss_ratio_one_first_minibatch_regression():
    adv = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, NAN, -INF]])   # garbage on padding
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, cliprange=0.2)
    # ratio = 1 everywhere: loss = -mean(A) = -(0.5 - 1 + 2 + 1.5)/4 = -0.75
    assert loss.item() == pytest.approx(-0.75)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0


def test_policy_loss_clipping_binds_for_positive_and_negative_advantages():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    logp_old = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    logp_new = (logp_old + ratios.log()).requires_grad_()
    loss, stats = policy_loss(logp_new, logp_old, adv, mask, cliprange=0.2)
    # token  A   ratio   -A·ratio   -A·clip(ratio, 0.8, 1.2)   max            clipped branch taken?
    #   0   +1    1.5     -1.5        -1.2                      -1.2           yes (A>0, ratio above 1+ε)
    #   1   -1    0.5     +0.5        +0.8                      +0.8           yes (A<0, ratio below 1-ε)
    #   2   +1    0.5     -0.5        -0.8                      -0.5           no  (pessimistic: unclipped)
    #   3   -2    1.5     +3.0        +2.4                      +3.0           no
    # loss = (-1.2 + 0.8 - 0.5 + 3.0) / 4 = 2.1 / 4 = 0.525; clipfrac = 2/4
    assert loss.item() == pytest.approx(0.525, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    # approx_kl = 0.5 · mean(log²) = 0.5 · (2·log(1.5)² + 2·log(0.5)²)/4
    #           = 0.5 · (2·0.164402 + 2·0.480453)/4 = 0.161214
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4,
                                                      abs=1e-6)
    # gradient: clipped tokens get none; d/dlogp (-A·ratio)/4 = -A·ratio/4: token 2 → -0.125, token 3 → 0.75
    loss.backward()
    assert close(logp_new.grad, [[0.0, 0.0, -0.125, 0.75, 0.0]])


def test_value_loss_clipping():
    v_old = torch.tensor([[0.0, 0.0, 1.0, 3.0]])
    v_new = torch.tensor([[1.0, 0.1, 0.0, NAN]])
    ret = torch.tensor([[1.0, 1.0, 0.5, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(v_new, v_old, ret, mask, cliprange_value=0.2)
    # token  V_old V_new  R    V_clip              (V_new-R)²  (V_clip-R)²  max   clipped taken?
    #   0     0    1.0   1.0   0 + clip(1, ±.2) = 0.2   0.00      0.64     0.64  yes
    #   1     0    0.1   1.0   0.1                      0.81      0.81     0.81  no (tie)
    #   2     1    0.0   0.5   1 - 0.2 = 0.8            0.25      0.09     0.25  no
    # loss = 0.5 · (0.64 + 0.81 + 0.25) / 3 = 0.5 · 1.7 / 3 = 0.283333
    assert loss.item() == pytest.approx(0.5 * 1.7 / 3, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)


def test_value_loss_gradient_is_finite_despite_garbage_padding():
    v_new = torch.tensor([[0.5, NAN]], requires_grad=True)
    loss, _ = value_loss(v_new, torch.tensor([[0.5, INF]]), torch.tensor([[1.5, NAN]]), torch.tensor([[1, 0]]), 0.2)
    loss.backward()
    # only token 0: V_clip = V_new = 0.5, loss = 0.5 · (0.5 - 1.5)² = 0.5; d/dV_new = (V_new - R) = -1
    assert loss.item() == pytest.approx(0.5)
    assert close(v_new.grad, [[-1.0, 0.0]])


# ---------------------------------------------------------------------------------------------------------- logits

def test_entropy_from_logits():
    uniform = torch.zeros(2, 3, 5)
    assert close(entropy_from_logits(uniform), torch.full((2, 3), math.log(5)))
    # logits [0, log 3] → p = [1/4, 3/4]; H = -(0.25·log 0.25 + 0.75·log 0.75) = 0.3465736 + 0.2157616 = 0.5623351
    assert entropy_from_logits(torch.tensor([0.0, math.log(3)])).item() == pytest.approx(0.5623351, abs=1e-6)
    # masked vocabulary (-inf) contributes nothing: one possible token → H = 0, no NaN
    assert entropy_from_logits(torch.tensor([3.0, -INF, -INF])).item() == pytest.approx(0.0)


def test_logprobs_temperature_divides_logits():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    tokens = torch.tensor([[2, 1]])
    # T = 2: z = [0.5, 1.0, 1.5]; log p(2) = 1.5 - log(e^0.5 + e^1 + e^1.5)
    #        = 1.5 - log(1.648721 + 2.718282 + 4.481689) = 1.5 - log(8.848692) = 1.5 - 2.180270 = -0.680270
    #        uniform row: log(1/3) at any temperature
    lp = logprobs_from_logits(logits, tokens, temperature=2.0)
    lse = math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5))
    assert close(lp, [[1.5 - lse, -math.log(3)]])
    assert lp[0, 0].item() == pytest.approx(-0.680270, abs=1e-6)
    # exactly log_softmax(logits / T), and T = 1 is plain log_softmax
    assert torch.allclose(lp, torch.log_softmax(logits / 2.0, -1).gather(-1, tokens[..., None]).squeeze(-1))
    assert torch.allclose(logprobs_from_logits(logits, tokens, 1.0),
                          torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1))
    # half precision goes through float32 and agrees
    assert torch.allclose(logprobs_from_logits(logits.bfloat16(), tokens, 2.0), lp, atol=2e-2)


def test_temperature_is_required_and_positive():
    param = inspect.signature(logprobs_from_logits).parameters["temperature"]
    assert param.default is inspect.Parameter.empty
    with pytest.raises(TypeError):
        logprobs_from_logits(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))   # type: ignore[call-arg]
    with pytest.raises(ValueError):
        logprobs_from_logits(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), 0.0)


def test_same_temperature_gives_ratio_one_and_another_does_not():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g)
    tokens = torch.randint(0, 7, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv = torch.randn(2, 4, generator=g)
    rollout = logprobs_from_logits(logits, tokens, 0.7)
    _, stats = policy_loss(logprobs_from_logits(logits, tokens, 0.7), rollout, adv, mask, 0.2)
    assert stats["approx_kl"].item() == 0.0
    _, wrong = policy_loss(logprobs_from_logits(logits, tokens, 1.0), rollout, adv, mask, 0.2)
    assert wrong["approx_kl"].item() > 1e-4


# ------------------------------------------------------------------------------------------------------ statistics

def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(ret.clone(), ret, mask).item() == pytest.approx(1.0)      # perfect predictions
    # V = [1, 2, 2]: R - V = [0, 0, 1], Var = 2/9 (mean 1/3); Var[R] = 2/3 → 1 - (2/9)/(2/3) = 1 - 1/3 = 2/3
    assert explained_variance(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), ret, mask).item() == pytest.approx(2 / 3)
    # a constant prediction explains nothing: 1 - Var[R]/Var[R] = 0
    assert explained_variance(torch.zeros(1, 4), ret, mask).item() == pytest.approx(0.0, abs=1e-6)
    # Var[R] = 0 → 0.0 by definition, never NaN
    assert explained_variance(torch.zeros(1, 4), torch.ones(1, 4), torch.ones(1, 4)).item() == 0.0


def test_adaptive_kl_update():
    # factor n_steps/horizon = 256/10000 = 0.0256
    assert adaptive_kl_update(0.1, 6.0, 6.0, 10000, 256) == pytest.approx(0.1)                  # on target
    assert adaptive_kl_update(0.1, 6.6, 6.0, 10000, 256) == pytest.approx(0.1 * (1 + 0.1 * 0.0256))  # 0.100256
    assert adaptive_kl_update(0.1, 12.0, 6.0, 10000, 256) == pytest.approx(0.100512)   # e = 1 → clipped to 0.2
    assert adaptive_kl_update(0.1, 0.0, 6.0, 10000, 256) == pytest.approx(0.099488)    # e = -1 → clipped to -0.2
    out = adaptive_kl_update(0.1, torch.tensor(12.0), 6.0, 10000, 256)
    assert isinstance(out, float) and out == pytest.approx(0.100512)


def test_missing_eos_penalty_lowers_truncated_scores():
    scores = torch.tensor([1.0, 2.0, 3.0])
    ended = torch.tensor([True, False, True])
    assert close(apply_missing_eos_penalty(scores, ended, 1.0), [1.0, 1.0, 3.0])    # 2 - 1 on the truncated row
    assert close(apply_missing_eos_penalty(scores, ended, 0.0), [1.0, 2.0, 3.0])
    assert close(scores, [1.0, 2.0, 3.0])                                             # input untouched
    with pytest.raises(ValueError):
        apply_missing_eos_penalty(scores, ended, -1.0)


def test_normalize_scores():
    # (1 - 2)/2 = -0.5, (3 - 2)/2 = 0.5
    assert close(normalize_scores(torch.tensor([1.0, 3.0]), 2.0, 2.0), [-0.5, 0.5])


# --------------------------------------------------------------------------------------------------------- rollout

def test_truncate_after_stop():
    eos, pad = 2, 0
    tokens = torch.tensor([[5, 2, 7, 8],      # EOS mid-way
                           [5, 6, 7, 2],      # EOS at the last position
                           [5, 6, 7, 8],      # never: hit the length limit
                           [2, 0, 2, 9],      # EOS first, then garbage (a pad id, another EOS)
                           [0, 0, 5, 2]])     # pad ids generated BEFORE the EOS are real samples
    out, mask, ended = truncate_after_stop(tokens, eos, pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0], [0, 0, 5, 2]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False, True, True]
    assert last_index(mask).tolist() == [1, 3, 3, 0, 3]


def test_truncate_after_stop_with_several_stop_ids():
    tokens = torch.tensor([[4, 3, 2, 4], [4, 4, 4, 4]])
    out, mask, ended = truncate_after_stop(tokens, [2, 3], pad_id=1)
    assert out.tolist() == [[4, 3, 1, 1], [4, 4, 4, 4]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, False]


def test_rollout_to_advantages_end_to_end():
    tokens = torch.tensor([[5, 2, 7], [5, 6, 7]])
    _, mask, ended = truncate_after_stop(tokens, 2, 0)
    scores = apply_missing_eos_penalty(torch.tensor([1.0, 1.0]), ended, 1.0)        # [1, 0]
    logp = torch.tensor([[-1.0, -1.0, NAN], [-1.0, -1.0, -1.0]])
    kl = kl_per_token(logp, logp - 0.5, "k1")                                        # 0.5 on every valid token
    rewards = per_token_rewards(scores, kl, mask, kl_coef=0.2)
    # row 0: [-0.1, -0.1 + 1, 0]; row 1: [-0.1, -0.1, -0.1 + 0]
    assert close(rewards, [[-0.1, 0.9, 0.0], [-0.1, -0.1, -0.1]])
    adv, ret = gae(rewards, torch.zeros(2, 3), mask, gamma=1.0, lam=1.0)
    # V = 0: A = R = reward-to-go: row 0 [0.8, 0.9, 0]; row 1 [-0.3, -0.2, -0.1]
    assert close(ret, [[0.8, 0.9, 0.0], [-0.3, -0.2, -0.1]])
    white = masked_whiten(adv, mask)
    assert torch.isfinite(white).all() and white[0, 2].item() == 0.0
    assert white[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
