"""Reward models from elsewhere and ours for elsewhere: any AutoModelForSequenceClassification with one label
(causal or encoder) scores in rlhf_cli exactly as in transformers, and our reward artifacts load with
AutoModelForSequenceClassification giving the same scores; the layout of earlier versions still loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification, LlamaConfig,
                          LlamaForSequenceClassification)

from helpers import FAST_PPO, compose_stage
from rlhf_cli.config import ModelConfig
from rlhf_cli.engine import checkpoint
from rlhf_cli.errors import ArtifactError, ConfigError
from rlhf_cli.models.loading import resolve
from rlhf_cli.models.reward import CONFIG_FILE, HEAD_FILE, RewardModel, load_reward_model
from rlhf_cli.rl.reward import pool
from rlhf_cli.stages import eval as eval_stage, ppo

TEXTS = ["give 1 fruit : fig !", "give 3 tool without saw : axe rake drill", "give 2 color : red"]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(resolve(ModelConfig()))


def _hf_scores(net, tokenizer, texts, side="right"):
    """What transformers itself gives: one forward of the batch, padded on `side` (each text alone when side is
    None), logits[:, 0]."""
    net.eval()
    with torch.no_grad():
        if side is None:
            return torch.cat([net(**tokenizer([t], return_tensors="pt")).logits[:, 0] for t in texts])
        tokenizer.padding_side = side
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        return net(**enc).logits[:, 0]


def _our_scores(model, tokenizer, texts, side="right"):
    model.eval()
    tokenizer.padding_side = side
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"])


def _seeded(cls, config, seed=0):
    torch.manual_seed(seed)
    net = cls(config)
    with torch.no_grad():  # a head that says something (HF initialises small)
        for name, p in net.named_parameters():
            if name.startswith(("score", "classifier")):
                p.normal_(0, 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def llama_rm(tmp_path_factory, tiny_tokenizer):
    """A tiny LlamaForSequenceClassification on the built-in tokenizer (TRL's RewardTrainer writes these)."""
    out = tmp_path_factory.mktemp("llama-rm")
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, num_labels=1,
                         pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    _seeded(LlamaForSequenceClassification, config).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2_rm(tmp_path_factory, tiny_tokenizer):
    """A tiny GPT2ForSequenceClassification whose tokenizer has no pad token and whose config names none either
    (GPT-2 style): padding must fall back to EOS, adding no token."""
    out = tmp_path_factory.mktemp("gpt2-rm")
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        num_labels=1, pad_token_id=None, bos_token_id=tiny_tokenizer.bos_token_id,
                        eos_token_id=tiny_tokenizer.eos_token_id)
    _seeded(GPT2ForSequenceClassification, config, seed=1).save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(resolve(ModelConfig()))
    tok.pad_token = None
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bert_rm(tmp_path_factory, tiny_bert_dir):
    out = tmp_path_factory.mktemp("bert-rm")
    config = BertConfig.from_pretrained(tiny_bert_dir, num_labels=1)
    _seeded(BertForSequenceClassification, config, seed=2).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(out)
    return out


def test_causal_sequence_classifier_scores_as_in_transformers_under_any_padding(llama_rm):
    model, tokenizer = load_reward_model(str(llama_rm))
    assert model.pooling == "last" and not model.is_encoder and model.head.bias is None
    net = AutoModelForSequenceClassification.from_pretrained(llama_rm)
    expected = _hf_scores(net, tokenizer, TEXTS, side=None)
    assert torch.allclose(_hf_scores(net, tokenizer, TEXTS, "right"), expected, atol=1e-6)
    assert torch.allclose(_our_scores(model, tokenizer, TEXTS, "right"), expected, atol=1e-6)
    assert torch.allclose(_our_scores(model, tokenizer, TEXTS, "left"), expected, atol=1e-6)
    enc = tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():  # per-token values (PPO's value model) read the same head at every position
        values = model(enc["input_ids"], enc["attention_mask"], per_token=True)
    assert values.shape == enc["input_ids"].shape and torch.allclose(values[0, -1], expected[0], atol=1e-6)


def test_gpt2_classifier_without_a_pad_token_pads_with_eos(gpt2_rm):
    model, tokenizer = load_reward_model(str(gpt2_rm))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and model.pad_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == model.backbone.get_input_embeddings().weight.shape[0]  # no token added
    net = AutoModelForSequenceClassification.from_pretrained(gpt2_rm)
    expected = _hf_scores(net, tokenizer, TEXTS, side=None)
    assert torch.allclose(_our_scores(model, tokenizer, TEXTS, "right"), expected, atol=1e-5)
    assert torch.allclose(_our_scores(model, tokenizer, TEXTS, "left"), expected, atol=1e-5)


