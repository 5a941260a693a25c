"""Tokenizing and rendering conversations, shared by the SFT and preference formats (and by prompts).

- Messages: `{"role": "system"|"user"|"assistant", "content": str}` (`check_message`).
- Rendering: a row's prompt and completion text, through the tokenizer's chat template or the HH fallback (`render`).
- Tokenizing: texts to ids without special tokens (`encode_texts`), and the BOS rule every layout follows: BOS is
  prepended only when the tokenizer has one and adds it itself, and a BOS the chat template already wrote is kept,
  never doubled (`bos_policy`, `split_bos`).
- Truncation: a (prompt, completion) pair cut to a token budget (`truncate_pair`).
- Error text: `present` (a field counts as missing when its value is `None`, as `datasets` fills absent fields) and
  `describe` (a value's type and repr, short, for error messages).
"""

from __future__ import annotations

from typing import Any

from rlhf_cli.errors import DataError

ROLES = ("system", "user", "assistant")
_FALLBACK_ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


# ---------------------------------------------------------------------------------------------------------------------
# Rows and messages


def present(row: dict, field: str) -> bool:
    """Whether `row` has `field` with a value other than `None`."""
    return row.get(field) is not None


def describe(value: Any) -> str:
    """`value`'s type name and repr, cut to 60 characters: e.g. "int 3", for "must be a string, got ..."."""
    return f"{type(value).__name__} {value!r}"[:60]


def check_message(message: Any, field: str, where: str, hint: str) -> dict:
    """`{"role", "content"}` of a valid message (other keys dropped).

    Raise DataError("{where}: field '{field}...' ...", hint=hint) when it is not an object, when role or content is
    missing or not a string, or when the role is not one of system/user/assistant.
    """
    if not isinstance(message, dict):
        raise DataError(
            f"{where}: field '{field}' must be an object with 'role' and 'content', got {describe(message)}", hint=hint
        )
    for key in ("role", "content"):
        if message.get(key) is None:
            raise DataError(f"{where}: field '{field}.{key}' is missing", hint=hint)
        if not isinstance(message[key], str):
            raise DataError(f"{where}: field '{field}.{key}' must be a string, got {describe(message[key])}", hint=hint)
    if message["role"] not in ROLES:
        raise DataError(
            f"{where}: field '{field}.role' is '{message['role']}', expected one of: {', '.join(ROLES)}", hint=hint
        )
    return {"role": message["role"], "content": message["content"]}


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def render(row: dict, tokenizer: Any) -> tuple[str, str]:
    """(prompt text, completion text) of a normalised row (`{"prompt", "completion"}` or `{"messages"}`).

    Prompt/completion rows are returned as they are. Chat rows use the tokenizer's chat template on all messages but
    the last (with the generation prompt), and the last message's content as the completion. Without a chat template
    they fall back to the HH format: prompt = "\\n\\n{Role}: {content}" for each message + "\\n\\nAssistant:",
    completion = " " + last content (Role = Human / Assistant / System).
    """
    if "messages" not in row:
        return row["prompt"], row["completion"]
    history, reply = row["messages"][:-1], row["messages"][-1]["content"]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return prompt, reply
    prompt = "".join(f"\n\n{_FALLBACK_ROLE_NAMES[m['role']]}: {m['content']}" for m in history) + "\n\nAssistant:"
    return prompt, " " + reply


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing


def encode_texts(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """The ids of each text, tokenized in one batch with `add_special_tokens=False`; [] for no texts."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def bos_policy(tokenizer: Any) -> tuple[int | None, bool]:
    """(BOS id or None, whether the tokenizer itself adds BOS, i.e. the model expects it).

    The tokenizer adds BOS when `tokenizer("x")` starts with it and `tokenizer("x", add_special_tokens=False)` does not.
    """
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return None, False
    with_special = tokenizer("x").input_ids[:1]
    without_special = tokenizer("x", add_special_tokens=False).input_ids[:1]
    return bos_id, with_special == [bos_id] and without_special != [bos_id]


def split_bos(prompt: list[int], bos_id: int | None, adds_bos: bool) -> tuple[list[int], list[int]]:
    """(leading BOS to keep, prompt ids without it), for `bos_policy`'s (bos_id, adds_bos).

    A BOS the chat template wrote is kept, never truncated or doubled; otherwise BOS is prepended only when the
    tokenizer adds it itself.
    """
    if bos_id is not None and prompt[:1] == [bos_id]:
        return [bos_id], prompt[1:]
    return ([bos_id] if adds_bos and bos_id is not None else []), prompt


def truncate_pair(prompt: list[int], completion: list[int], budget: int) -> tuple[list[int], list[int]]:
    """(kept prompt ids, kept completion ids), together at most `budget` tokens; both unchanged when they fit.

    The completion (with its EOS, if any, as its last token) keeps `min(len(completion), max(budget // 2,
    budget - len(prompt)))` tokens from its START (a cut completion loses its EOS: the text did not end there); the
    prompt keeps the rest of the budget from its END (left truncation, so the end of the dialogue survives).
    """
    if len(prompt) + len(completion) <= budget:
        return prompt, completion
    kept_completion = completion[: min(len(completion), max(budget // 2, budget - len(prompt)))]
    prompt_budget = budget - len(kept_completion)
    kept_prompt = prompt[len(prompt) - prompt_budget :] if prompt_budget > 0 else []
    return kept_prompt, kept_completion
