"""Reward-model ensembles (`reward.ensemble=K`, `ppo.reward_aggregation`): the aggregations against hand-computed
numbers, the config's rules, the reward stage's ensemble artifact (members loadable on their own, the manifest's
accuracies, WARM, resume inside a member), and PPO and eval scoring with an ensemble artifact or a list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from helpers import FAST_PPO, FAST_REWARD, compose_stage
from rlhf_cli import artifacts
from rlhf_cli.engine import train
from rlhf_cli.engine.reward_functions import REWARD_MODEL, Rewards, ensemble_metrics, ensemble_spread
from rlhf_cli.errors import ArtifactError, ConfigError
from rlhf_cli.models.reward import ENSEMBLE_FILE, RewardModel, ensemble_members
from rlhf_cli.rl.reward import ensemble_mean, ensemble_min, ensemble_uwo, standardize_members
from rlhf_cli.stages import eval as eval_stage, ppo, reward
from rlhf_cli.stages.pipeline import split_overrides

# ---- the numbers ------------------------------------------------------------------------------------------------

# three members' raw scores of two responses, and their held-out means and standard deviations
RAW = torch.tensor([[3.0, 1.0], [0.0, 2.0], [10.0, 10.0]])
MEANS, STDS = torch.tensor([1.0, 0.0, 10.0]), torch.tensor([2.0, 1.0, 4.0])


def test_each_member_is_standardised_with_its_own_statistics():
    # (3 - 1) / 2 = 1, (1 - 1) / 2 = 0; (0 - 0) / 1 = 0, 2; (10 - 10) / 4 = 0, 0
    assert standardize_members(RAW, MEANS, STDS).tolist() == [[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]


def test_mean_min_and_uwo_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert ensemble_mean(z).tolist() == pytest.approx([1 / 3, 2 / 3])
    assert ensemble_min(z).tolist() == [0.0, 0.0]
    # population variance across members: response 0: mean 1/3, ((2/3)² + 2 (1/3)²) / 3 = 2/9;
    # response 1: mean 2/3, ((4/3)² + 2 (2/3)²) / 3 = 8/9
    assert ensemble_uwo(z, 0.5).tolist() == pytest.approx([1 / 3 - 0.5 * 2 / 9, 2 / 3 - 0.5 * 8 / 9])
    assert ensemble_uwo(z, 0.0).tolist() == pytest.approx(ensemble_mean(z).tolist())
    # members that agree: no penalty, and min = mean
    same = torch.tensor([[0.5, -1.0]] * 4)
    assert ensemble_uwo(same, 3.0).tolist() == ensemble_min(same).tolist() == [0.5, -1.0]


def test_spread_is_the_members_mean_and_population_std():
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    spread = ensemble_spread(z)
    assert spread["ensemble_mean"].tolist() == [2.0, 0.0] and spread["ensemble_std"].tolist() == [1.0, 0.0]
    assert ensemble_metrics(z) == {"ensemble_mean": 2.0, "ensemble_std": 1.0}  # sums over the responses


def _scorer(mean: float, std: float):
    return SimpleNamespace(model=SimpleNamespace(score_stats={"mean": mean, "std": std}))


@pytest.mark.parametrize("how, expected", [("mean", [1 / 3, 2 / 3]), ("min", [0.0, 0.0]),
                                           ("uwo", [1 / 3 - 0.25 * 2 / 9, 2 / 3 - 0.25 * 8 / 9])])
def test_the_reward_model_component_of_an_ensemble(how, expected):
    rewards = Rewards([_scorer(m, s) for m, s in zip(MEANS.tolist(), STDS.tolist())], [], {REWARD_MODEL: 1.0},
                      ensemble=how, uwo_coef=0.25)
    assert rewards.is_ensemble and rewards.reward_model_score(RAW).tolist() == pytest.approx(expected)
    assert f"{how}" in rewards.describe() and "3 standardised members" in rewards.describe()
    one = Rewards([_scorer(1.0, 2.0)], [], {REWARD_MODEL: 1.0}, ensemble=how)
    assert one.reward_model_score(RAW[:1]).tolist() == [3.0, 1.0]  # one reward model: its raw score, as before


# ---- the config -------------------------------------------------------------------------------------------------

def test_ensemble_settings_compose_and_route_through_the_pipeline(tmp_path):
    cfg = compose_stage("reward", ["reward.ensemble=4", "reward.ensemble_merge=weight_average"], tmp_path)
    assert (cfg.reward.ensemble, cfg.reward.ensemble_bootstrap, cfg.reward.ensemble_merge) == \
        (4, True, "weight_average")
    cfg = compose_stage("ppo", ["model.reward=[runs/a/reward,runs/b/reward]", "ppo.reward_aggregation=min"], tmp_path)
    assert cfg.model.reward == ["runs/a/reward", "runs/b/reward"] and cfg.ppo.reward_aggregation == "min"
    (tmp_path / "a").mkdir()
    cfg = compose_stage("ppo", [f"model.reward=[{tmp_path / 'a'},./a]"], tmp_path)  # each made absolute
    assert all(Path(p).is_absolute() for p in cfg.model.reward)
    cfg = compose_stage("eval", ["reward.model=[x/reward,y/reward]", "reward.ensemble_aggregation=uwo"], tmp_path)
    assert len(cfg.reward.model) == 2 and cfg.reward.ensemble_aggregation == "uwo"
    _, per_stage = split_overrides(["experiment=e", "reward.ensemble=4", "ppo.reward_aggregation=uwo",
                                    "ppo.uwo_coef=1.0"])
    assert "reward.ensemble=4" in per_stage["reward"] and "reward.ensemble=4" not in per_stage["eval"]
    assert per_stage["ppo"][-2:] == ["ppo.reward_aggregation=uwo", "ppo.uwo_coef=1.0"]


@pytest.mark.parametrize("stage, overrides, needle", [
    ("reward", ["reward.ensemble=0"], "reward.ensemble"),
    ("reward", ["reward.ensemble_merge=weight_average"], "set reward.ensemble=2 or more"),
    ("reward", ["reward.ensemble=2", "reward.ensemble_merge=soup"], "reward.ensemble_merge"),
    ("ppo", ["ppo.reward_aggregation=max"], "ppo.reward_aggregation"),
    ("ppo", ["ppo.uwo_coef=-1"], "ppo.uwo_coef"),
    ("ppo", ["model.reward=[a,none]"], "cannot be a member of an ensemble"),
    ("ppo", ["model.reward=[]"], "is not a reward model or a list of them"),
    ("eval", ["reward.ensemble_aggregation=median"], "reward.ensemble_aggregation"),
])
def test_bad_ensemble_settings_are_one_clear_error(stage, overrides, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        compose_stage(stage, overrides, tmp_path)


# ---- training an ensemble ---------------------------------------------------------------------------------------

ENSEMBLE = [*FAST_REWARD, "experiment=demo", "reward.ensemble=2", "train.max_steps=12", "train.eval_every=6",
            "train.checkpoint_every=6"]


@pytest.fixture(scope="module")
def ensemble_run(trained_experiment, tmp_path_factory) -> Path:
    """A finished `reward.ensemble=2` run of the shared experiment's SFT policy (its own run directory)."""
    run_dir = tmp_path_factory.mktemp("ensemble") / "reward"
    reward.run(compose_stage("reward", [*ENSEMBLE, f"root={trained_experiment}"], run_dir))
    return run_dir