def test_encoder_classifier_scores_as_in_transformers(bert_rm):
    model, tokenizer = load_reward_model(str(bert_rm))
    assert model.is_encoder and model.pooling == "first"
    net = AutoModelForSequenceClassification.from_pretrained(bert_rm)
    expected = _hf_scores(net, tokenizer, TEXTS, side="right")
    assert torch.allclose(_our_scores(model, tokenizer, TEXTS, "right"), expected, atol=1e-6)
    assert torch.allclose(expected, _hf_scores(net, tokenizer, TEXTS, side=None), atol=1e-5)
    with pytest.raises(ValueError, match="per-token"):
        model(torch.tensor([[2, 5, 3]]), torch.ones(1, 3, dtype=torch.long), per_token=True)


def test_a_classifier_with_two_labels_or_a_plain_lm_is_refused(tmp_path, tiny_tokenizer):
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, num_labels=2)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "two")
    with pytest.raises(ArtifactError, match="2 labels; a reward model has one"):
        RewardModel.from_pretrained(tmp_path / "two")
    with pytest.raises(ArtifactError, match="not a reward model"):
        RewardModel.from_pretrained(resolve(ModelConfig()))


def test_our_causal_reward_model_is_a_sequence_classifier_on_disk(tmp_path, tiny_tokenizer):
    path = resolve(ModelConfig())
    model = RewardModel.from_backbone(path, tiny_tokenizer)
    assert model.head.bias is None and model.layout() == "sequence_classification"
    torch.nn.init.normal_(model.head.weight)
    model.score_stats = {"mean": 0.5, "std": 2.0, "n": 10}
    model.save_pretrained(tmp_path / "rm", tiny_tokenizer)
    ours = _our_scores(model, tiny_tokenizer, TEXTS)
    net = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert type(net).__name__ == "LlamaForSequenceClassification" and net.config.num_labels == 1
    assert torch.allclose(_hf_scores(net, tiny_tokenizer, TEXTS, "right"), ours, atol=1e-6)
    again = RewardModel.from_pretrained(tmp_path / "rm")
    assert again.score_stats == {"mean": 0.5, "std": 2.0, "n": 10} and again.pooling == "last"
    assert torch.equal(_our_scores(again, tiny_tokenizer, TEXTS), ours)
    AutoModel.from_pretrained(tmp_path / "rm")  # the body alone still loads too
    value = again.add_head_bias()  # PPO's value model learns the level of the returns with a bias, from 0
    assert value.head.bias.requires_grad and torch.equal(_our_scores(value, tiny_tokenizer, TEXTS), ours)


def test_our_encoder_reward_model_trains_the_architectures_own_head(tmp_path, tiny_bert_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = RewardModel.from_backbone(str(tiny_bert_dir), tokenizer)
    assert model.is_encoder and model.pooling == "first" and model.layout() == "sequence_classification"
    assert type(model.backbone).__name__ == "BertModel"  # where LoRA and gradient checkpointing go
    model.save_pretrained(tmp_path / "rm", tokenizer)
    net = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    ours = _our_scores(model, tokenizer, TEXTS)
    assert torch.allclose(_hf_scores(net, tokenizer, TEXTS), ours, atol=1e-6)
    assert torch.allclose(_our_scores(RewardModel.from_pretrained(tmp_path / "rm"), tokenizer, TEXTS), ours, atol=1e-6)
    mean = RewardModel.from_backbone(str(tiny_bert_dir), tokenizer, pooling="mean")  # no HF convention: our layout
    assert mean.layout() == "backbone_and_head" and mean.head.bias is not None
    mean.save_pretrained(tmp_path / "mean", tokenizer)
    assert (tmp_path / "mean" / HEAD_FILE).is_file()
    assert torch.allclose(_our_scores(RewardModel.from_pretrained(tmp_path / "mean"), tokenizer, TEXTS),
                          _our_scores(mean, tokenizer, TEXTS), atol=1e-6)


def test_the_layout_of_earlier_versions_still_loads(tmp_path, tiny_tokenizer):
    """backbone directory + reward_head.safetensors (a head with a bias) + reward_config.json without `layout`."""
    path = resolve(ModelConfig())
    backbone = AutoModel.from_pretrained(path)
    backbone.save_pretrained(tmp_path / "old")
    tiny_tokenizer.save_pretrained(tmp_path / "old")
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(1, 64, generator=g), torch.tensor([0.7])
    save_file({"weight": w, "bias": b}, str(tmp_path / "old" / HEAD_FILE))
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps({"pooling": "last", "pad_token_id": 0, "is_encoder": False,
                                                            "hidden_size": 64, "score_stats": {"mean": 1.0}}))
    model = RewardModel.from_pretrained(tmp_path / "old")
    assert model.layout() == "backbone_and_head" and model.score_stats == {"mean": 1.0}
    tiny_tokenizer.padding_side = "right"
    enc = tiny_tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = backbone.eval()(**enc).last_hidden_state
    expected = pool(hidden, enc["attention_mask"], "last") @ w[0] + b  # w · h_last + b, by hand
    assert torch.allclose(_our_scores(model, tiny_tokenizer, TEXTS), expected, atol=1e-5)
    (tmp_path / "old" / HEAD_FILE).unlink()
    with pytest.raises(ArtifactError, match="no reward_head.safetensors"):
        RewardModel.from_pretrained(tmp_path / "old")


