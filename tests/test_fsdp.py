"""train.strategy=fsdp (FSDP2) in one process with a group of one, in-process: sharding, gathering the full weights
back, checkpoints in both formats read into both kinds of model, failures; the launch helpers (even micro-batches
across ranks, SLURM/submitit ranks). The multi-process runs are in test_distributed.py."""

from __future__ import annotations

import errno
import sys
import types

import pytest
import torch
import torch.distributed as tdist
from transformers import AutoModelForCausalLM

from rlhf_cli.config import FSDPConfig, LoraConfig, OptimConfig
from rlhf_cli.engine import batches, checkpoint, dist, fsdp
from rlhf_cli.engine.optim import build_optimizer, build_scheduler
from rlhf_cli.errors import ConfigError, StorageError
from rlhf_cli.models import lora
from rlhf_cli.models.tiny import tiny_model_path

CPU = torch.device("cpu")


@pytest.fixture
def group():
    """A one-process gloo group, as `rlhf <stage> train.strategy=fsdp` makes without torchrun."""
    d = dist.init("cpu", group_of_one=True)
    yield d
    dist.close()


def _model(r: int = 0):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)
    lora.add_adapters(model, LoraConfig(r=r), seed=0)
    return model.train()


def _train(model, steps: int = 2):
    """A few AdamW steps on a fixed batch; the optimizer and schedule."""
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], OptimConfig(lr=1e-2, warmup_steps=0))
    sched = build_scheduler(opt, OptimConfig(lr=1e-2, warmup_steps=0), 10)
    ids = torch.arange(24).reshape(2, 12) % 200 + 3
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt, sched


def _full(model) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def test_rank_micro_batches_give_every_rank_as_many_micro_batches_and_each_item_once():
    items = list(range(7))
    per_rank = [list(batches.rank_micro_batches(items, r, 3, 2)) for r in range(3)]
    assert [len(p) for p in per_rank] == [2, 2, 2]                    # ceil(ceil(7 / 3) / 2)
    real = sorted(x for p in per_rank for part, ok in p if ok for x in part)
    assert real == items
    assert per_rank[1][1] == ([0], False) and per_rank[2][1] == ([0], False)  # filler: run, discarded
    assert list(batches.rank_micro_batches([], 0, 2, 4)) == []


