"""torch.distributed set up from the launcher's environment (gloo on CPU, NCCL on CUDA).

Launchers: torchrun (one node or several: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or a SLURM job
that submitit started with one task per GPU (`hydra/launcher=slurm`, or `submitit_local` on one machine): the rank
and world size come from the job's environment, the address from its first node (`from_submitit`). Never start
torchrun inside such a task. Without either, everything here degrades to a single process: rank 0 of world size 1
(with a one-process group when FSDP asks for one).
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


def from_submitit() -> None:
    """In a task submitit started (SUBMITIT_EXECUTOR is set: slurm, or local for its test executor) and no
    torchrun around it: torchrun's variables from submitit's view of the job (global rank, local rank, number of
    tasks, the first node as the rendezvous address, a port derived from the job id), so `init` reads one
    environment whatever launched the process. A task of one is left alone."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    job = submitit.JobEnvironment()
    if job.num_tasks <= 1:
        return
    os.environ.update({"RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks),
                       "LOCAL_RANK": str(job.local_rank),
                       "MASTER_ADDR": "127.0.0.1" if os.environ["SUBMITIT_EXECUTOR"] == "local" else job.hostnames[0],
                       "MASTER_PORT": os.environ.get("MASTER_PORT") or str(port_for(job.job_id))})


def port_for(job_id: str) -> int:
    """A rendezvous port in 20000-39999 that every task of one job derives alike (from its job id's digits)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits[-6:]) % 20000


def init(device_kind: str, group_of_one: bool = False) -> Dist:
    """Join the process group the launcher describes (RANK, WORLD_SIZE, LOCAL_RANK), if any. `group_of_one`: a
    single process still gets a (one-member) group, which FSDP needs to shard over."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if world_size == 1:
        if group_of_one and not dist.is_initialized():
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def concat_over_ranks(d: Dist, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each 1-D CPU tensor of `values` concatenated over the ranks, in rank order, on every rank."""
    if not d.enabled:
        return values
    parts: list = [None] * d.world_size
    dist.all_gather_object(parts, values)
    return {k: torch.cat([part[k] for part in parts]) for k in values}


def all_ok(d: Dist, ok: bool) -> bool:
    """Did every rank succeed? (One collective; every rank gets the same answer, so all raise or none do.)"""
    if not d.enabled:
        return ok
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return all_sum(d, [0.0 if ok else 1.0], device)[0] == 0.0


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
