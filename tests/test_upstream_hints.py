"""A missing upstream artifact is reported with the key of the stage at hand: PPO's policy is `model.policy`, eval's
inputs are `policies=`, `reward.model=` and `reference=`, the reward model's backbone is `model.name_or_path`."""

from __future__ import annotations

import pytest

from helpers import compose_stage
from rlhf_cli.errors import ArtifactError
from rlhf_cli.stages import eval as eval_stage, ppo, reward


def _hint(call) -> str:
    with pytest.raises(ArtifactError, match="has no finished") as err:
        call()
    return err.value.hint


def test_ppo_names_model_policy_and_model_reward(tmp_path):
    cfg = compose_stage("ppo", [f"root={tmp_path}", "experiment=x"], tmp_path / "x" / "ppo")
    assert _hint(lambda: ppo.find_upstream(cfg)) == \
        "run `rlhf sft experiment=x` first, or set model.policy=<model or run directory>"
    cfg = compose_stage("ppo", [f"root={tmp_path}", "experiment=x", "model.policy=builtin:tiny"],
                        tmp_path / "x" / "ppo")
    assert _hint(lambda: ppo.find_upstream(cfg)) == \
        "run `rlhf reward experiment=x` first, or set model.reward=<model or run directory>"


def test_eval_names_its_own_keys(tmp_path):
    cfg = compose_stage("eval", [f"root={tmp_path}", "experiment=x"], tmp_path / "x" / "eval")
    assert _hint(lambda: eval_stage.resolve_policies(cfg)) == \
        "run `rlhf sft experiment=x` first, or set policies=[<run directory>,...]"
    assert _hint(lambda: eval_stage.find_upstream(None, cfg, "sft", "policy", "reference")) == \
        "run `rlhf sft experiment=x` first, or set reference=<model or run directory>"
    assert _hint(lambda: eval_stage.find_reward_models(cfg, [])) == \
        "run `rlhf reward experiment=x` first, or set reward.model=<model or run directory>"


def test_reward_names_model_name_or_path(tmp_path):
    cfg = compose_stage("reward", [f"root={tmp_path}", "experiment=x", "train.device=cpu"], tmp_path / "x" / "reward")
    assert _hint(lambda: reward.run(cfg)) == \
        "run `rlhf sft experiment=x` first, or set model.name_or_path=<model or run directory>"
