"""`rlhf ppo` on the tiny model: the notes' numerical details at the stage level, the artifact, hand-off errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FAST_PPO, compose_stage
from rlhf_cli import artifacts
from rlhf_cli.config import ModelConfig, PPOAlgoConfig
from rlhf_cli.errors import ArtifactError
from rlhf_cli.models.loading import load_causal_lm
from rlhf_cli.models.reward import RewardModel
from rlhf_cli.engine import rollout as rollout_mod
from rlhf_cli.engine.rollout import Rollout, Scorer, constants, sample
from rlhf_cli.stages import ppo
from rlhf_cli.rl import ppo as rl


@pytest.fixture(scope="module")
def root(trained_experiment):
    """Experiment `demo` with finished SFT, reward and PPO artifacts; runs of the tests' own go under tmp_path."""
    return trained_experiment


@pytest.fixture(scope="module")
def trained(root):
    run_dir = root / "demo" / "ppo"
    return artifacts.read_manifest(run_dir)["metrics"], run_dir


@pytest.fixture(scope="module")
def roles(root):
    policy, tokenizer, _ = load_causal_lm(ModelConfig(name_or_path=str(root / "demo" / "sft" / "model")),
                                          torch.device("cpu"), dropout=False)
    rm = RewardModel.from_pretrained(root / "demo" / "reward" / "model").eval()
    return policy.eval(), tokenizer, rm


def _rollout(policy, tokenizer, n=12, seed=0, **algo):
    from rlhf_cli.data import toy
    from rlhf_cli.data.prompts import encode_prompts

    p = PPOAlgoConfig(response_length=8, **algo)
    prompts = [r["prompt"] for r in toy.prompt_rows(n, 0, "train")]
    ids, _ = encode_prompts(prompts, tokenizer, 64)
    torch.manual_seed(seed)
    return sample(policy, ids, p.response_length, p.temperature, 64, tokenizer.pad_token_id, tokenizer.eos_token_id,
                  torch.device("cpu")), p


