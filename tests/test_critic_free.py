"""`rlhf ppo` with the critic-free estimators (algo=grpo|dr_grpo|rloo|reinforce_pp): they raise the gold score of
the built-in task, load and save no value model, resume bit for bit, refuse groups of one, leave zero-std groups out
when asked, and give one gradient however an optimizer step is split into micro-batches."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST_PPO, compose_stage
from rlhf_cli.config import PPOAlgoConfig
from rlhf_cli.engine.reward_functions import REWARD_MODEL, Rewards
from rlhf_cli.engine.rollout import Rollout
from rlhf_cli.errors import ConfigError
from rlhf_cli.stages import ppo, reward, sft
from rlhf_cli.stagespec import SPECS

# 16 prompts x 4 responses per iteration (the presets' shape), 2 minibatches of 32 in micro-batches of 8
CRITIC_FREE = [*FAST_PPO, "ppo.samples_per_prompt=4"]
GAE_ONLY = {"final_value_loss", "final_vf_clipfrac", "final_explained_variance"}


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def gold_root(tmp_path_factory):
    """An SFT policy and a reward model good enough to steer by (the shared experiment's reward model is near
    chance on gold): half the default SFT, half the default reward training (held-out gold accuracy about 0.84)."""
    root = tmp_path_factory.mktemp("gold")
    sft.run(compose_stage("sft", ["experiment=g", f"root={root}", "train.max_steps=500", "train.eval_every=500",
                                  "train.num_samples=0"], root / "g" / "sft"))
    reward.run(compose_stage("reward", ["experiment=g", f"root={root}", "train.max_steps=250",
                                        "train.eval_every=250"], root / "g" / "reward"))
    return root


@pytest.fixture(scope="module")
def grpo_run(gold_root):
    """algo=grpo at its preset (16 prompts x 4 responses, KL k3 in the loss) for 12 iterations."""
    run_dir = gold_root / "g" / "ppo_grpo"
    metrics = ppo.run(compose_stage("ppo", ["experiment=g", f"root={gold_root}", "algo=grpo", "train.max_steps=12",
                                            "train.checkpoint_every=6", "train.sample_every=6"], run_dir))
    return metrics, run_dir


def _gold_rose(rows: list[dict]) -> None:
    gold = [r["gold"] for r in rows]
    first, last = sum(gold[:4]) / 4, sum(gold[-4:]) / 4  # 256 responses each
    assert last > first + 0.05, [round(g, 2) for g in gold]


@pytest.mark.slow
def test_grpo_raises_the_gold_score_with_no_value_model(grpo_run, capsys):
    metrics, run_dir = grpo_run
    _gold_rose(_rows(run_dir))
    checkpoint = run_dir / "checkpoints" / "step-6"
    assert (checkpoint / "policy.safetensors").is_file() and not list(checkpoint.glob("value*"))
    numbers = {k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    ensemble_only = {f"final_{k}" for k in ("ensemble_score", "ensemble_mean", "ensemble_std")}
    assert numbers == set(SPECS["ppo"].metrics) - GAE_ONLY - ensemble_only  # kl_loss, zero_std_groups included
    assert 0 <= metrics["final_zero_std_groups"] <= 1 and metrics["final_kl_loss"] >= 0
    assert (run_dir / "charts" / "groups.png").is_file() and not (run_dir / "charts" / "value.png").exists()


@pytest.mark.slow
def test_rloo_raises_the_gold_score(gold_root):
    run_dir = gold_root / "g" / "ppo_rloo"
    ppo.run(compose_stage("ppo", ["experiment=g", f"root={gold_root}", "algo=rloo", "train.max_steps=12",
                                  "train.checkpoint_every=12", "train.sample_every=12"], run_dir))
    _gold_rose(_rows(run_dir))


def test_the_start_up_line_says_no_value_model(trained_experiment, tmp_path, capsys):
    ppo.run(compose_stage("ppo", [*CRITIC_FREE, "experiment=demo", f"root={trained_experiment}", "algo=reinforce_pp",
                                  "train.max_steps=1"], tmp_path / "r"))
    out = capsys.readouterr().out
    assert "value model: none (critic-free); advantage reinforce_pp" in out
    assert "prompts_per_rollout 16 x samples_per_prompt 4" in out


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_refuse_groups_of_one(algo, tmp_path):
    with pytest.raises(ConfigError, match=f"ppo.advantage={algo} compares the responses sampled for one prompt, but "
                                          "ppo.samples_per_prompt=1"):
        compose_stage("ppo", [f"algo={algo}", "ppo.samples_per_prompt=1"], tmp_path)
    with pytest.raises(ConfigError, match="skip_zero_std_groups=true needs groups"):
        compose_stage("ppo", ["ppo.skip_zero_std_groups=true"], tmp_path)


def test_presets_set_the_switches_and_ppo_is_the_default(tmp_path):
    default, explicit = (compose_stage("ppo", o, tmp_path) for o in ([], ["algo=ppo"]))
    assert default.ppo == explicit.ppo == PPOAlgoConfig() and default.algo == "ppo"
    grpo = compose_stage("ppo", ["algo=grpo", "ppo.samples_per_prompt=8"], tmp_path)  # an override wins
    assert (grpo.algo, grpo.ppo.advantage, grpo.ppo.samples_per_prompt, grpo.ppo.kl_penalty,
            grpo.ppo.loss_aggregation) == ("grpo", "grpo", 8, "loss", "seq_mean_token_mean")


def _rollout(scores: list[float], k: int) -> Rollout:
    n, t = len(scores), 3
    z = torch.zeros(n, t)
    return Rollout(prompt=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                   response=torch.zeros(n, t, dtype=torch.long), mask=torch.ones(n, t), ended=torch.ones(n, dtype=bool),
                   input_ids=torch.zeros(n, t + 1, dtype=torch.long), attention_mask=torch.ones(n, t + 1),
                   logprobs=z, ref_logprobs=z, values=None, scores=torch.tensor(scores), prompt_text=[""] * n,
                   response_text=[""] * n, components={REWARD_MODEL: torch.tensor(scores)})


RM_ONLY = Rewards([], [], {REWARD_MODEL: 1.0})  # a reward model's score alone (never normalised here)


def test_zero_std_groups_are_counted_and_left_out_when_asked():
    roll = _rollout([1.0, 1.0, 0.0, 2.0], 2)
    p = PPOAlgoConfig(advantage="grpo", samples_per_prompt=2)
    shaped = ppo.shape_rewards(roll, 0.0, p, RM_ONLY)
    assert shaped.zero_std.tolist() == [True, True, False, False] and shaped.keep is None
    assert shaped.advantages[:2].abs().sum() == 0 and shaped.advantages[2:, 0].tolist() == pytest.approx(
        [-1 / (2 ** .5 + 1e-4), 1 / (2 ** .5 + 1e-4)])
    skipping = ppo.shape_rewards(roll, 0.0, PPOAlgoConfig(advantage="grpo", samples_per_prompt=2,
                                                          skip_zero_std_groups=True), RM_ONLY)
    assert skipping.keep.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_a_critic_free_run_resumes_bit_for_bit(trained_experiment, tmp_path):
    """The run's own checkpoint at iteration 2 (a copy of the finished run cut back to it) continues to the same
    weights and metrics: nothing of a critic-free run's state is missing from its checkpoints."""
    args = [*CRITIC_FREE, "experiment=demo", f"root={trained_experiment}", "algo=grpo", "train.checkpoint_every=2"]
    straight = tmp_path / "straight"
    ppo.run(compose_stage("ppo", args, straight))
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    for finished in ("manifest.json", "model", "checkpoints/step-4"):
        path = cut / finished
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    ppo.run(compose_stage("ppo", [*args, "resume=true"], cut))
    a, b = (load_file(d / "model" / "model.safetensors") for d in (straight, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    def numbers(run_dir):  # what was computed, not when or how fast
        return [{k: v for k, v in r.items() if k != "time" and not k.endswith("per_s")} for r in _rows(run_dir)]

    assert numbers(straight) == numbers(cut)


def test_micro_batches_do_not_change_the_gradient(trained_experiment, tmp_path):
    """One iteration of GRPO (seq_mean_token_mean) in micro-batches of 8 and of 2: the same update."""
    weights = {}
    for micro in (8, 2):
        run_dir = tmp_path / f"micro{micro}"
        ppo.run(compose_stage("ppo", [*CRITIC_FREE, "experiment=demo", f"root={trained_experiment}", "algo=grpo",
                                      f"train.micro_batch_size={micro}", "train.max_steps=1", "ppo.num_ppo_epochs=1",
                                      "ppo.num_mini_batches=1"], run_dir))
        weights[micro] = load_file(run_dir / "model" / "model.safetensors")
    moved = load_file(trained_experiment / "demo" / "sft" / "model" / "model.safetensors")
    assert any(not torch.equal(weights[8][k], moved[k]) for k in moved)  # the step did something
    assert all(torch.allclose(weights[8][k], weights[2][k], atol=1e-6) for k in moved)


def test_without_a_kl_coefficient_no_reference_is_loaded(trained_experiment, tmp_path, capsys):
    """algo=dr_grpo has β = 0: no reference model, no KL measured or logged (eval measures it against the SFT
    policy), and the run's numbers are still what the spec declares."""
    metrics = ppo.run(compose_stage("ppo", [*CRITIC_FREE, "experiment=demo", f"root={trained_experiment}",
                                            "algo=dr_grpo", "train.max_steps=1"], tmp_path / "d"))
    assert "reference: none (ppo.kl_coef=0: no KL to penalise or measure)" in capsys.readouterr().out
    assert "kl" not in _rows(tmp_path / "d")[0] and "final_kl" not in metrics and "final_kl_loss" not in metrics
    numbers = {k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers <= set(SPECS["ppo"].metrics) and set(SPECS["ppo"].metrics) - numbers <= set(
        SPECS["ppo"].variant_metrics)


def test_a_groups_responses_stay_on_one_process(tmp_path):
    """Each process takes its share of the iteration's prompts, then samples each of them k times in a row: a group
    never straddles two processes, and together they cover every prompt once."""
    from rlhf_cli.engine.dist import Dist

    cfg = compose_stage("ppo", ["algo=grpo", "ppo.prompts_per_rollout=8", "ppo.num_mini_batches=2"], tmp_path)
    shares = [ppo.rollout_prompts(100, 3, cfg, Dist(rank=r, world_size=2)) for r in range(2)]  # prompt indices
    for share in shares:
        assert len(share) == 4 * 4 and all(share[i] == share[i - i % 4 + j] for i in range(16) for j in range(4))
    firsts = [share[i] for share in shares for i in range(0, 16, 4)]
    assert len(set(firsts)) == 8  # 8 distinct prompts, 4 per process
    # 6 prompts x 4 = 24 rows would split over 4 processes, but the groups would not
    with pytest.raises(ConfigError, match="prompts do not split evenly over world_size=4"):
        ppo.batch_shape(compose_stage("ppo", ["algo=grpo", "ppo.prompts_per_rollout=6", "ppo.num_mini_batches=1"],
                                      tmp_path), 4)
