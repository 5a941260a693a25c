"""Checkpoints: the full training state under run_dir/checkpoints/step-N/, written atomically.

A checkpoint holds every model being trained (safetensors), the optimizer and scheduler states, the RNG states, and
a JSON `state` with the stage's counters (step, data position, ...), the run's config, and the name and size (and,
when small, the sha256) of every file beside it. It is written to a hidden temporary directory and renamed into
place, so a kill at any moment leaves either the old set of checkpoints or the new one, never a half-written step;
a failed write (disk full, permissions) removes its temporary directory and says so in one message. Before a
resume, `verify` checks the files against their record, so a damaged or altered checkpoint is refused by name
instead of failing deep inside torch (or, worse, loading). Tensors are read back with
`torch.load(weights_only=True)`, weights with safetensors. Nothing in it depends on the world size: only rank 0
writes, and every rank reads.

Sharded models (train.strategy=fsdp) are checkpointed with torch.distributed.checkpoint instead (`save_sharded`):
every rank writes its shards of the trained weights and of the optimizer state into `shards/` of the same
temporary directory, rank 0 adds the rest and renames it, so a kill leaves the last complete checkpoint as it was.
`load` reads either kind into either kind of model: shards at any world size (torch.distributed.checkpoint
reshards them) or into plain models, and a DDP run's files into sharded models. The shards' directory must be one
that every rank sees (a shared file system across nodes).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from rlhf_cli import artifacts
from rlhf_cli.engine.fsdp import is_sharded, resharded
from rlhf_cli.errors import ArtifactError
from rlhf_cli.models.loading import bare

STATE = "state.json"
SHARDS = "shards"   # torch.distributed.checkpoint's files of a sharded (FSDP) checkpoint
_STEP = re.compile(r"^step-(\d+)$")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DDP/compile wrappers (models.loading.bare)."""
    return bare(model)


def save_weights(model: torch.nn.Module, file: Path) -> None:
    """What trains of a model, as safetensors: every weight of a fully trained model (tied weights once), only the
    trained ones (LoRA adapters, a reward head) of a model with a frozen base, which stays as loaded."""
    if all(p.requires_grad for p in model.parameters()):
        save_model(model, str(file))
    else:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(file))


def load_weights(model: torch.nn.Module, file: Path) -> None:
    """The counterpart of `save_weights`: a file must hold exactly the weights that train in `model` (a
    checkpoint of a LoRA run does not load into a full model, or the reverse)."""
    if all(p.requires_grad for p in model.parameters()):
        load_model(model, str(file))
        return
    weights = load_file(str(file))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trained:
        extra, missing = sorted(set(weights) - trained), sorted(trained - set(weights))
        raise ValueError(f"{file.name} holds other weights than this model trains (unexpected: {extra[:3]}, "
                         f"missing: {missing[:3]}): was it written with other model.lora settings?")
    model.load_state_dict(weights, strict=False)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_root: Path, step: int, models: dict, optimizer, scheduler, state: dict, keep: int,
         check: str = "auto") -> Path:
    """Write checkpoint `step-<step>` atomically, then keep only the newest `keep`. Call on rank 0 only.
    A failed write leaves the earlier checkpoints as they were and raises a StorageError naming the last good one.
    optimizer=None: no optimizer.pt (a run's final checkpoint: its artifact is published next, and AdamW's state,
    twice the weights, would only be written to be thrown away)."""
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".step-{step}.tmp-{os.getpid()}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, model in models.items():
            save_weights(unwrap(model), tmp / f"{name}.safetensors")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        finish(tmp, final, f".step-{step}.old-{os.getpid()}", scheduler, state, check)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if artifacts.write_failure(exc) is None:
            raise
        last = latest(ckpt_root)
        raise artifacts.storage_error(
            f"checkpoint step-{step}", exc,
            hint=f"free space on that disk (or lower train.keep_checkpoints) or fix its permissions, then continue "
                 f"with resume=true from {last if last else 'the start (no checkpoint was written yet)'}") from exc
    shutil.rmtree(ckpt_root / f".step-{step}.old-{os.getpid()}", ignore_errors=True)
    for old in list_steps(ckpt_root)[:-keep]:
        shutil.rmtree(ckpt_root / f"step-{old}", ignore_errors=True)
    return final


def finish(tmp: Path, final: Path, old: str, scheduler, state: dict, check: str) -> None:
    """The rest of a checkpoint whose weights are in `tmp`: the scheduler and RNG states, then `state.json` with
    every file's name and size (and sha256), then the rename into place (an earlier `final`, a step re-run after a
    resume, moved aside to `old` first, so there is never neither)."""
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = rng_state()
    rng["python"] = _py_state_to_json(rng["python"])
    torch.save(rng, tmp / "rng.pt")
    files = artifacts.file_sizes(tmp)
    sha = artifacts.content_hash(tmp, list(files)) if artifacts.wants_full_check(sum(files.values()), check) else None
    (tmp / STATE).write_text(artifacts.dumps({**state, "files": files, "sha256": sha}, indent=1))
    if final.exists():
        os.rename(final, final.parent / old)
    os.rename(tmp, final)


