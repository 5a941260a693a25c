"""Prompts for PPO rollouts and evaluation, from any of the row shapes the other stages read, and their ids.

A row gives its prompt as `{"prompt": str}`, `{"prompt": [messages]}` or `{"messages": [...]}` (rendered with the
tokenizer's chat template, or the Human:/Assistant: fallback, up to the assistant's turn), an SFT or preference
row (its prompt), or an Anthropic HH transcript (the dialogue up to the last "Assistant:").
"""

from __future__ import annotations

from typing import Any

from rlhf_cli.data import hh
from rlhf_cli.data.loading import Source, row_location
from rlhf_cli.data.text import bos_policy, encode_texts, render, split_bos
from rlhf_cli.errors import DataError


def prompt_texts(rows: list[dict], source: Source | str, tokenizer: Any) -> list[str]:
    """The prompt text of each row; a DataError naming the row (`loading.row_location`) for a row without one."""
    texts = []
    for index, row in enumerate(rows):
        where = row_location(source, index)
        prompt = row.get("prompt")
        if isinstance(prompt, str) and prompt.strip():
            texts.append(prompt)
        elif isinstance(prompt, list) or isinstance(row.get("messages"), list):
            messages = prompt if isinstance(prompt, list) else row["messages"]
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]  # a full conversation: prompt = everything before the last reply
            if not messages:
                raise DataError(f"{where}: field 'messages' holds no prompt", hint="give at least one user turn")
            texts.append(render({"messages": [*messages, {"role": "assistant", "content": ""}]}, tokenizer)[0])
        elif isinstance(row.get("chosen"), str) and "\n\nAssistant:" in row["chosen"]:
            try:
                texts.append(hh.split_transcript(row["chosen"])[0])
            except ValueError as exc:
                raise DataError(f"{where}: field 'chosen' is not an HH transcript ({exc})") from exc
        else:
            raise DataError(f"{where}: no prompt (expected a non-empty 'prompt', 'messages', or an HH 'chosen')",
                            hint="prompt rows look like {\"prompt\": \"...\"}")
    if not texts:
        raise DataError(f"{source}: no prompts")
    return texts


def encode_prompts(prompts: list[str], tokenizer: Any, max_len: int) -> tuple[list[list[int]], int]:
    """Prompt ids for generation, laid out as in training (BOS by `text.split_bos`'s rule, no EOS), each kept to its
    last `max_len` tokens (the end of a dialogue matters most). Returns (ids, number of prompts cut)."""
    bos_id, adds_bos = bos_policy(tokenizer)
    out, cut = [], 0
    for ids in encode_texts(prompts, tokenizer):
        lead, body = split_bos(ids, bos_id, adds_bos)
        budget = max(1, max_len - len(lead))
        cut += len(body) > budget
        out.append(lead + body[len(body) - budget:] if len(body) > budget else lead + body)
    return out, cut
