"""The training scaffold every stage calls, as plain functions: set up the process, wrap a model for training, run a
micro-step, take an optimizer step (engine/optim.py), decide what is due at a step, resume and checkpoint.

A capability that changes how models are held or stepped (DDP or FSDP2, gradient checkpointing, torch.compile)
lands here once, and every stage gets it without a branch of its own:

    with process(t.device, t.precision, t.strategy) as (d, device):  # device, precision, process group up and down
        train_model = wrap_for_training(model, d, device, t)  # what the forward/backward runs through (FSDP: before
        training = start(plan, cfg, {"model": model}, ...)    #   the optimizer is built over the sharded weights)
        for micro, last in micro_batches(mine, micro_batch_size):
            with micro_step([train_model], last, device):     # gradient sync only on the last one, autocast
                loss.backward()
        step_ok = take_step(training, step, loss)             # clip, step, schedule, zero (engine/optim.py)
        if due(step, every, total_steps): ...                 # log / evaluate / checkpoint cadence
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhf_cli import charts
from rlhf_cli.engine import checkpoint, device as dev, dist, fsdp, rundir
from rlhf_cli.engine.guard import Guard
from rlhf_cli.engine.logging import console
from rlhf_cli.engine.optim import apply_hyperparameters, build_optimizer, build_scheduler, optimizer_step
from rlhf_cli.engine.recording import MetricsLog, close_failed
from rlhf_cli.engine.rundir import RunPlan
from rlhf_cli.models.loading import enable_gradient_checkpointing

if TYPE_CHECKING:
    from rlhf_cli.config.schemas import ComputeConfig, LoopConfig


@contextlib.contextmanager
def process(device_setting: str, precision: str = "auto", strategy: str = "ddp"
            ) -> Iterator[tuple[dist.Dist, torch.device]]:
    """(ranks, device) for the body of a stage: the device picked (`auto`: this rank's CUDA device when there is
    one, else the CPU), its precision set (engine.device.autocast), the process group the launcher describes
    (torchrun, or a submitit/SLURM task: engine.dist) joined, and left again however the body ends. FSDP shards
    over a group even in a single process."""
    dist.from_submitit()
    device = dev.pick(device_setting, dist.local_rank_from_env())
    dev.set_precision(precision)
    d = dist.init(device.type, group_of_one=strategy == "fsdp")
    try:
        yield d, device
    except BaseException:
        close_failed()  # trackers still open end as failed runs
        rundir.discard_failed()  # a failed replacement with nothing to resume leaves no .overwrite/
        raise
    finally:
        rundir.PREPARED.clear()
        dist.close()
        dev.set_precision("auto")


def main_first(d: dist.Dist, load, *args, **kwargs):
    """`load(*args, **kwargs)` on rank 0 first, then on the other ranks: whatever rank 0 builds and caches on the
    way (the built-in tiny model) is there, complete, before another rank looks for it."""
    if d.is_main:
        result = load(*args, **kwargs)
    dist.barrier(d)
    if not d.is_main:
        result = load(*args, **kwargs)
    return result


def wrap_for_training(model: torch.nn.Module, d: dist.Dist, device: torch.device, t: LoopConfig) -> torch.nn.Module:
    """The module a training forward/backward runs through, as `t` (the stage's loop knobs) says; call it before
    `start` builds the optimizer. This is the one place a different way of holding a model for training slots in.

    t.strategy: ddp = the model itself in one process, DDP (gradients averaged over ranks at the last micro-step)
    under torchrun; evaluation, checkpoints and saving use the unwrapped model. fsdp = the model sharded in place
    over the processes (engine/fsdp.py, t.fsdp): the same object trains, evaluates and checkpoints.

    t.gradient_checkpointing: each transformer layer's activations are recomputed in the backward pass instead of
    kept (transformers' non-reentrant checkpointing, in training mode only: evaluation and sampling are untouched).

    t.compile: the training path runs through torch.compile (after DDP, so its graph breaks at gradient buckets);
    the model itself stays uncompiled for evaluation, sampling and saving. Its first steps compile, and a new input
    shape may compile again.
    """
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    wrapped = model
    if t.strategy == "fsdp":
        fsdp.shard(model, device, d, t.fsdp)
    elif d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(wrapped) if t.compile else wrapped


def load_device(device: torch.device, t: ComputeConfig) -> torch.device:
    """Where a stage loads its models before `wrap_for_training`/`hold_frozen`: the host under fsdp (fully_shard
    moves one block at a time to the device and keeps its shard there, so models whose full weights do not fit
    one device, or do not fit it together, still load), the training device otherwise."""
    return torch.device("cpu") if t.strategy == "fsdp" else device


def hold_frozen(model, d: dist.Dist, device: torch.device, t: ComputeConfig):
    """A model that is only run (PPO's reference and reward model), held as `t.strategy` says: sharded like the
    trained ones under fsdp (no optimizer state, no copy kept for saving), a full copy per process under ddp."""
    if t.strategy == "fsdp" and isinstance(model, torch.nn.Module):
        fsdp.shard(model, device, d, t.fsdp, trained=False)
    return model


def published(model, d: dist.Dist):
    """The trained model with its full weights, to save and publish on rank 0 (every rank calls it: a sharded
    model's weights are gathered together; ranks other than 0 get None): engine.fsdp.gathered."""
    return fsdp.gathered(model, d)


def generating(model):
    """The context a model samples in (every rank, together): engine.fsdp.generating."""
    return fsdp.generating(model)


def micro_batches(items: Sequence, size: int) -> Iterator[tuple[Sequence, bool]]:
    """(micro-batch, is_last) over consecutive slices of `size` items (a list, or a tensor of row indices)."""
    n = -(-len(items) // size)
    for k in range(n):
        yield items[k * size:(k + 1) * size], k == n - 1


@contextlib.contextmanager
def micro_step(wrapped: Sequence[torch.nn.Module], sync: bool, device: torch.device) -> Iterator[None]:
    """The context of one forward/backward of a gradient-accumulation window: the ranks exchange gradients only
    when `sync` (the window's last micro-batch; DDP's no_sync, FSDP's gradient sync switch), and the forward runs
    under the device's autocast."""
    with contextlib.ExitStack() as stack:
        for model in wrapped:
            fsdp.set_gradient_sync(model, sync)
            if not sync and hasattr(model, "no_sync"):
                stack.enter_context(model.no_sync())
        stack.enter_context(dev.autocast(device))
        yield


def due(step: int, every: int, last: int) -> bool:
    """Is a periodic action (log, evaluation, checkpoint) due after step `step` (counted from 1)? At every
    `every`-th step and always at the last step of the run."""
    return step % every == 0 or step == last


@dataclass
class Training:
    """What a training loop steps and records with (`start` builds it)."""
    params: list                     # the trained parameters (clipped together; a frozen base is left out)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    max_grad_norm: float
    guard: Guard                     # stops a diverged run (engine/guard.py)
    log: MetricsLog                  # metrics.jsonl and the trackers of `logger` (close it with the summary)
    resumed: dict                    # the state of the checkpoint this run continues from; {} for a fresh run

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses (the one the schedule set last)."""
        return self.optimizer.param_groups[0]["lr"]

    def step_metrics(self) -> dict:
        """What every stage logs after an optimizer step: the learning rate, and the skipped steps once any were."""
        skipped = self.guard.skipped
        return {"lr": self.lr, **({"skipped_steps": skipped} if skipped else {})}


def start(plan: RunPlan, cfg, models: dict, total_steps: int, d: dist.Dist, restore_rng: bool,
          unit: str = "step", log: MetricsLog | None = None) -> Training:
    """AdamW over the trained `models`' parameters and its schedule over `total_steps` optimizer steps, resumed
    from the plan's checkpoint if there is one (`resume`, announced on the console), the divergence guard (with the
    skipped-step count a resumed run carries), and the metrics log (cut back to the checkpoint's step on resume;
    `log`: go on writing that one, as the next model of a run that trains several, one after another)."""
    params = [p for model in models.values() for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    state = resume(plan, models, optimizer, scheduler, cfg.optim, restore_rng)
    if state:
        console(d.is_main).print(f"resumed from {plan.resume_from} ({unit} {state['step']})" + (
            "; it is a run's final checkpoint, without optimizer state: AdamW's moments start afresh for any further "
            "steps" if state.get("final") else ""))
    guard = Guard(cfg.stage, plan.checkpoints, cfg.optim.lr, cfg.train.max_skipped_steps,
                  state.get("skipped_steps", 0), unit=unit)
    if log is None:
        log = MetricsLog(plan.work_dir, d.is_main, cfg, resume_step=state["step"] if state else None)
    return Training(params, optimizer, scheduler, cfg.optim.max_grad_norm, guard, log, state)


def record_end(training: Training, stage: str, run_dir: Path, metrics: dict, artifact: str) -> list[Path]:
    """Once the artifact is published (rank 0): the run's charts drawn from metrics.jsonl (rlhf_cli.charts), then
    the trackers ended with the final metrics and the paths of the artifact (`<run_dir>/model`, named `artifact`)
    and the charts. Returns the charts."""
    pngs = charts.draw(stage, run_dir)
    training.log.close(metrics, {artifact: run_dir / "model", "charts": pngs})
    return pngs


def take_step(training: Training, step: int, loss: float) -> float | None:
    """engine.optim.optimizer_step with the run's parameters, optimizer, schedule, clip norm and guard: the
    gradient norm before clipping, or None when the guard dropped a non-finite update."""
    return optimizer_step(training.params, training.optimizer, training.scheduler, training.max_grad_norm,
                          training.guard, step, loss)


def resume(plan: RunPlan, models: dict, optimizer, scheduler, optim_cfg, restore_rng: bool) -> dict:
    """The state dict of the checkpoint the run continues from, after loading it into `models`, the optimizer and
    the scheduler, with lr/betas/eps/weight decay taken from the config (engine.optim.apply_hyperparameters);
    {} for a fresh run. `restore_rng`: also restore this process's RNG states from the checkpoint."""
    if plan.resume_from is None:
        return {}
    state = checkpoint.load(plan.resume_from, models, optimizer, scheduler, restore_rng=restore_rng)
    apply_hyperparameters(optimizer, scheduler, optim_cfg)
    return state


def save_checkpoint(d: dist.Dist, directory: Path, step: int, models: dict, training: Training, state: dict,
                    cfg, data_sha256: str, final: bool = False) -> None:
    """Checkpoint `step-<step>` (every rank waits for it): the models, optimizer, scheduler and RNG states, the
    stage's `state` with the guard's skipped-step count, the resolved config and the data's fingerprint (which a
    resume checks). Written by rank 0, or, for sharded models, by every rank with torch.distributed.checkpoint
    (engine.checkpoint.save_sharded). `final` (the run's last step, whose artifact is published next): without the
    optimizer state, twice the trained weights; a run resumed from it only publishes."""
    args = (directory, step, models, None if final else training.optimizer, training.scheduler,
            {"step": step, **state, "skipped_steps": training.guard.skipped, "config": asdict(cfg),
             "data_sha256": data_sha256, **({"final": True} if final else {})},
            cfg.train.keep_checkpoints, cfg.artifact_check)
    if any(fsdp.is_sharded(m) for m in models.values()):
        checkpoint.save_sharded(*args, d=d)
    elif d.is_main:
        checkpoint.save(*args)
    dist.barrier(d)
