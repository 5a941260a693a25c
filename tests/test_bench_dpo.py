"""scripts/bench_dpo.py runs `rlhf dpo`'s own training step on HH pairs, each configuration in a process of its own:
a tiny --memory run must report ours' tokens/s and peak memory with the reference precomputed and held (the suite
never needs TRL)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import HH_FILE, REPO

TINY = ["--hidden", "64", "--layers", "2", "--vocab-size", "1000", "--pairs", "16", "--steps", "2", "--warmup", "1",
        "--max-len", "64", "--packing", "false", "--device", "cpu"]


@pytest.fixture
def bench():
    """The script as a module; its model lives in the tests' cache (conftest's RLHF_CLI_CACHE)."""
    spec = importlib.util.spec_from_file_location("bench_dpo", REPO / "scripts" / "bench_dpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not HH_FILE.is_file(), reason=f"needs the shared HH file {HH_FILE}")
def test_bench_dpo_memory_mode_reports_throughput_and_both_peaks(bench, capsys):
    assert bench.main([*TINY, "--memory", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["trainer"], r["precompute"]) for r in runs] == [("rlhf dpo", True), ("rlhf dpo", False)]
    for run in runs:
        assert run["tokens_per_s"] > 0 and run["tokens_per_step"] > run["response_tokens_per_step"] > 0
        assert run["peak_mib"] >= run["after_loading_mib"] > run["runtime_mib"] > 0
        assert run["batch"] == 8 and run["steps"] == 2 and run["model"].startswith("hidden 64, 2 layers")
    pre, held = runs
    assert pre["reference"].startswith("log-probs precomputed") and held["reference"] == "held"
    assert pre["tokens_per_step"] == held["tokens_per_step"]  # the same pairs, the same steps
    assert pre["loss_first"] == pytest.approx(held["loss_first"], abs=1e-4)  # the same reference, either way


def test_bench_dpo_table_and_trl_missing_is_one_line(bench, capsys, monkeypatch):
    """The table shows ours' figures; --trl without TRL says so in one line and still prints ours."""
    monkeypatch.setattr(bench, "trl_found", lambda: bench.missing_trl("is not installed here"))
    run = {"trainer": "rlhf dpo", "model": "hidden 64, 2 layers", "device": "cpu", "threads": 2, "batch": 8,
           "micro_batch": 8, "max_len": 64, "warmup": 1, "steps": 2, "parameters_m": 0.23, "precision": "fp32",
           "reference": "held", "precompute": False, "layout": "packing off", "pairs": "16 (0 truncated)",
           "tokens_per_step": 900.0, "response_tokens_per_step": 400.0, "s_per_step": 0.05, "tokens_per_s": 18000.0,
           "loss_first": 0.69, "loss_last": 0.68, "memory_unit": "rss", "runtime_mib": 250.0,
           "after_loading_mib": 500.0, "peak_mib": 550.0}
    monkeypatch.setattr(bench, "build_model", lambda args, cache: "model-dir")
    monkeypatch.setattr(bench, "run_child", lambda cmd: (run, None))
    assert bench.main([*TINY, "--trl", "--no-precompute"]) == 0
    out = capsys.readouterr().out
    assert "18,000" in out and "550 MiB" in out and "reference held" in out
    assert out.strip().splitlines()[-1].startswith("bench_dpo.py: --trl needs TRL's DPOTrainer")
