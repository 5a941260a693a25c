"""Checkpoints: the full training state under run_dir/checkpoints/step-N/, written atomically.

A checkpoint holds every model being trained (safetensors), the optimizer and scheduler states, the RNG states, and
a JSON `state` with the stage's counters (step, data position, ...). It is written to a hidden temporary directory
and renamed into place, so a kill at any moment leaves either the old set of checkpoints or the new one, never a
half-written step. Tensors are read back with `torch.load(weights_only=True)`, weights with safetensors. Nothing in
it depends on the world size: only rank 0 writes, and every rank reads.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

_STEP = re.compile(r"^step-(\d+)$")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DDP/compile wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


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


def save(ckpt_root: Path, step: int, models: dict, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write checkpoint `step-<step>` atomically, then keep only the newest `keep`. Call on rank 0 only."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, model in models.items():
        save_model(unwrap(model), str(tmp / f"{name}.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = rng_state()
    rng["python"] = _py_state_to_json(rng["python"])
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():  # a re-run of a step after resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_steps(ckpt_root)[:-keep]:
        shutil.rmtree(ckpt_root / f"step-{old}", ignore_errors=True)
    return final


def list_steps(ckpt_root: Path) -> list[int]:
    """Steps of the complete checkpoints, oldest first (temporary directories of a killed save are ignored)."""
    if not ckpt_root.is_dir():
        return []
    steps = []
    for child in ckpt_root.iterdir():
        m = _STEP.match(child.name)
        if m and (child / "state.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest(ckpt_root: Path) -> Path | None:
    steps = list_steps(ckpt_root)
    return ckpt_root / f"step-{steps[-1]}" if steps else None


def clean_partial(ckpt_root: Path) -> None:
    """Remove the temporary directories a killed save left behind."""
    if ckpt_root.is_dir():
        for child in ckpt_root.iterdir():
            if child.name.startswith(".step-"):
                shutil.rmtree(child, ignore_errors=True)


def load(path: Path, models: dict, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Load a checkpoint into the given objects; returns its `state` dict."""
    for name, model in models.items():
        load_model(unwrap(model), str(path / f"{name}.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if restore_rng:
        rng = torch.load(path / "rng.pt", weights_only=True)
        rng["python"] = _py_state_from_json(rng["python"])
        set_rng_state(rng)
    return json.loads((path / "state.json").read_text())


def _py_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