def test_an_ensemble_is_one_artifact_of_members_each_loadable_alone(ensemble_run):
    model_dir = ensemble_run / "model"
    listing = json.loads((model_dir / ENSEMBLE_FILE).read_text())
    assert listing["members"] == ["member-0", "member-1"] and listing["bootstrap"] is True
    assert ensemble_members(str(model_dir)) == [str(model_dir / "member-0"), str(model_dir / "member-1")]
    weights = []
    for k, member in enumerate(ensemble_members(str(model_dir))):
        alone = AutoModelForSequenceClassification.from_pretrained(member)  # plain transformers
        ours = RewardModel.from_pretrained(member)
        assert ours.score_stats == listing["score_stats"][k] and ours.score_stats["std"] > 0
        weights.append(load_file(Path(member) / "model.safetensors"))
        assert alone.config.num_labels == 1
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0])  # two models, not one
    assert not (ensemble_run / "work").exists() or not any((ensemble_run / "work").glob("**/members"))


def test_the_manifest_gives_each_members_accuracy_and_the_ensembles(ensemble_run):
    manifest = artifacts.read_manifest(ensemble_run)
    members = manifest["ensemble"]["members"]
    assert [m["seed"] for m in members] == [0, 1] and all(0.0 < m["eval_accuracy"] <= 1.0 for m in members)
    metrics = manifest["metrics"]
    assert metrics["ensemble"] == 2
    assert metrics["member_eval_accuracy"] == pytest.approx(sum(m["eval_accuracy"] for m in members) / 2)
    for key in ("ensemble_eval_accuracy", "ensemble_eval_accuracy_min", "ensemble_eval_accuracy_uwo",
                "ensemble_eval_gold_accuracy"):
        assert 0.0 < metrics[key] <= 1.0
    assert metrics["eval_accuracy"] == metrics["ensemble_eval_accuracy"]
    assert manifest["ensemble"]["accuracy"]["min"]["accuracy"] == metrics["ensemble_eval_accuracy_min"]
    rows = [json.loads(line) for line in (ensemble_run / "metrics.jsonl").read_text().splitlines()]
    assert {r["member"] for r in rows} == {0, 1} and rows[-1]["step"] == 24  # member 1's steps follow member 0's