def test_a_sharded_model_is_split_into_its_decoder_layers_and_gathers_back_to_a_plain_copy(group):
    model = _model()
    plain = _model()
    assert len(fsdp.units(model)) == model.config.num_hidden_layers
    fsdp.shard(model, CPU, group, FSDPConfig())
    assert fsdp.is_sharded(model) and not fsdp.is_sharded(plain)
    _train(model)
    _train(plain)
    model.score_stats = {"mean": 1.5}
    copy = fsdp.gathered(model, group)
    assert not fsdp.is_sharded(copy) and copy.score_stats == {"mean": 1.5}
    trained = _full(plain)
    got = copy.state_dict()
    assert got.keys() == trained.keys()
    for k in trained:  # FSDP on one process computes what the plain model computes
        torch.testing.assert_close(got[k], trained[k], rtol=1e-5, atol=1e-6)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # the tie is restored
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(copy(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_sharded_checkpoints_load_into_plain_models_and_plain_ones_into_sharded(group, tmp_path):
    sharded, plain = _model(r=4), _model(r=4)
    fsdp.shard(sharded, CPU, group, FSDPConfig())
    opt_s, sched_s = _train(sharded)
    opt_p, sched_p = _train(plain)
    checkpoint.save_sharded(tmp_path / "a", 2, {"policy": sharded}, opt_s, sched_s, {"step": 2}, keep=2, d=group)
    checkpoint.save(tmp_path / "b", 2, {"policy": plain}, opt_p, sched_p, {"step": 2}, keep=2)
    saved = tmp_path / "a" / "step-2"
    assert (saved / checkpoint.SHARDS / ".metadata").is_file() and not list((tmp_path / "a").glob(".step-*"))
    assert checkpoint.verify(saved)["step"] == 2

    # shards -> a fresh plain model with LoRA: the adapters and the AdamW moments come back
    fresh = _model(r=4)
    opt_f, sched_f = _train(fresh, steps=0)
    assert checkpoint.load(saved, {"policy": fresh}, opt_f, sched_f, restore_rng=False)["step"] == 2
    adapters = {k: v for k, v in _full(plain).items() if "lora_" in k}
    got = fresh.state_dict()
    assert adapters and all(torch.allclose(got[k], v, atol=1e-6) for k, v in adapters.items())
    moments = [s["exp_avg"] for s in opt_f.state.values()]
    assert len(moments) == len(adapters) and all(m.abs().sum() > 0 for m in moments)

    # a plain checkpoint -> a fresh sharded model; then one more step on each lands on the same weights
    resharded = _model(r=4)
    fsdp.shard(resharded, CPU, group, FSDPConfig())
    opt_r, sched_r = _train(resharded, steps=0)
    checkpoint.load(tmp_path / "b" / "step-2", {"policy": resharded}, opt_r, sched_r, restore_rng=False)
    _train_one(resharded, opt_r)
    _train_one(plain, opt_p)
    a, b = _full(resharded), _full(plain)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in adapters)

    # a full model's checkpoint does not load into adapters
    with pytest.raises(Exception, match="damaged"):
        checkpoint.load(saved, {"policy": _model(r=0)}, restore_rng=False)


def _train_one(model, opt):
    ids = torch.arange(24).reshape(2, 12) % 200 + 3
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_a_sharded_checkpoint_that_cannot_be_written_fails_on_every_rank_and_keeps_the_last_one(group, tmp_path,
                                                                                                 monkeypatch):
    model = _model()
    fsdp.shard(model, CPU, group, FSDPConfig())
    opt, sched = _train(model, steps=1)
    checkpoint.save_sharded(tmp_path, 1, {"model": model}, opt, sched, {"step": 1}, keep=3, d=group)
    import torch.distributed.checkpoint as dcp

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(StorageError, match="checkpoint step-2.*No space left") as err:
        checkpoint.save_sharded(tmp_path, 2, {"model": model}, opt, sched, {"step": 2}, keep=3, d=group)
    assert "step-1" in err.value.hint
    assert checkpoint.list_steps(tmp_path) == [1] and not list(tmp_path.glob(".step-*"))


def test_fsdp_refuses_mixed_dtypes_without_bf16_and_cpu_offload_on_the_cpu(group):
    model = _model(r=4)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    with pytest.raises(ConfigError, match="bfloat16, float32") as err:
        fsdp.shard(model, CPU, group, FSDPConfig())
    assert "model.dtype=float32" in err.value.hint
    with pytest.raises(ConfigError, match="cpu_offload"):
        fsdp.shard(_model(), CPU, group, FSDPConfig(cpu_offload=True))


def test_a_submitit_task_takes_its_rank_and_world_from_the_job(monkeypatch):
    job = types.SimpleNamespace(num_tasks=4, global_rank=3, local_rank=1, hostnames=["gpu-a", "gpu-b"],
                                job_id="1234_5")
    monkeypatch.setitem(sys.modules, "submitit", types.SimpleNamespace(JobEnvironment=lambda: job))
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", {**env, "SUBMITIT_EXECUTOR": "slurm"})  # nothing leaks to other tests
    dist.from_submitit()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "gpu-a" and os.environ["MASTER_PORT"] == str(20000 + 12345 % 20000)
    assert dist.local_rank_from_env() == 1
    # torchrun's own variables win
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1"})
    dist.from_submitit()
    assert os.environ["WORLD_SIZE"] == "1" and not tdist.is_initialized()
    # a task of one is a single process
    job.num_tasks = 1
    del os.environ["RANK"], os.environ["WORLD_SIZE"]
    dist.from_submitit()
    assert "RANK" not in os.environ


def test_the_slurm_and_optuna_presets_compose_onto_their_plugins():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from helpers import REPO
    from rlhf_cli.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="reward", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra/sweeper=maximize",
                                 "objective=eval_accuracy", "seed=7"])
    GlobalHydra.instance().clear()
    launcher, sweeper = cfg.hydra.launcher, cfg.hydra.sweeper
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8  # one task per GPU
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler.seed == 7 and cfg.objective == "eval_accuracy"


def test_a_preset_without_its_plugin_is_one_line_naming_the_extra(monkeypatch, capsys):
    import importlib.util

    from rlhf_cli import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_submitit") else real(name, *a))
    assert cli.main(["sft", "-m", "hydra/launcher=slurm"]) == 2
    err = capsys.readouterr().err
    assert "hydra/launcher=slurm needs Hydra's slurm plugin" in err and "pip install 'rlhf-cli[slurm]'" in err


def test_the_objective_is_the_named_metric_or_a_message_listing_the_numeric_ones():
    from rlhf_cli.cli import objective_value

    metrics = {"eval_accuracy": 0.75, "steps": 24, "eval_gold_accuracy": None, "note": "x"}
    assert objective_value(metrics, "eval_accuracy") == 0.75
    assert objective_value(metrics, None) is None
    with pytest.raises(ConfigError, match="objective=accuracy") as err:
        objective_value(metrics, "accuracy")
    assert err.value.hint == "use one of: eval_accuracy, steps"


def test_under_fsdp_models_load_into_host_memory_and_shard_onto_the_device():
    from rlhf_cli.config import TrainConfig
    from rlhf_cli.engine import train

    gpu = torch.device("cuda", 3)
    assert train.load_device(gpu, TrainConfig(strategy="fsdp")) == CPU  # fully_shard moves each block's shard
    assert train.load_device(gpu, TrainConfig(strategy="ddp")) == gpu
