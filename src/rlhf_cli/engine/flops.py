"""Model FLOPs utilisation (MFU): the FLOPs a step's tokens need, as a share of what the chip could do in its time.

    FLOPs of training (forward + backward)  = 6 · N · tokens
    FLOPs of a forward pass                 = 2 · N · tokens
    MFU                                     = FLOPs / (seconds · peak FLOP/s)

N = the parameters a token passes through in matmuls: every parameter but the input embedding table (a lookup);
an untied LM head counts, and a tied one still runs as a matmul, so it counts once. Attention's own FLOPs
(quadratic in the length) are left out, as in the usual 6·N·D convention. The peak is the chip's dense bf16
tensor-core figure from its datasheet; unknown chips (and CPUs) give no MFU.
"""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
             "L4": 121e12, "RTX 4090": 165e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    """The chip's dense bf16 peak in FLOP/s, or None (a CPU, or a GPU not in PEAK_BF16)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):   # "GH200" before "H200"
        if key in name:
            return PEAK_BF16[key]
    return None


def matmul_params(model: torch.nn.Module) -> int:
    """N: the model's parameters minus its input embedding table (counted once when the LM head is tied to it); a
    reward or value model (models.reward.RewardModel) is read through its backbone."""
    params = {id(p): p.numel() for p in model.parameters()}
    body = model if hasattr(model, "get_input_embeddings") else getattr(model, "backbone", None)
    embed = body.get_input_embeddings() if body is not None else None
    head = body.get_output_embeddings() if hasattr(body, "get_output_embeddings") else None
    if embed is not None and (head is None or head.weight is not embed.weight):
        params.pop(id(embed.weight), None)
    return sum(params.values())


def mfu(flops: float, seconds: float, device: torch.device) -> float | None:
    """flops / (seconds · peak), or None where the peak is unknown."""
    peak = peak_flops(device)
    return flops / (seconds * peak) if peak and seconds > 0 else None
