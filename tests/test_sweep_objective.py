"""An Optuna sweep's objective is checked against the stage's declared metrics before the first trial, and a
sweep whose every trial failed ends with the trials' own errors, once each, not a sweeper's traceback."""

from __future__ import annotations

import pytest
from helpers import run_cli

from rlhf_cli.stagespec import SPECS

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


def test_an_objective_that_names_no_metric_is_refused_before_any_trial(tmp_path):
    run = run_cli(["reward", "-m", "experiment=t", "hydra/sweeper=maximize", "objective=eval_acc",
                   "hydra.sweeper.n_trials=2"], tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "objective=eval_acc is not a metric of rlhf reward" in run.stderr
    assert "eval_accuracy" in run.stderr and "label_noise_ceiling" in run.stderr  # the stage's metrics, listed
    assert not (tmp_path / "runs").exists()  # no trial started


def test_a_sweeper_without_an_objective_is_refused(tmp_path):
    run = run_cli(["sft", "-m", "experiment=t", "hydra/sweeper=maximize"], tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "a sweeper needs objective=<metric of rlhf sft>" in run.stderr and "objective=eval_loss" in run.stderr


@pytest.mark.slow
def test_a_sweep_whose_every_trial_failed_ends_with_one_message(tmp_path):
    missing = tmp_path / "absent.jsonl"
    run = run_cli(["sft", "-m", "experiment=t", "hydra/sweeper=maximize", "objective=gold_score",
                   "hydra.sweeper.n_trials=2", f"data.path={missing}"], tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.count(str(missing)) == 1  # the trials' error, said once
    assert "every trial failed (2 of them)" in run.stderr


def test_the_declared_metrics_match_what_a_plain_run_checks(tmp_path):
    """A plain run (no sweep) checks objective= the same way: before training."""
    run = run_cli(["ppo", "experiment=t", "objective=gold"], tmp_path)
    assert run.returncode == 2 and "objective=gold is not a metric of rlhf ppo" in run.stderr
    assert "final_gold" in run.stderr and "final_gold" in SPECS["ppo"].metrics
