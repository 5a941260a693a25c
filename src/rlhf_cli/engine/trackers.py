"""Experiment trackers a stage reports to besides metrics.jsonl: `logger=[tensorboard,mlflow,wandb]` (any of them,
several at once; default none). Only rank 0 reports.

Each tracker gets the same three calls:
- opened with the resolved config (MLflow: as parameters, dotted keys; W&B: as its config);
- `log(step, metrics)`: every logged step's numbers (what metrics.jsonl gets; non-numbers left out);
- `finish(summary, files, ok)`: the stage's final metrics, the paths of what it wrote (artifact, charts, report),
  and how the run ended.

Where each writes:
- tensorboard: event files in <run dir>/tensorboard/ (extra: rlhf-cli[tensorboard]);
- mlflow: the tracking URI in $MLFLOW_TRACKING_URI, else a local store, sqlite:///<root>/mlflow.db (browse it with
  `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`); experiment = `experiment`, run name = the stage (and
  the job's directory in a sweep); the charts are logged as artifacts (extra: rlhf-cli[mlflow]);
- wandb: project = `experiment` ($WANDB_PROJECT overrides it), run name as MLflow's; files under $WANDB_DIR, else
  <root>/<experiment>/wandb/; $WANDB_MODE=offline works without a network (`wandb sync` uploads later); the console
  is not captured (extra: rlhf-cli[wandb]).

A resumed run continues the same MLflow and W&B runs (their ids are kept in <run dir>/trackers.json); the steps
after the checkpoint are logged again (W&B plots them against the `step` metric, so they line up).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

from rich.markup import escape

from rlhf_cli import artifacts
from rlhf_cli.config.compose import flatten
from rlhf_cli.config.schemas import LOGGERS
from rlhf_cli.engine.logging import console
from rlhf_cli.errors import ConfigError

IDS = "trackers.json"


def numbers(metrics: dict) -> dict[str, float]:
    """The finite numbers of a metrics dict, as floats (booleans, None, text and NaN/inf left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def run_name(cfg) -> str:
    """The stage, and in a sweep the job's directory under the stage's: `reward/optim.lr-0.001`."""
    stage_dir = Path(cfg.root) / cfg.experiment / cfg.stage
    try:
        job = Path(cfg.run_dir).relative_to(stage_dir)
    except ValueError:
        return cfg.stage
    return cfg.stage if str(job) == "." else f"{cfg.stage}/{job}"


class TensorBoard:
    def __init__(self, cfg, work_dir: Path, resume_step: int | None, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(work_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: dict) -> None:
        for key, value in numbers(metrics).items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict, files: dict, ok: bool) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, cfg, work_dir: Path, resume_step: int | None, ids: dict):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # the local store's "creating tables" chatter
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.root) / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        try:
            self._start(cfg, ids, resume_step)
        except MlflowException as exc:  # an unreachable server, a store it cannot open
            raise ConfigError(f"logger mlflow could not start a run at {uri}: {str(exc).splitlines()[0]}",
                              hint="check MLFLOW_TRACKING_URI (unset it for the local store in <root>/mlflow.db)") \
                from exc

    def _start(self, cfg, ids: dict, resume_step: int | None) -> None:
        from mlflow.entities import Param

        client = self.client
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # a local store keeps artifacts beside the database, not in the working directory
            local = None if os.environ.get("MLFLOW_TRACKING_URI") else (Path(cfg.root) / "mlartifacts").as_uri()
            experiment_id = client.create_experiment(cfg.experiment, artifact_location=local)
        self.run_id = ids.get("mlflow") if resume_step is not None else None
        if self.run_id is not None and not self._active(self.run_id):
            self.run_id = None  # deleted since, or another store: a new run
        if self.run_id is None:
            run = client.create_run(experiment_id, run_name=run_name(cfg),
                                    tags={"rlhf.stage": cfg.stage, "rlhf.run_dir": str(cfg.run_dir)})
            self.run_id = run.info.run_id
            params = [Param(k[:250], str(v)[:6000]) for k, v in flatten(asdict(cfg)).items()]
            for i in range(0, len(params), 100):  # the store takes at most 100 parameters per batch
                client.log_batch(self.run_id, params=params[i:i + 100])
        else:
            client.update_run(self.run_id, status="RUNNING")
        ids["mlflow"] = self.run_id

    def _active(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def log(self, step: int, metrics: dict) -> None:
        self._metrics(numbers(metrics), step)

    def _metrics(self, values: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def finish(self, summary: dict, files: dict, ok: bool) -> None:
        if summary:
            self._metrics({f"final/{k}": v for k, v in numbers(summary).items()}, 0)
        for name, path in files.items():
            for one in path if isinstance(path, list) else [path]:
                self.client.set_tag(self.run_id, f"rlhf.{name}" if not isinstance(path, list) else
                                    f"rlhf.{name}.{Path(one).stem}", str(one))
                if Path(one).suffix in (".png", ".html") and Path(one).is_file():
                    self.client.log_artifact(self.run_id, str(one), artifact_path=name)
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandB:
    def __init__(self, cfg, work_dir: Path, resume_step: int | None, ids: dict):
        import wandb

        where = None
        if not os.environ.get("WANDB_DIR"):
            where = Path(cfg.root) / cfg.experiment
            where.mkdir(parents=True, exist_ok=True)
        run_id = ids.get("wandb") if resume_step is not None else None
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or cfg.experiment, name=run_name(cfg),
                                  config=asdict(cfg), dir=str(where) if where else None, id=run_id,
                                  resume="allow" if run_id else None, reinit="finish_previous",
                                  settings=wandb.Settings(console="off", silent=True))
        except wandb.errors.Error as exc:  # not logged in, no network, a bad entity or project
            raise ConfigError(f"logger wandb could not start a run: {exc}",
                              hint="`wandb login` (or set WANDB_API_KEY); or WANDB_MODE=offline to log locally and "
                                   "`wandb sync` later") from exc
        self.run.define_metric("*", step_metric="step")  # resumed steps are logged again: plot against `step`
        ids["wandb"] = self.run.id

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({"step": step, **numbers(metrics)})

    def finish(self, summary: dict, files: dict, ok: bool) -> None:
        import wandb

        self.run.summary.update({f"final/{k}": v for k, v in numbers(summary).items()})
        charts = {}
        for name, path in files.items():
            for one in path if isinstance(path, list) else [path]:
                if Path(one).suffix == ".png" and Path(one).is_file():
                    charts[f"{name}/{Path(one).stem}"] = wandb.Image(str(one))
                else:
                    self.run.summary[f"files/{name}"] = str(one)
        if charts:
            self.run.log(charts)
        self.run.finish(exit_code=0 if ok else 1)


OPENERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
assert set(OPENERS) == set(LOGGERS)


@contextlib.contextmanager
def rng_untouched():
    """Whatever a tracker's library draws from Python's or NumPy's global random state (ids, retries) is given back:
    a run with trackers trains exactly as one without."""
    import random

    numpy = sys.modules.get("numpy")
    state = random.getstate(), numpy.random.get_state() if numpy else None
    try:
        yield
    finally:
        random.setstate(state[0])
        if numpy is not None:
            numpy.random.set_state(state[1])


class Trackers:
    """The trackers `cfg.logger` names, open for one run (rank 0; an empty set elsewhere)."""

    def __init__(self, cfg, work_dir: Path, enabled: bool, resume_step: int | None = None):
        self.open: list = []
        names = list(getattr(cfg, "logger", []) or []) if enabled else []
        if not names:
            return
        self.ids_path = work_dir / IDS
        ids = json.loads(self.ids_path.read_text()) if resume_step is not None and self.ids_path.is_file() else {}
        with rng_untouched():
            try:
                for name in names:
                    self.open.append((name, OPENERS[name](cfg, work_dir, resume_step, ids)))
            except BaseException:  # one could not start (W&B not logged in): the ones that did end as failed
                self.finish(ok=False)
                raise
        artifacts.write_text_atomic(self.ids_path, json.dumps(ids) + "\n")

    def log(self, step: int, metrics: dict) -> None:
        if not self.open:
            return
        with rng_untouched():
            for _, tracker in self.open:
                tracker.log(step, metrics)

    def finish(self, summary: dict | None = None, files: dict | None = None, ok: bool = True) -> None:
        """End every tracker once (a second call does nothing). The stage's work is done by now: a tracker that
        cannot record the end (a server gone away) is a warning, not a failed stage."""
        open_, self.open = self.open, []
        with rng_untouched():
            for name, tracker in open_:
                try:
                    tracker.finish(summary or {}, files or {}, ok)
                except Exception as exc:  # noqa: BLE001 - whatever the tracker's client raises
                    console(True).print(f"[yellow]warning:[/yellow] logger {name} could not record the end of the "
                                        f"run: {escape(str(exc))}", soft_wrap=True)
