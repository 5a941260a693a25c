"""Batch arithmetic and data order, shared by every training stage.

examples_per_step (global, per optimizer step) = micro-batch x grad_accum_steps x world_size, where the micro-batch
is the largest size up to `train.micro_batch_size` (a memory knob, an upper bound) that divides each process's
share, examples_per_step / world_size, into equal micro-batches. The data order is a pure function of (step, seed):
a seeded permutation per epoch, so the data position in a checkpoint is just the step, and a run resumes (at any
world size) on exactly the examples it would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from rlhf_cli.errors import ConfigError
from rlhf_cli.rl.masks import position_ids_from_mask

if TYPE_CHECKING:
    from rlhf_cli.config.schemas import DataConfig, TrainConfig


def largest_micro_batch(share: int, upper: int) -> int:
    """The largest micro-batch of at most `upper` rows that splits `share` rows into equal micro-batches:
    (16, 32) -> 16, (24, 16) -> 12, (7, 4) -> 1."""
    return next(m for m in range(min(share, upper), 0, -1) if share % m == 0)


def split_step(examples: int, world_size: int, upper: int, key: str = "train.examples_per_step") -> tuple[int, int]:
    """(micro-batch, grad_accum_steps) for a step of `examples` over `world_size` processes: each process takes
    examples / world_size of them in grad_accum_steps equal micro-batches of at most `upper`
    (`largest_micro_batch`). A ConfigError, naming `key`, when the examples do not split evenly over the processes.
    (32, 2, 32) -> (16, 1); (24, 1, 16) -> (12, 2); (30, 4, ...) -> refused."""
    per_rank, rest = divmod(examples, world_size)
    if rest or not per_rank:
        raise ConfigError(f"{key}={examples} does not split evenly over world_size={world_size} processes",
                          hint=f"make {key} a multiple of the number of processes")
    micro = largest_micro_batch(per_rank, upper)
    return micro, per_rank // micro


def micro_batch(train: TrainConfig, world_size: int) -> int:
    """The micro-batch each process steps with: `split_step`'s for the run's examples_per_step."""
    return split_step(train.examples_per_step, world_size, train.micro_batch_size)[0]


def total_steps(train: TrainConfig, n_examples: int) -> tuple[int, int]:
    """(steps of the run, steps per epoch) for a TrainConfig and a dataset of n_examples."""
    if n_examples < train.examples_per_step:
        raise ConfigError(f"only {n_examples} training examples for train.examples_per_step={train.examples_per_step}",
                          hint="lower train.examples_per_step or add data")
    per_epoch = n_examples // train.examples_per_step
    return (math.ceil(train.epochs * per_epoch) if train.epochs > 0 else train.max_steps), per_epoch


def step_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Indices of the examples of optimizer step `step` (0-based): a seeded permutation per epoch, the tail that
    does not fill a batch dropped. A pure function of (step, batch, n, seed): the data position is the step."""
    per_epoch = (n // batch) * batch
    start = step * batch
    epoch, offset = divmod(start, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)[:per_epoch]
    return perm[offset:offset + batch].tolist()


def rank_slice(examples: list, rank: int, world_size: int) -> list:
    """This rank's contiguous share of a global batch."""
    per_rank = len(examples) // world_size
    return examples[rank * per_rank:(rank + 1) * per_rank]


def padded_share(items: list, rank: int, world_size: int) -> tuple[list, int]:
    """(this rank's contiguous share of `items`, how many of them are real): ceil(n / world_size) items on every
    rank, a short share padded with copies of items[0] whose results the caller drops."""
    per_rank = -(-len(items) // world_size)
    share = items[rank * per_rank:(rank + 1) * per_rank]
    return share + [items[0]] * (per_rank - len(share)), len(share)


def rank_micro_batches(items: list, rank: int, world_size: int, size: int):
    """This rank's share of `items` (every world_size-th one from `rank`) in micro-batches of `size`, as
    (micro-batch, real). Every rank gets as many micro-batches as the busiest one needs, a rank past the end of its
    share getting `[items[0]]` with real=False (run it, discard it): ranks whose forward passes gather weights
    together (FSDP) stay in step. No items: no micro-batches."""
    mine = items[rank::world_size]
    per_rank = -(-len(items) // world_size)
    for k in range(-(-per_rank // size)):
        part = mine[k * size:(k + 1) * size]
        yield (part, True) if part else ([items[0]], False)


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a collated batch and add position_ids = position_ids_from_mask(attention_mask) (cumsum(mask) - 1,
    clamped at 0), so padded and unpadded sequences get the same positions."""
    batch = {k: v.to(device) for k, v in batch.items()}
    if "attention_mask" in batch:
        batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    return batch


def step_examples(examples: list, step: int, batch: int, seed: int) -> list:
    """The examples of optimizer step `step` (0-based), in `step_indices` order."""
    return [examples[i] for i in step_indices(step, batch, len(examples), seed)]


def describe_micro(micro: int, upper: int) -> str:
    """`micro_batch_size 12 (of at most 16)` as the batch line prints it; the bound only when it is not the size."""
    return f"micro_batch_size {micro}" + (f" (of at most {upper})" if micro != upper else "")


@dataclass(frozen=True)
class StepPlan:
    """The batch arithmetic of a run of optimizer steps over a dataset."""
    micro: int                # examples per micro-batch on each rank (at most train.micro_batch_size)
    grad_accum: int           # micro-batches per optimizer step on each rank
    total: int                # optimizer steps of the run
    per_epoch: int            # optimizer steps per pass over the dataset

    def describe(self, train: TrainConfig, world_size: int, unit: str = "") -> str:
        """The arithmetic as printed at start: examples_per_step = micro-batch x grad_accum_steps x world."""
        return (f"batch: examples_per_step {train.examples_per_step}{unit} = "
                f"{describe_micro(self.micro, train.micro_batch_size)} x grad_accum_steps {self.grad_accum} x "
                f"world_size {world_size}; {self.total} steps = {self.total / self.per_epoch:.2f} epochs of "
                f"{self.per_epoch} steps")


def step_plan(train: TrainConfig, n_examples: int, world_size: int) -> StepPlan:
    """`split_step` and `total_steps` for a TrainConfig, a dataset of n_examples and world_size processes."""
    return StepPlan(*split_step(train.examples_per_step, world_size, train.micro_batch_size),
                    *total_steps(train, n_examples))


def decide_packing(data: DataConfig, refusal: Callable[[], str | None]) -> str:
    """Settle `data.packing` to a bool, in place, and say how, in a few words for the start-up lines:
    true -> on (a ConfigError with the reason if `refusal()` gives one), false -> off, auto -> on where the model
    keeps packed examples apart (the same loss, fewer padding FLOPs), else off with `refusal()`'s reason."""
    if data.packing is False:
        data.packing = False
        return "packing off (data.packing=false)"
    why = refusal()
    if why is None:
        was, data.packing = data.packing, True
        return f"packing on ({'auto' if was == 'auto' else 'data.packing=true'}: each micro-batch one padding-free row)"
    if data.packing == "auto":
        data.packing = False
        return f"packing off (auto: {why})"
    raise ConfigError(f"data.packing=true, but {why}", hint="set data.packing=false (or auto)")
