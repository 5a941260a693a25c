"""Experiment trackers (`logger=[tensorboard,mlflow,wandb]`): each gets the resolved config, every logged step and
the final metrics and files; MLflow against a local store, W&B offline; a missing package or a bad logger name is
one config error; a run that fails ends its tracker runs as failed; a resumed run continues them."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from helpers import FAST_SFT, compose_stage, run_cli

from rlhf_cli.config import check_loggers, logger_word
from rlhf_cli.errors import ConfigError


def wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run's .wandb file (a LevelDB-style log of protobuf records: 32 KiB blocks,
    each chunk with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("*.wandb")).read_bytes()
    out, pos, pending = [], 7, b""  # after the "W&B" header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def items(record, field: str) -> dict:
    """{key: value} of a history (`item`) or summary (`update`) record."""
    entries = record.history.item if field == "history" else record.summary.update
    return {("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in entries}


@pytest.mark.slow
def test_sft_reports_to_tensorboard_mlflow_and_wandb(tmp_path):
    for module in ("tensorboard", "mlflow", "wandb", "matplotlib"):
        pytest.importorskip(module)
    proc = run_cli(["sft", "experiment=tr", "logger=[tensorboard,mlflow,wandb]", *FAST_SFT, "train.max_steps=8"],
                   tmp_path, env={"WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tr" / "sft"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tr").experiment_id])
    assert run.info.run_name == "sft" and run.info.status == "FINISHED"
    assert float(run.data.params["optim.lr"]) == manifest["config"]["optim"]["lr"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert run.data.metrics["final/eval_loss"] == pytest.approx(manifest["metrics"]["eval_loss"])
    assert run.data.tags["rlhf.policy"] == str(run_dir / "model")
    assert "charts/loss.png" in {a.path for a in client.list_artifacts(run.info.run_id, "charts")}
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"] == run.info.run_id

    (offline,) = (tmp_path / "runs" / "tr" / "wandb").glob("offline-run-*")
    records = wandb_records(offline)
    history = [items(r, "history") for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["step"], h["loss"]) for h in history if "loss" in h] == [(r["step"], r["loss"]) for r in logged
                                                                       if "loss" in r]
    summary = {k: v for r in records if r.WhichOneof("record_type") == "summary" for k, v in items(r, "summary").items()}
    assert summary["final/eval_loss"] == pytest.approx(manifest["metrics"]["eval_loss"])
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert run.display_name == "sft" and config["optim"]["lr"] == manifest["config"]["optim"]["lr"]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An empty local MLflow store with its tables made (seconds of migrations), for the tests to copy; the first run
    of a fresh root making its own is the end-to-end test's."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def mlflow_stage(stage: str, tmp_path: Path, monkeypatch, store: Path) -> tuple:
    """(config with logger=[mlflow] and the local store, a copy of `store`; its run directory, a client of that
    store)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs" / "x" / stage
    run_dir.mkdir(parents=True)
    shutil.copy(store, tmp_path / "runs" / "mlflow.db")
    cfg = compose_stage(stage, [f"root={tmp_path / 'runs'}", "experiment=x", "logger=[mlflow]"], run_dir)
    return cfg, run_dir, MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")


