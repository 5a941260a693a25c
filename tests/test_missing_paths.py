"""A model or run directory that is not there: one config error naming the key the user set, never a hub
connection failure. A local path that does not exist says so; a hub id while offline (the tests run with
HF_HUB_OFFLINE=1) says that it is not in the local cache and how to get it there. Each refusal comes before any
training (models.loading.check_source, which every load goes through)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from helpers import run_cli
from rlhf_cli.config import ModelConfig
from rlhf_cli.errors import ConfigError
from rlhf_cli.models.loading import check_source, is_hub_id, load_causal_lm, load_tokenizer
from rlhf_cli.models.reward import RewardModel, load_reward_model


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache of the test's own, with the hub off."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_model(cache: Path, repo_id: str) -> None:
    """Lay out `repo_id` in a hub cache as `hf download` leaves it: refs/main -> snapshots/<commit>/config.json."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")


@pytest.mark.parametrize(("name", "hub"), [
    ("Qwen/Qwen2.5-0.5B", True), ("gpt2", True), ("nobody/no-such-model", True),
    ("/abs/model", False), ("./model", False), ("../model", False), ("~/model", False), ("runs/demo/sft", False),
    ("a b", False),
])
def test_hub_ids_and_local_paths_are_told_apart(name, hub):
    assert is_hub_id(name) is hub


@pytest.mark.parametrize("key", ["model.name_or_path", "model.reward", "policies"])
def test_a_missing_local_path_names_the_key_and_says_it_does_not_exist(key, tmp_path, hub_cache):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(ConfigError) as caught:
        check_source(missing, key)
    assert caught.value.message == f"{key}: the path {missing} does not exist"
    assert "builtin:tiny" in caught.value.hint and "hub" not in caught.value.message


def test_a_hub_id_offline_and_not_cached_says_how_to_get_it(hub_cache):
    with pytest.raises(ConfigError) as caught:
        check_source("nobody/no-such-model", "model.policy")
    message, hint = caught.value.message, caught.value.hint
    assert message.startswith("model.policy: nobody/no-such-model is neither a local directory nor in the local "
                              "Hugging Face cache")
    assert str(hub_cache) in message and "HF_HUB_OFFLINE=1" in message
    for way in ("hf download nobody/no-such-model", "huggingface-cli download nobody/no-such-model", "HF_HOME",
                "local model directory"):
        assert way in hint


def test_what_can_load_passes(hub_cache, tmp_path, monkeypatch):
    check_source(str(tmp_path), "model.name_or_path")              # an existing directory
    check_source("builtin:tiny", "model.name_or_path")
    cache_model(hub_cache, "someone/cached-model")
    check_source("someone/cached-model", "model.name_or_path")     # offline, but in the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_source("nobody/no-such-model", "model.name_or_path")     # online: from_pretrained will say


def test_every_loader_checks_with_the_key_it_is_given(hub_cache):
    cases = [
        (lambda: load_tokenizer(ModelConfig(name_or_path="/nope"), key="reference"), "reference: the path /nope"),
        (lambda: load_causal_lm(ModelConfig(name_or_path="/nope"), torch.device("cpu"), key="model.policy"),
         "model.policy: the path /nope"),
        (lambda: load_reward_model("/nope", key="reward"), "reward: the path /nope"),
        (lambda: RewardModel.from_pretrained("nobody/x", key="model.value"), "model.value: nobody/x is neither"),
        (lambda: RewardModel.from_backbone("./nope", None), "model.name_or_path: the path ./nope"),
        (lambda: load_causal_lm(ModelConfig(name_or_path="builtin:huge"), torch.device("cpu"), key="model.policy"),
         "model.policy=builtin:huge: the only built-in model is builtin:tiny"),
    ]
    for load, start in cases:
        with pytest.raises(ConfigError) as caught:
            load()
        assert caught.value.message.startswith(start), caught.value.message


# ---- through the `rlhf` command: exit code 2, one message, nothing trained -----------------------------------------

CLI_CASES = {
    "sft-path": (["sft", "model.name_or_path=/does/not/exist"],
                 "model.name_or_path: the path /does/not/exist does not exist"),
    "ppo-reward": (["ppo", "model.policy=builtin:tiny", "model.reward=/nope"],
                   "model.reward: the path /nope does not exist"),
    "eval-policy": (["eval", "reference=builtin:tiny", "reward.model=builtin:tiny", "policies=[/nope]"],
                    "policies: the path /nope does not exist"),
    "sft-hub-offline": (["sft", "model.name_or_path=nobody/no-such-model"],
                        "model.name_or_path: nobody/no-such-model is neither a local directory nor in the local "
                        "Hugging Face cache"),
}


@pytest.mark.slow   # a process each: ~5 s of imports and start-up
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_the_command_refuses_a_missing_model_in_one_message(case, tmp_path):
    args, message = CLI_CASES[case]
    proc = run_cli([*args, "experiment=missing"], tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "connect" not in proc.stderr and "Repo id must" not in proc.stderr
    if case.endswith("offline"):
        assert "hf download nobody/no-such-model" in proc.stderr
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("checkpoints"))
