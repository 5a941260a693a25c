"""scripts/bench_ppo.py runs the PPO stage's own phases on roles built by the stage's load_roles: a tiny run of it
must work and report its figures, full and LoRA."""

from __future__ import annotations

import importlib.util
import json

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
