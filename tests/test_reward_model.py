"""RewardModel: pooling under padding, dropout off, save/load round trip, causal and encoder backbones."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from rlhf_cli.config import ModelConfig
from rlhf_cli.errors import ArtifactError
from rlhf_cli.models.loading import resolve
from rlhf_cli.models.reward import RewardModel

TEXTS = ["give 1 fruit : fig !", "give 3 tool without saw : axe rake drill", "give 2 color : red"]


@pytest.fixture(scope="module")
def tiny_path():
    return resolve(ModelConfig())


def _scores(model, tokenizer, texts, side):
    tokenizer.padding_side = side
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"])


def test_causal_backbone_scores_last_token_under_any_padding(tiny_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    model = RewardModel.from_backbone(tiny_path, tokenizer).eval()
    assert model.pooling == "last" and not model.is_encoder
    right, left = _scores(model, tokenizer, TEXTS, "right"), _scores(model, tokenizer, TEXTS, "left")
    alone = torch.cat([_scores(model, tokenizer, [t], "right") for t in TEXTS])
    assert right.shape == (3,)
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)


def test_pooling_really_reads_the_last_token(tiny_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    model = RewardModel.from_backbone(tiny_path, tokenizer).eval()
    a = _scores(model, tokenizer, ["give 1 fruit : fig"], "right")
    b = _scores(model, tokenizer, ["give 1 fruit : fig !"], "right")
    assert not torch.allclose(a, b)  # appending a token changes the score: it is read at the end


def test_save_load_round_trip_gives_identical_scores(tiny_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    model = RewardModel.from_backbone(tiny_path, tokenizer).eval()
    torch.nn.init.normal_(model.head.weight)  # a trained-looking head
    model.score_stats = {"mean": 0.5, "std": 2.0, "n": 10}
    model.save_pretrained(tmp_path / "rm", tokenizer)
    again = RewardModel.from_pretrained(tmp_path / "rm").eval()
    assert again.pooling == "last" and again.score_stats == {"mean": 0.5, "std": 2.0, "n": 10}
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert torch.equal(_scores(model, tokenizer, TEXTS, "right"), _scores(again, tok2, TEXTS, "right"))
    AutoModel.from_pretrained(tmp_path / "rm")  # the backbone alone is a plain HF model


def test_encoder_backbone_pools_cls_and_turns_dropout_off(tiny_bert_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = RewardModel.from_backbone(str(tiny_bert_dir), tokenizer)
    assert model.is_encoder and model.pooling == "first"
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    model.train()  # even in train mode the scores are deterministic
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(model(enc["input_ids"], enc["attention_mask"]), model(enc["input_ids"], enc["attention_mask"]))
    model.eval()
    padded = model(enc["input_ids"], enc["attention_mask"])
    alone = torch.cat([model(**{k: v for k, v in tokenizer([t], return_tensors="pt").items()
                                if k != "token_type_ids"}) for t in TEXTS])
    assert torch.allclose(padded, alone, atol=1e-5)
    model.save_pretrained(tmp_path / "rm", tokenizer)
    assert RewardModel.from_pretrained(tmp_path / "rm").pooling == "first"


def test_pooling_override(tiny_bert_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    assert RewardModel.from_backbone(str(tiny_bert_dir), tokenizer, pooling="mean").pooling == "mean"


def test_loading_a_non_reward_directory_says_what_it_is(tiny_path):
    with pytest.raises(ArtifactError, match="not a reward model"):
        RewardModel.from_pretrained(tiny_path)
