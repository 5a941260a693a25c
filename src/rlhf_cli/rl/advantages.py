"""Advantage estimators: how a rollout's scores (and KL terms) become the per-token advantages the clipped policy
loss weighs (pure torch, no I/O; conventions as in rl/ppo.py: [B, T] response tokens, right-padded `mask`).

`gae` needs a value model; the others are critic-free. The group estimators read the rollout as G groups of k
consecutive rows, the k responses sampled for one prompt (row b belongs to group b // k). Every critic-free
advantage is the same for all tokens of a response except REINFORCE++'s, which are per-token returns.

`ESTIMATORS` is the one table the PPO stage selects from (`ppo.advantage`): each entry takes an `Inputs` and
returns (advantages [B, T], returns [B, T] or None: the value targets, only for gae).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_cli.rl.masks import as_bool
from rlhf_cli.rl.ppo import gae, masked_whiten, per_token_rewards

__all__ = ["Inputs", "Estimator", "ESTIMATORS", "group_mean", "group_std", "grpo", "rloo", "reinforce_pp_returns",
           "zero_std_groups", "broadcast"]

SCALES = ("group", "batch", "none")


# -------------------------------------------------------------------------------------------------------- groups

def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B] -> [G, k]; B must be a multiple of k (ValueError otherwise)."""
    if k < 1 or scores.shape[0] % k:
        raise ValueError(f"{scores.shape[0]} scores do not form groups of {k}")
    return scores.reshape(-1, k)


def group_mean(scores: torch.Tensor, k: int) -> torch.Tensor:
    """mean_g: the mean of each row's group of k, repeated for each of its rows ([B] -> [B])."""
    return _groups(scores, k).mean(-1).repeat_interleave(k)


def group_std(scores: torch.Tensor, k: int) -> torch.Tensor:
    """std_g: the standard deviation of each row's group, with Bessel's correction (as torch.std, TRL and
    OpenRLHF), repeated for each of its rows; 0 for k = 1."""
    g = _groups(scores, k)
    std = g.std(-1) if k > 1 else torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    return std.repeat_interleave(k)


def zero_std_groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B] bool: whether the row's group scored all alike (max_g == min_g: no relative signal in it)."""
    g = _groups(scores, k)
    return (g.amax(-1) == g.amin(-1)).repeat_interleave(k)


def broadcast(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-response value [B] on every valid token of its response ([B, T]), 0 on padding."""
    zero = torch.zeros((), dtype=per_row.dtype, device=per_row.device)
    return torch.where(as_bool(mask), per_row.unsqueeze(-1), zero)


# ----------------------------------------------------------------------------------------------------- estimators

def grpo(scores: torch.Tensor, k: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantage of each response (Shao et al., 2024), [B] -> [B]:

        A_i = (r_i − mean_g) / (σ + eps)      σ = std_g (scale=group), the std of all B scores (scale=batch)
        A_i =  r_i − mean_g                   scale=none (Dr. GRPO, Liu et al., 2025: no std division)

    std with Bessel's correction; eps = 1e-4 as TRL. A group whose scores are all equal gets A = 0 on every row.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    centred = scores - group_mean(scores, k)
    if scale == "none":
        return centred
    std = group_std(scores, k) if scale == "group" else scores.std().expand_as(scores)
    return centred / (std + eps)


def rloo(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024), [B] -> [B]:

        A_i = r_i − (1 / (k − 1)) · Σ_{j ≠ i in g} r_j  =  k / (k − 1) · (r_i − mean_g)

    computed in the first form. k ≥ 2 (ValueError otherwise: with one sample there is no other to compare with).
    """
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {k}")
    total = _groups(scores, k).sum(-1).repeat_interleave(k)
    return scores - (total - scores) / (k - 1)


def reinforce_pp_returns(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """REINFORCE++ (Hu, 2025): the return of each token, with γ = 1, of the per-token rewards r_t = −β·kl_t plus
    the score on the last valid token, whitened over the whole batch:

        G_t = Σ_{s ≥ t} r_s          A = (G − mean(G)) / sqrt(var(G) + 1e-8)      (over every valid token)

    Padding is 0. With the baseline variant, `scores` come in already centred on their group mean.
    """
    rewards = per_token_rewards(scores, kl, mask, kl_coef)
    valid = as_bool(mask)
    rewards = torch.where(valid, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    returns = rewards.flip(-1).cumsum(-1).flip(-1)
    return masked_whiten(returns, mask)


# ---------------------------------------------------------------------------------------------------------- table

@dataclass(frozen=True)
class Inputs:
    """What an estimator may read, derived from one rollout."""
    scores: torch.Tensor            # [B] the score optimised (normalised, clipped, missing-EOS penalty applied)
    kl: torch.Tensor                # [B, T] per-token KL estimate to the reference, 0 on padding
    mask: torch.Tensor              # [B, T]
    kl_coef: float                  # β of the KL penalty in the reward (0 when the KL is a loss term instead)
    group_size: int                 # k: consecutive rows sampled from one prompt
    values: torch.Tensor | None     # [B, T] value estimates (gae only)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    scale_rewards: str = "group"


@dataclass(frozen=True)
class Estimator:
    fn: Callable[[Inputs], tuple[torch.Tensor, torch.Tensor | None]]
    needs_value: bool = False
    grouped: bool = False           # compares the k samples of a prompt: needs k ≥ 2
    doc: str = ""


def _gae(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = per_token_rewards(x.scores, x.kl, x.mask, x.kl_coef)
    if x.whiten_rewards:
        rewards = masked_whiten(rewards, x.mask, shift_mean=False)
    advantages, returns = gae(rewards, x.values, x.mask, x.gamma, x.lam)
    return masked_whiten(advantages, x.mask), returns


def _sequence_reward(x: Inputs) -> torch.Tensor:
    """r_i = score_i − β · Σ_t kl_it: the KL penalty in the reward, for estimators of one number per response."""
    return x.scores - x.kl_coef * (x.kl * x.mask).sum(-1)


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(_gae, needs_value=True,
                     doc="GAE over per-token rewards (score at the last token, −β·KL on each), whitened"),
    "grpo": Estimator(lambda x: (broadcast(grpo(_sequence_reward(x), x.group_size, x.scale_rewards), x.mask), None),
                      grouped=True, doc="(r − mean_g) / std (ppo.scale_rewards: group, batch or none)"),
    "dr_grpo": Estimator(lambda x: (broadcast(grpo(_sequence_reward(x), x.group_size, "none"), x.mask), None),
                         grouped=True, doc="r − mean_g"),
    "rloo": Estimator(lambda x: (broadcast(rloo(_sequence_reward(x), x.group_size), x.mask), None),
                      grouped=True, doc="r − mean of the other k − 1"),
    "reinforce_pp": Estimator(lambda x: (reinforce_pp_returns(x.scores, x.kl, x.mask, x.kl_coef), None),
                              doc="per-token returns of score and −β·KL, whitened over the batch"),
    "reinforce_pp_baseline": Estimator(
        lambda x: (reinforce_pp_returns(x.scores - group_mean(x.scores, x.group_size), x.kl, x.mask, x.kl_coef),
                   None), grouped=True, doc="REINFORCE++ on scores minus their group mean"),
}