def test_bootstrap_draws_each_members_own_resample():
    cfg = SimpleNamespace(seed=3, reward=SimpleNamespace(ensemble=2, ensemble_bootstrap=True))
    pairs = list(range(100))
    a, b = reward.member_pairs(cfg, pairs, 0), reward.member_pairs(cfg, pairs, 1)
    assert len(a) == len(b) == 100 and a != b and a == reward.member_pairs(cfg, pairs, 0)
    assert len(set(a)) < 80  # drawn with replacement: about 63% distinct
    cfg.reward.ensemble_bootstrap = False
    assert reward.member_pairs(cfg, pairs, 1) == pairs


def test_a_run_stopped_inside_the_second_member_resumes_to_the_same_ensemble(trained_experiment, ensemble_run,
                                                                              tmp_path, monkeypatch):
    args = [*ENSEMBLE, f"root={trained_experiment}"]
    save = train.save_checkpoint

    def stop_at_18(d, where, step, *rest, **kw):  # member 1's first checkpoint (member 0 had 12 steps)
        save(d, where, step, *rest, **kw)
        if step == 18:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", stop_at_18)
    cut = tmp_path / "reward"
    with pytest.raises(KeyboardInterrupt):
        reward.run(compose_stage("reward", args, cut))
    monkeypatch.setattr(train, "save_checkpoint", save)
    assert not (cut / "manifest.json").exists()
    reward.run(compose_stage("reward", [*args, "resume=true"], cut))
    for k in (0, 1):
        a, b = (load_file(d / "model" / f"member-{k}" / "model.safetensors") for d in (ensemble_run, cut))
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert artifacts.read_manifest(cut)["metrics"]["ensemble_eval_accuracy"] == \
        artifacts.read_manifest(ensemble_run)["metrics"]["ensemble_eval_accuracy"]


def test_warm_averages_the_members_into_one_model(trained_experiment, tmp_path):
    run_dir = tmp_path / "reward"
    metrics = reward.run(compose_stage("reward", [*ENSEMBLE, f"root={trained_experiment}",
                                                  "reward.ensemble_merge=weight_average"], run_dir))
    assert not (run_dir / "model" / ENSEMBLE_FILE).exists() and ensemble_members(str(run_dir / "model")) is None
    model = RewardModel.from_pretrained(run_dir / "model")
    assert model.score_stats["std"] > 0 and metrics["reward_std"] == pytest.approx(model.score_stats["std"])
    assert 0.0 < metrics["eval_accuracy"] <= 1.0 and 0.0 < metrics["member_eval_accuracy"] <= 1.0
    assert artifacts.read_manifest(run_dir)["ensemble"]["merge"] == "weight_average"


def test_average_members_is_the_mean_of_each_weight(ensemble_run):
    members = [Path(p) for p in ensemble_members(str(ensemble_run / "model"))]
    averaged = reward.average_members(members, torch.device("cpu")).state_dict()
    a, b = (RewardModel.from_pretrained(p).state_dict() for p in members)
    assert all(torch.allclose(averaged[k], (a[k] + b[k]) / 2, atol=1e-6) for k in a)


# ---- scoring with an ensemble -----------------------------------------------------------------------------------

def _ppo(root: Path, run_dir: Path, *extra: str) -> dict:
    return ppo.run(compose_stage("ppo", [*FAST_PPO, "experiment=demo", f"root={root}", "train.max_steps=2",
                                         *extra], run_dir))


