"""Config mistakes are caught at compose time with the key's name and a hint (what ships composes:
test_shipped_config.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from helpers import compose_config
from rlhf_cli.config import SFTConfig, finalize
from rlhf_cli.errors import ConfigError


def _compose(stage: str, overrides: list[str]):
    return compose_config(stage, overrides)


def _finalize(stage: str, overrides: list[str], tmp_path: Path):
    return finalize(_compose(stage, [*overrides, f"run_dir={tmp_path}"]))


def test_misspelled_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("sft", ["optim.lrr=1e-3"])
    assert "optim.lrr" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("sft", ["train.max_steps=many"])
    assert "train.max_steps" in str(err.value) + str(err.value.__cause__)


def test_missing_required_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        _finalize("sft", ["data=hh_sft"], tmp_path)


@pytest.mark.parametrize("override,key", [
    ("optim.schedule=exp", "optim.schedule"), ("train.max_steps=0", "train.max_steps"),
    ("train.examples_per_step=0", "train.examples_per_step"), ("data.toy.label_noise=0.7", "label_noise"),
    ("logger=[comet]", "logger"), ("optim.lr=-1", "optim.lr"),
])
def test_rule_violations_name_the_key(override, key, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(key)):
        _finalize("sft", [override], tmp_path)


@pytest.mark.parametrize("stage,override", [
    ("sft", "optim.lr=nan"), ("sft", "optim.lr=inf"), ("reward", "optim.max_grad_norm=nan"),
    ("ppo", "ppo.kl_coef=nan"), ("ppo", "ppo.temperature=inf"), ("ppo", "ppo.score_clip=nan"),
    ("eval", "temperature=nan"),
])
def test_non_finite_numbers_are_refused_at_compose_time(stage, override, tmp_path):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key) + r"=(nan|inf) is not a finite number"):
        _finalize(stage, [override], tmp_path)


@pytest.mark.parametrize("name", ["../../escape", "team/a", "/tmp/abs", ".hidden", ".."])
def test_experiment_must_be_one_safe_name(name, tmp_path):
    with pytest.raises(ConfigError, match="is not a single name"):
        _finalize("sft", [f"experiment={name}"], tmp_path)


def test_micro_batch_size_is_an_upper_bound_not_a_divisor(tmp_path):
    # examples_per_step need not be a multiple of micro_batch_size: the step uses 2 micro-batches of 12
    cfg = _finalize("sft", ["train.examples_per_step=24", "train.micro_batch_size=16"], tmp_path)
    assert (cfg.train.examples_per_step, cfg.train.micro_batch_size) == (24, 16)
    ppo = _finalize("ppo", ["ppo.prompts_per_rollout=16", "ppo.num_mini_batches=2", "train.micro_batch_size=3"],
                    tmp_path)
    assert ppo.train.micro_batch_size == 3
    with pytest.raises(ConfigError, match="train.micro_batch_size=0 must be > 0"):
        _finalize("sft", ["train.micro_batch_size=0"], tmp_path)


def test_config_diff_ignores_how_a_run_is_launched():
    from dataclasses import asdict

    from rlhf_cli.config import config_diff

    a = asdict(SFTConfig())
    b = asdict(SFTConfig(experiment="x", resume=True, logger=["tensorboard"]))
    b["train"]["micro_batch_size"], b["train"]["checkpoint_every"] = 8, 5
    assert config_diff(a, b) == {}
    b["optim"]["lr"], b["model"]["name_or_path"] = 0.5, "/m"
    assert config_diff(a, b) == {"model.name_or_path": ("builtin:tiny", "/m"), "optim.lr": (1e-3, 0.5)}


def test_relative_paths_become_absolute_once(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    cfg = _finalize("sft", ["data.path=d.jsonl", "root=out", "model.name_or_path=./m"], tmp_path)
    assert cfg.data.path == str(tmp_path / "d.jsonl")
    assert cfg.root == str(tmp_path / "out")
    assert cfg.model.name_or_path == str(tmp_path / "m")
    hub = _finalize("sft", ["model.name_or_path=Qwen/Qwen2.5-0.5B"], tmp_path)
    assert hub.model.name_or_path == "Qwen/Qwen2.5-0.5B"
