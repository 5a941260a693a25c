"""LoRA: adapters injected in place (models/lora.py), the base with its adapters off, merged artifacts with the
adapter beside them, checkpoints of only what trains, PPO's reference as the policy's own base, config errors."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import FAST_PPO, FAST_REWARD, FAST_SFT, compose_stage
from rlhf_cli import artifacts
from rlhf_cli.config import LoraConfig, ModelConfig
from rlhf_cli.engine import checkpoint, rollout
from rlhf_cli.engine.rollout import Rollout, constants, sample
from rlhf_cli.errors import ConfigError
from rlhf_cli.models import lora
from rlhf_cli.models.loading import enable_gradient_checkpointing, load_causal_lm, resolve
from rlhf_cli.models.reward import RewardModel
from rlhf_cli.rl.ppo import masked_mean
from rlhf_cli.stages import eval as eval_stage, ppo, reward, sft

X = torch.tensor([[5, 17, 42, 9, 3, 28], [7, 7, 12, 40, 2, 11]])


@pytest.fixture(scope="module")
def base_path():
    return resolve(ModelConfig())


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _randomise_adapters(model, seed=0):
    """Trained-looking adapters, the same for the same seed (B is 0 at the start, which would make every
    comparison trivial, and A is drawn from the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_fresh_adapters_change_nothing_and_switched_off_give_the_base_exactly(base_path):
    base, model = _base(base_path), _base(base_path)
    lora.add_adapters(model, LoraConfig(r=4), 0)
    trained, total = lora.counts(model)
    assert 0 < trained < total / 5 and lora.has_adapters(model)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert "of" in lora.describe(model) and "(LoRA)" in lora.describe(model)
    assert torch.equal(_logits(model), _logits(base))  # B = 0: W + BA = W
    _randomise_adapters(model)
    assert not torch.allclose(_logits(model), _logits(base), atol=1e-3)
    assert torch.equal(_logits(lora.BaseView(model)), _logits(base))
    assert not torch.allclose(_logits(model), _logits(base), atol=1e-3)  # the adapters are back on afterwards


def test_r_zero_leaves_the_model_as_it_is(base_path):
    model = _base(base_path)
    lora.add_adapters(model, LoraConfig(r=0), 0)
    assert not lora.has_adapters(model) and all(p.requires_grad for p in model.parameters())
    assert lora.merged(model) is model and lora.adapter_writer(model) is None
    assert lora.describe(model).endswith("all trained")
    assert lora.frozen_base(model, lambda: "a copy") == "a copy"


def test_target_modules_pick_the_layers_and_a_wrong_name_is_a_config_error(base_path):
    model = _base(base_path)
    lora.add_adapters(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), 0)
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match=r"model.lora.target_modules=\['qkv_typo'\]"):
        lora.add_adapters(_base(base_path), LoraConfig(r=2, target_modules=["qkv_typo"]), 0)