def test_artifact_and_parents(trained, root):
    metrics, run_dir = trained
    manifest = artifacts.read_manifest(run_dir)
    assert manifest["stage"] == "ppo" and manifest["kind"] == "policy" and metrics["iterations"] == 4
    assert [p["stage"] for p in manifest["parents"]] == ["sft", "reward"]
    assert manifest["parents"][1]["model_sha256"] == artifacts.read_manifest(root / "demo" / "reward")["model_sha256"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape[1] > 3


def test_every_iteration_logs_the_notes_metrics(trained):
    _, run_dir = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    needed = {"score", "kl", "rlhf_reward", "entropy", "approx_kl", "clipfrac", "vf_clipfrac", "value_loss",
              "explained_variance", "response_length", "stop_rate", "kl_coef", "rollout_tokens_per_s",
              "update_tokens_per_s", "gold", "policy_loss"}
    assert all(needed <= set(r) for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    # the rollout's log-probs are the very numbers the first minibatch recomputes, every iteration
    assert all(r["first_minibatch_approx_kl"] < 1e-12 for r in rows) and rows[-1]["approx_kl"] > 1e-8
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2, 4} and {"prompt", "response", "score", "gold"} <= set(samples[0])


def test_first_minibatch_ratio_is_one_and_approx_kl_zero(roles):
    policy, tokenizer, rm = roles
    value = rm  # the value model: a causal reward model, as PPO initialises it
    samples, p = _rollout(policy, tokenizer)
    with torch.inference_mode():
        logprobs = rollout_mod.response_logprobs(policy, samples, p.temperature, 64)
        roll = Rollout(**vars(samples), logprobs=logprobs, ref_logprobs=logprobs,
                       values=rollout_mod.response_values(value, samples, 64), scores=torch.zeros(len(logprobs)),
                       prompt_text=[], response_text=[])
    roll = constants(roll)
    adv = torch.randn_like(roll.mask) * roll.mask
    shaped = ppo.Shaped(roll.scores, torch.zeros_like(adv), adv, roll.values, None, None, 0.0)
    rows = torch.arange(6)
    _, stats = ppo.ppo_loss(policy, value, roll, rows, roll.mask[rows], shaped, p, rl.masked_mean)
    assert stats["approx_kl"].item() < 1e-12 and stats["clipfrac"].item() == 0.0
    # a different temperature in training than at rollout is exactly the mistake this catches
    _, wrong = ppo.ppo_loss(policy, value, roll, rows, roll.mask[rows], shaped,
                            PPOAlgoConfig(response_length=8, temperature=0.7), rl.masked_mean)
    assert wrong["approx_kl"].item() > 1e-4


def test_rollout_truncates_after_eos_and_ignores_the_models_generation_config(roles):
    policy, tokenizer, _ = roles
    policy.generation_config.top_k = 1  # a hub model may ship such defaults: the rollout must not use them
    policy.generation_config.repetition_penalty = 3.0
    try:
        first, _ = _rollout(policy, tokenizer, n=32, seed=0)
        second, _ = _rollout(policy, tokenizer, n=32, seed=1)
    finally:
        policy.generation_config.top_k, policy.generation_config.repetition_penalty = 50, 1.0
    # top_k=1 honoured would make sampling greedy: two seeds would give the same responses
    assert not torch.equal(first.response, second.response)
    resp, mask, eos = first.response, first.mask, tokenizer.eos_token_id
    assert first.ended.any()
    for row, m, ended in zip(resp, mask, first.ended):
        n = int(m.sum())
        if ended:
            assert row[n - 1] == eos and (row[:n - 1] != eos).all()
        else:
            assert n == resp.shape[1]
        assert (row[n:] == tokenizer.pad_token_id).all()


def test_score_is_read_at_the_last_real_token(roles):
    policy, tokenizer, rm = roles
    roll, _ = _rollout(policy, tokenizer)
    with torch.inference_mode():
        scores = rollout_mod.score_responses(Scorer(rm, tokenizer, True, 512), roll, [], [], 64)
        for i in range(len(scores)):
            real = roll.input_ids[i][roll.attention_mask[i].bool()]  # prompt + response up to EOS, no pads
            alone = rm(real[None], torch.ones_like(real)[None])
            assert alone.item() == pytest.approx(scores[i].item(), abs=1e-5)


def test_values_are_read_where_each_response_token_is_predicted(roles):
    policy, tokenizer, rm = roles
    roll, _ = _rollout(policy, tokenizer)
    with torch.inference_mode():
        values = rollout_mod.response_values(rm, roll, 64)
        width = roll.prompt.shape[1]
        i = 0
        real = roll.input_ids[i][roll.attention_mask[i].bool()]
        n_prompt = int(roll.prompt_mask[i].sum())
        per_token = rm(real[None], torch.ones_like(real)[None], per_token=True)[0]
        n_resp = int(roll.mask[i].sum())
        # the value of response token t sits at the position that predicts it: prompt length - 1 + t
        assert torch.allclose(values[i, :n_resp], per_token[n_prompt - 1:n_prompt - 1 + n_resp], atol=1e-5)
        assert (values[i, n_resp:] == 0).all() and width >= n_prompt


def test_missing_reward_artifact_names_the_command(tmp_path, root):
    cfg = compose_stage("ppo", [*FAST_PPO, f"root={tmp_path}", "experiment=x",
                                f"model.policy={root / 'demo' / 'sft'}"], tmp_path / "x" / "ppo")
    with pytest.raises(ArtifactError) as err:
        ppo.run(cfg)
    assert "rlhf reward experiment=x" in err.value.hint


def test_wrong_kind_is_refused(tmp_path, root):
    cfg = compose_stage("ppo", [*FAST_PPO, f"model.reward={root / 'demo' / 'sft'}", "experiment=demo",
                                f"root={root}"], tmp_path / "p")
    with pytest.raises(ArtifactError, match="policy artifact, but a reward_model is needed"):
        ppo.run(cfg)


def test_adaptive_kl_moves_the_coefficient(root, tmp_path):
    cfg = compose_stage("ppo", [*FAST_PPO, "experiment=demo", f"root={root}", "ppo.adaptive_kl=true",
                                "ppo.kl_target=0.01", "ppo.kl_horizon=100", "train.max_steps=3"],
                        tmp_path / "ppo_adaptive")
    ppo.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "ppo_adaptive" / "metrics.jsonl").read_text().splitlines()]
    coefs = [r["kl_coef"] for r in rows]
    assert coefs[0] == 0.05 and coefs[-1] != coefs[0]


