"""Preference data for reward models: validate and normalise ranked pairs, render them, tokenise with a truncation
policy, collate batches of chosen-then-rejected rows.

Row formats (`fmt`):

- `preference`, text rows: `{"prompt": str, "chosen": str, "rejected": str}`; "prompt" may be missing or empty, then
  chosen and rejected are whole texts.
- `preference`, conversational rows (TRL style), messages being `{"role": "system"|"user"|"assistant",
  "content": str}`:
  - `{"chosen": [messages], "rejected": [messages]}`: two full conversations; the leading messages they share are the
    prompt, and each must then end with exactly one assistant message (the response);
  - `{"prompt": [messages], "chosen": [one assistant message] or str, "rejected": ...}`.
- `hh`: `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}` (Anthropic HH, split by
  `rlhf_cli.data.hh.hh_to_preference`).
- `auto` decides per row: a row without "prompt", with no list in chosen/rejected and "\\n\\nAssistant:" in one
  of them, is HH; every other row is `preference`. (Use `fmt=preference` to read such strings as whole texts.)

Any row may carry `"margin": number` (how much better chosen is; kept as a float). A field whose value is `None`
counts as missing: `datasets` fills fields absent from a row with `None`.

Invalid pairs: chosen == rejected (no preference signal) or both responses empty/blank. They are a DataError, or with
`skip_invalid` dropped and counted. One empty response is valid (in HH refusing to answer is sometimes preferred) and
counted.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from rlhf_cli.data.hh import ASSISTANT, hh_to_preference
from rlhf_cli.data.loading import Source, row_location, source_for
from rlhf_cli.data.text import (bos_policy, check_message, describe, encode_texts, present, render, split_bos,
                                truncate_pair)
from rlhf_cli.errors import ConfigError, DataError

FORMATS = ("auto", "preference", "hh")
_HINTS = {
    "text": 'text rows look like {"prompt": "...", "chosen": "...", "rejected": "..."}',
    "chat": 'chat rows look like {"prompt": [{"role": "user", "content": "..."}], '
    '"chosen": [{"role": "assistant", "content": "..."}], "rejected": [{"role": "assistant", "content": "..."}]}, '
    'or {"chosen": [full conversation], "rejected": [full conversation]}',
    "hh": 'HH rows look like {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}',
    "margin": 'margin is an optional number: how much better chosen is than rejected, e.g. "margin": 1.5',
}
_SKIP_HINT = "fix the row, or set data.skip_invalid=true to drop such rows (they are counted and reported)"


# ---------------------------------------------------------------------------------------------------------------------
# Normalising


def normalize_preference_rows(
    rows: list[dict], source: Source | str, fmt: str = "auto", skip_invalid: bool = False
) -> tuple[list[dict], dict]:
    """Validate `rows` and return them normalised, plus stats.

    Output rows are `{"prompt": str, "chosen": str, "rejected": str}` (text) or `{"messages": [prompt messages],
    "chosen": str, "rejected": str}` (chat; chosen/rejected are the assistant replies' contents), plus
    `"margin": float` when the row gives one; other fields are dropped.

    Raise DataError naming the row (`loading.row_location`: its file and line, or "row N") and the field for: a
    missing field, a wrong type, malformed
    messages, conversations that do not share a prompt, a margin that is not a finite number; and for invalid pairs
    (chosen == rejected, or both responses blank) unless `skip_invalid`, which drops and counts them instead.
    Stats: `{"rows": kept, "dropped_identical": k, "dropped_empty": k, "empty_response": kept pairs with one blank
    response}`. Every row dropped is a DataError too.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown preference data format '{fmt}'", hint=f"use one of: {', '.join(FORMATS)}")
    normalised: list[dict] = []
    stats = {"rows": 0, "dropped_identical": 0, "dropped_empty": 0, "empty_response": 0}
    for index, row in enumerate(rows):
        where = row_location(source, index)
        if not isinstance(row, dict):
            raise DataError(f"{where} is not an object (got {type(row).__name__})", hint=_HINTS["text"])
        row_fmt = fmt if fmt != "auto" else _detect_format(row, where)
        pair = hh_to_preference(row, where) if row_fmt == "hh" else _normalise_preference(row, where)
        margin = _margin(row, where)
        if margin is not None:
            pair["margin"] = margin
        problem = _invalid(pair)
        if problem is not None:
            if not skip_invalid:
                raise DataError(f"{where}: {_PROBLEMS[problem]}", hint=_SKIP_HINT)
            stats[f"dropped_{problem}"] += 1
            continue
        stats["empty_response"] += not pair["chosen"].strip() or not pair["rejected"].strip()
        normalised.append(pair)
    stats["rows"] = len(normalised)
    if rows and not normalised:
        raise DataError(
            f"{source}: every row was dropped as an invalid pair ({stats['dropped_identical']} with chosen == "
            f"rejected, {stats['dropped_empty']} with both responses empty)",
            hint="check the data's 'chosen' and 'rejected' fields: no pair is left to train on",
        )
    return normalised, stats


_PROBLEMS = {
    "identical": "fields 'chosen' and 'rejected' are identical: the pair carries no preference",
    "empty": "fields 'chosen' and 'rejected' are both empty: the pair carries no preference",
}


def _invalid(pair: dict) -> str | None:
    if not pair["chosen"].strip() and not pair["rejected"].strip():
        return "empty"
    if pair["chosen"] == pair["rejected"]:
        return "identical"
    return None


def _detect_format(row: dict, where: str) -> str:
    if not present(row, "chosen") and not present(row, "rejected"):
        fields = ", ".join(repr(key) for key in row if present(row, key)) or "none"
        raise DataError(
            f"{where}: no preference fields found: expected 'chosen' + 'rejected', optionally 'prompt' (fields "
            f"present: {fields})",
            hint="; ".join(_HINTS[key] for key in ("text", "chat", "hh")),
        )
    if present(row, "prompt"):
        return "preference"
    responses = [row.get("chosen"), row.get("rejected")]
    if any(isinstance(value, list) for value in responses):
        return "preference"
    return "hh" if any(isinstance(value, str) and ASSISTANT in value for value in responses) else "preference"


def _normalise_preference(row: dict, where: str) -> dict:
    prompt = row.get("prompt")
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            hint = _HINTS["chat"] if isinstance(prompt, list) else _HINTS["text"]
            raise DataError(f"{where}: field '{field}' is missing", hint=hint)
    if isinstance(prompt, list):
        return _normalise_prompt_chat(row, where)
    if prompt is not None and not isinstance(prompt, str):
        raise DataError(
            f"{where}: field 'prompt' must be a string or a list of messages, got {describe(prompt)}",
            hint=f"{_HINTS['text']}; {_HINTS['chat']}",
        )
    if prompt is None and (isinstance(row["chosen"], list) or isinstance(row["rejected"], list)):
        return _normalise_conversations(row, where)
    for field in ("chosen", "rejected"):
        value = row[field]
        if not isinstance(value, str):
            allowed = "a string" if prompt is not None else "a string or a list of messages"
            raise DataError(f"{where}: field '{field}' must be {allowed}, got {describe(value)}", hint=_HINTS["text"])
    return {"prompt": prompt or "", "chosen": row["chosen"], "rejected": row["rejected"]}


def _normalise_prompt_chat(row: dict, where: str) -> dict:
    """`{"prompt": [messages], "chosen": [one assistant message] or str, "rejected": ...}`."""
    messages = _check_messages(row["prompt"], "prompt", where, minimum=1)
    return {"messages": messages, "chosen": _reply(row, "chosen", where), "rejected": _reply(row, "rejected", where)}


def _reply(row: dict, field: str, where: str) -> str:
    value = row[field]
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise DataError(
            f"{where}: field '{field}' must be a string or a list with one assistant message, got {describe(value)}",
            hint=_HINTS["chat"],
        )
    if len(value) != 1:
        raise DataError(
            f"{where}: field '{field}' must hold exactly one assistant message (the prompt holds the rest), "
            f"got {len(value)}",
            hint=_HINTS["chat"],
        )
    (message,) = _check_messages(value, field, where, minimum=1)
    _check_reply_role(message, f"{field}[0]", where)
    return message["content"]


def _normalise_conversations(row: dict, where: str) -> dict:
    """`{"chosen": [messages], "rejected": [messages]}`: shared leading messages = prompt, last ones = responses."""
    chosen = _check_messages(row["chosen"], "chosen", where, minimum=2)
    rejected = _check_messages(row["rejected"], "rejected", where, minimum=2)
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected' differ from their first message, so they share no prompt",
            hint="both conversations must repeat the same prompt messages and differ only in the final assistant "
            "reply",
        )
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) - shared > 1:
            raise DataError(
                f"{where}: fields 'chosen' and 'rejected' differ at message {shared}, before their last message",
                hint="both conversations must share every message but the final assistant reply",
            )
        _check_reply_role(messages[-1], f"{field}[{len(messages) - 1}]", where)
    return {"messages": chosen[:shared], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _check_messages(value: Any, field: str, where: str, minimum: int) -> list[dict]:
    """Validate a list of messages with `text.check_message`, hinted for preference rows."""
    hint = _HINTS["chat"]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field}' must be a list of messages, got {describe(value)}", hint=hint)
    if len(value) < minimum:
        what = "a prompt, then the assistant's reply" if minimum > 1 else "the prompt"
        raise DataError(
            f"{where}: field '{field}' needs at least {minimum} message{'s' * (minimum > 1)} ({what}), "
            f"got {len(value)}",
            hint=hint,
        )
    return [check_message(message, f"{field}[{index}]", where, hint) for index, message in enumerate(value)]


