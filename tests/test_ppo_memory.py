"""scripts/ppo_memory.py: its parameter counts and static bytes are exact (checked against instantiated tiny
models, peft's adapters and the roles the PPO stage's own load_roles builds), its per-layer activation formulas
match what autograd saves, and its estimate and verdicts move the way memory does."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from helpers import REPO
from rlhf_cli.config import LoraConfig
from rlhf_cli.models import lora
from rlhf_cli.models.reward import RewardModel

spec = importlib.util.spec_from_file_location("ppo_memory", REPO / "scripts" / "ppo_memory.py")
mem = importlib.util.module_from_spec(spec)
sys.modules["ppo_memory"] = mem  # its dataclasses look their module up
spec.loader.exec_module(mem)

TINY = mem.Llama("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160, vocab=512)


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_are_exact(tied):
    m = replace(TINY, layers=3, tied=tied)
    config = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    assert m.causal_lm_params() == sum(p.numel() for p in model.parameters())
    assert m.body_params() == sum(p.numel() for p in LlamaModel(config).parameters())
    reward = RewardModel(LlamaModel(config), "last", 0, False)  # a causal LM's reward head: no bias
    assert m.body_params() + m.hidden == sum(p.numel() for p in reward.parameters())
    assert m.body_params() + m.hidden + 1 == sum(p.numel() for p in reward.add_head_bias().parameters())
    lora.add_adapters(model, LoraConfig(r=8), 0)
    assert m.lora_params(8) == lora.counts(model)[0]


@pytest.mark.parametrize("tied,r", [(False, 0), (True, 4)])
def test_static_bytes_match_the_roles_load_roles_builds(tied, r):
    for category, (estimate, measured) in mem.check_static(replace(TINY, tied=tied), r).items():
        assert estimate == measured, category


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("r", [0, 4])
def test_per_layer_activations_match_what_autograd_saves(device, r):
    estimate, measured = mem.check_activations(TINY, r, device)
    assert estimate == measured


def test_estimate_grows_with_the_work_and_lora_needs_less():
    m = mem.PRESETS[2]  # Llama-3.1-8B
    s = mem.Setting()
    base = mem.estimate(m, s)
    longer = mem.estimate(m, replace(s, response_length=512))
    assert longer["phase_update"] > base["phase_update"] and longer["phase_rollout"] > base["phase_rollout"]
    lora_s = replace(s, lora_r=16)
    longer_lora, lora = mem.estimate(m, replace(lora_s, response_length=512)), mem.estimate(m, lora_s)
    # (its peak at these micro-batches is the loading transient, which the response length does not change)
    assert longer_lora["phase_update"] > lora["phase_update"] and longer_lora["phase_rollout"] > lora["phase_rollout"]
    assert mem.estimate(m, replace(s, micro_batch=16))["phase_update"] > base["phase_update"]
    assert mem.estimate(m, replace(s, rollout_micro_batch=128))["phase_rollout"] > base["phase_rollout"]
    assert mem.estimate(m, replace(s, gradient_checkpointing=False))["update_activations"] > \
        base["update_activations"]
    with_lora = mem.estimate(m, replace(s, lora_r=16))
    assert with_lora["peak"] < base["peak"] / 3 and with_lora["weights_reference"] == 0
    assert with_lora["trained_parameters"] == 2 * m.lora_params(16) + m.hidden + 1
    assert base["weights_policy"] == 4 * m.causal_lm_params() and base["weights_reference"] == 2 * m.causal_lm_params()
    cpu = mem.estimate(m, replace(s, device="cpu"))
    assert cpu["weights_reference"] == 4 * m.causal_lm_params()  # model.dtype=auto: fp32 on the CPU


def test_the_verdicts_follow_the_numbers():
    gpu, overhead = 79.2, 3.0
    s = mem.Setting()
    rows = mem.table(mem.PRESETS, s, gpu, overhead)
    budget = (gpu - overhead) * mem.GIB
    for m, row in zip(mem.PRESETS, rows):
        for key, r, ckpt in mem.KEYS:
            assert row[f"{key}_fits"] == (row[f"{key}_gib"] <= gpu)
            if row[f"{key}_fits"]:  # the largest powers of two that fit: doubling either one does not
                mb, rmb = map(int, row[f"{key}_micro"].split("/"))
                at = replace(s, lora_r=r, gradient_checkpointing=ckpt, micro_batch=mb, rollout_micro_batch=rmb)
                assert mem.estimate(m, at)["peak"] <= budget
                if 2 * mb <= s.prompts // s.num_mini_batches:
                    assert mem.estimate(m, replace(at, micro_batch=2 * mb))["peak"] > budget
                if 2 * rmb <= s.prompts:
                    assert mem.estimate(m, replace(at, rollout_micro_batch=2 * rmb))["peak"] > budget
    sizes = [r["parameters_b"] for r in rows]
    assert sizes == sorted(sizes)
    for key, _, _ in mem.KEYS:  # a bigger model never fits where a smaller one does not
        fits = [r[f"{key}_fits"] for r in rows]
        assert fits == sorted(fits, reverse=True)
    assert mem.largest(rows, "lora16").startswith("Llama-3.1-8B")
    assert mem.largest(rows, "full").startswith("Llama-3.2-1B")


@pytest.mark.parametrize("tied,r", [(False, 0), (True, 4)])
def test_critic_free_static_bytes_match_the_roles_load_roles_builds(tied, r):
    """ppo.advantage=grpo, samples_per_prompt=4: load_roles builds no value model; the accounting says 0 for it."""
    measured = mem.check_static(replace(TINY, tied=tied), r, critic_free=True)
    assert measured["weights_value"] == (0, 0)
    for category, (estimate, got) in measured.items():
        assert estimate == got, category


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("r", [0, 16])
@pytest.mark.parametrize("m", [TINY, mem.PRESETS[2]], ids=["tiny", "8B"])
def test_critic_free_drops_exactly_the_value_model(m, r, device):
    s = mem.Setting(lora_r=r, device=device)
    ppo, grpo = mem.estimate(m, s), mem.estimate(m, replace(s, critic_free=True))
    f, B, h = (2 if device == "cuda" else 4), m.body_params(), m.hidden
    value_trained = (m.lora_params(r) if r else B) + h + 1       # the value body (or its adapters) and its head
    value_weights = f * B + 4 * (m.lora_params(r) + h + 1) if r else 4 * (B + h + 1)
    assert ppo["weights_value"] == value_weights and grpo["weights_value"] == 0
    assert ppo["trained_parameters"] - grpo["trained_parameters"] == value_trained
    assert ppo["gradients"] - grpo["gradients"] == 4 * value_trained
    assert ppo["adamw"] - grpo["adamw"] == 8 * value_trained
    for role in ("policy", "reference", "reward"):
        assert ppo[f"weights_{role}"] == grpo[f"weights_{role}"]
    static = lambda e: sum(v for k, v in e.items() if k.startswith("weights_")) + e["gradients"] + e["adamw"]
    by_hand = f * B + 16 * (m.lora_params(r) + h + 1) if r else 16 * (B + h + 1)
    assert static(ppo) - static(grpo) == by_hand
    assert ppo["phase_step"] - grpo["phase_step"] == by_hand
    # the update runs the policy alone; the rollout's largest pass is the same (the reward pass stays)
    assert grpo["update_activations"] * 2 == ppo["update_activations"]
    assert grpo["autocast_copies"] < ppo["autocast_copies"] if device == "cuda" else grpo["autocast_copies"] == 0
    assert all(grpo[k] == ppo[k] for k in ("rollout_generation", "rollout_logprob_pass", "rollout_value_reward_pass",
                                           "update_logits", "update_transient"))
    for phase in ("phase_loading", "phase_rollout", "phase_update", "peak"):
        assert grpo[phase] <= ppo[phase], phase


def test_critic_free_verdicts_fit_at_least_what_ppo_fits():
    gpu, overhead = 79.2, 3.0
    s = mem.Setting()
    grpo = mem.critic_free_setting(s)
    assert (grpo.prompts, grpo.samples_per_prompt, grpo.rows, grpo.critic_free) == (16, 4, s.rows, True)
    ppo_rows, grpo_rows = mem.table(mem.PRESETS, s, gpu, overhead), mem.table(mem.PRESETS, grpo, gpu, overhead)
    for key, _, _ in mem.KEYS:
        ppo_fits, grpo_fits = [r[f"{key}_fits"] for r in ppo_rows], [r[f"{key}_fits"] for r in grpo_rows]
        assert grpo_fits == sorted(grpo_fits, reverse=True)
        assert sum(grpo_fits) >= sum(ppo_fits), key  # the largest critic-free model is at least PPO's
    assert mem.largest(grpo_rows, "full").startswith("Llama-3.2-3B")
    assert mem.largest(grpo_rows, "lora16").startswith("Llama-2-13B")
    assert mem.main([]) == 0  # the default run prints both tables
