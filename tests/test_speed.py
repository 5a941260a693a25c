"""Issue 10's fast paths give the numbers of the plain ones: fused log-probs and entropy, logits only where used,
padding-free packing, bf16 rollouts whose first minibatch has ratio 1, the static-cache sampler, compile, MFU."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import FAST_SFT, compose_stage
from rlhf_cli.config import PPOAlgoConfig, PPOConfig, PPOTrainConfig, TrainConfig
from rlhf_cli.data.preference import collate_pairs
from rlhf_cli.data.sft import collate_sft
from rlhf_cli.engine import batches, device as dev, dist, flops, train
from rlhf_cli.engine.reward_functions import make_rewards
from rlhf_cli.engine.rollout import Scorer, backend_for, policy_logits, sample
from rlhf_cli.errors import ConfigError
from rlhf_cli.models import lora
from rlhf_cli.models.loading import logits_at, packing_refusal
from rlhf_cli.models.reward import RewardModel
from rlhf_cli.rl.ppo import masked_mean
from rlhf_cli.models.tiny import tiny_model_path
from rlhf_cli.rl.ppo import entropy_from_logits, logprobs_and_entropy
from rlhf_cli.stages import ppo, reward, sft

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path), path


def _examples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in (5, 11, 3, 14, 8, 6)[:n]:
        ids = torch.randint(3, 400, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return out


# ---- fused log-probs and entropy ----------------------------------------------------------------------------------

def test_logprobs_and_entropy_hand_values_and_masked_vocabulary():
    logits = torch.tensor([[0.0, math.log(3)], [3.0, -math.inf]])
    logp, h = logprobs_and_entropy(logits, torch.tensor([1, 0]), 1.0)
    # p = (1/4, 3/4): log p(1) = log 3/4, H = -(1/4 log 1/4 + 3/4 log 3/4); one finite logit: p = 1, H = 0
    assert logp.tolist() == pytest.approx([math.log(0.75), 0.0], abs=1e-6)
    assert h.tolist() == pytest.approx([0.5623351, 0.0], abs=1e-6)
    halved, _ = logprobs_and_entropy(logits[:1], torch.tensor([1]), 2.0)  # T = 2: softmax(z / 2)
    assert halved.item() == pytest.approx(math.log(3 ** 0.5 / (1 + 3 ** 0.5)), abs=1e-6)


def test_logprobs_and_entropy_match_autograd_of_the_plain_formulas(monkeypatch):
    monkeypatch.setattr("rlhf_cli.rl.ppo.chunk_rows", lambda logits: 16)   # 210 rows: 14 chunks, the last short
    torch.manual_seed(0)
    z = torch.randn(3, 70, 33, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 33, (3, 70))
    logp, h = logprobs_and_entropy(z, tokens, 0.7)
    plain_logp = torch.log_softmax(z / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    plain_h = entropy_from_logits(z / 0.7)
    assert torch.allclose(logp, plain_logp, atol=1e-12) and torch.allclose(h, plain_h, atol=1e-12)
    g, k = torch.randn(3, 70, dtype=torch.float64), torch.randn(3, 70, dtype=torch.float64)
    ours = torch.autograd.grad((logp * g + h * k).sum(), z)[0]
    plain = torch.autograd.grad((plain_logp * g + plain_h * k).sum(), z)[0]
    assert torch.allclose(ours, plain, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: logprobs_and_entropy(x, tokens[:1, :4], 1.3), (z[:1, :4].detach()
                                                                                            .requires_grad_(),))
    # bf16 logits: upcast chunk-wise, fp32 out, close to the fp32 numbers
    lp16, h16 = logprobs_and_entropy(z.detach().bfloat16(), tokens, 0.7)
    assert lp16.dtype == torch.float32 and torch.allclose(lp16.double(), plain_logp, atol=5e-2)


# ---- logits only where they are used ------------------------------------------------------------------------------

def test_logits_at_runs_the_head_on_the_asked_positions_only(tiny):
    model, _, _ = tiny
    ids = torch.randint(3, 400, (2, 12))
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        positions = torch.tensor([3, 4, 5, 9])
        kept = logits_at(model, positions, input_ids=ids)
        full = model(input_ids=ids).logits
    finally:
        hook.remove()
    assert seen == [4, 12] and kept.shape == (2, 4, model.config.vocab_size)
    assert torch.allclose(kept, full[:, positions], atol=1e-5)


def test_policy_and_value_read_only_the_response_positions(tiny):
    model, tok, path = tiny
    torch.manual_seed(0)
    s = sample(model.eval(), [[5, 6, 7], [8, 9]], 6, 1.0, 2, tok.pad_token_id, tok.eos_token_id, CPU)
    value = RewardModel.from_backbone(str(path), tok).eval()
    width, response = s.prompt.shape[1], torch.arange(s.prompt.shape[1] - 1, s.prompt.shape[1] + 5)
    with torch.no_grad():  # the samples are inference tensors
        full = model(input_ids=s.input_ids, attention_mask=s.attention_mask,
                     position_ids=(s.attention_mask.cumsum(1) - 1).clamp_min(0)).logits
        kept = policy_logits(model, s, slice(0, 2))
        every = value(s.input_ids, s.attention_mask, per_token=True)
        only = value(s.input_ids, s.attention_mask, per_token=True, positions=response)
    assert kept.shape[1] == 6 and torch.allclose(kept, full[:, width - 1:width + 5], atol=1e-5)
    assert torch.allclose(only, every[:, width - 1:width + 5], atol=1e-6)


# ---- padding-free packing -----------------------------------------------------------------------------------------

def test_packed_and_padded_sft_losses_and_gradients_are_equal(tiny):
    model, _, _ = tiny
    model.train()
    results = []
    for packing in (False, True):
        batch = collate_sft(_examples(), 0, packing)
        model.zero_grad()
        loss = sft.token_loss_sum(model, batches.to_device(batch, CPU), sft.supervised_positions(batch))
        loss.backward()
        results.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone(), batch))
    (padded, g_padded, b_padded), (packed, g_packed, b_packed) = results
    assert b_packed["input_ids"].shape == (1, 5 + 11 + 3 + 14) and "attention_mask" not in b_packed
    assert b_packed["position_ids"][0, :7].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert b_padded["input_ids"].shape == (4, 14)
    assert torch.allclose(packed, padded, rtol=1e-5) and torch.allclose(g_packed, g_padded, atol=1e-6)
    model.zero_grad()


def test_packed_and_padded_reward_scores_are_equal(tiny):
    _, tok, path = tiny
    rm = RewardModel.from_backbone(str(path), tok).eval()
    pairs = [{"chosen_ids": ex["input_ids"], "rejected_ids": ex["input_ids"][::-1][:4] + [tok.eos_token_id]}
             for ex in _examples()]
    padded = reward.pair_scores(rm, pairs, tok.pad_token_id, CPU)
    packed = reward.pair_scores(rm, pairs, tok.pad_token_id, CPU, packing=True)
    assert collate_pairs(pairs, tok.pad_token_id, packing=True)["ends"].tolist()[:2] == [4, 15]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(padded[:2], packed[:2]))


def test_packing_refuses_a_model_whose_examples_see_each_other_and_an_encoder(tiny, tiny_bert_dir):
    model, tok, _ = tiny
    assert packing_refusal(model, "tiny") is None  # transformers' Llama keeps them apart

    class Leaky(torch.nn.Module):  # ignores the restarting positions: one causal mask over the whole row
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=use_cache)

    assert re.match(r"leaky .*does not keep packed examples apart", packing_refusal(Leaky(), "leaky"))
    encoder = RewardModel.from_backbone(str(tiny_bert_dir), AutoTokenizer.from_pretrained(tiny_bert_dir))
    assert "is an encoder" in reward.why_not_packable(encoder, "tiny-bert")


@pytest.mark.parametrize("setting, refusal, on, says", [
    ("auto", None, True, "packing on (auto: each micro-batch one padding-free row)"),
    ("auto", "tiny-bert is an encoder", False, "packing off (auto: tiny-bert is an encoder)"),
    (True, None, True, "packing on (data.packing=true: each micro-batch one padding-free row)"),
    (False, "never asked", False, "packing off (data.packing=false)"),
])
def test_packing_is_settled_once_and_said(setting, refusal, on, says):
    from rlhf_cli.config.schemas import DataConfig
    from rlhf_cli.engine.batches import decide_packing

    data = DataConfig(packing=setting)
    assert decide_packing(data, lambda: refusal) == says and data.packing is on


def test_packing_asked_for_on_a_model_that_cannot_is_refused():
    from rlhf_cli.config.schemas import DataConfig
    from rlhf_cli.engine.batches import decide_packing

    with pytest.raises(ConfigError, match="data.packing=true, but tiny-bert is an encoder") as raised:
        decide_packing(DataConfig(packing=True), lambda: "tiny-bert is an encoder")
    assert "data.packing=false" in raised.value.hint


def test_packing_defaults_to_auto_and_takes_only_auto_true_false(tmp_path):
    assert compose_stage("sft", [], tmp_path).data.packing == "auto"
    assert compose_stage("sft", ["data.packing=false"], tmp_path).data.packing is False
    with pytest.raises(ConfigError, match="data.packing='yes' is not one of auto, true, false"):
        compose_stage("sft", ["data.packing=yes"], tmp_path)


@pytest.mark.slow
def test_sft_stage_with_packing_trains_and_its_final_checkpoint_has_no_optimizer_state(tmp_path):
    cfg = compose_stage("sft", [*FAST_SFT, "data.packing=true", f"root={tmp_path}"], tmp_path / "sft")
    metrics = sft.run(cfg)
    assert metrics["eval_loss"] < metrics["eval_loss_start"] - 0.5
    ckpts = tmp_path / "sft" / "checkpoints"
    assert (ckpts / "step-12" / "optimizer.pt").is_file() and not (ckpts / "step-24" / "optimizer.pt").exists()
    assert json.loads((ckpts / "step-24" / "state.json").read_text())["final"] is True


# ---- precision: rollout and training passes with the same numerics -----------------------------------------------

def test_bf16_autocast_rollout_gives_ratio_one_on_the_first_minibatch(tiny):
    model, tok, path = tiny
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    value = RewardModel.from_backbone(str(path), tok).eval()
    roles = ppo.Roles(policy, lora.frozen_base(policy, lambda: policy), value,
                      make_rewards([Scorer(value, tok, True, 64)], [], []), tok, "test")
    cfg = PPOConfig(ppo=PPOAlgoConfig(response_length=8, temperature=0.7, prompts_per_rollout=8),
                    train=PPOTrainConfig(micro_batch_size=4, rollout_micro_batch_size=8, precision="bf16"))
    prompts = [[5 + i, 6, 7, 8][: 2 + i % 3] for i in range(8)]
    stats = {}
    try:
        for setting in ("bf16", "fp32"):  # the rollout under bf16, or (the mistake) under fp32
            dev.set_precision(setting)
            torch.manual_seed(0)
            roll = ppo.collect_rollout(roles, prompts, cfg, CPU)
            dev.set_precision("bf16")
            shaped = ppo.Shaped(roll.scores, torch.zeros_like(roll.mask), torch.randn_like(roll.mask) * roll.mask,
                                roll.values, None, None, 0.0)
            with train.micro_step([policy, value], True, CPU):
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
                # other rows than the rollout pass's first micro-batch: a row's numbers do not depend on its company
                rows = torch.tensor([5, 2, 7, 0])
                _, stats[setting] = ppo.ppo_loss(policy, value, roll, rows, roll.mask[rows], shaped, cfg.ppo,
                                                 masked_mean)
    finally:
        dev.set_precision("auto")
    assert stats["bf16"]["approx_kl"].item() == 0.0 and stats["bf16"]["clipfrac"].item() == 0.0
    assert stats["fp32"]["approx_kl"].item() > 1e-7


# ---- the rollout function -----------------------------------------------------------------------------------------

def test_static_cache_rollout_samples_what_the_dynamic_one_does(tiny):
    model, tok, _ = tiny
    prompts = [[5, 6], [5, 6, 7, 8, 9], [7, 8, 9], [4, 4, 4, 4]]
    runs = []
    for static in (False, True):
        torch.manual_seed(0)
        runs.append(sample(model.eval(), prompts, 12, 1.0, 2, tok.pad_token_id, tok.eos_token_id, CPU,
                           static=static))
    dynamic, static = runs
    assert torch.equal(dynamic.response, static.response) and torch.equal(dynamic.mask, static.mask)
    assert static.input_ids.shape == (4, 5 + 12)  # the generation-only padding to 64 is gone
    assert backend_for("auto", CPU) == "eager" and backend_for("auto", torch.device("cuda", 0)) == "compiled"
    with pytest.raises(ValueError, match="unknown rollout backend 'vllm'"):
        backend_for("vllm", CPU)


# ---- torch.compile and MFU ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_training_forward_gives_the_eager_loss_and_gradients(tiny, monkeypatch):
    """Through Dynamo's graph capture and AOTAutograd (where a model's code breaks or changes numbers), not Inductor's
    C++ code generation: a cold cache compiles for half a minute on CPU (the GPU run of scripts/gpu_checks.sh is
    Inductor's)."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    _, _, path = tiny
    batch = collate_sft(_examples(2), 0, True)
    out = []
    for compiled in (False, True):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
        wrapped = train.wrap_for_training(model, dist.Dist(), CPU, TrainConfig(compile=compiled))
        loss = sft.token_loss_sum(wrapped, batches.to_device(batch, CPU), sft.supervised_positions(batch))
        loss.backward()
        out.append((loss.detach(), model.lm_head.weight.grad.clone(), type(wrapped).__name__))
    assert out[1][2] == "OptimizedModule" and out[0][2] != "OptimizedModule"
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-5) and torch.allclose(out[0][1], out[1][1], atol=1e-6)


def test_mfu_counts_every_matmul_parameter_and_needs_a_known_gpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    untied = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    tied = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=True))
    layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64   # attention, MLP, two norms
    assert flops.matmul_params(untied) == layer + 64 + 1000 * 64       # + final norm + LM head, no embedding
    assert flops.matmul_params(tied) == layer + 64 + 1000 * 64         # the tied table counts once, as the head
    assert flops.mfu(1e12, 1.0, CPU) is None
