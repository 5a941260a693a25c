"""AdamW and the learning-rate schedule: linear warmup, then cosine or linear decay to lr * min_lr_ratio."""

from __future__ import annotations

import math

import torch


def build_optimizer(params, cfg) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D tensors) get no weight decay."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    warmup:  (step + 1) / warmup_steps                      for step < warmup_steps
    cosine:  min + (1 - min) * 0.5 * (1 + cos(pi * p))       p = progress through the decay phase in [0, 1]
    linear:  min + (1 - min) * (1 - p)
    constant: 1
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return min_ratio + (1 - min_ratio) * (1 - p)


def build_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio),
    )
