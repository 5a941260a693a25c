"""Device auto-selection and mixed precision: CUDA with bf16 autocast when present, else CPU fp32."""

from __future__ import annotations

import contextlib

import torch

from rlhf_cli.errors import ConfigError


def pick(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible", hint="use train.device=auto or cpu")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA devices that support it; plain fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def frozen_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype of models that are only run, never trained (`model.dtype`): auto = bf16 on a CUDA device that
    supports it, else fp32; float32 / bfloat16 as asked."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def precision(device: torch.device) -> str:
    return "bf16-autocast" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
