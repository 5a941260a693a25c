"""AdamW, the learning-rate schedule (linear warmup, then cosine or linear decay to lr * min_lr_ratio), and the
optimizer step every stage takes."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

from rlhf_cli.engine.guard import Guard

if TYPE_CHECKING:
    from rlhf_cli.config.schemas import OptimConfig


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D tensors) get no weight decay. The fused implementation (one kernel
    over all parameters: 4x faster than the per-tensor loop on a CPU) where every parameter allows it."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


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


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio),
    )


def apply_hyperparameters(optimizer, scheduler, cfg: OptimConfig) -> None:
    """Set lr, betas, eps and weight decay from the config after a checkpoint's state was loaded, so a resumed run
    follows its config (the same values in a plain resume; the new ones under force_resume=true) rather than the
    values the saved optimizer and scheduler states carry. Groups as `build_optimizer` makes them: [decay, none]."""
    for group in optimizer.param_groups:
        group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, initial_lr=cfg.lr)
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)


def optimizer_step(params, optimizer, scheduler, max_grad_norm: float, guard: Guard, step: int, loss: float):
    """Clip the gradients, step the optimizer and the schedule, zero the gradients; returns the gradient norm
    before clipping. A NaN/inf loss or gradient norm (`guard.step_ok`) drops the update instead, or stops the stage
    once train.max_skipped_steps is spent: the weights never see it. The schedule advances either way, so the
    learning rate stays a function of the step. Returns None for a skipped step."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # sharded (FSDP): a DTensor
    ok = guard.step_ok(step, loss=loss, gradient_norm=grad_norm)
    with warnings.catch_warnings():  # a skipped first step: torch warns that the schedule moves before the weights
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        if ok:
            optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm if ok else None