def _check_reply_role(message: dict, field: str, where: str) -> None:
    if message["role"] != "assistant":
        raise DataError(
            f"{where}: field '{field}.role' is '{message['role']}', but the response must be the assistant's",
            hint=_HINTS["chat"],
        )


def _margin(row: dict, where: str) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field 'margin' must be a number, got {describe(value)}", hint=_HINTS["margin"])
    if not math.isfinite(value):
        raise DataError(f"{where}: field 'margin' must be a finite number, got {value}", hint=_HINTS["margin"])
    return float(value)


# ---------------------------------------------------------------------------------------------------------------------
# Rendering and tokenising


def render_pair(row: dict, tokenizer: Any) -> tuple[str, str, str]:
    """(prompt text, chosen text, rejected text) of a normalised row.

    Text rows are returned as they are. Chat rows are rendered by `text.render` (for each response, as a conversation
    ending with it): the prompt by the tokenizer's chat template with the generation prompt, or without a template
    in the HH format ("\\n\\nHuman: ...\\n\\nAssistant:"), whose responses then get a leading space.
    """
    if "messages" not in row:
        return row["prompt"], row["chosen"], row["rejected"]
    prompt, chosen = render(_conversation(row, "chosen"), tokenizer)
    _, rejected = render(_conversation(row, "rejected"), tokenizer)
    return prompt, chosen, rejected


