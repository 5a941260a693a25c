"""A stage's run directory: refuse, resume, replace or start clean, decided before anything is written there.

| what run_dir holds                 | overwrite | resume | this run                                                   |
|------------------------------------|-----------|--------|------------------------------------------------------------|
| nothing (or a run killed before its first checkpoint) | any | any | starts clean in run_dir                         |
| an unfinished run (checkpoints)    | false     | true   | continues from its latest checkpoint, in run_dir           |
|                                    | true      | false  | starts clean in run_dir (the unfinished run is discarded)  |
|                                    | false     | false  | refused: say resume=true or overwrite=true                 |
| a finished artifact                | false     | any    | refused: the artifact stays as it is                       |
|                                    | true      | false  | starts a replacement in run_dir/.overwrite/ (clean)        |
|                                    | true      | true   | continues an interrupted replacement, else starts one      |

A replacement never touches the finished artifact: it trains beside it and is moved into place only once it is
published (artifacts.settle), so a refusal, a crash or a kill at any point leaves the old artifact intact and
usable by the next stages. A replacement that fails before it has anything to resume (no checkpoint, no manifest:
bad data, a config that only fails once the data or model is seen, a divergence before the first checkpoint) is
removed again (`discard_failed`), so the finished run directory is left exactly as it was.

Resuming checks the checkpoint's files against what was recorded when it was written, and its config against this
run's (a differing key is refused, naming it, unless force_resume=true); the stage then checks the training data
against the checkpoint's record (`check_data`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf

from rlhf_cli import artifacts
from rlhf_cli.config.compose import config_diff, describe_diff
from rlhf_cli.engine import checkpoint, dist
from rlhf_cli.engine.logging import console
from rlhf_cli.errors import ArtifactError, ConfigError, DataError


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path                 # where the finished artifact lives (and is published)
    work_dir: Path                # where this run writes until it publishes: run_dir, or run_dir/.overwrite
    resume_from: Path | None      # the checkpoint this run continues from
    resumed: dict | None          # that checkpoint's state (counters, config, data fingerprint)

    @property
    def checkpoints(self) -> Path:
        return self.work_dir / "checkpoints"


# Replacements (run_dir/.overwrite) that this process prepared on rank 0, until its stage ends: engine.train.process
# removes those a failed stage leaves with nothing to resume (`discard_failed`).
PREPARED: list[RunPlan] = []


def plan_run_dir(run_dir: Path, stage: str, overwrite: bool, resume: bool) -> tuple[Path, Path | None, bool]:
    """(work_dir, checkpoint to resume from or None, whether to clear work_dir first), by the table above.
    Read-only, so every rank can call it."""
    staging = run_dir / artifacts.STAGING
    if artifacts.is_finished(run_dir):
        staged = checkpoint.latest(staging / "checkpoints")
        if not overwrite:
            also = (f"; an interrupted replacement of it is in {staging} (continue it with overwrite=true "
                    f"resume=true)" if staged else "")
            raise ArtifactError(f"{run_dir} already holds a finished {stage} artifact{also}",
                                hint="pass overwrite=true to replace it (it stays in place until the replacement "
                                     "is finished), or pick another experiment=NAME")
        if resume and staged is not None:
            return staging, staged, False
        return staging, None, True
    latest = checkpoint.latest(run_dir / "checkpoints")
    if latest is not None:
        if resume:
            return run_dir, latest, False
        if overwrite:
            return run_dir, None, True
        raise ArtifactError(
            f"{run_dir} holds an unfinished {stage} run (last checkpoint: {latest.name})",
            hint="continue it with resume=true, or start over with overwrite=true",
        )
    return run_dir, None, True  # nothing worth keeping: clear leftovers of a run killed before its first checkpoint


def prepare(cfg, d: dist.Dist) -> RunPlan:
    """Settle, decide and check on every rank (read-only), then let rank 0 clear the work directory and write
    config.yaml and Hydra's record there. Nothing is written before the run is accepted."""
    run_dir = Path(cfg.run_dir)
    if d.is_main:
        try:
            artifacts.settle(run_dir)  # a replacement whose final moves a kill interrupted
        except OSError as exc:
            raise artifacts.storage_error(f"the run directory {run_dir}", exc,
                                          hint="check that it is writable and the disk has free space") from exc
    dist.barrier(d)
    work_dir, resume_from, clean = plan_run_dir(run_dir, cfg.stage, cfg.overwrite, cfg.resume)
    resumed = None
    if resume_from is not None:
        resumed = checkpoint.verify(resume_from, cfg.artifact_check)
        _check_config(resumed, cfg, resume_from, d)
    dist.barrier(d)
    plan = RunPlan(run_dir=run_dir, work_dir=work_dir, resume_from=resume_from, resumed=resumed)
    if d.is_main:
        if work_dir != run_dir:
            PREPARED.append(plan)
        try:
            if clean:
                artifacts.clean_run_dir(work_dir)
            checkpoint.clean_partial(work_dir / "checkpoints")
            work_dir.mkdir(parents=True, exist_ok=True)
            artifacts.write_text_atomic(work_dir / "config.yaml", OmegaConf.to_yaml(asdict(cfg)))
            write_hydra_record(work_dir)
        except OSError as exc:
            raise artifacts.storage_error(f"the run directory {work_dir}", exc,
                                          hint="check that it is writable (permissions, a read-only mount) and the "
                                               "disk has free space, or set root= to another place") from exc
    dist.barrier(d)
    return plan


