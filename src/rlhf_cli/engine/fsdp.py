"""FSDP2 for `train.strategy=fsdp`: every model sharded over the processes with torch's `fully_shard`.

Each transformer block (the classes a Hugging Face model lists in `_no_split_modules`) is one FSDP unit and the
rest of the model (embeddings, final norm, LM or reward head) is the root unit. A process keeps 1/world_size of
each parameter, of its gradient and of its AdamW moments; a unit's full weights exist only while it runs (gathered
before its forward, freed after it unless `train.fsdp.reshard_after_forward=false`, gathered again for the
backward), and gradients are reduce-scattered (averaged, like DDP) into the shards. `fully_shard` changes the model
in place: the same object trains, evaluates and checkpoints, and every process must run each of its forward
passes (they gather together).

Precision: the shards stay fp32 (the optimizer's master weights); under bf16 (`train.precision`, auto on CUDA) the
units are gathered and run in bf16 and gradients reduced in fp32 (FSDP's MixedPrecisionPolicy). On CPU: fp32.

Loading: stages load a model into host memory under fsdp (engine.train.load_device); `fully_shard` moves each
unit to the device and keeps only its shard there, so the device never holds more than one unit in full.

What costs memory beyond the shards:
- generation (`generating`): the policy's units are gathered once at the first decoding step and kept until the
  rollout ends, so decoding does not all-gather every block at every token: the full policy in the compute dtype
  on every device for the rollout's duration (2 bytes per parameter under bf16).
- publishing (`gathered`): the full fp32 weights in rank 0's host memory (4 bytes per parameter), once at the end.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from rlhf_cli.engine import device as dev, dist
from rlhf_cli.errors import ConfigError
from rlhf_cli.models import lora
from rlhf_cli.models.loading import bare

if TYPE_CHECKING:
    from rlhf_cli.config.schemas import FSDPConfig

# sharded model -> (its structure on the meta device to receive the full weights, or None for a frozen one;
#                   reshard_after_forward of its blocks; of its root)
_SHARDED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(bare(model), FSDPModule)


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that become FSDP units below the root: the transformer blocks, i.e. the modules whose class a
    Hugging Face model inside `model` names in `_no_split_modules` (decoder layers); without such a list, the
    entries of the model's largest ModuleList."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: torch.nn.Module, device: torch.device, d: dist.Dist, cfg: FSDPConfig, trained: bool = True) -> None:
    """Shard `model` in place over the processes' mesh (`cfg`: train.fsdp): each transformer block, then the root.
    `trained`: keep the model's structure (on the meta device, no memory) so `gathered` can hand rank 0 a plain
    copy with the full weights at the end; a frozen model (no backward to wait for) frees its root's gathered
    weights after every forward pass too."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    compute = dev.autocast_dtype(device)
    dtypes = {p.dtype for p in model.parameters()}
    if compute is None and len(dtypes) > 1:
        names = ", ".join(sorted(str(t).removeprefix("torch.") for t in dtypes))
        raise ConfigError(f"train.strategy=fsdp gathers a model's weights in one dtype, but this one holds {names} "
                          f"parameters (a frozen base in another dtype than its trained adapters or head)",
                          hint="set model.dtype=float32, or train.precision=bf16 (weights then gathered in bf16)")
    if cfg.cpu_offload and device.type != "cuda":
        raise ConfigError("train.fsdp.cpu_offload=true moves shards between the GPU and host memory, but this run "
                          f"is on {device.type}", hint="drop train.fsdp.cpu_offload (or run on a CUDA device)")
    replica = lora.structure_copy(model) if trained else None
    options = {"mesh": init_device_mesh(device.type, (d.world_size,)),
               "mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute
               else MixedPrecisionPolicy(),
               "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()}
    # one process frees nothing by resharding (its shard is the whole block): keep blocks gathered between the
    # forward and the backward, one all-gather copy fewer per block and step
    reshard = cfg.reshard_after_forward and d.world_size > 1
    for unit in units(model):
        fully_shard(unit, reshard_after_forward=reshard, **options)
    fully_shard(model, reshard_after_forward=reshard and not trained, **options)
    _SHARDED[model] = (replica, reshard, reshard and not trained)


def set_gradient_sync(model, sync: bool) -> None:
    """Gradient accumulation without communication: a sharded model reduce-scatters its gradients only when
    `sync` (the window's last micro-batch); until then each process accumulates unsharded gradients."""
    if is_sharded(model):
        bare(model).set_requires_gradient_sync(sync)


@contextlib.contextmanager
def generating(model) -> Iterator[None]:
    """The body decodes with `model` (every process, together): a sharded model's units stay gathered after their
    first forward pass, so the decoding steps that follow need no collective (processes may then take different
    numbers of steps), and are freed when the body ends. No-op for a model that is not sharded."""
    if not is_sharded(model):
        yield
        return
    root = bare(model)
    root.set_reshard_after_forward(False)
    try:
        yield
    finally:
        _, blocks, top = _SHARDED[root]
        for part in resharded(root):
            part.set_reshard_after_forward(top if part is root else blocks, recurse=False)


def resharded(model) -> list:
    """Free every gathered unit of a sharded model, so it holds only its shards (as a state dict must see it: a
    forward pass without a backward leaves the root gathered); returns its FSDP modules. [] when not sharded."""
    from torch.distributed.fsdp import FSDPModule

    parts = [m for m in bare(model).modules() if isinstance(m, FSDPModule)]
    for part in parts:
        part.reshard()
    return parts


def gathered(model, d: dist.Dist):
    """The model to save or sample from on rank 0: for a sharded model a plain copy on the CPU holding the full
    weights (every process takes part in gathering them), else the model itself; ranks other than 0 get None.
    The copy has the model's structure as it was sharded (adapters included) and its plain attributes as they are
    now (a reward model's score statistics)."""
    if not is_sharded(model):
        return bare(model) if d.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    root = bare(model)
    resharded(root)
    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    replica = _SHARDED[root][0]
    if not d.is_main or replica is None:
        return None
    tied = _tied_names(replica)
    replica.load_state_dict(state, assign=True)
    for first, *others in tied:  # load_state_dict(assign=True) gives each name its own tensor: tie them again
        for name in others:
            _set_param(replica, name, replica.get_parameter(first))
    for key, value in vars(root).items():
        if not key.startswith("_") and key != "training" and isinstance(value, (dict, list, str, int, float, bool)):
            setattr(replica, key, copy.deepcopy(value))
    return replica


def _tied_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one parameter (tied embeddings), each group in registration order."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _set_param(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, param)
