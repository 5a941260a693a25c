"""torch.distributed set up from torchrun's environment (DDP; gloo on CPU, NCCL on CUDA).

Without torchrun everything here degrades to a single process: rank 0 of world size 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device_kind: str) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_sum(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks (for metrics)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_sum_named(d: Dist, values: dict[str, float], device: torch.device) -> dict[str, float]:
    """`all_sum` of named scalars: {name: sum over ranks}, in one collective."""
    return dict(zip(values, all_sum(d, list(values.values()), device)))