def test_merged_model_and_base_plus_adapter_give_the_adapted_outputs(base_path, tmp_path):
    from peft import PeftModel

    model = _base(base_path)
    lora.add_adapters(model, LoraConfig(r=4, alpha=8), 0)
    _randomise_adapters(model)
    expected = _logits(model)
    lora.adapter_writer(model)(tmp_path / "adapter")
    merged = lora.merged(model)
    assert not lora.has_adapters(merged) and not any("lora_" in n for n in merged.state_dict())
    assert torch.allclose(_logits(merged), expected, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    assert torch.allclose(_logits(_base(tmp_path / "merged")), expected, atol=1e-5)
    again = PeftModel.from_pretrained(_base(base_path), str(tmp_path / "adapter")).eval()
    assert torch.allclose(_logits(again), expected, atol=1e-6)


def test_a_bf16_base_is_merged_into_a_fresh_fp32_copy(base_path):
    fp32, bf16 = _base(base_path), _base(base_path)
    lora.add_adapters(fp32, LoraConfig(r=4), 0)
    lora.add_adapters(bf16, LoraConfig(r=4), 0, base_dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}
    _randomise_adapters(fp32)
    _randomise_adapters(bf16)
    _logits(bf16)  # runs with a bf16 base and fp32 adapters
    a = lora.merged(fp32).state_dict()
    b = lora.merged(bf16, reload=lambda: _base(base_path)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # not the bf16-rounded base


def test_checkpoints_hold_only_what_trains_and_refuse_the_other_kind(base_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = RewardModel.from_backbone(base_path, tokenizer)
    lora.add_adapters(model, LoraConfig(r=4), 0)
    assert model.head.weight.requires_grad  # the head trains in full
    _randomise_adapters(model)
    checkpoint.save_weights(model, tmp_path / "value.safetensors")
    saved = load_file(tmp_path / "value.safetensors")
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(k.startswith("head.") for k in saved) and all("lora_" in k or k.startswith("head.") for k in saved)
    fresh = RewardModel.from_backbone(base_path, tokenizer)
    lora.add_adapters(fresh, LoraConfig(r=4), 0)
    checkpoint.load_weights(fresh, tmp_path / "value.safetensors")
    mask = torch.ones_like(X)
    with torch.no_grad():
        assert torch.equal(model(X, mask), fresh(X, mask))
    with pytest.raises(Exception):  # a LoRA checkpoint into a fully trained model
        checkpoint.load_weights(RewardModel.from_backbone(base_path, tokenizer), tmp_path / "value.safetensors")
    other = RewardModel.from_backbone(base_path, tokenizer)
    lora.add_adapters(other, LoraConfig(r=2, target_modules=["q_proj"]), 0)
    with pytest.raises(ValueError, match="other model.lora settings"):
        checkpoint.load_weights(other, tmp_path / "value.safetensors")


def test_gradient_checkpointing_with_adapters_gives_the_same_loss_and_gradients(base_path):
    results = []
    for checkpointing in (False, True):
        model = _base(base_path)
        lora.add_adapters(model, LoraConfig(r=4), 0)
        _randomise_adapters(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        loss = model(input_ids=X, labels=X).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and all(g is not None for g in grads_a.values())
    assert all(torch.allclose(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-7) for k in grads_a)


def test_config_rules(tmp_path):
    with pytest.raises(ConfigError, match="model.lora.dropout=0.1: PPO"):
        compose_stage("ppo", ["model.lora.r=8", "model.lora.dropout=0.1"], tmp_path)
    with pytest.raises(ConfigError, match="model.lora.r=-1"):
        compose_stage("sft", ["model.lora.r=-1"], tmp_path)
    with pytest.raises(ConfigError, match="model.lora.alpha"):
        compose_stage("reward", ["model.lora.r=8", "model.lora.alpha=0"], tmp_path)
    cfg = compose_stage("sft", ["model.lora.r=16", "model.lora.dropout=0.05",
                                "model.lora.target_modules=[q_proj,v_proj]"], tmp_path)
    assert cfg.model.lora == LoraConfig(r=16, alpha=16.0, dropout=0.05, target_modules=["q_proj", "v_proj"])


# ---- the stages ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(trained_experiment, tmp_path_factory):
    """Experiment `l`: a fully fine-tuned SFT policy (the shared experiment's: LoRA adapts a model that has learnt
    something), then reward and ppo with LoRA adapters (r=8); and `l/sft_lora`, SFT with LoRA on the built-in tiny
    model."""
    root = tmp_path_factory.mktemp("lora-runs")
    common = ["experiment=l", f"root={root}"]
    out = {"root": root}
    shutil.copytree(trained_experiment / "demo" / "sft", root / "l" / "sft",
                    ignore=shutil.ignore_patterns("checkpoints"))
    out["sft"] = sft.run(compose_stage("sft", [*FAST_SFT, *common, "model.lora.r=8", "train.max_steps=60",
                                               "optim.lr=1e-2"], root / "l" / "sft_lora"))
    out["reward"] = reward.run(compose_stage("reward", [*FAST_REWARD, *common, "model.lora.r=8", "train.max_steps=80",
                                                        "optim.lr=3e-3"], root / "l" / "reward"))
    return out


def test_sft_with_lora_learns_and_publishes_the_merged_model_and_the_adapter(runs, base_path):
    from peft import PeftModel

    run_dir = runs["root"] / "l" / "sft_lora"
    # frozen random embeddings and LM head: the adapters alone move the loss, slowly
    assert runs["sft"]["eval_loss"] < runs["sft"]["eval_loss_start"] - 0.2
    merged = _base(run_dir / "model")  # a plain causal LM
    assert not any("lora_" in k for k in load_file(run_dir / "model" / "model.safetensors"))
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 8
    with_adapter = PeftModel.from_pretrained(_base(base_path), str(run_dir / "adapter")).eval()
    assert torch.allclose(_logits(merged), _logits(with_adapter), atol=1e-5)
    assert not torch.allclose(_logits(merged), _logits(_base(base_path)), atol=1e-3)  # it did train
    ckpt = load_file(run_dir / "checkpoints" / "step-60" / "model.safetensors")
    assert ckpt and all("lora_" in k for k in ckpt)


def test_reward_with_lora_trains_adapters_and_a_full_head(runs):
    run_dir = runs["root"] / "l" / "reward"
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1 and runs["reward"]["train_accuracy"] > 0.6
    ckpt = load_file(run_dir / "checkpoints" / "step-80" / "model.safetensors")
    assert any(k.startswith("head.") for k in ckpt) and all("lora_" in k or k.startswith("head.") for k in ckpt)
    model = RewardModel.from_pretrained(run_dir / "model")  # merged: no adapters left
    assert not any("lora_" in n for n, _ in model.named_parameters())


@pytest.fixture(scope="module")
def ppo_run(runs):
    """PPO with LoRA (r=8): its metrics, run directory and what it printed."""
    root = runs["root"]
    cfg = compose_stage("ppo", [*FAST_PPO, "experiment=l", f"root={root}", "model.lora.r=8"], root / "l" / "ppo")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        metrics = ppo.run(cfg)
    return metrics, root / "l" / "ppo", out.getvalue()


def test_ppo_with_lora_runs_end_to_end_and_keeps_only_adapters(ppo_run):
    metrics, run_dir, _ = ppo_run
    assert metrics["iterations"] == 4
    assert metrics["first_kl"] == 0.0  # the first rollout's policy is its own reference, exactly
    policy = load_file(run_dir / "checkpoints" / "step-4" / "policy.safetensors")
    value = load_file(run_dir / "checkpoints" / "step-4" / "value.safetensors")
    assert policy and all("lora_" in k for k in policy)
    assert any(k.startswith("head.") for k in value) and all("lora_" in k or k.startswith("head.") for k in value)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not any("lora_" in k for k in load_file(run_dir / "model" / "model.safetensors"))


def test_ppo_lora_start_up_line_names_each_roles_parameters(ppo_run):
    out = " ".join(ppo_run[2].split())
    assert "reference: the policy with its adapters off" in out
    assert out.count("parameters trained (LoRA)") == 2  # policy and value model
    assert "M parameters, frozen" in out  # the reward model


def test_ppo_lora_reference_is_the_sft_model_and_the_first_ratio_is_one(runs):
    root = runs["root"]
    cfg = compose_stage("ppo", [*FAST_PPO, "experiment=l", f"root={root}", "model.lora.r=8"], root / "l" / "x")
    roles = ppo.load_roles(cfg, ppo.find_upstream(cfg), torch.device("cpu"))
    _randomise_adapters(roles.policy)  # a policy that has moved away from its reference
    sft_model, tokenizer, _ = load_causal_lm(ModelConfig(name_or_path=str(root / "l" / "sft" / "model")),
                                             torch.device("cpu"), dropout=False)
    from rlhf_cli.data import toy
    from rlhf_cli.data.prompts import encode_prompts

    ids, _ = encode_prompts([r["prompt"] for r in toy.prompt_rows(8, 0, "train")], tokenizer, 64)
    roles.policy.eval()
    torch.manual_seed(0)
    samples = sample(roles.policy, ids, 8, 1.0, 8, tokenizer.pad_token_id, tokenizer.eos_token_id,
                     torch.device("cpu"))
    with torch.inference_mode():
        ref = rollout.response_logprobs(roles.reference, samples, 1.0, 8)
        assert torch.equal(ref, rollout.response_logprobs(sft_model.eval(), samples, 1.0, 8))
        logprobs = rollout.response_logprobs(roles.policy, samples, 1.0, 8)
        assert not torch.allclose(logprobs, ref, atol=1e-3)
        roll = Rollout(**vars(samples), logprobs=logprobs, ref_logprobs=ref,
                       values=rollout.response_values(roles.value, samples, 8), scores=torch.zeros(8),
                       prompt_text=[], response_text=[])
    roll = constants(roll)
    roles.policy.train()
    adv = torch.randn_like(roll.mask) * roll.mask
    shaped = ppo.Shaped(roll.scores, torch.zeros_like(adv), adv, roll.values, None, None, 0.0)
    rows = torch.arange(8)
    _, stats = ppo.ppo_loss(roles.policy, roles.value, roll, rows, roll.mask[rows], shaped, cfg.ppo, masked_mean)
    assert stats["approx_kl"].item() < 1e-12 and stats["clipfrac"].item() == 0.0


def test_eval_draws_the_curve_from_lora_checkpoints(ppo_run, runs):
    _, run_dir, _ = ppo_run
    root = runs["root"]
    cfg = compose_stage("eval", ["experiment=l", f"root={root}", "num_prompts=16", "response_length=8"],
                        root / "l" / "eval")
    report = eval_stage.run(cfg)
    curve = report["curves"]["l/ppo"]
    assert [p["step"] for p in curve] == [0, 2, 4]
    final = next(p for p in report["policies"] if p["name"] == "l/ppo")
    # the last checkpoint's adapters on the SFT base are the merged final policy
    assert curve[-1]["score"] == pytest.approx(final["score"], abs=1e-4)
    assert curve[-1]["kl"] == pytest.approx(final["kl"], abs=1e-3)
    assert artifacts.read_manifest(run_dir)["config"]["model"]["lora"]["r"] == 8


def test_adapters_are_drawn_from_the_seed_and_leave_the_callers_rng_alone(base_path):
    models = [_base(base_path) for _ in range(3)]
    state = torch.get_rng_state()
    for model, seed in zip(models, (7, 7, 8)):
        lora.add_adapters(model, LoraConfig(r=4), seed)
    assert torch.equal(torch.get_rng_state(), state)
    a, b, c = ({n: p for n, p in m.named_parameters() if "lora_A" in n} for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_ppo_lora_with_a_bf16_base_publishes_the_adapters_on_the_fp32_sft_weights(runs):
    from peft import PeftModel

    root = runs["root"]
    run_dir = root / "l" / "ppo_bf16"
    cfg = compose_stage("ppo", [*FAST_PPO, "experiment=l", f"root={root}", "model.lora.r=8", "model.dtype=bfloat16",
                                "train.max_steps=2"], run_dir)
    metrics = ppo.run(cfg)
    assert metrics["first_kl"] == 0.0  # the reference is the policy's own (bf16) base
    published = load_file(run_dir / "model" / "model.safetensors")
    assert {v.dtype for v in published.values()} == {torch.float32}
    sft_dir = root / "l" / "sft" / "model"
    expected = PeftModel.from_pretrained(_base(sft_dir), str(run_dir / "adapter")).eval()
    assert torch.allclose(_logits(_base(run_dir / "model")), _logits(expected), atol=1e-5)
