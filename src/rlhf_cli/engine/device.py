"""Device auto-selection and mixed precision: CUDA with bf16 autocast when present, else CPU fp32
(`train.precision`, set once per process by engine.train.process)."""

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


_PRECISION = {"setting": "auto"}


def set_precision(setting: str) -> None:
    """This process's `train.precision`: auto, fp32 or bf16 (see autocast_dtype)."""
    if setting not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision={setting!r} is not one of auto, fp32, bf16",
                          hint="use train.precision=auto")
    _PRECISION["setting"] = setting


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of forward passes on `device`, None for plain fp32: auto = bf16 on a CUDA device that
    supports it; bf16 = bf16 on CUDA or CPU; fp32 = none."""
    setting = _PRECISION["setting"]
    if setting == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16 if setting == "bf16" or device.type == "cuda" else None


def autocast(device: torch.device):
    """The forward passes' autocast (autocast_dtype), or a no-op context for plain fp32."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def frozen_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype of models that are only run, never trained (`model.dtype`): auto = bf16 on a CUDA device that
    supports it, else fp32; float32 / bfloat16 as asked."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def precision(device: torch.device) -> str:
    return "bf16-autocast" if autocast_dtype(device) is not None else "fp32"