def save_sharded(ckpt_root: Path, step: int, models: dict, optimizer, scheduler, state: dict, keep: int,
                 check: str = "auto", *, d) -> Path:
    """`save` for sharded models, called on every rank: the trained weights and the optimizer state (FQN-keyed,
    `<model name>.<parameter>`) as torch.distributed.checkpoint shards written by every rank, then rank 0 writes
    the scheduler, RNG and state files and renames the directory into place. A failure on any rank (disk full)
    fails the save on every rank, with the earlier checkpoints as they were."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    from rlhf_cli.engine import dist

    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".step-{step}.tmp-sharded"
    box = torch.nn.ModuleDict({name: unwrap(model) for name, model in models.items()})
    resharded(box)
    options = StateDictOptions(ignore_frozen_params=True)  # LoRA: the adapters (and heads), never the frozen base
    if optimizer is not None:
        weights, optim = get_state_dict(box, optimizer, options=options)
        content = {"model": trained_only(box, weights), "optim": optim}
    else:
        content = {"model": trained_only(box, get_model_state_dict(box, options=options))}

    def prepare() -> None:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    phases = ((prepare, False), (lambda: dcp.save(content, checkpoint_id=tmp / SHARDS), True),
              (lambda: finish(tmp, final, f".step-{step}.old-sharded", scheduler, state, check), False))
    for phase, everyone in phases:
        failure = None
        try:
            if everyone or d.is_main:
                phase()
        except BaseException as exc:  # noqa: BLE001 - every rank learns of it below and raises
            if not _caught(exc):
                raise
            failure = _cause(exc)
        if not dist.all_ok(d, failure is None):
            if d.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if failure is not None and artifacts.write_failure(failure) is None:
                raise failure
            last = latest(ckpt_root)
            raise artifacts.storage_error(
                f"checkpoint step-{step}", failure or OSError("another process could not write its shards"),
                hint=f"free space on that disk (or lower train.keep_checkpoints) or fix its permissions, then "
                     f"continue with resume=true from {last if last else 'the start (no checkpoint was written yet)'}")
    if d.is_main:
        shutil.rmtree(ckpt_root / f".step-{step}.old-sharded", ignore_errors=True)
        for old in list_steps(ckpt_root)[:-keep]:
            shutil.rmtree(ckpt_root / f"step-{old}", ignore_errors=True)
    return final


def trained_only(box: torch.nn.Module, state: dict) -> dict:
    """The entries of `state` that are trained parameters: no buffers, and no frozen weight under another name
    (an LM head tied to a frozen embedding), as a plain checkpoint holds them (`save_weights`)."""
    trained = {name for name, p in box.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


def _caught(exc: BaseException) -> bool:
    """An error to report: any Exception, and torch.distributed.checkpoint's CheckpointException (a BaseException),
    never an interrupt."""
    return isinstance(exc, Exception) or type(exc).__name__ == "CheckpointException"


def _cause(exc: BaseException) -> BaseException:
    """The first rank's own exception inside torch.distributed.checkpoint's CheckpointException, else `exc`."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) and isinstance(first[0], BaseException) else exc
    return exc