def _conversation(row: dict, field: str) -> dict:
    return {"messages": [*row["messages"], {"role": "assistant", "content": row[field]}]}


def tokenize_pairs(
    rows: list[dict], tokenizer: Any, max_seq_len: int, encoder: bool, *, source: Source | str = "data"
) -> tuple[list[dict], dict]:
    """Tokenise normalised rows into `{"chosen_ids", "rejected_ids", "margin", "chosen_start", "rejected_start"}`
    examples, plus stats.

    Prompt and responses are rendered by `render_pair` and tokenised separately with `add_special_tokens=False`.

    Layouts:

    - causal (`encoder=False`): `[bos] + prompt ids + response ids + [eos]`. BOS follows `text.split_bos`'s rule
      (only when the tokenizer adds it itself; one the chat template wrote is kept, never doubled). The reward is
      read at the last real token, the EOS, which is also where PPO scores a finished response.
    - encoder (`encoder=True`): the tokenizer's own pair layout, e.g. `[CLS] prompt [SEP] response [SEP]`, or its
      single-sequence layout `[CLS] response [SEP]` when the prompt is empty (no tokens). Fast tokenizers' layouts
      are read from their post-processor (transformers 5 fast tokenizers have no `build_inputs_with_special_tokens`,
      and in transformers 4 the generic fast one ignores the post-processor); slow ones use
      `build_inputs_with_special_tokens`.

    Truncation, for each of chosen and rejected alone, when the sequence is longer than `max_seq_len` (never drop a
    pair): the special tokens are always kept, the budget is `max_seq_len` minus them (BOS; [CLS]/[SEP]s). The EOS
    counts as the response's last token. Then `text.truncate_pair` cuts: the response keeps
    `min(len(response), max(budget // 2, budget - len(prompt)))` tokens from its START (a cut response loses its
    EOS: the text did not end there), the prompt the rest of the budget from its END (left truncation: the end of
    the dialogue survives). So the two sides of a pair may keep different amounts of a long prompt. A pair counts as
    truncated when either side was.

    Each example also says where its responses start: `chosen_start` / `rejected_start`, the index in
    `chosen_ids` / `rejected_ids` of the first response token (the tokens before it are the prompt and the special
    tokens around it), so a stage can sum log-probs over the response alone.

    Stats: `{"pairs": n, "truncated": pairs cut, "tokens": total ids over both sides}`. `source` names the data in
    errors raised while rendering (a chat template rejecting the prompt messages): by file and line when `rows` are
    all the rows it loaded, else as "row N" counting the rows given here (`loading.source_for`).
    """
    side = sequence_builder(tokenizer, max_seq_len, encoder)
    named = source_for(rows, source)
    texts = [_render_or_fail(row, tokenizer, row_location(named, index)) for index, row in enumerate(rows)]
    prompts = encode_texts([text[0] for text in texts], tokenizer)
    chosen = encode_texts([text[1] for text in texts], tokenizer)
    rejected = encode_texts([text[2] for text in texts], tokenizer)
    examples, truncated = [], 0
    for row, prompt, *responses in zip(rows, prompts, chosen, rejected):
        (chosen_ids, chosen_start, chosen_cut), (rejected_ids, rejected_start, rejected_cut) = [
            side(prompt, response) for response in responses]
        truncated += chosen_cut or rejected_cut
        margin = float(row.get("margin", 0.0))
        examples.append({"chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "margin": margin,
                         "chosen_start": chosen_start, "rejected_start": rejected_start})
    stats = {
        "pairs": len(examples),
        "truncated": truncated,
        "tokens": sum(len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples),
    }
    return examples, stats


