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
from rlhf_cli.engine.batches import step_indices, to_device


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
    from rlhf_cli.engine.rundir import plan_run_dir

    def ckpt(root, step):
        (root / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (root / "checkpoints" / f"step-{step}" / "state.json").write_text('{"step": %d}' % step)
        return root / "checkpoints" / f"step-{step}"

    staging = tmp_path / artifacts.STAGING
    assert plan_run_dir(tmp_path, "sft", False, False) == (tmp_path, None, True)
    step10 = ckpt(tmp_path, 10)
    assert plan_run_dir(tmp_path, "sft", False, True) == (tmp_path, step10, False)
    assert plan_run_dir(tmp_path, "sft", True, False) == (tmp_path, None, True)
    with pytest.raises(ArtifactError, match="resume=true"):
        plan_run_dir(tmp_path, "sft", False, False)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactError, match="overwrite=true"):
        plan_run_dir(tmp_path, "sft", False, True)
    # a finished artifact is replaced beside itself, never cleaned first
    assert plan_run_dir(tmp_path, "sft", True, False) == (staging, None, True)
    assert plan_run_dir(tmp_path, "sft", True, True) == (staging, None, True)
    staged = ckpt(staging, 4)  # an interrupted replacement: continued with overwrite + resume, named when refused
    assert plan_run_dir(tmp_path, "sft", True, True) == (staging, staged, False)
    assert plan_run_dir(tmp_path, "sft", True, False) == (staging, None, True)
    with pytest.raises(ArtifactError, match="overwrite=true resume=true"):
        plan_run_dir(tmp_path, "sft", False, False)


