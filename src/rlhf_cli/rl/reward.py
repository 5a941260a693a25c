"""Reward-model math: the pairwise ranking loss and the pooling of hidden states (pure torch, no I/O).

Scores come in pairs: r_c[i] for the chosen response of pair i, r_r[i] for the rejected one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_cli.rl.masks import first_index, last_index


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_coef: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Bradley-Terry ranking loss (InstructGPT), optionally with a margin and reward centering.

        loss_i = -log σ(r_c,i − r_r,i − m_i) + c · (r_c,i + r_r,i)²

    written with logsigmoid, which is stable for large |r_c − r_r|. m_i is the pair's margin (0 when absent);
    c = center_coef pulls the mean reward towards 0 (Eisenstein et al. 2023). reduction: "mean" or "sum".
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss.mean() if reduction == "mean" else loss.sum()


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per sequence from hidden states [B, L, H]:
    last  = h[b, last_index(mask)_b]         (causal LMs: the only position that has seen the whole text)
    first = h[b, first_index(mask)_b]        (encoders with a [CLS] token)
    mean  = Σ_t mask·h / Σ_t mask            (mean over real tokens)
    An all-padding row pools h[b, 0] (last, first) or the zero vector (mean)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if how == "last":
        return hidden[rows, last_index(attention_mask)]
    if how == "first":
        return hidden[rows, first_index(attention_mask)]
    if how == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    raise ValueError(f"unknown pooling {how!r}")


# ---- rewards of several components (a reward model and reward functions) --------------------------------------

def weighted_sum(components: dict[str, torch.Tensor], weights: dict[str, float], k: int = 1) -> torch.Tensor:
    """The score of each response from its components ([B] each, NaN where a function returned None):

        score_i = Σ_c w_c · r_c,i      over the components c that apply to row i (a None adds nothing)

    (TRL's sum_then_normalize; an estimator then centres or scales the sum). `k` is unused (the table's
    signature)."""
    total = None
    for name, values in components.items():
        term = weights[name] * torch.nan_to_num(values, nan=0.0)
        total = term if total is None else total + term
    return total


def normalize_then_sum(components: dict[str, torch.Tensor], weights: dict[str, float], k: int,
                       eps: float = 1e-4) -> torch.Tensor:
    """Each component standardised within the row's group of k responses first, then weighted and summed (GDPO,
    Liu et al. 2026; TRL's multi_objective_aggregation=normalize_then_sum):

        score_i = Σ_c w_c · (r_c,i − mean_g(r_c)) / (std_g(r_c) + eps)

    mean and std (Bessel's correction) over the rows of the group where c applies; a None adds nothing. A group
    where a component is constant gets 0 from it."""
    total = None
    for name, values in components.items():
        g = values.reshape(-1, k)
        present = ~torch.isnan(g)
        n = present.sum(-1, keepdim=True).clamp(min=1)
        mean = torch.nan_to_num(g, nan=0.0).sum(-1, keepdim=True) / n
        centred = torch.where(present, g - mean, torch.zeros_like(g))
        std = (centred.pow(2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        term = weights[name] * (centred / (std + eps)).reshape(-1)
        total = term if total is None else total + term
    return total


COMBINE = {"sum": weighted_sum, "normalize_then_sum": normalize_then_sum}


def unscored(components: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] bool: the rows that no component applies to (every one returned None): no reward signal at all."""
    return torch.stack([torch.isnan(v) for v in components.values()]).all(0)


# ---- reward-model ensembles (Coste et al. 2023) ----------------------------------------------------------------

def standardize_members(scores: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """Each member's scores on its own scale: [K, B] raw scores, [K] held-out means and standard deviations ->

        z_k,i = (r_k,i − μ_k) / σ_k

    so that members trained apart (different seeds, data, scales) can be compared and combined."""
    return (scores - means.unsqueeze(-1)) / stds.unsqueeze(-1)


def ensemble_mean(z: torch.Tensor, coef: float = 0.0) -> torch.Tensor:
    """mean: R_i = (1/K) Σ_k z_k,i over the K members ([K, B] -> [B]); `coef` unused (the table's signature)."""
    return z.mean(0)


def ensemble_min(z: torch.Tensor, coef: float = 0.0) -> torch.Tensor:
    """min (worst-case optimisation, WCO): R_i = min_k z_k,i ([K, B] -> [B]); `coef` unused."""
    return z.min(0).values


def ensemble_uwo(z: torch.Tensor, coef: float) -> torch.Tensor:
    """uwo (uncertainty-weighted optimisation): the mean less λ = `coef` times the members' disagreement,

        R_i = (1/K) Σ_k z_k,i − λ · (1/K) Σ_k (z_k,i − z̄_i)²

    the population variance across members, as Coste et al. (2023) write it ([K, B] -> [B])."""
    return z.mean(0) - coef * z.var(0, unbiased=False)


ENSEMBLE = {"mean": ensemble_mean, "min": ensemble_min, "uwo": ensemble_uwo}
