"""The artifact contract: what a stage leaves in its run directory, and how the next stage finds and trusts it.

runs/<experiment>/<stage>/            (a multirun job: one sub-directory per job)
  manifest.json    written last: its presence means "finished". Stage, kind, schema version, resolved config,
                   parents (path + content hash), base model, tokenizer facts, final metrics, package versions.
  config.yaml      the resolved config
  metrics.jsonl    one JSON object per logged step
  model/           Hugging Face save_pretrained (safetensors) + tokenizer
  checkpoints/step-N/  full training state for resume
  .hydra/          Hydra's own record of the composition

A finished artifact appears atomically: model/ is written under a temporary name and renamed, then manifest.json
likewise. A stage refuses to overwrite a finished artifact unless `overwrite=true`, and continues an unfinished one
with `resume=true`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

from rlhf_cli.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# What a stage owns in its run directory (Hydra's .hydra/ is left alone).
OWNED = ("manifest.json", "config.yaml", "metrics.jsonl", "samples.jsonl", "eval.json", "model", "checkpoints",
         "tensorboard")


def is_finished(run_dir: Path) -> bool:
    return (run_dir / MANIFEST).is_file()


def plan_run_dir(run_dir: Path, stage: str, overwrite: bool, resume: bool, latest_checkpoint: Path | None):
    """Decide what to do with what is already in run_dir; read-only, so every rank can call it.

    Returns (resume_from, clean): the checkpoint to resume from (or None), and whether to wipe the stage's files.
    """
    if is_finished(run_dir):
        if overwrite:
            return None, True
        raise ArtifactError(
            f"{run_dir} already holds a finished {stage} artifact",
            hint="pass overwrite=true to replace it, or pick another experiment=NAME",
        )
    if latest_checkpoint is not None:
        if resume:
            return latest_checkpoint, False
        if overwrite:
            return None, True
        raise ArtifactError(
            f"{run_dir} holds an unfinished {stage} run (last checkpoint: {latest_checkpoint.name})",
            hint="continue it with resume=true, or start over with overwrite=true",
        )
    return None, True  # nothing worth keeping: clear leftovers of a run killed before its first checkpoint


def clean_run_dir(run_dir: Path) -> None:
    """Remove what a previous run of this stage left (rank 0 only)."""
    for name in OWNED:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for child in run_dir.glob(".model.tmp-*") if run_dir.is_dir() else []:
        shutil.rmtree(child, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(run_dir: Path, save_model: Callable[[Path], None], manifest: dict) -> Path:
    """Write model/ through `save_model(tmp_dir)`, rename it into place, then write manifest.json (rank 0 only)."""
    tmp = run_dir / f".model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp)
    final = run_dir / "model"
    if final.exists():  # left by a run killed between the two renames
        shutil.rmtree(final)
    os.rename(tmp, final)
    manifest = {**manifest, "model_sha256": content_hash(final)}
    write_text_atomic(run_dir / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    return final


def content_hash(directory: Path) -> str:
    """sha256 over the names and bytes of every file in a directory (sorted), to pin a parent artifact."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_facts(tokenizer) -> dict:
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def package_versions() -> dict:
    import datasets
    import hydra
    import torch
    import transformers

    from rlhf_cli import __version__

    return {"rlhf_cli": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "hydra": hydra.__version__}


def build_manifest(*, stage: str, kind: str, config: dict, base_model: str, tokenizer, metrics: dict,
                   parents: list[dict] | None = None, extra: dict | None = None) -> dict:
    return {
        "stage": stage,
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": base_model,
        "parents": parents or [],
        "tokenizer": tokenizer_facts(tokenizer),
        "metrics": metrics,
        "versions": package_versions(),
        **(extra or {}),
        "config": config,
    }


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"no finished artifact in {run_dir} (no {MANIFEST})") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", hint="re-run the stage with overwrite=true") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path} has schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}",
                            hint="re-run the stage that made it with this version of rlhf_cli")
    return manifest


def upstream(name_or_path: str | None, root: str, experiment: str, stage: str, kind: str) -> tuple[str | None, dict | None]:
    """Where a stage's input model comes from, and the parent record for the manifest.

    - None: the finished `stage` artifact of this experiment (<root>/<experiment>/<stage>);
    - a run directory with a manifest: that artifact (its kind is checked);
    - anything else (model directory, hub id, builtin:...): returned as is, with no parent.
    Returns (model directory or name, parent) where parent = {stage, kind, path, model_sha256}.
    """
    if name_or_path is None:
        run_dir = Path(root) / experiment / stage
        if not is_finished(run_dir):
            unfinished = (run_dir / "checkpoints").is_dir()
            command = f"rlhf {stage} experiment={experiment}" + (" resume=true" if unfinished else "")
            state = "an unfinished" if unfinished else "no finished"
            raise ArtifactError(f"experiment '{experiment}' has {state} {stage} artifact at {run_dir}",
                                hint=f"run `{command}` first, or set model.name_or_path=<model or run directory>")
    elif (Path(name_or_path) / MANIFEST).is_file():
        run_dir = Path(name_or_path)
    else:
        return name_or_path, None
    manifest = read_manifest(run_dir)
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{run_dir} holds a {manifest.get('kind')} artifact, but a {kind} is needed here",
                            hint=f"point at the run directory of an `rlhf {stage}` run")
    parent = {"stage": manifest["stage"], "kind": kind, "path": str(run_dir),
              "model_sha256": manifest.get("model_sha256")}
    return str(run_dir / "model"), parent
