"""The built-in tiny model: a randomly initialised Llama-architecture causal LM plus tokenizer, built on first use.

Why it exists
-------------
No model hub is reachable, and the toy task (`rlhf_cli.data.toy`) needs only a few hundred thousand parameters,
so the pipeline builds its own starting model. It is saved like any real checkpoint (``save_pretrained``,
safetensors), so every caller loads it with ``AutoModelForCausalLM.from_pretrained(path)`` /
``AutoTokenizer.from_pretrained(path)``: there is no special code path for "the tiny model".

Tokenizer
---------
Byte-level BPE trained (deterministically) on ``toy.corpus()``, so every toy word with its leading space
(" apple", " !") is one token, while any text at all (e.g. Anthropic HH dialogue) still tokenizes through the
256 byte symbols and decodes back unchanged. Special tokens: ``<pad>`` (0), ``<s>`` (1, bos), ``</s>`` (2, eos);
pad is distinct from eos so padding is never confused with a learned stop. Nothing is inserted automatically:
``tokenizer("text").input_ids`` holds only the text's tokens (adding EOS is the data layer's job), and there is
no chat template.

Cache
-----
Built into ``<cache_dir>/tiny-llama-<hash>`` where the hash covers every argument plus ``FORMAT_VERSION``
(bump it whenever the recipe changes). ``cache_dir`` defaults to ``$RLHF_CLI_CACHE`` or ``~/.cache/rlhf_cli``.
The build goes into a temporary sibling directory that is renamed into place only when complete, so a
half-built directory never counts as the cache; if another process (another torchrun rank) won the race, its
copy is used and ours discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

from rlhf_cli.errors import ArtifactError

FORMAT_VERSION = "tiny-llama-v1"
TOKENIZER_VOCAB_LIMIT = 2048  # upper bound; BPE training on the toy corpus stops well below it
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
_COMPLETE_MARKERS = ("config.json", "model.safetensors", "tokenizer.json")


def default_cache_dir() -> pathlib.Path:
    """`$RLHF_CLI_CACHE`, else `~/.cache/rlhf_cli`."""
    return pathlib.Path(os.environ.get("RLHF_CLI_CACHE") or pathlib.Path.home() / ".cache" / "rlhf_cli")


def tiny_model_path(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    seed: int = 0,
    cache_dir: str | None = None,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
) -> pathlib.Path:
    """The directory of the tiny model with these settings, building it first if it is not cached yet.
    vocab_size: the embedding and LM-head rows (default: the tokenizer's ~500; a benchmark asks for a realistic
    32k, whose ids past the tokenizer's decode to nothing); tie_word_embeddings=False gives the LM head its own
    weights, as most models at 1B+ have."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    settings = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
    }
    if vocab_size is not None or not tie_word_embeddings:  # only then: the default models keep their cache names
        settings |= {"vocab_size": vocab_size, "tie_word_embeddings": tie_word_embeddings}
    root = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = root / f"tiny-llama-h{hidden_size}-l{num_layers}-{_settings_hash(settings)}"
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        _build(tmp, **settings)
        os.rename(tmp, final)
    except OSError as error:
        if _is_complete(final):  # another process finished first: use theirs
            pass
        elif final.exists():
            raise ArtifactError(
                f"tiny model cache {final} exists but is incomplete", hint="delete that directory and rerun"
            ) from error
        else:
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return final


def _settings_hash(settings: dict) -> str:
    text = json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _is_complete(path: pathlib.Path) -> bool:
    return all((path / name).is_file() for name in _COMPLETE_MARKERS)


def _build(out: pathlib.Path, *, seed: int, max_position_embeddings: int, **sizes: int) -> None:
    from transformers.utils import logging as hf_logging

    tokenizer = build_tokenizer(model_max_length=max_position_embeddings)
    model = _build_model(tokenizer, seed=seed, max_position_embeddings=max_position_embeddings, **sizes)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no stray "Writing model shards" bar in the CLI's output
    try:
        model.save_pretrained(out)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)


def train_bpe():
    """A byte-level BPE `tokenizers.Tokenizer` trained on the toy corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from rlhf_cli.data import toy

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_LIMIT,
        min_frequency=1,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(toy.corpus(), trainer=trainer)
    # An explicit no-op template: transformers only installs its own post-processor when there is none.
    tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    return tokenizer


def build_tokenizer(model_max_length: int = 256):
    """The tiny model's tokenizer as a transformers fast tokenizer (not saved)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def _build_model(
    tokenizer,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    seed: int,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    generation = model.generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    return model
