"""Attention-mask arithmetic shared by the models, the engine and the RL math (pure torch, no I/O).

A mask is [B, L] (bool, int or float), non-zero on real tokens and 0 on padding. Padding may be on the left
(prompts fed to `generate`), on the right (collated training batches, PPO responses) or both (a prompt + response
row). Every function here reads only where the mask is non-zero, so the same row gives the same numbers whatever
padding surrounds it.
"""

from __future__ import annotations

import torch

__all__ = ["as_bool", "position_ids_from_mask", "last_index", "first_index"]


def as_bool(mask: torch.Tensor) -> torch.Tensor:
    """Boolean view of a bool/int/float mask: True where mask != 0."""
    return mask if mask.dtype == torch.bool else mask != 0


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore padding:

        pos_t = max(Σ_{s ≤ t} 1[mask_s ≠ 0] − 1, 0)

    so the k-th real token of a row is at position k − 1 however much padding precedes it (left padding:
    [0, 0, 1, 1, 1] → [0, 0, 0, 1, 2]; right padding: [1, 1, 1, 0, 0] → [0, 1, 2, 2, 2]). Positions on padding are
    clamped at 0 or repeat the last real position; attention never reads them. An all-padding row gives all 0.
    Returns int64 of the mask's shape.
    """
    return (as_bool(mask).long().cumsum(-1) - 1).clamp(min=0)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, under left or right padding:

        last_b = L − 1 − argmax(flip(1[mask_b ≠ 0]))      (the first non-zero seen from the right)

    An all-padding row gives 0. Returns int64 [B] (one index per row of a [..., L] mask).
    """
    valid = as_bool(mask)
    idx = valid.shape[-1] - 1 - valid.flip(-1).to(torch.uint8).argmax(-1)
    return torch.where(valid.any(-1), idx, torch.zeros_like(idx))


def first_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first real token of each row, under left or right padding:

        first_b = argmax(1[mask_b ≠ 0])                   (the first non-zero seen from the left)

    An all-padding row gives 0. Returns int64 [B] (one index per row of a [..., L] mask).
    """
    return as_bool(mask).to(torch.uint8).argmax(-1)