def test_ppo_with_an_ensemble_artifact_logs_the_aggregate_mean_and_disagreement(trained_experiment, ensemble_run,
                                                                                 tmp_path):
    metrics = _ppo(trained_experiment, tmp_path / "ppo", f"model.reward={ensemble_run}", "ppo.reward_aggregation=min")
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["ensemble_std"] > 0 and row["ensemble_score"] <= row["ensemble_mean"] + 1e-6  # min <= mean
    assert metrics["final_ensemble_std"] == rows[-1]["ensemble_std"]
    manifest = artifacts.read_manifest(tmp_path / "ppo")
    assert manifest["ppo"]["reward_aggregation"] == "min" and len(manifest["ppo"]["reward_model"]) == 2
    assert (tmp_path / "ppo" / "charts" / "ensemble.png").is_file() or not _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_ppo_with_a_list_mixes_layouts_and_eval_reports_the_members(trained_experiment, ensemble_run, tmp_path):
    members = [str(trained_experiment / "demo" / "reward"), str(ensemble_run / "model" / "member-1")]
    _ppo(trained_experiment, tmp_path / "ppo", f"model.reward=[{','.join(members)}]", "ppo.reward_aggregation=uwo")
    manifest = artifacts.read_manifest(tmp_path / "ppo")
    assert manifest["ppo"]["reward_aggregation"] == "uwo" and manifest["ppo"]["reward_model"] == [
        f"{members[0]}/model", members[1]]  # a run directory stands for its model
    report = eval_stage.run(compose_stage("eval", [
        "experiment=demo", f"root={trained_experiment}", "num_prompts=16", "response_length=8", "checkpoints=false",
        f"policies=[{trained_experiment / 'demo' / 'sft'},{tmp_path / 'ppo'}]", f"reward.model={ensemble_run}",
        "reward.ensemble_aggregation=min"], tmp_path / "eval"))
    assert report["reward_model"] == [str(ensemble_run / "model" / f"member-{k}") for k in (0, 1)]
    assert report["rewards"]["ensemble_aggregation"] == "min"
    for row in report["policies"]:
        assert row["ensemble_std"] > 0 and row[f"reward/{REWARD_MODEL}"] <= row["ensemble_mean"] + 1e-9
    from rlhf_cli.stages import report as report_stage

    html = report_stage.eval_section(report, tmp_path / "eval", [], SimpleNamespace(samples=1))
    assert "reward ensemble: 2 members" in html and "score (min)" in html and "members&#x27; std" in html


def test_an_off_the_shelf_member_without_statistics_is_refused(trained_experiment, ensemble_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(ensemble_run / "model" / "member-0", bare)
    config = json.loads((bare / "reward_config.json").read_text())
    config.pop("score_stats")
    (bare / "reward_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="records no held-out score statistics"):
        _ppo(trained_experiment, tmp_path / "ppo", f"model.reward=[{bare},{ensemble_run}]")


# ---- LoRA members on one base -----------------------------------------------------------------------------------

def test_lora_members_share_their_base_and_score_as_the_members_do(trained_experiment, tmp_path):
    from rlhf_cli.engine.reward_functions import find_reward_models
    from rlhf_cli.models.reward import LoraEnsemble, load_frozen_reward_model, score_padded

    run_dir = tmp_path / "lora" / "reward"
    reward.run(compose_stage("reward", [*ENSEMBLE, f"root={trained_experiment}", "model.lora.r=4"], run_dir))
    model_dir = str(run_dir / "model")
    listing = json.loads((run_dir / "model" / ENSEMBLE_FILE).read_text())
    assert listing["shared_base"] == str(trained_experiment / "demo" / "sft" / "model")
    found = lambda together: find_reward_models(model_dir, "", "", "sha256", "model.reward", together)[0]  # noqa
    assert found(True) == [model_dir] and found(False) == ensemble_members(model_dir)
    together, tokenizer = load_frozen_reward_model(model_dir, torch.device("cpu"), torch.float32)
    assert isinstance(together, LoraEnsemble) and together.member_stats == listing["score_stats"]
    batch = tokenizer(["give 2 fruit without fig : apple pear", "give 1 city without rome : oslo", "no"],
                      return_tensors="pt", padding=True)
    scores = score_padded(together, batch["input_ids"], batch["attention_mask"], 2)  # [B, K], 2 rows at a time
    for k, member in enumerate(ensemble_members(model_dir)):
        alone, _ = load_frozen_reward_model(member, torch.device("cpu"), torch.float32)
        assert torch.allclose(scores[:, k], score_padded(alone, batch["input_ids"], batch["attention_mask"], 3),
                              atol=1e-4)
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert size(together) < 1.5 * size(alone)  # one base and two adapters, not two models
    metrics = _ppo(trained_experiment, tmp_path / "ppo", f"model.reward={run_dir}", "ppo.reward_aggregation=uwo")
    assert metrics["final_ensemble_std"] > 0
    # the base moved away: the members load as the complete models they also are
    listing["shared_base"] = str(tmp_path / "gone")
    (run_dir / "model" / ENSEMBLE_FILE).write_text(json.dumps(listing))
    assert found(True) == ensemble_members(model_dir)
