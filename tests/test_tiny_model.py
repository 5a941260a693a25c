"""The built-in tiny Llama model: build, load like a real checkpoint, tokenizer behaviour, cache, determinism."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_cli.data import toy
from rlhf_cli.errors import ArtifactError
from rlhf_cli.models import tiny

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def default_path(cache: pathlib.Path) -> pathlib.Path:
    return tiny.tiny_model_path(cache_dir=str(cache))


@pytest.fixture(scope="module")
def tokenizer(default_path: pathlib.Path):
    return AutoTokenizer.from_pretrained(default_path)


@pytest.fixture(scope="module")
def model(default_path: pathlib.Path):
    return AutoModelForCausalLM.from_pretrained(default_path)


def test_builds_and_loads_like_a_real_checkpoint(default_path: pathlib.Path, model, tokenizer) -> None:
    assert (default_path / "model.safetensors").is_file()
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2


def test_special_tokens(model, tokenizer) -> None:
    assert tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    for config in (model.config, model.generation_config):
        assert config.pad_token_id == tokenizer.pad_token_id
        assert config.bos_token_id == tokenizer.bos_token_id
        assert config.eos_token_id == tokenizer.eos_token_id
    assert not tokenizer.chat_template


def test_no_special_tokens_are_inserted(tokenizer) -> None:
    ids = tokenizer("give 3 fruit :").input_ids
    assert ids == tokenizer.convert_tokens_to_ids(tokenizer.tokenize("give 3 fruit :"))
    assert not set(ids) & {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}


def test_toy_words_are_single_tokens(tokenizer) -> None:
    words = {word for text in toy.corpus() for word in text.split()}
    for word in words:
        assert len(tokenizer(" " + word).input_ids) == 1, word
    assert len(tokenizer("give").input_ids) == 1
    prompt = "give 3 fruit without apple :"
    assert len(tokenizer(prompt + " fig plum pear !").input_ids) == 10


@pytest.mark.parametrize(
    "text",
    [
        "\n\nHuman: What's the capital of France?\n\nAssistant: It's Paris , I think.",
        "  leading and trailing spaces  ",
        "ünïcödé ☃ 你好 🙂\ttabs",
        "give 3 fruit : fig plum pear !",
        "a , b 's . n't",
    ],
)
def test_any_text_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text


def test_forward_and_generate(model, tokenizer) -> None:
    batch = tokenizer(["give 3 fruit :", "give 1 animal without cat :"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tokenizer))
    out = model.generate(**tokenizer(["give 3 fruit :"], return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= 4 + 5
    assert isinstance(tokenizer.decode(out[0]), str)


def test_second_call_reuses_the_cache(cache: pathlib.Path, default_path: pathlib.Path, monkeypatch) -> None:
    mtime = (default_path / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny, "_build", fail)
    assert tiny.tiny_model_path(cache_dir=str(cache)) == default_path
    assert (default_path / "model.safetensors").stat().st_mtime_ns == mtime


def test_cache_dir_defaults_to_env(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setenv("RLHF_CLI_CACHE", str(tmp_path))
    assert tiny.default_cache_dir() == tmp_path


def test_different_settings_get_different_paths(cache: pathlib.Path, default_path: pathlib.Path) -> None:
    small = tiny.tiny_model_path(**SMALL, cache_dir=str(cache))
    other_seed = tiny.tiny_model_path(**SMALL, seed=1, cache_dir=str(cache))
    assert len({default_path, small, other_seed}) == 3
    assert AutoModelForCausalLM.from_pretrained(small).config.hidden_size == 32


def _weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_same_seed_gives_identical_weights_and_keeps_global_rng(tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    fresh = tiny.tiny_model_path(**SMALL, cache_dir=str(tmp_path))
    assert torch.equal(torch.rand(3), expected_next)  # the build did not consume the caller's RNG

    cached = tiny.tiny_model_path(**SMALL, cache_dir=str(cache))
    assert fresh != cached
    a, b = _weights(fresh), _weights(cached)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _weights(tiny.tiny_model_path(**SMALL, seed=1, cache_dir=str(cache)))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tokenizer_training_is_deterministic() -> None:
    assert tiny.train_bpe().to_str() == tiny.train_bpe().to_str()


def test_losing_the_build_race_uses_the_winners_copy(tmp_path: pathlib.Path, monkeypatch) -> None:
    real_build = tiny._build
    winner: list[pathlib.Path] = []

    def build_while_another_rank_finishes(out: pathlib.Path, **settings) -> None:
        real_build(out, **settings)
        final = out.parent / out.name.split(".tmp-")[0].lstrip(".")
        real_build(final, **settings)  # the other process renames its copy into place first
        winner.append(final)

    monkeypatch.setattr(tiny, "_build", build_while_another_rank_finishes)
    path = tiny.tiny_model_path(**SMALL, cache_dir=str(tmp_path))
    assert [path] == winner
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # our temporary copy was discarded


def test_half_built_directories_never_count(tmp_path: pathlib.Path) -> None:
    path = tiny.tiny_model_path(**SMALL, cache_dir=str(tmp_path))
    other = tmp_path / "other"
    stale_tmp = other / f".{path.name}.tmp-crashed"
    stale_tmp.mkdir(parents=True)
    (stale_tmp / "config.json").write_text("{}")
    rebuilt = tiny.tiny_model_path(**SMALL, cache_dir=str(other))
    assert rebuilt.name == path.name and (rebuilt / "model.safetensors").is_file()

    broken = tmp_path / "broken"
    (broken / path.name).mkdir(parents=True)
    (broken / path.name / "config.json").write_text("{}")
    with pytest.raises(ArtifactError):
        tiny.tiny_model_path(**SMALL, cache_dir=str(broken))
    assert [p.name for p in broken.iterdir()] == [path.name]
