"""SFT data: validate and normalise rows, render them to text and tokenise them with a truncation policy (the
shared pieces live in `rlhf_cli.data.text`), collate batches.

Row formats (`fmt`):

- `prompt_completion`: `{"prompt": str, "completion": str}`.
- `messages`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`; the last message is the
  assistant's reply that is trained on, and at least one message comes before it.
- `hh`: `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."}` (Anthropic HH); becomes a prompt/completion row.
- `auto` decides per row: `messages` -> chat; `prompt` or `completion` -> plain; `chosen` -> HH.

A field whose value is `None` counts as missing: `datasets` fills fields absent from a row with `None`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlhf_cli.data.hh import hh_to_sft
from rlhf_cli.data.loading import Source, row_location, source_for
from rlhf_cli.data.text import (bos_policy, check_message, describe, encode_texts, present, render, split_bos,
                                truncate_pair)
from rlhf_cli.errors import ConfigError, DataError

FORMATS = ("auto", "prompt_completion", "messages", "hh")
IGNORE_INDEX = -100
_HINTS = {
    "prompt_completion": 'plain rows look like {"prompt": "...", "completion": "..."}',
    "messages": 'chat rows look like {"messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}]}',
    "hh": 'HH rows look like {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."}',
}


# ---------------------------------------------------------------------------------------------------------------------
# Normalising


def normalize_sft_rows(rows: list[dict], source: Source | str, fmt: str = "auto") -> list[dict]:
    """Validate `rows` and return them as `{"prompt", "completion"}` or `{"messages"}` rows (other fields dropped).

    Raise DataError naming the row (`loading.row_location`: its file and line, or "row N") and the field for: a
    missing field, a wrong type, an empty
    (blank) completion or final assistant message, a chat not ending with an assistant message or with nothing
    before it, a role outside system/user/assistant. An empty HH reply is allowed (see `rlhf_cli.data.hh`).
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown SFT data format '{fmt}'", hint=f"use one of: {', '.join(FORMATS)}")
    normalised = []
    for index, row in enumerate(rows):
        where = row_location(source, index)
        if not isinstance(row, dict):
            raise DataError(f"{where} is not an object (got {type(row).__name__})", hint=_HINTS["prompt_completion"])
        row_fmt = fmt if fmt != "auto" else _detect_format(row, where)
        normalised.append(_NORMALISERS[row_fmt](row, where))
    return normalised


def _detect_format(row: dict, where: str) -> str:
    if present(row, "messages"):
        return "messages"
    if present(row, "prompt") or present(row, "completion"):
        return "prompt_completion"
    if present(row, "chosen"):
        return "hh"
    fields = ", ".join(repr(key) for key in row if present(row, key)) or "none"
    raise DataError(
        f"{where}: no SFT fields found: expected 'messages', 'prompt' + 'completion' or 'chosen' (fields present: "
        f"{fields})",
        hint="; ".join(_HINTS.values()),
    )


def _normalise_plain(row: dict, where: str) -> dict:
    prompt = _string_field(row, "prompt", where, "prompt_completion")
    completion = _string_field(row, "completion", where, "prompt_completion")
    if not completion.strip():
        raise DataError(f"{where}: field 'completion' is empty", hint="give every row a non-empty completion to learn")
    return {"prompt": prompt, "completion": completion}


def _normalise_hh(row: dict, where: str) -> dict:
    return hh_to_sft(row, where)


def _normalise_chat(row: dict, where: str) -> dict:
    messages = row.get("messages")
    hint = _HINTS["messages"]
    if messages is None:
        raise DataError(f"{where}: field 'messages' is missing", hint=hint)
    if not isinstance(messages, list):
        raise DataError(f"{where}: field 'messages' must be a list of messages, got {describe(messages)}", hint=hint)
    if len(messages) < 2:
        raise DataError(
            f"{where}: field 'messages' needs at least 2 messages (a prompt, then the assistant's reply), "
            f"got {len(messages)}",
            hint=hint,
        )
    checked = [check_message(message, f"messages[{index}]", where, hint) for index, message in enumerate(messages)]
    last = f"messages[{len(messages) - 1}]"
    if checked[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: field '{last}.role' is '{checked[-1]['role']}', but the last message must be the assistant's",
            hint="end each conversation with the assistant reply to train on",
        )
    if not checked[-1]["content"].strip():
        raise DataError(f"{where}: field '{last}.content' is empty", hint="the last assistant message is the target")
    return {"messages": checked}


def _string_field(row: dict, field: str, where: str, fmt: str) -> str:
    value = row.get(field)
    if value is None:
        raise DataError(f"{where}: field '{field}' is missing", hint=_HINTS[fmt])
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {describe(value)}", hint=_HINTS[fmt])
    return value


_NORMALISERS: dict[str, Callable[[dict, str], dict]] = {
    "prompt_completion": _normalise_plain,
    "messages": _normalise_chat,
    "hh": _normalise_hh,
}


# ---------------------------------------------------------------------------------------------------------------------
# Rendering and tokenising