def _artifact(run_dir, tag: str) -> None:
    """A finished artifact whose every owned file says which one it is."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl"):
        (run_dir / name).write_text(tag)
    for folder in ("model", "checkpoints/step-1", ".hydra"):
        (run_dir / folder).mkdir(parents=True)
        (run_dir / folder / "f").write_text(tag)
    (run_dir / "manifest.json").write_text(json.dumps({"tag": tag}))


def _tags(run_dir) -> set:
    files = [p for p in run_dir.rglob("*") if p.is_file() and artifacts.STAGING not in p.parts]
    return {(p.read_text() if p.name != "manifest.json" else json.loads(p.read_text())["tag"]) for p in files}


def test_settle_finishes_a_replacement_killed_at_any_rename(tmp_path, monkeypatch):
    """Kill the move of a finished replacement after each possible rename: the run directory always holds one
    whole artifact or none (never a mix marked finished), and settling again completes it."""
    import os

    real_rename, calls = os.rename, []
    monkeypatch.setattr(os, "rename", lambda a, b: (calls.append(1), real_rename(a, b))[1])
    _artifact(tmp_path / "count", "old")
    _artifact(tmp_path / "count" / artifacts.STAGING, "new")
    artifacts.settle(tmp_path / "count")
    total = len(calls)
    assert total > 10 and _tags(tmp_path / "count") == {"new"}
    assert not (tmp_path / "count" / artifacts.STAGING).exists()
    for kill_after in range(total):
        run_dir = tmp_path / f"kill{kill_after}"
        _artifact(run_dir, "old")
        _artifact(run_dir / artifacts.STAGING, "new")
        budget = [kill_after]

        def dying_rename(a, b):
            if budget[0] == 0:
                raise KeyboardInterrupt("killed")
            budget[0] -= 1
            return real_rename(a, b)

        monkeypatch.setattr(os, "rename", dying_rename)
        with pytest.raises(KeyboardInterrupt):
            artifacts.settle(run_dir)
        if artifacts.is_finished(run_dir):  # whatever is marked finished is whole
            assert _tags(run_dir) in ({"old"}, {"new"})
        monkeypatch.setattr(os, "rename", real_rename)
        artifacts.settle(run_dir)
        assert _tags(run_dir) == {"new"}, kill_after
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(
            ["config.yaml", "metrics.jsonl", "samples.jsonl", "model", "checkpoints", ".hydra", "manifest.json"])


def test_upstream_settles_and_checks_the_model_it_hands_on(tmp_path):
    run_dir = tmp_path / "runs" / "e" / "sft"
    run_dir.mkdir(parents=True)

    def save(tmp):
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"x" * 64)

    manifest = {"stage": "sft", "kind": "policy", "schema_version": artifacts.SCHEMA_VERSION}
    artifacts.publish(run_dir, save, manifest)
    path, parent = artifacts.upstream(None, tmp_path / "runs", "e", "sft", "policy")
    assert path == str(run_dir / "model") and parent["model_sha256"]
    weights = run_dir / "model" / "model.safetensors"
    weights.write_bytes(b"y" * 64)  # same size, other bytes: the sha256 (small model) catches it
    with pytest.raises(ArtifactError, match="changed after it was published") as err:
        artifacts.upstream(None, tmp_path / "runs", "e", "sft", "policy")
    assert "rlhf sft experiment=e overwrite=true" in err.value.hint
    artifacts.upstream(None, tmp_path / "runs", "e", "sft", "policy", check="sizes")  # sizes only: passes
    weights.write_bytes(b"y" * 10)
    with pytest.raises(ArtifactError, match="model.safetensors has 10 bytes, 64 were recorded"):
        artifacts.upstream(None, tmp_path / "runs", "e", "sft", "policy", check="sizes")
    import shutil

    shutil.rmtree(run_dir / "model")
    with pytest.raises(ArtifactError, match="model/ is missing"):
        artifacts.upstream(str(run_dir), tmp_path / "runs", "e", "sft", "policy")


def test_experiment_names_are_single_safe_components(tmp_path):
    from rlhf_cli.errors import ConfigError

    assert artifacts.stage_dir(tmp_path, "team-a_lr3e-4.v2", "sft") == tmp_path / "team-a_lr3e-4.v2" / "sft"
    for bad in ("../../escape", "team/a", "/abs/path", ".hidden", "..", "", "a b", "x" * 101):
        with pytest.raises(ConfigError, match="is not a single name"):
            artifacts.stage_dir(tmp_path, bad, "sft")
        with pytest.raises(ConfigError):
            artifacts.upstream(None, str(tmp_path), bad, "sft", "policy")


def test_strict_json_writes_null_for_nan(tmp_path):
    from rlhf_cli.engine.recording import MetricsLog

    assert artifacts.dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": tmp_path}) == \
        f'{{"a": null, "b": [null, 1.5], "c": "{tmp_path}"}}'
    log = MetricsLog(tmp_path, True, None)
    log.log(1, {"loss": float("nan"), "lr": 0.1})

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert row["loss"] is None and row["lr"] == 0.1


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


def test_to_device_adds_position_ids_that_ignore_padding():
    batch = to_device({"input_ids": torch.tensor([[0, 0, 7, 8], [7, 8, 9, 0]]),
                       "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])}, torch.device("cpu"))
    assert batch["position_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]
    assert "position_ids" not in to_device({"input_ids": torch.tensor([[1]])}, torch.device("cpu"))


def test_optimizer_step_skips_a_nonfinite_step_then_stops(tmp_path):
    from rlhf_cli.engine.guard import Guard
    from rlhf_cli.engine.optim import optimizer_step
    from rlhf_cli.errors import DivergedError

    model, opt, sched = _train_state()
    guard = Guard("sft", tmp_path / "checkpoints", lr=0.1, max_skipped=1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.full((2, 4), float("nan"))).sum().backward()
    assert optimizer_step(model.parameters(), opt, sched, 1.0, guard, step=1, loss=float("nan")) is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update reached the weights
    assert all(p.grad is None for p in model.parameters()) and sched.last_epoch == 1 and guard.skipped == 1
    model(torch.randn(2, 4)).sum().backward()
    assert optimizer_step(model.parameters(), opt, sched, 1.0, guard, step=2, loss=0.5) > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    checkpoint.save(tmp_path / "checkpoints", 2, {"model": model}, opt, sched, {"step": 2}, keep=1)
    after = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(DivergedError) as err:  # the budget of one skip is spent
        optimizer_step(model.parameters(), opt, sched, 1.0, guard, step=3, loss=float("inf"))
    assert all(torch.equal(a, b) for a, b in zip(after, model.parameters()))
    assert "the loss is inf at step 3, after 1 skipped step" in err.value.message
    assert str(tmp_path / "checkpoints" / "step-2") in err.value.message
    assert "optim.lr" in err.value.hint and err.value.exit_code == 3


def test_guard_names_how_many_values_are_not_finite(tmp_path):
    from rlhf_cli.engine.guard import Guard
    from rlhf_cli.errors import DivergedError

    guard = Guard("ppo", tmp_path, lr=1e-3, unit="iteration")
    guard.require_finite(5, "reward model's score", torch.tensor([1.0, 2.0]))
    with pytest.raises(DivergedError, match=r"the reward model's score is nan for 2 of 4 at iteration 5") as err:
        guard.require_finite(5, "reward model's score", torch.tensor([1.0, float("nan"), 2.0, float("nan")]),
                             hint="check the reward model")
    assert err.value.hint == "check the reward model" and "no checkpoint was written yet" in err.value.message


def test_a_failed_checkpoint_write_leaves_the_last_good_one(tmp_path, monkeypatch):
    import errno

    from rlhf_cli.errors import StorageError

    model, opt, sched = _train_state()
    checkpoint.save(tmp_path, 1, {"model": model}, opt, sched, {"step": 1}, keep=2)
    good = {p.name: p.read_bytes() for p in (tmp_path / "step-1").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".step-2.tmp" / "optimizer.pt"))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(StorageError) as err:
        checkpoint.save(tmp_path, 2, {"model": model}, opt, sched, {"step": 2}, keep=2)
    assert "could not write checkpoint step-2" in err.value.message and "No space left" in err.value.message
    assert str(tmp_path / "step-1") in err.value.hint and "resume=true" in err.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]  # no half-written step left behind
    assert {p.name: p.read_bytes() for p in (tmp_path / "step-1").iterdir()} == good
    assert checkpoint.latest(tmp_path) == tmp_path / "step-1"


def test_a_damaged_checkpoint_is_refused_by_name(tmp_path):
    model, opt, sched = _train_state()
    for step in (1, 2):
        checkpoint.save(tmp_path, step, {"model": model}, opt, sched, {"step": step}, keep=2)
    assert checkpoint.verify(tmp_path / "step-2") == {"step": 2}
    weights = tmp_path / "step-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte inside a weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="step-2 is damaged: the content of step-2/ differs") as err:
        checkpoint.verify(tmp_path / "step-2")
    assert f"delete {tmp_path / 'step-2'} to continue from step-1" in err.value.hint
    checkpoint.verify(tmp_path / "step-2", check="sizes")  # sizes alone cannot see it
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(ArtifactError, match="model.safetensors has 100 bytes"):
        checkpoint.verify(tmp_path / "step-2", check="sizes")
    with pytest.raises(ArtifactError, match="it does not load"):
        checkpoint.load(tmp_path / "step-2", {"model": model})
    (tmp_path / "step-1" / "state.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="state.json cannot be read"):
        checkpoint.verify(tmp_path / "step-1")


def test_resumed_optimizer_follows_the_config(tmp_path):
    from rlhf_cli.engine.optim import apply_hyperparameters

    model, opt, sched = _train_state()
    for _ in range(3):
        _step(model, opt, sched)
    checkpoint.save(tmp_path, 3, {"model": model}, opt, sched, {"step": 3}, keep=1)
    lrs = [g["lr"] for g in opt.param_groups]
    model2, opt2, sched2 = _train_state()
    checkpoint.load(tmp_path / "step-3", {"model": model2}, opt2, sched2)
    apply_hyperparameters(opt2, sched2, OptimConfig(lr=0.1, warmup_steps=2))  # the same config: the same numbers
    assert [g["lr"] for g in opt2.param_groups] == lrs
    apply_hyperparameters(opt2, sched2, OptimConfig(lr=0.01, warmup_steps=2, weight_decay=0.5))
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([lr / 10 for lr in lrs])
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.5, 0.0]
    _step(model2, opt2, sched2)
    assert sched2.get_last_lr() == pytest.approx([0.01 * lr_factor(4, 10, 2, "cosine", 0.1)] * 2)


def test_a_failed_publish_leaves_the_old_artifact(tmp_path):
    import errno

    from rlhf_cli.errors import StorageError

    _artifact(tmp_path, "old")

    def disk_full(tmp):
        tmp.mkdir()
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))

    staging = tmp_path / artifacts.STAGING
    staging.mkdir()
    with pytest.raises(StorageError, match="could not write the sft's artifact"):
        artifacts.publish(staging, disk_full, {"stage": "sft"}, tmp_path)
    assert _tags(tmp_path) == {"old"} and not list(staging.iterdir())