def test_a_causal_classifier_whose_pad_is_eos_is_read_where_transformers_reads_it(tmp_path, tiny_tokenizer):
    """TRL sets pad = EOS on Llama reward models: transformers then reads the rightmost token that is not EOS, so a
    text's trailing EOS (which the causal reward tokenisation appends) is passed over, here as there."""
    eos = tiny_tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, num_labels=1,
                         pad_token_id=eos, eos_token_id=eos)
    _seeded(LlamaForSequenceClassification, config, seed=4).save_pretrained(tmp_path / "rm")
    tok = AutoTokenizer.from_pretrained(resolve(ModelConfig()))
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "rm")
    model, tokenizer = load_reward_model(str(tmp_path / "rm"))
    assert tokenizer.pad_token_id == eos and model.skip_token_id == eos
    assert len(tokenizer) == model.backbone.get_input_embeddings().weight.shape[0]  # no token added
    net = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    rows = [tokenizer(t)["input_ids"] + [eos] for t in TEXTS]
    with torch.no_grad():
        expected = torch.cat([net(input_ids=torch.tensor([ids])).logits[:, 0] for ids in rows])
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
            assert torch.allclose(model.eval()(batch["input_ids"], batch["attention_mask"]), expected, atol=1e-6)
    assert RewardModel.from_backbone(resolve(ModelConfig()), tiny_tokenizer).skip_token_id is None  # ours: the mask


def test_a_reward_artifact_of_ours_loads_by_hub_id(tmp_path, tiny_tokenizer, monkeypatch):
    """Our files beside the weights (reward_config.json, reward_head.safetensors) come from the hub too: an artifact
    pushed to the hub (here: in the offline hub cache) loads by its id with its layout and score statistics."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--org--rm"
    model = RewardModel.from_backbone(resolve(ModelConfig()), tiny_tokenizer, pooling="mean")
    torch.nn.init.normal_(model.head.weight)
    model.score_stats = {"mean": 1.5}
    model.save_pretrained(repo / "snapshots" / ("a" * 40), tiny_tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    again, tokenizer = load_reward_model("org/rm")
    assert again.layout() == "backbone_and_head" and again.score_stats == {"mean": 1.5}
    assert torch.equal(_our_scores(again, tokenizer, TEXTS), _our_scores(model, tiny_tokenizer, TEXTS))
    with pytest.raises(ConfigError, match="org/absent is neither a local directory nor in the local"):
        RewardModel.from_pretrained("org/absent")   # offline and not in the cache: models.loading.check_source


@pytest.mark.parametrize("kind", ["causal", "encoder"])
def test_checkpoints_round_trip_both_forms(kind, tmp_path, tiny_tokenizer, tiny_bert_dir):
    path, tokenizer = ((resolve(ModelConfig()), tiny_tokenizer) if kind == "causal"
                       else (str(tiny_bert_dir), AutoTokenizer.from_pretrained(tiny_bert_dir)))
    torch.manual_seed(0)
    model = RewardModel.from_backbone(path, tokenizer)
    checkpoint.save_weights(model, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    fresh = RewardModel.from_backbone(path, tokenizer)
    assert not torch.equal(_our_scores(fresh, tokenizer, TEXTS), _our_scores(model, tokenizer, TEXTS))
    checkpoint.load_weights(fresh, tmp_path / "model.safetensors")
    assert torch.equal(_our_scores(fresh, tokenizer, TEXTS), _our_scores(model, tokenizer, TEXTS))


# ---- the stages ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(trained_experiment):
    """Experiment `demo` with finished sft, reward and ppo artifacts; runs of the tests' own go under tmp_path."""
    return trained_experiment