def tokenize_sft(
    rows: list[dict], tokenizer: Any, max_seq_len: int, completion_only: bool = True, *, source: Source | str = "data"
) -> tuple[list[dict], dict]:
    """Tokenise normalised rows into `{"input_ids", "labels"}` examples, plus stats.

    Layout: `[bos] + prompt ids + completion ids + [eos]`. Prompt and completion are tokenised separately with
    `add_special_tokens=False`; BOS is prepended only when the tokenizer has one and adds it itself
    (`tokenizer("x")` starts with it), and not twice when the rendered prompt already starts with it (chat templates
    often write it). Labels equal the ids (models shift them), with -100 on BOS and prompt tokens when
    `completion_only`.

    Truncation policy, when the example is longer than `max_seq_len` (never drop a row):

    - A leading BOS is always kept; the budget is `L = max_seq_len - (1 if BOS else 0)`.
    - The EOS counts as the completion's last token: `c = len(completion ids) + 1`, `p = len(prompt ids)`.
    - The completion keeps `min(c, max(L // 2, L - p))` tokens from its START. When it is cut, its EOS is gone,
      which is right: the text did not end there. (Edge: when exactly c - 1 tokens are kept, all its text survives
      but its EOS does not.)
    - The prompt keeps the remaining budget from its END (left truncation, so the end of the dialogue survives).

    Stats: `{"rows": n, "truncated": rows cut, "tokens": total ids, "completion_tokens": total supervised labels}`.
    `source` only names the data in errors raised while rendering (e.g. a chat template that rejects a conversation):
    by file and line when `rows` are all the rows it loaded, else as "row N" counting `rows` (`loading.source_for`).
    """
    bos_id, adds_bos = bos_policy(tokenizer)
    minimum = 2 if bos_id is None else 3
    if max_seq_len < minimum:
        raise ConfigError(
            f"max_seq_len must be at least {minimum} (BOS, a prompt or completion token, EOS), got {max_seq_len}"
        )
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token", hint="use a tokenizer with an eos_token")
    named = source_for(rows, source)
    texts = [_render_or_fail(row, tokenizer, row_location(named, index)) for index, row in enumerate(rows)]
    prompt_ids = encode_texts([prompt for prompt, _ in texts], tokenizer)
    completion_ids = encode_texts([completion for _, completion in texts], tokenizer)
    examples, truncated = [], 0
    for prompt, completion in zip(prompt_ids, completion_ids):
        lead, prompt = split_bos(prompt, bos_id, adds_bos)
        completion = completion + [tokenizer.eos_token_id]
        kept_prompt, kept_completion = truncate_pair(prompt, completion, max_seq_len - len(lead))
        truncated += len(kept_prompt) + len(kept_completion) < len(prompt) + len(completion)
        examples.append(_example(lead + kept_prompt, kept_completion, completion_only))
    stats = {
        "rows": len(examples),
        "truncated": truncated,
        "tokens": sum(len(example["input_ids"]) for example in examples),
        "completion_tokens": sum(sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in examples),
    }
    return examples, stats


def _render_or_fail(row: dict, tokenizer: Any, where: str) -> tuple[str, str]:
    if "messages" not in row:
        return render(row, tokenizer)
    try:
        return render(row, tokenizer)
    except Exception as error:  # noqa: BLE001 - jinja raises its own types when a template rejects a conversation
        raise DataError(
            f"{where}: field 'messages' was rejected by the tokenizer's chat template ({error})",
            hint="check the roles come in the order this model's chat template expects (e.g. user/assistant turns)",
        ) from error


def _example(prompt: list[int], completion: list[int], completion_only: bool) -> dict:
    input_ids = prompt + completion
    labels = [IGNORE_INDEX] * len(prompt) + completion if completion_only else list(input_ids)
    return {"input_ids": input_ids, "labels": labels}


# ---------------------------------------------------------------------------------------------------------------------
# Batching


def collate_sft(examples: list[dict], pad_id: int, packing: bool = False) -> dict[str, torch.Tensor]:
    """A micro-batch: right-padded rows (`collate_padded`), or with `packing` one padding-free row
    (`collate_packed`)."""
    return collate_packed(examples) if packing else collate_padded(examples, pad_id)


def collate_packed(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Every example of the micro-batch in one row [1, Σ lengths], no padding: `input_ids`, `labels` (each
    example's first label -100: the last token of one example never predicts the next example's first), and
    `position_ids` that restart at 0 with every example. There is no `attention_mask`: transformers reads the
    restarts as example boundaries and attention never crosses one (a block-diagonal causal mask; varlen kernels
    under flash attention)."""
    ids, labels, positions = [], [], []
    for example in examples:
        ids += example["input_ids"]
        labels += [IGNORE_INDEX, *example["labels"][1:]]
        positions += range(len(example["input_ids"]))
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long)}


def collate_padded(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: `input_ids` with `pad_id`, `attention_mask` 1/0, `labels` -100."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for index, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[index, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[index, :length] = 1
        labels[index, :length] = torch.tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
