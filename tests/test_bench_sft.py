"""scripts/bench_sft.py and bench_reward.py run the stages' own steps: tiny runs must work and report their
figures; packed and padded SFT see the same tokens and the same loss."""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import REPO

TINY = ["--hidden-size", "16", "--layers", "1", "--heads", "2", "--vocab-size", "1000", "--batch", "4",
        "--micro-batch", "2", "--seq-len", "24", "--steps", "2", "--warmup", "1", "--device", "cpu", "--json"]


@pytest.fixture(autouse=True)
def _precision_back():
    """The scripts set this process's train.precision (they are processes of their own when run): undo it."""
    yield
    from rlhf_cli.engine import device

    device.set_precision("auto")


def _script(name: str, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path))
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sft_padded_and_packed_see_the_same_tokens_and_loss(tmp_path, monkeypatch, capsys):
    bench = _script("bench_sft", tmp_path, monkeypatch)
    out = []
    for extra in ([], ["--packing"]):
        assert bench.main([*TINY, *extra]) == 0
        out.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    padded, packed = out
    assert packed["packing"] and not padded["packing"] and padded["vocab_size"] == 1000
    assert padded["tokens_per_s"] > padded["supervised_tokens_per_s"] > 0 and packed["mfu"] is None  # CPU: no MFU
    assert packed["loss_first"] == pytest.approx(padded["loss_first"], rel=1e-5)
    assert padded["matmul_parameters"] == padded["parameters"] - 1000 * 16   # all but the input embedding


def test_bench_reward_takes_a_vocabulary_and_a_precision(tmp_path, monkeypatch, capsys):
    bench = _script("bench_reward", tmp_path, monkeypatch)
    assert bench.main(["--hidden-size", "16", "--layers", "1", "--heads", "2", "--vocab-size", "2000", "--pairs", "2",
                       "--seq-len", "8", "--steps", "1", "--warmup", "0", "--precision", "bf16", "--device", "cpu",
                       "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["vocab_size"] == 2000 and out["precision"] == "bf16-autocast" and out["mfu"] is None


def test_bench_sft_under_fsdp_reports_the_same_loss_and_its_training_state(tmp_path, monkeypatch, capsys):
    bench = _script("bench_sft", tmp_path, monkeypatch)
    out = []
    for strategy in ("ddp", "fsdp"):
        assert bench.main([*TINY, "--strategy", strategy]) == 0
        out.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    ddp, fsdp = out
    assert (ddp["strategy"], fsdp["strategy"], fsdp["processes"]) == ("ddp", "fsdp", 1)
    assert fsdp["loss_last"] == pytest.approx(ddp["loss_last"], rel=1e-5)
    # one process holds every weight, its gradient and two AdamW moments (fp32): 16 bytes per parameter
    assert fsdp["state_mib"] == pytest.approx(16 * fsdp["parameters"] / 2**20, rel=1e-6) == ddp["state_mib"]


@pytest.mark.slow
def test_bench_strategy_runs_its_cells_in_processes_of_their_own(tmp_path, monkeypatch, capsys):
    bench = _script("bench_strategy", tmp_path, monkeypatch)
    monkeypatch.setitem(bench.SIZES, "tiny", TINY[:8])
    assert bench.main(["--sizes", "tiny", "--processes", "1", "--strategies", "fsdp", "--batch", "4",
                       "--seq-len", "16", "--steps", "1", "--warmup", "0", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["size"], row["strategy"], row["processes"], row["vocab_size"]) == ("tiny", "fsdp", 1, 1000)
    assert row["s_per_step"] > 0 and row["state_mib"] > 0
