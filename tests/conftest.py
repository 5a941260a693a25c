"""Shared test set-up: offline hubs, one cache for the built-in tiny model, and the pytest fixtures. Constants and
plain helpers (FAST_SFT, run_cli, compose_stage, ...) live in helpers.py: `from helpers import ...`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("RLHF_CLI_CACHE", str(Path(tempfile.gettempdir()) / "rlhf_cli_test_cache"))
os.environ.pop("HYDRA_FULL_ERROR", None)

from helpers import HH_FILE  # noqa: E402  (after the environment is set)


@pytest.fixture
def hh_file() -> Path:
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is absent (CI always has ../shared/data beside the checkout)")
    return HH_FILE


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised BERT encoder with a WordPiece tokenizer, saved like a hub model: the stand-in
    for an encoder reward model (all-MiniLM-style) in tests."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from rlhf_cli.data import toy

    out = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for text in toy.corpus() for w in text.split()} | {"human", "assistant", "hello", "no"})
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(out / "vocab.txt"))  # transformers 5 ignores vocab_file=
    assert tokenizer.unk_token_id not in tokenizer("give fig").input_ids
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