def test_batch_arithmetic_takes_the_largest_micro_batch_and_refuses_only_what_cannot_work(tmp_path):
    from rlhf_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="num_mini_batches"):  # whatever the world size: at compose time
        compose_stage("ppo", ["ppo.prompts_per_rollout=10", "ppo.num_mini_batches=3"], tmp_path)
    default = ppo.batch_shape(compose_stage("ppo", [], tmp_path), 1)  # 64 prompts, 2 minibatches, micro 32
    assert (default.micro, default.grad_accum, default.local_minibatch, default.local_rollout) == (32, 1, 32, 64)
    # train.micro_batch_size is an upper bound: minibatches of 8 at most 3 at a time are 4 micro-batches of 2
    cfg = compose_stage("ppo", ["ppo.prompts_per_rollout=16", "ppo.num_mini_batches=2", "train.micro_batch_size=3"],
                        tmp_path)
    shape = ppo.batch_shape(cfg, 1)
    assert (shape.micro, shape.grad_accum, shape.local_minibatch, shape.local_rollout) == (2, 4, 8, 16)
    shape = ppo.batch_shape(cfg, 2)  # 4 of each minibatch per process: 2 micro-batches of 2
    assert (shape.micro, shape.grad_accum, shape.local_minibatch, shape.local_rollout) == (2, 2, 4, 8)
    with pytest.raises(ConfigError, match="a minibatch of 8 sequences .* does not split evenly over world_size=3"):
        ppo.batch_shape(cfg, 3)


def test_gradient_checkpointing_trains_the_same_policy_and_value_model(root, tmp_path):
    from safetensors.torch import load_file

    metrics, dirs = {}, {}
    for flag in ("false", "true"):
        dirs[flag] = tmp_path / f"ppo_checkpointing_{flag}"
        cfg = compose_stage("ppo", [*FAST_PPO, "experiment=demo", f"root={root}", "train.max_steps=1",
                                    f"train.gradient_checkpointing={flag}"], dirs[flag])
        metrics[flag] = ppo.run(cfg)
    for key in ("final_score", "final_kl", "final_policy_loss", "final_value_loss", "final_entropy"):
        assert metrics["true"][key] == pytest.approx(metrics["false"][key], rel=1e-4, abs=1e-6), key
    for name in ("policy", "value"):
        plain = load_file(dirs["false"] / "checkpoints" / "step-1" / f"{name}.safetensors")
        checkpointed = load_file(dirs["true"] / "checkpoints" / "step-1" / f"{name}.safetensors")
        assert all(torch.allclose(plain[k], checkpointed[k], rtol=1e-4, atol=1e-6) for k in plain), name


def test_frozen_roles_in_bf16(root, tmp_path, capsys):
    cfg = compose_stage("ppo", [*FAST_PPO, "experiment=demo", f"root={root}", "train.max_steps=2",
                                "model.dtype=bfloat16"], tmp_path / "ppo_bf16")
    metrics = ppo.run(cfg)
    assert "frozen weights in bfloat16" in capsys.readouterr().out.replace("\n", " ")
    # the reference is the SFT policy rounded to bf16: the first rollout's KL is near 0, not exactly 0
    assert 0.0 < abs(metrics["first_kl"]) < 0.5 and metrics["iterations"] == 2
    assert all(math.isfinite(v) for k, v in metrics.items() if isinstance(v, float))
