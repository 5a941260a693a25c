"""scripts/bench_ppo.py runs the PPO stage's own phases: a tiny run of it must work and report its figures."""

from __future__ import annotations

import importlib.util
import json

from helpers import REPO


def test_bench_ppo_runs_the_stage_phases_and_prints_its_figures(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path))
    spec = importlib.util.spec_from_file_location("bench_ppo", REPO / "scripts" / "bench_ppo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--hidden-size", "16", "--layers", "1", "--heads", "2", "--prompts", "8", "--mini-batches",
                       "2", "--micro-batch", "2", "--epochs", "2", "--response-length", "4", "--iterations", "1",
                       "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompts_per_rollout"] == 8 and out["epochs"] == 2 and out["iterations"] == 1
    assert out["rollout_tokens_per_s"] > 0 and out["update_tokens_per_s"] > 0 and out["seconds_per_iteration"] > 0