def list_steps(ckpt_root: Path) -> list[int]:
    """Steps of the complete checkpoints, oldest first (temporary directories of a killed save are ignored)."""
    if not ckpt_root.is_dir():
        return []
    steps = []
    for child in ckpt_root.iterdir():
        m = _STEP.match(child.name)
        if m and (child / STATE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest(ckpt_root: Path) -> Path | None:
    steps = list_steps(ckpt_root)
    return ckpt_root / f"step-{steps[-1]}" if steps else None


def clean_partial(ckpt_root: Path) -> None:
    """Remove the temporary directories a killed save left behind."""
    if ckpt_root.is_dir():
        for child in ckpt_root.iterdir():
            if child.name.startswith(".step-"):  # .step-N.tmp-<pid>, .step-N.old-<pid>
                shutil.rmtree(child, ignore_errors=True)


def _damaged(path: Path, problem: str) -> ArtifactError:
    earlier = [s for s in list_steps(path.parent) if f"step-{s}" != path.name]
    fallback = (f"delete {path} to continue from step-{earlier[-1]}, the previous checkpoint, or start over"
                if earlier else "start over")
    return ArtifactError(f"checkpoint {path} is damaged: {problem}",
                         hint=f"{fallback} with overwrite=true")


def verify(path: Path, check: str = "auto") -> dict:
    """A checkpoint's state, after checking its files against the names, sizes and sha256 recorded when it was
    written (`artifacts.verify_files`); a damaged one raises ArtifactError naming the file and what to do."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise _damaged(path, f"{STATE} cannot be read ({exc})") from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _damaged(path, f"{STATE} holds no step counter")
    files, sha = state.pop("files", None), state.pop("sha256", None)
    if files is not None:  # checkpoints written before files were recorded have only what torch itself checks
        problem = artifacts.verify_files(path, files, sha, check)
        if problem:
            raise _damaged(path, problem)
    return state


def load(path: Path, models: dict, optimizer=None, scheduler=None, restore_rng: bool = True,
         check: str | None = None) -> dict:
    """Load a checkpoint into the given objects; returns its `state` dict. `check` (auto | full | sizes) verifies
    the files first; a file that does not load raises ArtifactError naming it. A checkpoint without optimizer state
    (a final one) leaves the optimizer as it is. Shards (`save_sharded`) load into sharded or plain models (every
    rank of a process group takes part), a plain checkpoint's files into sharded models too."""
    state = verify(path, check) if check else None
    try:
        models = {name: unwrap(model) for name, model in models.items()}
        resharded(torch.nn.ModuleDict(models))
        if (path / SHARDS).is_dir():
            final = (state if state is not None else verify(path, "sizes")).get("final", False)
            load_shards(path / SHARDS, models, None if final else optimizer)
        elif any(is_sharded(m) for m in models.values()):
            load_full_into_shards(path, models, optimizer)
        else:
            for name, model in models.items():
                load_weights(model, path / f"{name}.safetensors")
            if optimizer is not None and (path / "optimizer.pt").is_file():
                optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        if scheduler is not None:
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if restore_rng:
            rng = torch.load(path / "rng.pt", weights_only=True)
            rng["python"] = _py_state_from_json(rng["python"])
            set_rng_state(rng)
    except BaseException as exc:  # noqa: BLE001 - safetensors, torch, pickle and DCP each raise their own types
        if not _caught(exc):
            raise
        cause = _cause(exc)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise _damaged(path, f"it does not load ({first})") from exc
    return state if state is not None else verify(path, "sizes")


def load_shards(directory: Path, models: dict, optimizer=None) -> None:
    """torch.distributed.checkpoint shards into `models` (sharded at any world size, or plain) and, given one, the
    optimizer. A checkpoint that lacks a weight the models train (a full model's checkpoint into adapters, or the
    reverse) fails to load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    box = torch.nn.ModuleDict(models)
    read, write = StateDictOptions(ignore_frozen_params=True), StateDictOptions(ignore_frozen_params=True,
                                                                                strict=False)
    if optimizer is not None:
        weights, optim = get_state_dict(box, optimizer, options=read)
        content = {"model": trained_only(box, weights), "optim": optim}
    else:
        content = {"model": trained_only(box, get_model_state_dict(box, options=read))}
    dcp.load(content, checkpoint_id=directory)
    set_model_state_dict(box, content["model"], options=write)
    if optimizer is not None:
        set_optimizer_state_dict(box, optimizer, content["optim"], options=write)


def load_full_into_shards(path: Path, models: dict, optimizer=None) -> None:
    """A plain checkpoint (one safetensors file per model, optimizer.pt keyed by parameter index) into sharded
    models: each rank reads the full tensors and keeps its shards. The optimizer's indices number the parameters
    of its groups in turn, which this run's optimizer, built alike (engine.optim.build_optimizer), names."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    box = torch.nn.ModuleDict(models)
    full = {f"{name}.{key}": value for name in models
            for key, value in load_file(str(path / f"{name}.safetensors")).items()}
    names: dict[int, list[str]] = {}
    for key, p in box.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(key)
    missing = [aliases[0] for aliases in names.values() if not any(a in full for a in aliases)]
    unknown = sorted(set(full) - {a for aliases in names.values() for a in aliases})
    if missing or unknown:
        raise ValueError(f"it holds other weights than these models train (unexpected: {unknown[:3]}, missing: "
                         f"{missing[:3]}): was it written with other model.lora settings?")
    set_model_state_dict(box, full, options=StateDictOptions(full_state_dict=True, strict=False))
    if optimizer is not None and (path / "optimizer.pt").is_file():
        saved = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        name_of = {id(p): key for key, p in box.named_parameters()}
        order = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
        keyed = {"state": {order[i]: value for i, value in saved["state"].items()},
                 "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                  for group in saved["param_groups"]]}
        set_optimizer_state_dict(box, optimizer, keyed, options=StateDictOptions(full_state_dict=True))


def _py_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