@pytest.mark.parametrize("rm", ["llama_rm", "gpt2_rm", "bert_rm"])
def test_ppo_and_eval_take_an_off_the_shelf_reward_model(rm, root, request, tmp_path):
    rm_dir = request.getfixturevalue(rm)
    run_dir = tmp_path / f"ppo_{rm}"
    metrics = ppo.run(compose_stage("ppo", [*FAST_PPO, "experiment=demo", f"root={root}", f"model.reward={rm_dir}",
                                            "train.max_steps=2"], run_dir))
    assert metrics["iterations"] == 2
    # only the llama RM shares the policy's tokenizer (the gpt2 one pads with EOS): the others score decoded text
    assert json.loads((run_dir / "manifest.json").read_text())["ppo"]["same_tokenizer_as_reward"] is (rm == "llama_rm")
    # the scores PPO logged are what transformers gives for the decoded texts, re-tokenised as the reward stage
    # reads them (the llama RM shares the policy's tokenizer: ids go straight through, checked below)
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    net = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    for row in rows[:2] if rm != "llama_rm" else []:
        if rm == "gpt2_rm":  # causal: prompt + response + EOS
            ids = tokenizer(row["prompt"] + row["response"], add_special_tokens=False)["input_ids"]
            ids = ids + [tokenizer.eos_token_id]
        else:
            ids = tokenizer(row["prompt"], row["response"])["input_ids"]
        with torch.no_grad():
            expected = net(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert row["score"] == pytest.approx(expected, abs=2e-3), row
    report = eval_stage.run(compose_stage("eval", ["experiment=demo", f"root={root}", f"reward.model={rm_dir}",
                                                   f"policies=[{root / 'demo' / 'sft'},{run_dir}]", "num_prompts=8",
                                                   "response_length=8", "checkpoints=false"],
                                          tmp_path / f"eval_{rm}"))
    assert report["reward_model"] == str(rm_dir) and len(report["policies"]) == 2


def test_same_token_scoring_of_rollouts_matches_transformers(llama_rm, root, tiny_tokenizer):
    """The llama RM reads the policy's token ids as sampled (left-padded prompts, padded responses): each row's
    score is transformers' score of that row's real tokens alone."""
    from rlhf_cli.data import toy
    from rlhf_cli.data.prompts import encode_prompts
    from rlhf_cli.engine.rollout import Scorer, sample, score_responses
    from rlhf_cli.models.loading import load_causal_lm, same_tokenizer

    policy, tok, _ = load_causal_lm(ModelConfig(name_or_path=str(root / "demo" / "sft" / "model")), torch.device("cpu"))
    model, rm_tok = load_reward_model(str(llama_rm))
    assert same_tokenizer(tok, rm_tok)
    ids, _ = encode_prompts([r["prompt"] for r in toy.prompt_rows(6, 0, "train")], tok, 64)
    torch.manual_seed(0)
    samples = sample(policy.eval(), ids, 8, 1.0, 6, tok.pad_token_id, tok.eos_token_id, torch.device("cpu"))
    with torch.no_grad():
        scores = score_responses(Scorer(model.eval(), rm_tok, True, 512), samples, [], [], 6)
        net = AutoModelForSequenceClassification.from_pretrained(llama_rm).eval()
        expected = torch.cat([net(input_ids=row[mask.bool()][None]).logits[:, 0]
                              for row, mask in zip(samples.input_ids, samples.attention_mask)])
    assert torch.allclose(scores, expected, atol=1e-5)


def test_a_reward_artifact_works_in_transformers_end_to_end(root):
    run_dir = root / "demo" / "reward"
    model, tokenizer = load_reward_model(str(run_dir / "model"))
    net = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert torch.allclose(_hf_scores(net, tokenizer, TEXTS, "right"), _our_scores(model, tokenizer, TEXTS), atol=1e-6)
    assert model.score_stats["std"] > 0  # the held-out statistics PPO normalises with came along
