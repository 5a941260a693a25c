"""Anthropic HH transcripts: splitting, SFT and preference rows, errors, and the real harmless-base test file."""

from __future__ import annotations

import gzip
import json
import re
import statistics
from pathlib import Path

import pytest

from rlhf_cli.data.hh import hh_to_preference, hh_to_sft, split_transcript
from rlhf_cli.errors import DataError

SHARED_HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
WHERE = "pairs.jsonl: row 7"

MULTI_TURN_PROMPT = (
    "\n\nHuman: What is a good name for a cat?"
    "\n\nAssistant: How about Whiskers?"
    "\n\nHuman: Something shorter, please."
    "\n\nAssistant:"
)


def test_split_single_turn_keeps_the_replys_leading_space():
    prompt, reply = split_transcript("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?")
    assert prompt == "\n\nHuman: Hi there\n\nAssistant:"
    assert reply == " Hello! How can I help?"


def test_split_multi_turn_cuts_at_the_last_assistant_turn():
    prompt, reply = split_transcript(MULTI_TURN_PROMPT + " Tom.")
    assert prompt == MULTI_TURN_PROMPT
    assert reply == " Tom."


def test_split_empty_reply():
    assert split_transcript("\n\nHuman: Hi\n\nAssistant:") == ("\n\nHuman: Hi\n\nAssistant:", "")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("\n\nHuman: Hi there, nobody answers", "no \"\\n\\nAssistant:\" turn"),
        ("Assistant: no blank line before the marker", "no \"\\n\\nAssistant:\" turn"),
        ("\n\nAssistant: I speak first", "no \"\\n\\nHuman:\" turn before"),
    ],
)
def test_split_rejects_what_is_not_a_transcript(text, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        split_transcript(text)


def test_hh_to_sft_uses_the_chosen_transcript():
    row = {"chosen": MULTI_TURN_PROMPT + " Tom.", "rejected": MULTI_TURN_PROMPT + " No."}
    assert hh_to_sft(row, WHERE) == {"prompt": MULTI_TURN_PROMPT, "completion": " Tom."}


def test_hh_to_preference_multi_turn_by_hand():
    row = {"chosen": MULTI_TURN_PROMPT + " Tom.", "rejected": MULTI_TURN_PROMPT + " Cats do not need names."}
    assert hh_to_preference(row, WHERE) == {
        "prompt": MULTI_TURN_PROMPT,
        "chosen": " Tom.",
        "rejected": " Cats do not need names.",
    }


def test_hh_to_preference_falls_back_to_the_longest_shared_prefix():
    """A stray "  Human:" without the blank line inside one reply makes the transcripts' last markers differ."""
    shared = "\n\nHuman: Are drag queens men?\n\nAssistant:"
    chosen = shared + " Yes, usually.  Human: And drag kings?\n\nAssistant: Usually women."
    rejected = shared + " No.\n\nHuman: Why not?\n\nAssistant: I don't know."
    assert hh_to_preference({"chosen": chosen, "rejected": rejected}, WHERE) == {
        "prompt": shared,
        "chosen": " Yes, usually.  Human: And drag kings?\n\nAssistant: Usually women.",
        "rejected": " No.\n\nHuman: Why not?\n\nAssistant: I don't know.",
    }


def test_hh_to_preference_without_a_shared_prompt():
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Bye\n\nAssistant: Goodbye"}
    with pytest.raises(DataError) as caught:
        hh_to_preference(row, WHERE)
    assert caught.value.message.startswith(f"{WHERE}: fields 'chosen' and 'rejected' share no prompt")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"rejected": "\n\nHuman: a\n\nAssistant: b"},
            f"{WHERE}: field 'chosen' is missing (fields present: 'rejected')",
        ),
        ({"chosen": None, "rejected": "x"}, f"{WHERE}: field 'chosen' is missing"),
        ({"chosen": 42, "rejected": "x"}, f"{WHERE}: field 'chosen' must be a string, got int"),
        ({"chosen": "no markers here", "rejected": "x"}, f"{WHERE}: field 'chosen' is not an HH transcript: it has no"),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b"},
            f"{WHERE}: field 'rejected' is missing (fields present: 'chosen')",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nAssistant: b"},
            f"{WHERE}: field 'rejected' is not an HH transcript: it has no \"\\n\\nHuman:\" turn",
        ),
    ],
)
def test_preference_errors_name_file_row_and_field(row, message):
    with pytest.raises(DataError) as caught:
        hh_to_preference(row, WHERE)
    assert caught.value.message.startswith(message)
    assert caught.value.hint


def test_sft_error_names_file_row_and_field():
    with pytest.raises(DataError) as caught:
        hh_to_sft({"prompt": "p", "completion": "c"}, WHERE)
    assert caught.value.message == f"{WHERE}: field 'chosen' is missing (fields present: 'prompt', 'completion')"


# ---------------------------------------------------------------------------------------------------------------------
# The real file


@pytest.fixture(scope="module")
def hh_rows() -> list[dict]:
    if not SHARED_HH.exists():
        pytest.skip(f"shared HH data not found at {SHARED_HH} (expected ../shared/data beside the checkout)")
    with gzip.open(SHARED_HH, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_every_shared_row_parses_to_a_preference_pair(hh_rows):
    pairs = [hh_to_preference(row, f"{SHARED_HH.name}: row {n}") for n, row in enumerate(hh_rows, start=1)]
    assert len(pairs) == 2312
    assert all(pair["prompt"].startswith("\n\nHuman:") and pair["prompt"].endswith("\n\nAssistant:") for pair in pairs)
    for row, pair in zip(hh_rows, pairs):
        assert pair["prompt"] + pair["chosen"] == row["chosen"]
        assert pair["prompt"] + pair["rejected"] == row["rejected"]
    assert sum(pair["chosen"] == pair["rejected"] for pair in pairs) == 0
    assert all(pair["rejected"].strip() for pair in pairs)
    # Four chosen replies are empty (" "): saying nothing was preferred to the rejected reply.
    assert [n for n, pair in enumerate(pairs, start=1) if not pair["chosen"].strip()] == [87, 517, 926, 1104]
    assert all(pair["chosen"] == " " for pair in pairs if not pair["chosen"].strip())
    prompt_lengths = [len(pair["prompt"]) for pair in pairs]
    assert (statistics.median(prompt_lengths), max(prompt_lengths)) == (362, 3498)


def test_five_shared_rows_need_the_common_prefix_fallback(hh_rows):
    """The README says the transcripts share every turn but the last reply; 5 rows break that (stray turns)."""
    differing = [
        n
        for n, row in enumerate(hh_rows, start=1)
        if split_transcript(row["chosen"])[0] != split_transcript(row["rejected"])[0]
    ]
    assert differing == [1255, 1689, 1951, 1953, 2037]
    for n in differing:
        pair = hh_to_preference(hh_rows[n - 1], f"row {n}")
        replies = pair["chosen"] + pair["rejected"]
        assert "Human:" in replies or "\n\nAssistant:" in replies  # a reply carries the extra turns


def test_every_shared_row_gives_an_sft_example(hh_rows):
    examples = [hh_to_sft(row, f"row {n}") for n, row in enumerate(hh_rows, start=1)]
    assert all(ex["prompt"].endswith("\n\nAssistant:") and ex["completion"].startswith(" ") for ex in examples)
