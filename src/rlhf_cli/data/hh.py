"""Anthropic HH-RLHF transcripts: `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}`.

Policy:

- A transcript's *prompt* is everything up to and including its LAST `"\\n\\nAssistant:"` marker; its *reply* is the
  rest, keeping the reply's leading space (" Sure, ..."). So prompts always end with "Assistant:", and
  prompt + reply == transcript.
- A transcript needs a `"\\n\\nHuman:"` turn before that marker; otherwise it is not an HH transcript.
- For preference pairs the prompt is the part the two transcripts share. Usually both transcripts split to the same
  prompt. In a few rows (5 of 2,312 in harmless-base test) a reply contains a stray "  Human: ..." turn without the
  blank line, so the last markers differ; there the prompt is the longest common prefix that ends with a
  `"\\n\\nAssistant:"` marker, and chosen/rejected are everything after it (they may then span several turns).
- An empty reply is kept as it is (" "): in HH it means the assistant said nothing, and that is sometimes the
  preferred answer (4 chosen replies in harmless-base test).
- Every problem with a row is a DataError naming the file, the row and the field.
"""

from __future__ import annotations

import os

from rlhf_cli.errors import DataError

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_HINT = 'HH transcripts look like "\\n\\nHuman: question\\n\\nAssistant: answer" (a Human turn, then an Assistant turn)'


def split_transcript(text: str) -> tuple[str, str]:
    """Split an HH transcript into (prompt, reply) at its last "\\n\\nAssistant:" marker.

    Raise ValueError saying why when there is no Assistant turn, or no Human turn before the last one.
    """
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError('it has no "\\n\\nAssistant:" turn')
    prompt = text[: cut + len(ASSISTANT)]
    if HUMAN not in prompt:
        raise ValueError('it has no "\\n\\nHuman:" turn before the last "\\n\\nAssistant:" turn')
    return prompt, text[len(prompt) :]


def hh_to_sft(row: dict, where: str) -> dict:
    """`{"prompt", "completion"}` from the row's "chosen" transcript; `where` (e.g. "file: line N") prefixes errors."""
    prompt, completion = _split_field(row, "chosen", where)
    return {"prompt": prompt, "completion": completion}


def hh_to_preference(row: dict, where: str) -> dict:
    """`{"prompt", "chosen", "rejected"}` from the row's two transcripts (see the module docstring for the policy)."""
    chosen_prompt, chosen = _split_field(row, "chosen", where)
    rejected_prompt, rejected = _split_field(row, "rejected", where)
    if chosen_prompt == rejected_prompt:
        return {"prompt": chosen_prompt, "chosen": chosen, "rejected": rejected}
    prompt = shared_prompt(row["chosen"], row["rejected"])
    if prompt is None:
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected' share no prompt: their transcripts differ before the first "
            '"\\n\\nAssistant:" turn',
            hint="both transcripts must repeat the same dialogue and differ only in the assistant's reply",
        )
    return {"prompt": prompt, "chosen": row["chosen"][len(prompt) :], "rejected": row["rejected"][len(prompt) :]}


def shared_prompt(first: str, second: str) -> str | None:
    """The longest common prefix of two transcripts that ends with "\\n\\nAssistant:" after a Human turn, or None."""
    common = os.path.commonprefix([first, second])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        return None
    prompt = common[: cut + len(ASSISTANT)]
    return prompt if HUMAN in prompt else None


def _split_field(row: dict, field: str, where: str) -> tuple[str, str]:
    text = row.get(field)
    if text is None:
        present = ", ".join(repr(key) for key, value in row.items() if value is not None) or "none"
        raise DataError(f"{where}: field '{field}' is missing (fields present: {present})", hint=_HINT)
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(text).__name__}", hint=_HINT)
    try:
        return split_transcript(text)
    except ValueError as error:
        raise DataError(f"{where}: field '{field}' is not an HH transcript: {error}", hint=_HINT) from error
