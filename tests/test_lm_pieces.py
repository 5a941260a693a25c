"""The LM pieces every stage can reach below the stages: per-row sequence log-probs (rl), where a tokenized
response starts and a response tokenized alone (data.preference), pair and sequence scoring and frozen loading
(models). Numbers by hand where they are math; equality with the path they replace where they are plumbing."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.data.preference import collate_pairs, tokenize_pairs, tokenize_responses
from rlhf_cli.models.loading import load_causal_lm, load_frozen_lm
from rlhf_cli.config import ModelConfig
from rlhf_cli.models.reward import (RewardModel, load_frozen_reward_model, load_reward_model, score_padded,
                                    score_pairs, score_sequences)
from rlhf_cli.models.tiny import tiny_model_path
from rlhf_cli.rl.ppo import sequence_logprobs

# ---- rl.ppo.sequence_logprobs ----------------------------------------------------------------------------------


def test_sequence_logprobs_by_hand():
    # every position: z = [0, ln 3] -> p = [1/4, 3/4]; at T = 2: z/2 = [0, ln √3] -> p = [1/(1+√3), √3/(1+√3)]
    logits = torch.tensor([0.0, math.log(3.0)]).expand(3, 3, 2).clone()
    tokens = torch.tensor([[1, 0, -100], [1, 1, 1], [0, 7, 1]])      # -100 and 7 sit where the mask is 0
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]])
    got = sequence_logprobs(logits, tokens, mask, 1.0)
    want = torch.tensor([math.log(3 / 4) + math.log(1 / 4), 0.0, math.log(1 / 4) + math.log(3 / 4)])
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert torch.allclose(got, want, atol=1e-6)
    root3 = math.sqrt(3.0)
    hot = sequence_logprobs(logits, tokens, mask.bool(), 2.0)
    assert hot[0].item() == pytest.approx(math.log(root3 / (1 + root3)) + math.log(1 / (1 + root3)), abs=1e-6)


def test_sequence_logprobs_gradient_is_that_of_the_masked_tokens_only():
    logits = torch.zeros(1, 2, 2, requires_grad=True)                # p = [1/2, 1/2] at both positions
    sequence_logprobs(logits, torch.tensor([[1, 0]]), torch.tensor([[1, 0]]), 1.0).sum().backward()
    # d log p_1 / dz = onehot(1) - p = [-1/2, 1/2] at the counted position, nothing at the masked one
    assert torch.equal(logits.grad, torch.tensor([[[-0.5, 0.5], [0.0, 0.0]]]))


# ---- data.preference: where a response starts, a response tokenized alone ----------------------------------------


@pytest.fixture(scope="module")
def tiny_dir():
    return tiny_model_path()


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


PROMPTS = ["Human: say something kind about cats. Assistant:", "Human: hi. Assistant:",
           "Human: " + "tell me a long story about a dog and a cat " * 6 + "Assistant:"]
RESPONSES = [" cats are warm and gentle friends", " hello", " once upon a time there was a dog " * 8]


def test_the_response_starts_after_the_prompt_in_pairs_and_alone(tokenizer):
    rows = [{"prompt": p, "chosen": r, "rejected": r[: len(r) // 2]} for p, r in zip(PROMPTS, RESPONSES)]
    pairs, stats = tokenize_pairs(rows, tokenizer, 48, encoder=False)
    alone = tokenize_responses(PROMPTS, RESPONSES, tokenizer, 48, encoder=False)
    assert stats["truncated"] >= 1   # the long row is cut: the start moves with the kept prompt
    for pair, one, prompt, response in zip(pairs, alone, PROMPTS, RESPONSES):
        # a response scored alone is read exactly as the chosen side of a pair
        assert one == {"input_ids": pair["chosen_ids"], "response_start": pair["chosen_start"]}
        ids, start = one["input_ids"], one["response_start"]
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert ids[start:] == response_ids[: len(ids) - start]                  # from the first response token
        assert ids[:start] == ([tokenizer.bos_token_id] if ids[0] == tokenizer.bos_token_id else []) + \
            prompt_ids[len(prompt_ids) - (start - (ids[0] == tokenizer.bos_token_id)):]
    short = alone[1]
    assert short["input_ids"][-1] == tokenizer.eos_token_id and len(short["input_ids"]) < 48


# ---- models.reward: pair and sequence scoring ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(tiny_dir, tokenizer):
    torch.manual_seed(0)
    model = RewardModel.from_backbone(str(tiny_dir), tokenizer, pooling="last").eval()
    with torch.no_grad():
        model.head.weight.normal_()                                        # scores of a few units, not ~0
    return model


def old_fake_pair_scores(model, tokenizer, prompts, responses, max_len, micro) -> torch.Tensor:
    """What engine.rollout.score_responses did before score_sequences: each response as a pair whose chosen and
    rejected are both it, collated as pairs, the chosen rows scored."""
    rows = [{"prompt": p, "chosen": r, "rejected": r} for p, r in zip(prompts, responses)]
    examples, _ = tokenize_pairs(rows, tokenizer, max_len, model.is_encoder, source="rollout")
    scores = []
    for i in range(0, len(examples), micro):
        batch = collate_pairs(examples[i:i + micro], tokenizer.pad_token_id)
        n = len(examples[i:i + micro])
        scores.append(model(batch["input_ids"][:n], batch["attention_mask"][:n]).float())
    return torch.cat(scores)


@pytest.fixture(scope="module")
def encoder_reward_model(tiny_bert_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    torch.manual_seed(0)
    return RewardModel.from_backbone(str(tiny_bert_dir), tokenizer).eval(), tokenizer


@pytest.mark.parametrize("micro", [1, 2, 4])
@pytest.mark.parametrize("kind", ["causal", "encoder"])
def test_scoring_sequences_directly_is_bit_identical_to_the_fake_pair_path(kind, micro, request):
    model, tok = ((request.getfixturevalue("reward_model"), request.getfixturevalue("tokenizer")) if kind == "causal"
                  else request.getfixturevalue("encoder_reward_model"))
    prompts, responses = PROMPTS * 2, RESPONSES + [" no", " yes yes", " cats"]
    with torch.no_grad():
        old = old_fake_pair_scores(model, tok, prompts, responses, 48, micro)
        tokenized = tokenize_responses(prompts, responses, tok, 48, model.is_encoder)
        new = score_sequences(model, [x["input_ids"] for x in tokenized], tok.pad_token_id, torch.device("cpu"), micro)
    assert torch.equal(old, new)
    assert old.std() > 0


def test_score_pairs_reads_chosen_then_rejected_padded_or_packed(reward_model, tokenizer):
    rows = [{"prompt": p, "chosen": r, "rejected": " no"} for p, r in zip(PROMPTS, RESPONSES)]
    examples, _ = tokenize_pairs(rows, tokenizer, 48, encoder=False)
    with torch.no_grad():
        rc, rr = score_pairs(reward_model, collate_pairs(examples, tokenizer.pad_token_id))
        packed_c, packed_r = score_pairs(reward_model, collate_pairs(examples, tokenizer.pad_token_id, packing=True))
        alone_c = score_sequences(reward_model, [ex["chosen_ids"] for ex in examples], tokenizer.pad_token_id,
                                  torch.device("cpu"), 1)
        alone_r = score_sequences(reward_model, [ex["rejected_ids"] for ex in examples], tokenizer.pad_token_id,
                                  torch.device("cpu"), 1)
    assert rc.shape == rr.shape == (3,) and rc.dtype == torch.float32
    for got_c, got_r in ((rc, rr), (packed_c, packed_r)):
        assert torch.allclose(got_c, alone_c, atol=1e-5) and torch.allclose(got_r, alone_r, atol=1e-5)
    assert not torch.allclose(rc, rr)


def test_score_padded_in_micro_batches_is_one_score_per_row(reward_model, tokenizer):
    ids = [tokenizer(p + r).input_ids for p, r in zip(PROMPTS, RESPONSES)]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])   # left-padded
    mask = (torch.arange(width) >= torch.tensor([width - len(x) for x in ids]).unsqueeze(1)).long()
    with torch.no_grad():
        whole = score_padded(reward_model, input_ids, mask, 3)
        split = score_padded(reward_model, input_ids, mask, 2)
        right = score_sequences(reward_model, ids, tokenizer.pad_token_id, torch.device("cpu"), 3)
    assert whole.shape == (3,)
    assert torch.allclose(whole, split, atol=1e-5) and torch.allclose(whole, right, atol=1e-5)


# ---- models: frozen roles -----------------------------------------------------------------------------------------


def test_frozen_roles_load_read_only_in_the_asked_dtype(tiny_dir, reward_model, tokenizer, tmp_path):
    lm, lm_tokenizer = load_frozen_lm(str(tiny_dir), torch.device("cpu"), torch.bfloat16)
    trained, _, _ = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir)), torch.device("cpu"), dropout=False)
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    assert lm_tokenizer.get_vocab() == tokenizer.get_vocab()
    for (name, a), (_, b) in zip(lm.named_parameters(), trained.named_parameters()):
        assert torch.equal(a, b.to(torch.bfloat16)), name

    reward_model.save_pretrained(tmp_path / "rm", tokenizer)
    frozen, rm_tokenizer = load_frozen_reward_model(str(tmp_path / "rm"), torch.device("cpu"), torch.float32)
    plain, _ = load_reward_model(str(tmp_path / "rm"))
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert rm_tokenizer.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([tokenizer(PROMPTS[0] + RESPONSES[0]).input_ids])
    with torch.no_grad():
        assert torch.equal(frozen(ids, torch.ones_like(ids)), plain.eval()(ids, torch.ones_like(ids)))
