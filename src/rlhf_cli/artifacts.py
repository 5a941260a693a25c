"""The artifact contract: what a stage leaves in its run directory, and how the next stage finds and trusts it.

runs/<experiment>/<stage>/            (a multirun job: one sub-directory per job)
  manifest.json    written last: its presence means "finished". Stage, kind, schema version, resolved config,
                   parents (path + content hash), base model, model files and hash, tokenizer facts, final
                   metrics, package versions.
  config.yaml      the resolved config
  metrics.jsonl    one JSON object per logged step
  model/           Hugging Face save_pretrained (safetensors) + tokenizer
  checkpoints/step-N/  full training state for resume
  .hydra/          Hydra's record of the composition (written only once the run is accepted)
  .overwrite/      while `overwrite=true` replaces a finished artifact: the replacement run, laid out as above

A finished artifact appears atomically: model/ is written under a temporary name and renamed, then manifest.json
likewise. A finished artifact is never touched until its replacement is finished: `overwrite=true` trains in
`.overwrite/` beside it, and only a finished replacement is moved into place (`settle`, which a kill at any moment
leaves resumable: the next stage to look finishes the move). A stage refuses to overwrite a finished artifact
unless `overwrite=true`, and continues an unfinished one with `resume=true`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from rlhf_cli.errors import ArtifactError, ConfigError, StorageError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# What a stage owns in its run directory; everything else (a multirun's job directories, a user's notes) is left
# alone.
OWNED = ("manifest.json", "config.yaml", "metrics.jsonl", "samples.jsonl", "eval.json", "model", "adapter",
         "checkpoints", "tensorboard", "charts", "trackers.json", ".hydra")
STAGING = ".overwrite"  # the replacement of a finished artifact, until it is finished and moved into place
RETIRED = ".replaced"   # the replaced artifact while the move happens
# Below this size a model or checkpoint is checked byte for byte (sha256) before use; above it, names and sizes
# unless the stage's `artifact_check=full`.
FULL_CHECK_BYTES = 1 << 30
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,99}$")


# ---- where a stage's run directory is -----------------------------------------------------------------------------

def check_experiment(name: str) -> str:
    """An experiment name is one safe directory name, so `runs/<experiment>/<stage>` is where every stage looks."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"experiment={name!r} is not a single name: use letters, digits and . _ + - only, no '/' and no "
            f"leading '.' (at most 100 characters)",
            hint="e.g. experiment=team-a_lr3e-4; to keep runs somewhere else, set root=/path/to/runs")
    return name


def stage_dir(root: str | Path, experiment: str, stage: str) -> Path:
    """<root>/<experiment>/<stage>: the one rule every stage, the pipeline and Hydra's run directory follow."""
    return Path(root) / check_experiment(experiment) / stage


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / MANIFEST).is_file()


# ---- replacing a finished artifact safely --------------------------------------------------------------------------

def _move(src: Path, dst: Path) -> None:
    """Rename src to dst if src is there (another process may have moved it already)."""
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        pass


def settle(run_dir: Path) -> None:
    """Put a finished replacement (`.overwrite/` with its manifest) in place of the artifact it replaces.

    1. Retire: move the old artifact's files into `.replaced.partial/`, manifest.json first (from then on run_dir
       is not "finished"), then rename that folder to `.replaced/`, which marks the step done.
    2. Install: move the replacement's files into run_dir, manifest.json last (run_dir is "finished" again only
       when everything is in place); then delete `.replaced/` and the empty `.overwrite/`.
    Each move is a rename, so a kill between two of them leaves a state this function, run again, completes.
    """
    run_dir = Path(run_dir)
    staging, retired, partial = run_dir / STAGING, run_dir / RETIRED, run_dir / f"{RETIRED}.partial"
    if not is_finished(staging):
        if retired.exists():  # a completed move, killed before its clean-up
            shutil.rmtree(retired, ignore_errors=True)
            if staging.is_dir() and not any(staging.iterdir()):
                staging.rmdir()
        return
    rest = [name for name in OWNED if name != MANIFEST]
    if not retired.exists():
        partial.mkdir(exist_ok=True)
        for name in (MANIFEST, *rest):
            _move(run_dir / name, partial / name)
        _move(partial, retired)
    for name in (*rest, MANIFEST):
        _move(staging / name, run_dir / name)
    shutil.rmtree(retired, ignore_errors=True)
    remove_temporaries(staging)
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()


def clean_run_dir(run_dir: Path) -> None:
    """Remove what a previous, unfinished run of this stage left (rank 0 only)."""
    for name in OWNED:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    remove_temporaries(run_dir)