@pytest.mark.slow
def test_failed_run_ends_as_failed_and_resume_continues_it(tmp_path, monkeypatch, empty_store):
    from rlhf_cli.engine.recording import MetricsLog, close_failed

    cfg, run_dir, client = mlflow_stage("sft", tmp_path, monkeypatch, empty_store)
    log = MetricsLog(run_dir, True, cfg)
    log.log(1, {"loss": 2.0, "note": "text is left out", "bad": float("nan")})
    close_failed()  # what engine.train.process does when the stage raises
    (run,) = client.search_runs([client.get_experiment_by_name("x").experiment_id])
    assert run.info.status == "FAILED" and set(run.data.metrics) == {"loss"}

    resumed = MetricsLog(run_dir, True, cfg, resume_step=1)  # the same MLflow run, running again
    resumed.log(2, {"loss": 1.0})
    resumed.close({"eval_loss": 0.5}, {"policy": run_dir / "model"})
    (again,) = client.search_runs([client.get_experiment_by_name("x").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [2.0, 1.0]
    assert again.data.metrics["final/eval_loss"] == 0.5


def test_logger_words_and_names():
    assert logger_word("logger=tensorboard") == "logger=[tensorboard]"  # the one-name form still works
    assert logger_word("logger=none") == "logger=[]"
    assert logger_word("logger=[mlflow,wandb]") == "logger=[mlflow,wandb]"
    with pytest.raises(ConfigError, match="'comet' is not one of tensorboard, mlflow, wandb"):
        check_loggers(["comet"])
    with pytest.raises(ConfigError, match="twice"):
        check_loggers(["tensorboard", "tensorboard"])


def test_missing_tracker_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        check_loggers(["wandb"])
    assert "needs the wandb package" in err.value.message and "rlhf-cli[wandb]" in err.value.hint


@pytest.mark.slow
def test_eval_reports_its_curve_and_every_policy(tmp_path, monkeypatch, empty_store):
    from rlhf_cli.stages.eval import track

    cfg, run_dir, client = mlflow_stage("eval", tmp_path, monkeypatch, empty_store)
    curve = [{"step": 0, "kl": 0.0, "score": 3.0, "gold": 0.4}, {"step": 10, "kl": 1.5, "score": 4.0, "gold": 0.8}]
    report = {"policies": [{"name": "x/sft", "score": 3.0, "score_se": 0.1, "samples": []},
                           {"name": "x/ppo", "score": 4.5, "score_se": 0.1, "samples": []}], "curves": {"x/ppo": curve}}
    track(cfg, report, run_dir, [])
    (run,) = client.search_runs([client.get_experiment_by_name("x").experiment_id])
    assert run.info.run_name == "eval" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "x/ppo/gold")] == [(0, 0.4), (10, 0.8)]
    assert run.data.metrics["final/x/ppo/score"] == 4.5 and run.data.metrics["final/x/sft/score_se"] == 0.1


def test_trackers_leave_the_global_random_state_as_it_was(tmp_path, monkeypatch):
    import random

    import numpy as np

    from rlhf_cli.engine import trackers

    class Greedy:  # a tracker library that draws from the global generators (run ids, retries)
        def __init__(self, *args):
            random.random(), np.random.rand()

        def log(self, step, metrics):
            random.random(), np.random.rand()

        def finish(self, summary, files, ok):
            random.random(), np.random.rand()

    monkeypatch.setitem(trackers.OPENERS, "mlflow", Greedy)
    cfg = compose_stage("sft", [f"root={tmp_path}", "logger=[mlflow]"], tmp_path)
    random.seed(3), np.random.seed(3)
    expected = random.random(), np.random.rand()
    random.seed(3), np.random.seed(3)
    opened = trackers.Trackers(cfg, tmp_path, enabled=True)
    opened.log(1, {"loss": 1.0})
    opened.finish()
    assert (random.random(), np.random.rand()) == expected


@pytest.mark.slow
def test_a_tracker_that_cannot_start_leaves_no_run_open(tmp_path, monkeypatch, empty_store):
    from rlhf_cli.engine import trackers

    def refuse(*args):
        raise ConfigError("logger wandb could not start a run: not logged in")

    cfg, run_dir, client = mlflow_stage("sft", tmp_path, monkeypatch, empty_store)
    cfg.logger = ["mlflow", "wandb"]
    monkeypatch.setitem(trackers.OPENERS, "wandb", refuse)
    with pytest.raises(ConfigError, match="not logged in"):
        trackers.Trackers(cfg, run_dir, enabled=True)
    (run,) = client.search_runs([client.get_experiment_by_name("x").experiment_id])
    assert run.info.status == "FAILED"  # the MLflow run that had started is ended, not left RUNNING


def test_a_tracker_failing_at_the_end_is_a_warning(tmp_path, monkeypatch, capsys):
    from rlhf_cli.engine import trackers

    class Gone:  # the tracking server went away during the run
        def __init__(self, *args):
            pass

        def log(self, step, metrics):
            pass

        def finish(self, summary, files, ok):
            raise ConnectionError("server unreachable")

    monkeypatch.setitem(trackers.OPENERS, "mlflow", Gone)
    cfg = compose_stage("sft", [f"root={tmp_path}", "logger=[mlflow]"], tmp_path)
    trackers.Trackers(cfg, tmp_path, enabled=True).finish({"eval_loss": 1.0})  # the stage is done: no raise
    assert "warning: logger mlflow could not record the end of the run: server unreachable" in capsys.readouterr().out