def discard_failed() -> None:
    """After a stage failed (engine.train.process, rank 0): remove each replacement it prepared that holds nothing
    to continue (no checkpoint to resume, no finished manifest to settle), so a refused or failed `overwrite=true`
    leaves the finished artifact's directory as it was. One with a checkpoint stays, for overwrite=true resume=true."""
    while PREPARED:
        plan = PREPARED.pop()
        if plan.work_dir.is_dir() and not artifacts.is_finished(plan.work_dir) \
                and checkpoint.latest(plan.checkpoints) is None:
            shutil.rmtree(plan.work_dir, ignore_errors=True)


def _check_config(state: dict, cfg, path: Path, d: dist.Dist) -> None:
    """The interrupted run's config (recorded in each checkpoint) against this one's."""
    if "config" not in state:  # a checkpoint written before configs were recorded: nothing to compare
        return
    changed = config_diff(state["config"], asdict(cfg))
    if not changed:
        return
    if not cfg.force_resume:
        raise ConfigError(
            f"resume=true, but the config differs from the interrupted run's ({path}): {describe_diff(changed)}",
            hint="resume with the run's own values, add force_resume=true to continue with the new ones, or start "
                 "over with overwrite=true")
    console(d.is_main).print(f"[yellow]force_resume=true:[/yellow] continuing {path} with a changed config: "
                             f"{describe_diff(changed, limit=20)}")


def fingerprint(*parts) -> str:
    """sha256 of the data a run trains on (rows as loaded and normalised, in order): what a resume must see again."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def check_data(plan: RunPlan, cfg, d: dist.Dist, *parts) -> str:
    """The data's `fingerprint`, after checking that a resumed run trains on the data it started with: the data
    order is a function of seed, step and dataset size, so a changed file would silently continue on other rows."""
    data_sha256 = fingerprint(*parts)
    recorded = (plan.resumed or {}).get("data_sha256")
    if recorded is None or recorded == data_sha256:
        return data_sha256
    data = cfg.data
    what = ", ".join(f"{k}={v}" for k, v in (("data.path", data.path), ("data.eval_path", data.eval_path)) if v)
    what = what or "the built-in task"
    if cfg.force_resume:
        console(d.is_main).print(f"[yellow]force_resume=true:[/yellow] the training data changed since "
                                 f"{plan.resume_from} was written ({what}); continuing on the new data")
        return data_sha256
    raise DataError(
        f"resume=true, but the training data changed since {plan.resume_from} was written ({what}: sha256 "
        f"{recorded[:12]} then, {data_sha256[:12]} now)",
        hint="restore the data the run started with, or start over with overwrite=true (force_resume=true continues "
             "anyway: the data order depends on the dataset, so it would see other rows than it would have)")


def write_hydra_record(work_dir: Path) -> None:
    """Hydra's record of this run (overrides.yaml, hydra.yaml) in work_dir/.hydra, when Hydra launched it; the
    resolved config is config.yaml beside it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    out = work_dir / ".hydra"
    out.mkdir(exist_ok=True)
    artifacts.write_text_atomic(out / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))
    artifacts.write_text_atomic(out / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