def remove_temporaries(directory: Path) -> None:
    """Delete the `.<name>.tmp-<pid>` files and folders that killed writes left behind."""
    if not Path(directory).is_dir():
        return
    for child in Path(directory).glob(".*.tmp-*"):
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


# ---- writing -------------------------------------------------------------------------------------------------------

def json_safe(obj):
    """The same data with every NaN or infinity replaced by None: JSON has no such numbers (`NaN` is not JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON (non-finite numbers as null; paths and other objects as strings)."""
    return json.dumps(json_safe(obj), allow_nan=False, default=str, **kwargs)


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when `exc` is the file system refusing it: an OSError, or what torch's and safetensors'
    writers make of one (torch.save reports a full disk as "unexpected pos" / "file write failed", safetensors as
    "I/O error: ... (os error 28)"). None for anything else, which is a bug."""
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc.strerror or exc)
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("file write failed" in text or "unexpected pos" in text):
        return f"the file could not be written completely ({text.strip().splitlines()[0]})"
    if type(exc).__name__ == "SafetensorError" and "I/O error" in text:
        return text.split("I/O error:", 1)[1].strip()
    return None


def storage_error(what: str, exc: BaseException, hint: str) -> StorageError:
    """One message for a failed write: what was being written, where, the system's reason, what to do."""
    return StorageError(f"could not write {what} ({write_failure(exc) or exc})", hint=hint)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def publish(work_dir: Path, save_model: Callable[[Path], None], manifest: dict, run_dir: Path | None = None,
            save_adapter: Callable[[Path], None] | None = None) -> Path:
    """Write model/ through `save_model(tmp_dir)` (and adapter/ through `save_adapter`, first), rename each into
    place, then write manifest.json (rank 0 only).

    `work_dir` is where the run wrote (run_dir, or run_dir/.overwrite for a replacement); a replacement is then
    moved into run_dir by `settle`. Leftover temporaries of killed writes are removed. Returns the model directory.
    """
    run_dir = Path(run_dir or work_dir)
    tmp = work_dir / f".model.tmp-{os.getpid()}"
    try:
        for name, save in (("adapter", save_adapter), ("model", save_model)):
            if save is None:
                continue
            tmp = work_dir / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            save(tmp)
            final = work_dir / name
            if final.exists():  # left by a run killed between the two renames
                shutil.rmtree(final)
            os.rename(tmp, final)
        model = work_dir / "model"
        manifest = {**manifest, "model_files": file_sizes(model), "model_sha256": content_hash(model)}
        write_text_atomic(work_dir / MANIFEST, dumps(manifest, indent=2) + "\n")
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if write_failure(exc) is None:
            raise
        raise storage_error(f"the {manifest.get('stage', 'stage')}'s artifact", exc,
                            hint="free space or fix the permissions there; then resume=true publishes it from the last "
                                 "checkpoint (any earlier finished artifact is untouched)") from exc
    if work_dir != run_dir:
        settle(run_dir)
    remove_temporaries(work_dir)
    remove_temporaries(run_dir)
    return run_dir / "model"


# ---- checking what is on disk ------------------------------------------------------------------------------------

