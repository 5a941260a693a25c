"""`rlhf eval` on the tiny model: the report, its exact invariants (baseline vs itself), the over-optimisation
curve over kept PPO checkpoints, plain model directories, and the hand-off errors."""

from __future__ import annotations

import json

import pytest

from helpers import compose_stage
from rlhf_cli.errors import ArtifactError
from rlhf_cli.stages import eval as eval_stage

FAST_EVAL = ["num_prompts=48", "response_length=8", "micro_batch_size=48"]
METRICS = ("score", "gold", "kl", "response_length", "stop_rate", "win_rate")


@pytest.fixture(scope="module")
def root(trained_experiment):
    """Experiment `demo` with finished SFT, reward and PPO artifacts (PPO keeps checkpoints at steps 2 and 4)."""
    return trained_experiment


@pytest.fixture(scope="module")
def evaluated(root, tmp_path_factory):
    """The default evaluation: the experiment's SFT policy (baseline) against its PPO policy, and its run dir."""
    run_dir = tmp_path_factory.mktemp("eval") / "eval"
    return eval_stage.run(compose_stage("eval", [*FAST_EVAL, "experiment=demo", f"root={root}"], run_dir)), run_dir


@pytest.fixture(scope="module")
def report(evaluated):
    return evaluated[0]


def _policy(report: dict, name: str) -> dict:
    return next(p for p in report["policies"] if p["name"] == name)


def test_report_has_both_policies_with_every_metric_and_its_standard_error(report, evaluated, root):
    run_dir = evaluated[1]
    on_disk = json.loads((run_dir / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert (run_dir / "config.yaml").is_file() and on_disk["config"]["stage"] == "eval"
    assert [p["name"] for p in report["policies"]] == ["demo/sft", "demo/ppo"] and report["baseline"] == "demo/sft"
    assert [p["stage"] for p in report["policies"]] == ["sft", "ppo"]
    assert report["prompts"]["count"] == 48 and report["reward_model"] == str(root / "demo" / "reward" / "model")
    assert report["rewards"] == {"functions": [], "weights": {"reward_model": 1.0}, "aggregation": "sum"}
    for policy in report["policies"]:
        for key in METRICS:
            assert isinstance(policy[key], float) and policy[f"{key}_se"] >= 0.0
        # the reward model alone, weight 1: the score is its score; the toy task's gold is no 0/1 check
        assert policy["reward/reward_model"] == policy["score"] and not any(k.startswith("pass@") for k in policy)
        assert 0 < policy["response_length"] <= 8 and 0 <= policy["stop_rate"] <= 1
        assert len(policy["samples"]) == 4 and {"prompt", "response", "score", "gold"} <= set(policy["samples"][0])
    ppo_policy = _policy(report, "demo/ppo")
    assert ppo_policy["kl_se"] > 0 and ppo_policy["score_se"] > 0  # real spread over prompts, not a constant


def test_baseline_against_itself(report):
    base = _policy(report, "demo/sft")
    assert base["win_rate"] == 0.5 and base["win_rate_se"] == 0.0
    assert base["kl"] == pytest.approx(0.0, abs=1e-5)  # the baseline is the reference itself


def test_curve_lists_the_reference_and_every_kept_checkpoint(report, root):
    curve = report["curves"]["demo/ppo"]
    assert [point["step"] for point in curve] == [0, 2, 4]
    assert all(point["kl"] >= 0 for point in curve) and curve[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert {"score", "score_se", "gold", "gold_se", "kl_se"} <= set(curve[1])
    # step 0 is the SFT policy and the last checkpoint holds the final PPO weights: same seed, same numbers
    base, final = _policy(report, "demo/sft"), _policy(report, "demo/ppo")
    for key in ("score", "gold", "kl"):
        assert curve[0][key] == pytest.approx(base[key], abs=1e-6)
        assert curve[-1][key] == pytest.approx(final[key], abs=1e-5)


def test_plain_model_directories_and_relative_paths(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)  # relative policy paths resolve against the working directory
    cfg = compose_stage("eval", [*FAST_EVAL, "experiment=demo", f"root={root}", "checkpoints=false",
                                 "policies=[demo/ppo/model,builtin:tiny]"], tmp_path / "eval")
    out = eval_stage.run(cfg)
    first, tiny = out["policies"]
    assert first["path"] == str(root / "demo" / "ppo" / "model") and first["stage"] is None
    assert tiny["model"] == "builtin:tiny" and out["curves"] == {}
    assert first["win_rate"] == 0.5 and tiny["kl"] > first["kl"]  # an untrained model is far from the reference
    assert (tmp_path / "eval" / "eval.json").is_file()


def test_missing_ppo_artifact_names_the_command(root, tmp_path):
    for stage in ("sft", "reward"):  # experiment x has everything but its PPO policy
        (tmp_path / "x" / stage).parent.mkdir(exist_ok=True)
        (tmp_path / "x" / stage).symlink_to(root / "demo" / stage)
    cfg = compose_stage("eval", [*FAST_EVAL, "experiment=x", f"root={tmp_path}"], tmp_path / "x" / "eval")
    with pytest.raises(ArtifactError, match="no finished ppo artifact") as err:
        eval_stage.run(cfg)
    assert "rlhf ppo experiment=x" in err.value.hint


def test_a_policy_with_another_tokenizer_is_refused(root, tmp_path):
    import torch

    from rlhf_cli.config import ModelConfig
    from rlhf_cli.models.loading import load_causal_lm

    model, tokenizer, _ = load_causal_lm(ModelConfig(), torch.device("cpu"))
    tokenizer.add_tokens(["<extra_token>"])
    model.resize_token_embeddings(len(tokenizer))
    other = tmp_path / "other-vocab"
    model.save_pretrained(other, safe_serialization=True)
    tokenizer.save_pretrained(other)
    cfg = compose_stage("eval", [*FAST_EVAL, "experiment=demo", f"root={root}",
                                 f"policies=[{root / 'demo' / 'sft'},{other}]"], tmp_path / "eval")
    with pytest.raises(ArtifactError, match="does not share the reference's tokenizer") as err:
        eval_stage.run(cfg)
    assert str(other) in err.value.message and "reference=" in err.value.hint


def test_frozen_models_in_bf16_measure_nearly_what_fp32_does(report, root, tmp_path):
    lean = eval_stage.run(compose_stage("eval", [*FAST_EVAL, "experiment=demo", f"root={root}", "dtype=bfloat16",
                                                 "checkpoints=false"], tmp_path / "eval_bf16"))
    assert _policy(lean, "demo/sft")["kl"] == 0.0  # the SFT policy against the reference, both in bf16: the same numbers
    # bf16 rounding may flip a sampled token here and there, but the policies' scores stay where they were
    for name in ("demo/sft", "demo/ppo"):
        assert _policy(lean, name)["score"] == pytest.approx(_policy(report, name)["score"], abs=0.5)
