"""Model loading: local paths through from_pretrained, a pad token distinct from EOS, clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_cli.config import ModelConfig
from rlhf_cli.errors import ConfigError
from rlhf_cli.models.loading import PAD_TOKEN, ensure_pad_token, load_causal_lm, no_dropout, resolve, same_tokenizer


@pytest.fixture
def no_pad_model_dir(tmp_path):
    """A local HF model whose tokenizer reuses EOS as pad (as GPT-2-style tokenizers do)."""
    src = resolve(ModelConfig())
    model = AutoModelForCausalLM.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_pad_equal_to_eos_gets_a_distinct_pad_and_resized_embeddings(no_pad_model_dir):
    cfg = ModelConfig(name_or_path=str(no_pad_model_dir))
    model, tokenizer, info = load_causal_lm(cfg, torch.device("cpu"))
    assert info["added_pad_token"] is True
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer(["give 1 fruit :", "give 3 tool without saw :"], padding=True, return_tensors="pt")
    assert (ids.input_ids == tokenizer.pad_token_id).any()
    model(**ids)  # the new row of the embedding is usable


def test_builtin_model_keeps_its_pad():
    model, tokenizer, info = load_causal_lm(ModelConfig(), torch.device("cpu"))
    assert info["added_pad_token"] is False and tokenizer.pad_token == "<pad>"
    assert not model.config.to_dict().get("auto_map")  # nothing that would need trust_remote_code


def test_tokenizer_without_eos_is_refused(no_pad_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(no_pad_model_dir)
    tokenizer.eos_token = None
    with pytest.raises(ConfigError, match="EOS"):
        ensure_pad_token(tokenizer)


def test_missing_model_names_the_path_and_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "nowhere")), torch.device("cpu"))
    assert "nowhere" in str(err.value) and err.value.hint


def test_unknown_builtin_is_refused():
    with pytest.raises(ConfigError, match="builtin:tiny"):
        resolve(ModelConfig(name_or_path="builtin:huge"))


def test_same_tokenizer_compares_vocab_eos_and_pad(no_pad_model_dir, tiny_bert_dir):
    builtin = AutoTokenizer.from_pretrained(resolve(ModelConfig()))
    assert same_tokenizer(builtin, AutoTokenizer.from_pretrained(resolve(ModelConfig())))
    assert not same_tokenizer(builtin, AutoTokenizer.from_pretrained(tiny_bert_dir))     # another vocabulary
    pad_is_eos = AutoTokenizer.from_pretrained(no_pad_model_dir)                         # same vocab, pad = EOS
    assert pad_is_eos.get_vocab() == builtin.get_vocab() and not same_tokenizer(builtin, pad_is_eos)
    other_eos = AutoTokenizer.from_pretrained(resolve(ModelConfig()))
    other_eos.eos_token = other_eos.pad_token                                            # same vocab, EOS moved
    assert other_eos.get_vocab() == builtin.get_vocab() and not same_tokenizer(builtin, other_eos)


def test_no_dropout_zeroes_every_dropout_probability():
    from transformers import BertConfig

    config = BertConfig(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2, classifier_dropout=0.3)
    no_dropout(config)
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob, config.classifier_dropout) == (0, 0, 0)
    assert config.hidden_size == 768  # nothing else touched


def test_load_causal_lm_can_turn_dropout_off(tmp_path):
    src = resolve(ModelConfig())
    model = AutoModelForCausalLM.from_pretrained(src, attention_dropout=0.1)
    model.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"))
    assert load_causal_lm(cfg, torch.device("cpu"))[0].config.attention_dropout == 0.1
    assert load_causal_lm(cfg, torch.device("cpu"), dropout=False)[0].config.attention_dropout == 0.0