def file_sizes(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """{relative path: bytes} of every file under a directory (sorted), leaving out the names in `exclude`."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and str(p.relative_to(directory)) not in exclude}


def content_hash(directory: Path, names: list[str] | None = None) -> str:
    """sha256 over the names and bytes of the files in a directory (all of them, in `file_sizes` order, unless
    `names` gives them, in the order given), to pin a parent artifact or a checkpoint."""
    directory = Path(directory)
    names = list(names) if names is not None else list(file_sizes(directory))
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        with (directory / name).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def wants_full_check(total_bytes: int, check: str) -> bool:
    """`artifact_check`: full -> always sha256; sizes -> never; auto -> when the files total under FULL_CHECK_BYTES."""
    return check == "full" or (check == "auto" and total_bytes <= FULL_CHECK_BYTES)


def verify_files(directory: Path, sizes: dict[str, int], sha256: str | None, check: str) -> str | None:
    """What differs between a directory and the record written with it (names and sizes, then the sha256 when
    `wants_full_check`), as a short phrase, or None when it matches."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory.name}/ is missing"
    for name, size in sizes.items():
        path = directory / name
        if not path.is_file():
            return f"{directory.name}/{name} is missing"
        if path.stat().st_size != size:
            return f"{directory.name}/{name} has {path.stat().st_size} bytes, {size} were recorded"
    if sha256 and wants_full_check(sum(sizes.values()), check) and content_hash(directory, list(sizes)) != sha256:
        return f"the content of {directory.name}/ differs from its recorded sha256"
    return None


def verify_model(run_dir: Path, manifest: dict, check: str = "auto") -> None:
    """A finished artifact's model/ is what its manifest says was published; else one message naming the stage
    to re-run."""
    model = Path(run_dir) / "model"
    sizes = manifest.get("model_files")
    if sizes is None:  # an artifact published before file sizes were recorded: its hash is all there is
        sizes = file_sizes(model) if model.is_dir() else {}
    problem = verify_files(model, sizes, manifest.get("model_sha256"), check)
    if problem:
        stage = manifest.get("stage", "<stage>")
        experiment = Path(run_dir).parent.name
        raise ArtifactError(
            f"the finished {stage} artifact in {run_dir} was changed after it was published: {problem}",
            hint=f"restore it, or rebuild it with `rlhf {stage} experiment={experiment} overwrite=true` (for a multirun "
                 f"job, its own overrides and root=)")


# ---- the manifest ------------------------------------------------------------------------------------------------

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
    """The versions that made an artifact. Read from the installed packages' metadata, not by importing them: a
    stage that never touched `datasets` would pay over half a second of CPU to import it for its version."""
    from importlib.metadata import version

    from rlhf_cli import __version__

    return {"rlhf_cli": __version__, "python": platform.python_version(), "torch": version("torch"),
            "transformers": version("transformers"), "datasets": version("datasets"), "hydra": version("hydra-core")}


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", hint="re-run the stage with overwrite=true") from exc
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path} has schema version {version}, expected {SCHEMA_VERSION}",
                            hint="re-run the stage that made it with this version of rlhf_cli")
    return manifest


def stage_results(results: str, run_dir: Path) -> list[dict] | None:
    """The final numbers of a finished run, as rows: [the manifest's metrics] (results="manifest") or one row per
    policy of eval.json (results="eval.json"); None when the run has not finished (or keeps no results)."""
    run_dir = Path(run_dir)
    if results == "manifest":
        return [read_manifest(run_dir)["metrics"]] if is_finished(run_dir) else None
    if results and (run_dir / results).is_file():
        return json.loads((run_dir / results).read_text())["policies"]
    return None


def upstream(name_or_path: str | None, root: str, experiment: str, stage: str, kind: str, check: str = "auto",
             key: str = "model.name_or_path", value: str = "<model or run directory>"
             ) -> tuple[str | None, dict | None]:
    """Where a stage's input model comes from, and the parent record for the manifest. `key` is the config key the
    user sets to point elsewhere (ppo's `model.policy`, eval's `reference`), `value` what a hint shows it set to.

    - None: the finished `stage` artifact of this experiment (<root>/<experiment>/<stage>);
    - a run directory with a manifest: that artifact (its kind is checked);
    - anything else (model directory, hub id, builtin:...): returned as is, with no parent.
    A finished artifact's model/ is checked against its manifest (`verify_model`) before anyone loads it.
    Returns (model directory or name, parent) where parent = {stage, kind, path, model_sha256}.
    """
    if name_or_path is None:
        run_dir = stage_dir(root, experiment, stage)
        settle_if_possible(run_dir)
        if not is_finished(run_dir):
            unfinished = (run_dir / "checkpoints").is_dir()
            command = f"rlhf {stage} experiment={experiment}" + (" resume=true" if unfinished else "")
            state = "an unfinished" if unfinished else "no finished"
            raise ArtifactError(f"experiment '{experiment}' has {state} {stage} artifact at {run_dir}",
                                hint=f"run `{command}` first, or set {key}={value}")
    elif (Path(name_or_path) / MANIFEST).is_file() or (Path(name_or_path) / STAGING / MANIFEST).is_file():
        run_dir = Path(name_or_path)
        settle_if_possible(run_dir)
    else:
        return name_or_path, None
    manifest = read_manifest(run_dir)
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{run_dir} holds a {manifest.get('kind')} artifact, but a {kind} is needed here",
                            hint=f"point at the run directory of an `rlhf {stage}` run")
    verify_model(run_dir, manifest, check)
    parent = {"stage": manifest["stage"], "kind": kind, "path": str(run_dir),
              "model_sha256": manifest.get("model_sha256")}
    return str(run_dir / "model"), parent


def settle_if_possible(run_dir: Path) -> None:
    """A reader finishes an interrupted replacement if it can; on read-only storage it reads what is there."""
    try:
        settle(run_dir)
    except OSError:
        pass
