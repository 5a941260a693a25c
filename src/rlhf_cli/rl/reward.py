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
