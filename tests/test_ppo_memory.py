"""scripts/ppo_memory.py: its parameter counts are exact (checked against instantiated tiny models and peft's
adapters), and its estimate moves the way memory does."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from helpers import REPO
from rlhf_cli.config import LoraConfig
from rlhf_cli.models import lora

spec = importlib.util.spec_from_file_location("ppo_memory", REPO / "scripts" / "ppo_memory.py")
mem = importlib.util.module_from_spec(spec)
sys.modules["ppo_memory"] = mem  # its dataclasses look their module up
spec.loader.exec_module(mem)


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_are_exact(tied):
    m = mem.Llama("t", hidden=64, layers=3, heads=4, kv_heads=2, intermediate=160, vocab=1000, tied=tied)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    assert m.causal_lm_params() == sum(p.numel() for p in model.parameters())
    assert m.body_params() == sum(p.numel() for p in LlamaModel(config).parameters())
    lora.add_adapters(model, LoraConfig(r=8), 0)
    assert m.lora_params(8) == lora.counts(model)[0]


def test_estimate_grows_with_the_work_and_lora_needs_less():
    m = mem.PRESETS[2]  # Llama-3.1-8B
    s = mem.Setting()
    base = mem.estimate(m, s)["peak"]
    assert mem.estimate(m, mem.Setting(response_length=512))["peak"] > base
    assert mem.estimate(m, mem.Setting(micro_batch=16))["peak"] > base
    assert mem.estimate(m, mem.Setting(gradient_checkpointing=False))["peak"] > base
    with_lora = mem.estimate(m, mem.Setting(lora_r=16))
    assert with_lora["peak"] < base / 3 and with_lora["weights_reference"] == 0
    assert with_lora["trained_parameters"] == 2 * m.lora_params(16) + m.hidden + 1


def test_the_verdicts_follow_the_numbers():
    rows = mem.table(mem.PRESETS, mem.Setting(), gpu_gib=74.5, overhead_gib=3.0)
    for row in rows:
        for key in ("full", "lora16"):
            assert row[f"{key}_fits"] == (row[f"{key}_gib"] <= 74.5)
    sizes = [r["parameters_b"] for r in rows]
    assert sizes == sorted(sizes)
    # a bigger model never fits where a smaller one does not
    for key in ("full", "lora16"):
        fits = [r[f"{key}_fits"] for r in rows]
        assert fits == sorted(fits, reverse=True)
    assert mem.largest(rows, "lora16") == "Llama-3.1-8B" and mem.largest(rows, "full") == "Llama-3.2-1B"