def tokenize_responses(prompts: list[str], responses: list[str], tokenizer: Any, max_seq_len: int,
                       encoder: bool) -> list[dict]:
    """Each (prompt text, response text) as one side of a pair of `tokenize_pairs` (same layout, same truncation):
    `{"input_ids": ids, "response_start": index of the first response token}`. What a reward model reads when it
    scores text, e.g. a policy's decoded samples re-tokenised for a reward model with another tokenizer."""
    side = sequence_builder(tokenizer, max_seq_len, encoder)
    sides = [side(prompt, response) for prompt, response in zip(encode_texts(prompts, tokenizer),
                                                                encode_texts(responses, tokenizer))]
    return [{"input_ids": ids, "response_start": start} for ids, start, _ in sides]


def sequence_builder(tokenizer: Any, max_seq_len: int, encoder: bool) -> Callable[[list[int], list[int]], tuple]:
    """The function `(prompt ids, response ids) -> (ids, response start, cut)` of `tokenize_pairs`' layouts for
    this tokenizer (causal or `encoder`), after checking that `max_seq_len` leaves room for them (ConfigError)."""
    if encoder:
        layout = _encoder_layout(tokenizer)
        minimum = sum(len(part) for part in layout["pair"]) + 2
        if max_seq_len < minimum:
            raise ConfigError(
                f"max_seq_len must be at least {minimum} (the special tokens, a prompt token and a response token), "
                f"got {max_seq_len}"
            )
        return lambda prompt, response: _encoder_sequence(prompt, response, layout, max_seq_len)
    bos_id, adds_bos = bos_policy(tokenizer)
    minimum = 2 if bos_id is None else 3
    if max_seq_len < minimum:
        raise ConfigError(
            f"max_seq_len must be at least {minimum} (BOS, a prompt or response token, EOS), got {max_seq_len}"
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ConfigError("the tokenizer has no EOS token", hint="use a tokenizer with an eos_token")
    return lambda prompt, response: _causal_sequence(prompt, response, bos_id, adds_bos, eos_id, max_seq_len)


def _causal_sequence(
    prompt: list[int], response: list[int], bos_id: int | None, adds_bos: bool, eos_id: int, max_seq_len: int
) -> tuple[list[int], int, bool]:
    lead, prompt = split_bos(prompt, bos_id, adds_bos)
    response = response + [eos_id]
    kept_prompt, kept_response = truncate_pair(prompt, response, max_seq_len - len(lead))
    cut = len(kept_prompt) + len(kept_response) < len(prompt) + len(response)
    return lead + kept_prompt + kept_response, len(lead) + len(kept_prompt), cut


def _encoder_sequence(prompt: list[int], response: list[int], layout: dict,
                      max_seq_len: int) -> tuple[list[int], int, bool]:
    specials = layout["pair"] if prompt else layout["single"]
    budget = max_seq_len - sum(len(part) for part in specials)
    kept_prompt, kept_response = truncate_pair(prompt, response, budget)
    cut = len(kept_prompt) + len(kept_response) < len(prompt) + len(response)
    if prompt:
        prefix, middle, suffix = specials
        return prefix + kept_prompt + middle + kept_response + suffix, len(prefix) + len(kept_prompt) + len(middle), cut
    prefix, suffix = specials
    return prefix + kept_response + suffix, len(prefix), cut


def _encoder_layout(tokenizer: Any) -> dict[str, tuple[list[int], ...]]:
    """The special tokens an encoder tokenizer puts around one sequence and around a pair.

    `{"single": (prefix, suffix), "pair": (prefix, middle, suffix)}`: a pair is `prefix + A + middle + B + suffix`.
    Fast tokenizers are probed (their post-processor decides); slow ones answer `build_inputs_with_special_tokens`.
    """
    if getattr(tokenizer, "is_fast", False):
        return {"single": _probe(tokenizer, "a", None), "pair": _probe(tokenizer, "a", "b")}
    build = getattr(tokenizer, "build_inputs_with_special_tokens", None)
    if build is None:
        raise ConfigError(
            f"cannot tell where {type(tokenizer).__name__} puts its special tokens ([CLS], [SEP], ...)",
            hint="use a fast tokenizer, or one with build_inputs_with_special_tokens",
        )
    first, second = [-1], [-2]  # sentinels no tokenizer will add
    single, pair = build(first), build(first, second)
    return {
        "single": (single[: single.index(-1)], single[single.index(-1) + 1 :]),
        "pair": (pair[: pair.index(-1)], pair[pair.index(-1) + 1 : pair.index(-2)], pair[pair.index(-2) + 1 :]),
    }


def _probe(tokenizer: Any, first: str, second: str | None) -> tuple[list[int], ...]:
    """(specials before the first sequence, [between the two,] after the last) from encoding probe texts."""
    encoding = tokenizer(first, second) if second is not None else tokenizer(first)
    ids, sequence = list(encoding["input_ids"]), encoding.sequence_ids()
    positions = {index: [at for at, seq in enumerate(sequence) if seq == index] for index in (0, 1)}
    used = [positions[index] for index in ((0,) if second is None else (0, 1))]
    if not all(used):
        raise ConfigError(
            f"could not probe the special-token layout of {type(tokenizer).__name__}: a probe text encoded to no tokens"
        )
    cuts = [0] + [edge for spots in used for edge in (spots[0], spots[-1] + 1)] + [len(ids)]
    return tuple(ids[cuts[i] : cuts[i + 1]] for i in range(0, len(cuts), 2))


def _render_or_fail(row: dict, tokenizer: Any, where: str) -> tuple[str, str, str]:
    if "messages" not in row:
        return render_pair(row, tokenizer)
    try:
        return render_pair(row, tokenizer)
    except Exception as error:  # noqa: BLE001 - jinja raises its own types when a template rejects a conversation
        raise DataError(
            f"{where}: the prompt messages were rejected by the tokenizer's chat template ({error})",
            hint="check the roles come in the order this model's chat template expects (e.g. user/assistant turns)",
        ) from error


# ---------------------------------------------------------------------------------------------------------------------
# Batching


def collate_pairs(examples: list[dict], pad_id: int, packing: bool = False) -> dict[str, torch.Tensor]:
    """One batch of B pairs: rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones (same order).

    `input_ids` right-padded with `pad_id` and `attention_mask` 1/0, both [2B, L] with L the longest sequence;
    `margin` [B] float. With `packing`: the 2B sequences in one row without padding (`collate_packed_pairs`).
    """
    if packing:
        return collate_packed_pairs(examples)
    input_ids, attention_mask = pad_right([ex["chosen_ids"] for ex in examples] +
                                          [ex["rejected_ids"] for ex in examples], pad_id)
    margin = torch.tensor([float(ex.get("margin", 0.0)) for ex in examples], dtype=torch.float)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin}


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids right-padded with `pad_id`, attention_mask 1/0), both long [N, L], L the longest sequence."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for index, ids in enumerate(sequences):
        input_ids[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[index, : len(ids)] = 1
    return input_ids, attention_mask


def collate_packed_pairs(examples: list[dict]) -> dict[str, torch.Tensor]:
    """B pairs in one padding-free row: the B chosen sequences, then the B rejected ones, concatenated:
    `input_ids` and `position_ids` [1, T] (positions restart at 0 with every sequence, so attention never crosses
    one), `ends` [2B] the index of each sequence's last token (where a causal reward model reads its score, in
    the order of collate_pairs' rows), `margin` [B] float."""
    sequences = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
    ids, positions, ends = [], [], []
    for seq in sequences:
        ids += seq
        positions += range(len(seq))
        ends.append(len(ids) - 1)
    margin = torch.tensor([float(ex.get("margin", 0.0)) for ex in examples], dtype=torch.float)
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "position_ids": torch.tensor([positions]),
            "ends": torch.tensor(ends, dtype=torch.long), "margin": margin}
