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
