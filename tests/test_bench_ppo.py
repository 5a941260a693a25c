"""scripts/bench_ppo.py runs the PPO stage's own phases on roles built by the stage's load_roles: a tiny run of it
must work and report its figures, full and LoRA, with a value model (gae) and without one (grpo); --trl without
TRL installed stops with one line (the suite never needs TRL)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from helpers import REPO

TINY = ["--hidden-size", "16", "--layers", "1", "--heads", "2", "--vocab-size", "1000", "--prompts", "8",
        "--mini-batches", "2", "--micro-batch", "2", "--epochs", "2", "--response-length", "4", "--iterations", "1",
        "--device", "cpu", "--json"]


@pytest.fixture
def bench():
    """The script as a module; its models live in the tests' cache (conftest's RLHF_CLI_CACHE), built once."""
    spec = importlib.util.spec_from_file_location("bench_ppo", REPO / "scripts" / "bench_ppo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_ppo_runs_the_stage_phases_and_prints_its_figures(bench, capsys):
    assert bench.main(TINY) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompts_per_rollout"] == 8 and out["epochs"] == 2 and out["iterations"] == 1
    assert out["rollout_tokens_per_s"] > 0 and out["update_tokens_per_s"] > 0 and out["seconds_per_iteration"] > 0
    assert out["peak_memory_mib"] >= out["peak_loading_mib"] >= out["memory_after_loading_mib"] > 0
    assert out["runtime_rss_mib"] <= out["peak_loading_mib"]  # CPU: the runtime's RSS, before any model
    assert out["trained_policy_m"] == out["parameters_m"] == out["reference_copy_m"]  # full: a frozen copy
    assert out["trained_value_m"] == out["value_m"] > out["reward_m"]  # the value head's bias


def test_bench_ppo_scores_with_an_ensemble_of_reward_models(bench, capsys):
    assert bench.main(TINY) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert bench.main([*TINY, "--reward-models", "3"]) == 0
    three = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert three["reward_models"] == 3 and three["reward_m"] == pytest.approx(3 * one["reward_m"])


def test_bench_ppo_with_lora_trains_only_adapters(bench, capsys):
    assert bench.main([*TINY, "--lora-r", "4", "--gradient-checkpointing"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["lora_r"] == 4 and out["gradient_checkpointing"] is True
    assert 0 < out["trained_policy_m"] < out["parameters_m"] / 5 and out["trained_value_m"] > 0
    assert out["reference_copy_m"] == 0  # the policy with its adapters off


@pytest.mark.slow
def test_bench_ppo_compare_runs_full_and_lora_in_their_own_processes(bench, capsys):
    assert bench.main([*TINY, "--compare", "--sizes", "16x1"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["lora_r"] for r in rows] == [0, 16] and {r["model"] for r in rows} == {"16x1"}
    assert rows[1]["trained_policy_m"] < rows[0]["trained_policy_m"]
    assert rows[0]["reward_m"] == rows[1]["reward_m"]  # the same models, built once for both runs
    assert rows[1]["parameters_m"] - rows[0]["parameters_m"] == pytest.approx(rows[1]["trained_policy_m"])


def test_bench_ppo_grpo_runs_without_a_value_model(bench, capsys):
    """--advantage grpo: the preset's switches, k rows per prompt, no value model (nothing of it loaded or trained),
    the reference kept for the KL in the loss."""
    assert bench.main([*TINY, "--advantage", "grpo", "--samples-per-prompt", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["advantage"] == "grpo" and out["preset"] == "grpo" and out["samples_per_prompt"] == 2
    assert out["rows_per_rollout"] == 16 and out["kl_coef"] == 0.04 and out["kl_penalty"] == "loss"
    assert out["value_m"] == out["trained_value_m"] == 0
    assert out["reference_copy_m"] == out["parameters_m"] > 0 and out["seconds_per_iteration"] > 0
    assert 0 < out["response_tokens_per_iteration"] <= 16 * 4


def test_bench_ppo_batch_arithmetic_counts_rows_and_group_estimators_need_k(bench):
    # 4 prompts x 2 = 8 rows: 2 minibatches of one micro-batch of 4 (4 prompts alone would not split)
    args = bench.parse_args(["--prompts", "4", "--samples-per-prompt", "2", "--mini-batches", "2",
                             "--micro-batch", "4"])
    assert args.rollout_micro_batch == 8
    with pytest.raises(SystemExit):
        bench.parse_args(["--prompts", "4", "--mini-batches", "2", "--micro-batch", "4"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--advantage", "grpo", "--prompts", "8", "--mini-batches", "2", "--micro-batch", "4"])


def test_bench_ppo_trl_missing_is_one_clear_line(bench, monkeypatch):
    """Without TRL, --trl stops before building anything, with one line saying what is missing and how to install
    it; the child that runs TRL says the same when the import fails there."""
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` fails, find_spec finds nothing
    args = [*TINY, "--advantage", "grpo", "--samples-per-prompt", "2"]
    for flag in ("--trl", "--trl-child"):
        with pytest.raises(SystemExit) as stop:
            bench.main([*args, flag])
        message = str(stop.value.code)
        assert "\n" not in message and "--trl needs TRL" in message and "pip install trl" in message
