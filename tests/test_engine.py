"""Engine pieces: the lr schedule, checkpoints (atomic, pruned, exact round trip), the run-directory contract."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rlhf_cli import artifacts
from rlhf_cli.config import OptimConfig
from rlhf_cli.engine import checkpoint
from rlhf_cli.engine.optim import build_optimizer, build_scheduler, lr_factor
from rlhf_cli.errors import ArtifactError
from rlhf_cli.engine.batches import step_indices


def test_lr_factor_hand_values():
    # warmup 4 of 14 steps: 1/4, 2/4, 3/4, 4/4, then the decay phase of 10 steps
    assert [lr_factor(s, 14, 4, "cosine", 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 14, 4, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(9, 14, 4, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(14, 14, 4, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 14, 4, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(12, 14, 4, "constant", 0.1) == 1.0


def test_no_weight_decay_on_vectors():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model.parameters(), OptimConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["params"][0] is model.weight


def _train_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = build_optimizer(model.parameters(), OptimConfig(lr=0.1, warmup_steps=2))
    sched = build_scheduler(opt, OptimConfig(lr=0.1, warmup_steps=2), total_steps=10)
    return model, opt, sched


def _step(model, opt, sched):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_checkpoint_round_trip_continues_identically(tmp_path):
    model, opt, sched = _train_state()
    for _ in range(3):
        _step(model, opt, sched)
    random.seed(5)
    checkpoint.save(tmp_path, 3, {"model": model}, opt, sched, {"step": 3}, keep=2)
    for _ in range(2):
        _step(model, opt, sched)
    expected = [p.detach().clone() for p in model.parameters()]
    expected_py = random.random()

    model2, opt2, sched2 = _train_state()
    state = checkpoint.load(tmp_path / "step-3", {"model": model2}, opt2, sched2)
    assert state == {"step": 3}
    for _ in range(2):
        _step(model2, opt2, sched2)
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b)
    assert random.random() == expected_py
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_checkpoints_pruned_and_partial_ones_ignored(tmp_path):
    model, opt, sched = _train_state()
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, step, {"model": model}, opt, sched, {"step": step}, keep=2)
    (tmp_path / ".step-40.tmp-123").mkdir()  # a save killed half-way
    (tmp_path / "step-50").mkdir()  # no state.json: not complete
    assert checkpoint.list_steps(tmp_path) == [20, 30]
    assert checkpoint.latest(tmp_path) == tmp_path / "step-30"
    checkpoint.clean_partial(tmp_path)
    assert not (tmp_path / ".step-40.tmp-123").exists()


def test_optimizer_state_loads_with_weights_only(tmp_path):
    model, opt, sched = _train_state()
    _step(model, opt, sched)
    checkpoint.save(tmp_path, 1, {"model": model}, opt, sched, {"step": 1}, keep=1)
    # weights_only=True refuses arbitrary pickles; our files must pass it
    torch.load(tmp_path / "step-1" / "optimizer.pt", weights_only=True)
    torch.load(tmp_path / "step-1" / "rng.pt", weights_only=True)


def test_plan_run_dir(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step-10"
    assert artifacts.plan_run_dir(tmp_path, "sft", False, False, None) == (None, True)
    assert artifacts.plan_run_dir(tmp_path, "sft", False, True, ckpt) == (ckpt, False)
    assert artifacts.plan_run_dir(tmp_path, "sft", True, False, ckpt) == (None, True)
    with pytest.raises(ArtifactError, match="resume=true"):
        artifacts.plan_run_dir(tmp_path, "sft", False, False, ckpt)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactError, match="overwrite=true"):
        artifacts.plan_run_dir(tmp_path, "sft", False, True, ckpt)
    assert artifacts.plan_run_dir(tmp_path, "sft", True, False, None) == (None, True)


def test_publish_is_atomic_and_hashes(tmp_path):
    def failing_save(tmp):
        tmp.mkdir()
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        artifacts.publish(tmp_path, failing_save, {"stage": "sft"})
    assert not (tmp_path / "model").exists() and not artifacts.is_finished(tmp_path)

    def save(tmp):
        tmp.mkdir()
        (tmp / "weights").write_text("full")

    artifacts.publish(tmp_path, save, {"stage": "sft", "schema_version": artifacts.SCHEMA_VERSION})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model_sha256"] == artifacts.content_hash(tmp_path / "model")
    assert artifacts.read_manifest(tmp_path)["stage"] == "sft"
    artifacts.clean_run_dir(tmp_path)
    assert not any(p.name in artifacts.OWNED for p in tmp_path.iterdir())


def test_step_indices_cover_each_epoch_once_and_are_deterministic():
    n, batch = 10, 3  # 3 steps per epoch, one example dropped per epoch
    epoch0 = [i for s in range(3) for i in step_indices(s, batch, n, seed=1)]
    assert len(set(epoch0)) == 9
    assert step_indices(4, batch, n, seed=1) == step_indices(4, batch, n, seed=1)
    assert step_indices(0, batch, n, seed=1) != step_indices(0, batch, n, seed=2)
    epoch1 = [i for s in range(3, 6) for i in step_indices(s, batch, n, seed=1)]
    assert epoch1 != epoch0 and len(set(epoch1)) == 9
