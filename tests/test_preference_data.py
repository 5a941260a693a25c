"""Preference pairs: normalising and validating every accepted shape, rendering, tokenising (causal and encoder
layouts) with the truncation policy, and collating chosen-then-rejected batches."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlhf_cli.data.preference import (
    FORMATS,
    collate_pairs,
    normalize_preference_rows,
    render_pair,
    tokenize_pairs,
)
from rlhf_cli.data.loading import load_rows
from rlhf_cli.errors import ConfigError, DataError

SHARED_HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
SOURCE = "/data/pairs.jsonl"
SKIP_HINT = "fix the row, or set data.skip_invalid=true to drop such rows (they are counted and reported)"

# Causal tokenizer (mirrors tests/test_sft_data.py): one token a word, w<i> -> FIRST_WORD_ID + i.
PAD, BOS, EOS = 0, 1, 2
FIRST_WORD_ID = 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
# Encoder (BERT-style WordPiece) tokenizer: w<i> -> ENC_FIRST_WORD_ID + i.
ENC_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ENC_PAD, CLS, SEP = 0, 2, 3
ENC_FIRST_WORD_ID = 5


def words(count: int, start: int = 0) -> str:
    """`count` distinct one-token words: "w0 w1 ..."."""
    return " ".join(f"w{i}" for i in range(start, start + count))


def ids(count: int, start: int = 0, first: int = FIRST_WORD_ID) -> list[int]:
    return list(range(first + start, first + start + count))


def enc_ids(count: int, start: int = 0) -> list[int]:
    return ids(count, start, ENC_FIRST_WORD_ID)


def make_tokenizer(adds_bos: bool = False, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A whitespace WordLevel causal-LM tokenizer with <pad>/<s>/</s>."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3}
    vocab.update({f"w{i}": FIRST_WORD_ID + i for i in range(100)})
    for word in ("Human:", "Assistant:", "System:", "<user>", "<assistant>", "<system>", "hi", "hello"):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def encoder_vocab() -> list[str]:
    return ENC_SPECIALS + [f"w{i}" for i in range(100)] + ["Human:", "Assistant:"]


def make_encoder_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer: [CLS] A [SEP] (B [SEP]), no BOS/EOS, built from `tokenizers` parts."""
    vocab = {token: index for index, token in enumerate(encoder_vocab())}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(adds_bos=True)


@pytest.fixture(scope="module")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def encoder_tokenizer() -> PreTrainedTokenizerFast:
    return make_encoder_tokenizer()


@pytest.fixture(scope="module")
def hh_raw() -> list[dict]:
    if not SHARED_HH.exists():
        pytest.skip(f"shared HH data not found at {SHARED_HH} (expected ../shared/data beside the checkout)")
    with gzip.open(SHARED_HH, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def text_pair(prompt: str, chosen: str, rejected: str, **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def normalize(rows: list[dict], fmt: str = "auto", skip_invalid: bool = False) -> list[dict]:
    return normalize_preference_rows(rows, SOURCE, fmt, skip_invalid)[0]


# ---------------------------------------------------------------------------------------------------------------------
# normalize_preference_rows: accepted shapes


def test_formats():
    assert FORMATS == ("auto", "preference", "hh")


def test_text_rows_with_and_without_a_prompt():
    rows = [
        text_pair("p", "good", "bad", id=7),  # other fields dropped
        {"chosen": "whole good text", "rejected": "whole bad text"},
        text_pair("", "a", "b"),
        {"prompt": None, "chosen": "x", "rejected": "y", "margin": None},  # datasets' None = missing
    ]
    normalised, stats = normalize_preference_rows(rows, SOURCE)
    assert normalised == [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "", "chosen": "whole good text", "rejected": "whole bad text"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "", "chosen": "x", "rejected": "y"},
    ]
    assert stats == {"rows": 4, "dropped_identical": 0, "dropped_empty": 0, "empty_response": 0}


def test_margin_is_kept_as_a_float():
    rows = [text_pair("p", "a", "b", margin=2), text_pair("p", "a", "b", margin=-0.5), text_pair("p", "a", "b")]
    normalised = normalize(rows)
    assert [row.get("margin") for row in normalised] == [2.0, -0.5, None]
    assert isinstance(normalised[0]["margin"], float)


def test_full_conversations_share_their_prompt():
    prompt = [msg("system", "be nice"), msg("user", "hi"), msg("assistant", "hello"), msg("user", "help?")]
    row = {"chosen": [*prompt, msg("assistant", "sure")], "rejected": [*prompt, msg("assistant", "no")], "margin": 1}
    assert normalize([row]) == [{"messages": prompt, "chosen": "sure", "rejected": "no", "margin": 1.0}]


def test_conversations_with_extra_message_keys_keep_role_and_content():
    chosen = [{"role": "user", "content": "hi", "name": "x"}, msg("assistant", "yes")]
    rejected = [msg("user", "hi"), msg("assistant", "no")]
    (row,) = normalize([{"chosen": chosen, "rejected": rejected}])
    assert row == {"messages": [msg("user", "hi")], "chosen": "yes", "rejected": "no"}


def test_explicit_prompt_messages_with_message_or_string_replies():
    prompt = [msg("user", "hi")]
    rows = [
        {"prompt": prompt, "chosen": [msg("assistant", "hello")], "rejected": [msg("assistant", "go")]},
        {"prompt": prompt, "chosen": "hello", "rejected": "go"},
        {"prompt": prompt, "chosen": [msg("assistant", "hello")], "rejected": "go"},
    ]
    expected = {"messages": prompt, "chosen": "hello", "rejected": "go"}
    assert normalize(rows) == [expected] * 3


def test_hh_rows_auto_detected_and_explicit():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    expected = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"}]
    assert normalize([row]) == expected
    assert normalize([row], fmt="hh") == expected
    assert normalize([{**row, "margin": 3}], fmt="hh") == [{**expected[0], "margin": 3.0}]


def test_preference_format_reads_hh_like_strings_as_whole_texts():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    assert normalize([row], fmt="preference") == [{"prompt": "", **row}]


def test_a_row_with_a_prompt_is_never_hh():
    row = text_pair("\n\nHuman: hi\n\nAssistant:", " hello", " go away")
    assert normalize([row]) == [row]


def test_mixed_shapes_in_one_file():
    rows = [
        text_pair("p", "a", "b"),
        {"chosen": [msg("user", "q"), msg("assistant", "a")], "rejected": [msg("user", "q"), msg("assistant", "b")]},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
    ]
    assert [sorted(row) for row in normalize(rows)] == [
        ["chosen", "prompt", "rejected"],
        ["chosen", "messages", "rejected"],
        ["chosen", "prompt", "rejected"],
    ]


# ---------------------------------------------------------------------------------------------------------------------
# normalize_preference_rows: errors


def test_unknown_format_lists_the_valid_ones():
    with pytest.raises(DataError) as caught:
        normalize_preference_rows([], SOURCE, fmt="prompt_completion")
    assert caught.value.message == "unknown preference data format 'prompt_completion'"
    assert caught.value.hint == "use one of: auto, preference, hh"


def test_a_row_that_is_not_an_object():
    with pytest.raises(DataError) as caught:
        normalize_preference_rows(["just text"], SOURCE)  # type: ignore[list-item]
    assert caught.value.message == f"{SOURCE}: row 1 is not an object (got str)"
    assert caught.value.hint


U, A = msg("user", "q"), msg("assistant", "a")
TEXT_HINT = "text rows look like"
CHAT_HINT = "chat rows look like"
HH_HINT = "HH transcripts look like"
BAD_ROWS = [
    # (row, fmt, problem in the message, text in the hint)
    ({"prompt": "p", "rejected": "r"}, "auto", "field 'chosen' is missing", TEXT_HINT),
    ({"prompt": "p", "chosen": "c"}, "auto", "field 'rejected' is missing", TEXT_HINT),
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "auto", "field 'chosen' must be a string, got int 5", TEXT_HINT),
    ({"prompt": "p", "chosen": "c", "rejected": [A]}, "auto", "field 'rejected' must be a string, got list", TEXT_HINT),
    ({"chosen": 5, "rejected": "r"}, "auto", "field 'chosen' must be a string or a list of messages, got int 5",
     TEXT_HINT),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, "auto",
     "field 'prompt' must be a string or a list of messages, got int 3", CHAT_HINT),
    ({"text": "x", "label": 1}, "auto", "no preference fields found", CHAT_HINT),
    # full conversations
    ({"chosen": [U, A], "rejected": "r"}, "auto", "field 'rejected' must be a list of messages, got str", CHAT_HINT),
    ({"chosen": ["q", A], "rejected": [U, A]}, "auto", "field 'chosen[0]' must be an object", CHAT_HINT),
    ({"chosen": [U, A], "rejected": [U, {"role": "assistant"}]}, "auto", "field 'rejected[1].content' is missing",
     CHAT_HINT),
    ({"chosen": [U, A], "rejected": [U, msg("assistant", 3)]}, "auto",
     "field 'rejected[1].content' must be a string, got int", CHAT_HINT),
    ({"chosen": [msg("bot", "q"), A], "rejected": [U, A]}, "auto",
     "field 'chosen[0].role' is 'bot', expected one of: system, user, assistant", CHAT_HINT),
    ({"chosen": [A], "rejected": [U, A]}, "auto", "field 'chosen' needs at least 2 messages", CHAT_HINT),
    ({"chosen": [msg("user", "x"), A], "rejected": [U, A]}, "auto",
     "fields 'chosen' and 'rejected' differ from their first message, so they share no prompt", "same prompt"),
    ({"chosen": [U, A, msg("user", "more"), A], "rejected": [U, msg("assistant", "b")]}, "auto",
     "fields 'chosen' and 'rejected' differ at message 1, before their last message", "final assistant reply"),
    ({"chosen": [U, A, msg("user", "x")], "rejected": [U, A, msg("user", "y")]}, "auto",
     "field 'chosen[2].role' is 'user', but the response must be the assistant's", CHAT_HINT),
    # explicit prompt messages
    ({"prompt": [], "chosen": "c", "rejected": "r"}, "auto", "field 'prompt' needs at least 1 message", CHAT_HINT),
    ({"prompt": [U], "chosen": [A, A], "rejected": "r"}, "auto",
     "field 'chosen' must hold exactly one assistant message (the prompt holds the rest), got 2", CHAT_HINT),
    ({"prompt": [U], "chosen": [A], "rejected": [msg("user", "b")]}, "auto",
     "field 'rejected[0].role' is 'user', but the response must be the assistant's", CHAT_HINT),
    ({"prompt": [U], "chosen": 5, "rejected": "r"}, "auto",
     "field 'chosen' must be a string or a list with one assistant message, got int 5", CHAT_HINT),
    ({"prompt": [U], "chosen": "c"}, "auto", "field 'rejected' is missing", CHAT_HINT),
    # margin
    (text_pair("p", "c", "r", margin="1"), "auto", "field 'margin' must be a number, got str '1'", "margin"),
    (text_pair("p", "c", "r", margin=True), "auto", "field 'margin' must be a number, got bool True", "margin"),
    (text_pair("p", "c", "r", margin=math.nan), "auto", "field 'margin' must be a finite number, got nan", "margin"),
    # HH
    ({"chosen": "\n\nHuman: q\n\nAssistant: a"}, "auto", "field 'rejected' is missing", HH_HINT),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "no turns"}, "auto",
     "field 'rejected' is not an HH transcript", HH_HINT),
    (text_pair("p", "c", "r"), "hh", "field 'chosen' is not an HH transcript", HH_HINT),
    ({"chosen": 3, "rejected": "r"}, "hh", "field 'chosen' must be a string", HH_HINT),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"}, "hh",
     "fields 'chosen' and 'rejected' share no prompt", "same dialogue"),
]


@pytest.mark.parametrize(("row", "fmt", "problem", "hint"), BAD_ROWS)
def test_errors_name_source_row_and_field_with_a_hint(row, fmt, problem, hint):
    good = {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: z"}
    with pytest.raises(DataError) as caught:
        normalize_preference_rows([good, row], SOURCE, fmt=fmt)
    assert caught.value.message.startswith(f"{SOURCE}: row 2: ")
    assert problem in caught.value.message
    assert hint in caught.value.hint


INVALID = [
    (text_pair("p", "same", "same"), "identical"),
    ({"chosen": "whole", "rejected": "whole"}, "identical"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"}, "identical"),
    ({"chosen": [U, A], "rejected": [U, A]}, "identical"),
    ({"prompt": [U], "chosen": [A], "rejected": "a"}, "identical"),
    (text_pair("p", "", "  \n"), "both empty"),
    (text_pair("p", " ", " "), "both empty"),  # identical too: counted as empty
    ({"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: "}, "both empty"),
]


@pytest.mark.parametrize(("row", "problem"), INVALID)
def test_invalid_pairs_fail_with_the_skip_hint(row, problem):
    with pytest.raises(DataError) as caught:
        normalize_preference_rows([text_pair("p", "a", "b"), text_pair("p", "a", "b"), row], SOURCE)
    assert caught.value.message == (
        f"{SOURCE}: row 3: fields 'chosen' and 'rejected' are {problem}: the pair carries no preference"
    )
    assert caught.value.hint == SKIP_HINT


def test_skip_invalid_drops_and_counts():
    rows = [
        text_pair("p", "a", "b"),
        text_pair("p", "same", "same"),
        {"chosen": [U, A], "rejected": [U, A]},
        text_pair("p", "", " "),
        text_pair("p", "", "b"),  # one empty response: valid, counted
        {"prompt": [U], "chosen": "  ", "rejected": "b"},
    ]
    normalised, stats = normalize_preference_rows(rows, SOURCE, skip_invalid=True)
    assert normalised == [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"messages": [U], "chosen": "  ", "rejected": "b"},
    ]
    assert stats == {"rows": 3, "dropped_identical": 2, "dropped_empty": 1, "empty_response": 2}


def test_one_empty_response_is_valid_without_skip_invalid():
    _, stats = normalize_preference_rows([text_pair("p", "a", ""), text_pair("p", "", "b")], SOURCE)
    assert stats == {"rows": 2, "dropped_identical": 0, "dropped_empty": 0, "empty_response": 2}


def test_every_row_dropped_is_an_error():
    with pytest.raises(DataError) as caught:
        normalize_preference_rows([text_pair("p", "x", "x"), text_pair("p", "", "")], SOURCE, skip_invalid=True)
    assert caught.value.message == (
        f"{SOURCE}: every row was dropped as an invalid pair (1 with chosen == rejected, 1 with both responses empty)"
    )
    assert caught.value.hint


def test_no_rows_is_not_an_error():
    assert normalize_preference_rows([], SOURCE) == (
        [], {"rows": 0, "dropped_identical": 0, "dropped_empty": 0, "empty_response": 0}
    )


def test_rows_of_a_file_are_named_by_line_even_after_a_dropped_pair(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [text_pair("p", "a", "b"), text_pair("p", "a", "a"), {"prompt": "p", "chosen": "a"}]
    path.write_text(f"{json.dumps(rows[0])}\n\n{json.dumps(rows[1])}\n  \n{json.dumps(rows[2])}\n")
    loaded, source = load_rows(str(path))
    with pytest.raises(DataError) as caught:
        normalize_preference_rows(loaded, source)
    identical = "fields 'chosen' and 'rejected' are identical: the pair carries no preference"
    assert caught.value.message == f"{path}: line 3: {identical}"
    with pytest.raises(DataError) as caught:
        normalize_preference_rows(loaded, source, skip_invalid=True)
    assert caught.value.message == f"{path}: line 5: field 'rejected' is missing"


# ---------------------------------------------------------------------------------------------------------------------
# The shared HH file (harmless-base test split)


@pytest.mark.parametrize("fmt", ["auto", "hh"])
def test_hh_file_normalises_every_row(hh_raw, fmt):
    rows, stats = normalize_preference_rows(hh_raw, str(SHARED_HH), fmt=fmt)
    assert stats == {"rows": 2312, "dropped_identical": 0, "dropped_empty": 0, "empty_response": 4}
    assert all(row["prompt"].endswith("Assistant:") for row in rows)
    assert all(row["prompt"] + row["chosen"] == raw["chosen"] for row, raw in zip(rows, hh_raw))
    assert all(row["prompt"] + row["rejected"] == raw["rejected"] for row, raw in zip(rows, hh_raw))
    assert sum(not row["chosen"].strip() for row in rows) == 4  # the empty replies are all chosen ones
    assert sum(not row["rejected"].strip() for row in rows) == 0


def test_hh_file_tokenizes_every_pair_in_both_layouts(hh_raw, tokenizer, encoder_tokenizer):
    rows, _ = normalize_preference_rows(hh_raw, str(SHARED_HH), fmt="hh")
    for tok, encoder in ((tokenizer, False), (encoder_tokenizer, True)):
        examples, stats = tokenize_pairs(rows, tok, 64, encoder=encoder)
        assert stats["pairs"] == len(examples) == 2312
        assert 0 < stats["truncated"] < 2312
        lengths = [len(ex[key]) for ex in examples for key in ("chosen_ids", "rejected_ids")]
        assert max(lengths) <= 64 and stats["tokens"] == sum(lengths)


# ---------------------------------------------------------------------------------------------------------------------
# render_pair


def test_render_text_row_as_is(tokenizer):
    assert render_pair({"prompt": "p", "chosen": " a", "rejected": " b"}, tokenizer) == ("p", " a", " b")


def test_render_chat_without_template_uses_the_hh_format(tokenizer):
    row = {"messages": [msg("system", "be nice"), msg("user", "hi")], "chosen": "hello", "rejected": "go"}
    assert render_pair(row, tokenizer) == ("\n\nSystem: be nice\n\nHuman: hi\n\nAssistant:", " hello", " go")


def test_render_chat_with_template(chat_tokenizer):
    row = {"messages": [msg("user", "hi")], "chosen": "hello", "rejected": "go"}
    assert render_pair(row, chat_tokenizer) == ("<user> hi <assistant>", "hello", "go")


def test_template_rejecting_the_prompt_is_a_data_error():
    strict = make_tokenizer(chat_template="{{ raise_exception('Conversation roles must alternate') }}")
    rows = [text_pair("w1", "w2", "w3"), {"messages": [msg("user", "hi")], "chosen": "w1", "rejected": "w2"}]
    with pytest.raises(DataError) as caught:
        tokenize_pairs(rows, strict, 16, encoder=False, source=SOURCE)
    assert caught.value.message.startswith(f"{SOURCE}: row 2: the prompt messages were rejected by the tokenizer's")
    assert "Conversation roles must alternate" in caught.value.message
    assert caught.value.hint


# ---------------------------------------------------------------------------------------------------------------------
# tokenize_pairs, causal layout: [bos] prompt response EOS (max_seq_len = 10)


def test_causal_short_pair_ends_with_eos(tokenizer):
    rows = [text_pair(words(3), words(2, 50), words(1, 60), margin=1.5), text_pair(words(2), words(1, 50), "")]
    (first, second), stats = tokenize_pairs(rows, tokenizer, 10, encoder=False)
    assert first == {"chosen_ids": ids(3) + ids(2, 50) + [EOS], "rejected_ids": ids(3) + ids(1, 60) + [EOS],
                     "margin": 1.5, "chosen_start": 3, "rejected_start": 3}
    assert second == {"chosen_ids": ids(2) + ids(1, 50) + [EOS], "rejected_ids": ids(2) + [EOS], "margin": 0.0,
                      "chosen_start": 2, "rejected_start": 2}
    assert stats == {"pairs": 2, "truncated": 0, "tokens": 6 + 5 + 4 + 3}


def side(prompt_len: int, kept_prompt: int, response_start: int, kept_response: int, eos: bool) -> list[int]:
    """The expected causal ids: the prompt's last `kept_prompt` words, the response's first, EOS if it survived."""
    return ids(prompt_len)[prompt_len - kept_prompt :] + ids(kept_response, response_start) + [EOS] * eos


@pytest.mark.parametrize(
    ("prompt_len", "chosen_len", "rejected_len", "chosen", "rejected"),
    [
        # (kept prompt, kept response, EOS kept) per side; budget 10, the response's EOS counts as its token
        # fits: 3 + 2 + EOS and 3 + 6 + EOS
        (3, 2, 6, (3, 2, True), (3, 6, True)),
        # long prompt: response+EOS (3) fits in max(10 // 2, 10 - 20) = 5; the prompt keeps its last 7
        (20, 2, 2, (7, 2, True), (7, 2, True)),
        # long chosen: keeps max(5, 10 - 3) = 7 from its start, no EOS; rejected untouched
        (3, 20, 1, (3, 7, False), (3, 1, True)),
        # both long: response keeps max(5, 10 - 20) = 5; a short rejected (+EOS = 2) leaves 8 for the prompt
        (20, 20, 1, (5, 5, False), (8, 1, True)),
        # empty prompt: the whole budget for the response
        (0, 20, 9, (0, 10, False), (0, 9, True)),
        # edge: 4 + 6 + EOS = 11 -> response keeps 6 tokens: all its text, but not its EOS
        (4, 6, 5, (4, 6, False), (4, 5, True)),
    ],
)
def test_causal_truncation_by_hand(tokenizer, prompt_len, chosen_len, rejected_len, chosen, rejected):
    row = text_pair(words(prompt_len), words(chosen_len, 50), words(rejected_len, 80))
    (example,), stats = tokenize_pairs([row], tokenizer, 10, encoder=False)
    assert example["chosen_ids"] == side(prompt_len, chosen[0], 50, chosen[1], chosen[2])
    assert example["rejected_ids"] == side(prompt_len, rejected[0], 80, rejected[1], rejected[2])
    assert (example["chosen_start"], example["rejected_start"]) == (chosen[0], rejected[0])  # after the kept prompt
    untouched = all(kept == (prompt_len, length, True) for kept, length in ((chosen, chosen_len),
                                                                            (rejected, rejected_len)))
    assert stats["truncated"] == (not untouched)
    assert max(len(example["chosen_ids"]), len(example["rejected_ids"])) <= 10


def test_causal_bos_is_kept_and_counted_in_the_budget(bos_tokenizer):
    rows = [text_pair(words(2), words(1, 50), words(2, 60)), text_pair(words(20), words(20, 50), words(1, 80))]
    (short, long), stats = tokenize_pairs(rows, bos_tokenizer, 10, encoder=False)
    assert short["chosen_ids"] == [BOS] + ids(2) + ids(1, 50) + [EOS]
    assert short["rejected_ids"] == [BOS] + ids(2) + ids(2, 60) + [EOS]
    # budget 9: chosen keeps max(9 // 2, 9 - 20) = 4, the prompt its last 5; rejected+EOS (2) leaves 7 for the prompt
    assert long["chosen_ids"] == [BOS] + ids(5, 15) + ids(4, 50)
    assert long["rejected_ids"] == [BOS] + ids(7, 13) + ids(1, 80) + [EOS]
    assert [(x["chosen_start"], x["rejected_start"]) for x in (short, long)] == [(3, 3), (6, 8)]
    assert stats == {"pairs": 2, "truncated": 1, "tokens": 5 + 6 + 10 + 10}


def test_causal_chat_rows_with_template(chat_tokenizer):
    rows, _ = normalize_preference_rows(
        [{"chosen": [msg("user", "w1 w2"), msg("assistant", "w3")], "rejected": [msg("user", "w1 w2"),
                                                                                   msg("assistant", "w4 w5")]}],
        SOURCE,
    )
    (example,), _ = tokenize_pairs(rows, chat_tokenizer, 32, encoder=False)
    prompt = chat_tokenizer("<user> w1 w2 <assistant>", add_special_tokens=False).input_ids
    assert example["chosen_ids"] == prompt + ids(1, 3) + [EOS]
    assert example["rejected_ids"] == prompt + ids(2, 4) + [EOS]


def test_causal_max_seq_len_too_small(tokenizer, bos_tokenizer):
    with pytest.raises(ConfigError, match="max_seq_len must be at least 3"):
        tokenize_pairs([text_pair("w1", "w2", "w3")], bos_tokenizer, 2, encoder=False)
    with pytest.raises(ConfigError, match="max_seq_len must be at least 3"):
        tokenize_pairs([text_pair("w1", "w2", "w3")], tokenizer, 2, encoder=False)  # has a BOS token, as in sft


# ---------------------------------------------------------------------------------------------------------------------
# tokenize_pairs, encoder layout: [CLS] prompt [SEP] response [SEP] (max_seq_len = 10)


def test_encoder_pair_and_single_layouts(encoder_tokenizer):
    rows = [text_pair(words(3), words(2, 50), words(1, 60), margin=2), text_pair("", words(2, 50), words(1, 60))]
    (pair, single), stats = tokenize_pairs(rows, encoder_tokenizer, 10, encoder=True)
    assert pair == {
        "chosen_ids": [CLS] + enc_ids(3) + [SEP] + enc_ids(2, 50) + [SEP],
        "rejected_ids": [CLS] + enc_ids(3) + [SEP] + enc_ids(1, 60) + [SEP],
        "margin": 2.0,
        "chosen_start": 5,   # [CLS] + 3 prompt ids + [SEP]
        "rejected_start": 5,
    }
    assert single["chosen_ids"] == [CLS] + enc_ids(2, 50) + [SEP]
    assert (single["chosen_start"], single["rejected_start"]) == (1, 1)   # after [CLS]
    assert single["rejected_ids"] == [CLS] + enc_ids(1, 60) + [SEP]
    assert stats == {"pairs": 2, "truncated": 0, "tokens": 8 + 7 + 4 + 3}
    # the same as the tokenizer's own pair encoding
    assert pair["chosen_ids"] == encoder_tokenizer(words(3), words(2, 50)).input_ids


@pytest.mark.parametrize(
    ("prompt_len", "chosen_len", "rejected_len", "chosen", "rejected"),
    [
        # (kept prompt, kept response) per side; budget 10 - 3 specials = 7 (no EOS here)
        (3, 2, 4, (3, 2), (3, 4)),
        # long prompt: a 2-token response fits in max(7 // 2, 7 - 20) = 3; the prompt keeps its last 5
        (20, 2, 3, (5, 2), (4, 3)),
        # long response: keeps max(3, 7 - 3) = 4 from its start
        (3, 20, 1, (3, 4), (3, 1)),
        # both long: response 3, prompt 4
        (20, 20, 20, (4, 3), (4, 3)),
    ],
)
def test_encoder_truncation_by_hand(encoder_tokenizer, prompt_len, chosen_len, rejected_len, chosen, rejected):
    row = text_pair(words(prompt_len), words(chosen_len, 50), words(rejected_len, 80))
    (example,), stats = tokenize_pairs([row], encoder_tokenizer, 10, encoder=True)

    def expected(kept_prompt: int, start: int, kept_response: int) -> list[int]:
        prompt = enc_ids(prompt_len)[prompt_len - kept_prompt :]
        return [CLS] + prompt + [SEP] + enc_ids(kept_response, start) + [SEP]

    assert example["chosen_ids"] == expected(chosen[0], 50, chosen[1])
    assert example["rejected_ids"] == expected(rejected[0], 80, rejected[1])
    untouched = chosen == (prompt_len, chosen_len) and rejected == (prompt_len, rejected_len)
    assert stats["truncated"] == (not untouched)


def test_encoder_empty_prompt_gets_the_single_layout_budget(encoder_tokenizer):
    (example,), stats = tokenize_pairs([text_pair("", words(20, 50), words(8, 80))], encoder_tokenizer, 10, True)
    assert example["chosen_ids"] == [CLS] + enc_ids(8, 50) + [SEP]  # budget 10 - 2
    assert example["rejected_ids"] == [CLS] + enc_ids(8, 80) + [SEP]  # fits exactly
    assert stats["truncated"] == 1


def test_encoder_max_seq_len_too_small(encoder_tokenizer):
    with pytest.raises(ConfigError, match="max_seq_len must be at least 5"):
        tokenize_pairs([text_pair("w1", "w2", "w3")], encoder_tokenizer, 4, encoder=True)


def test_encoder_layout_matches_transformers_bert_tokenizers(tmp_path, encoder_tokenizer):
    """The layout read from a fast tokenizer's post-processor equals BERT's, fast and slow (build_inputs path)."""
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(encoder_vocab()) + "\n")
    major = int(transformers.__version__.split(".")[0])
    # transformers 5's BertTokenizerFast takes `vocab` and silently ignores `vocab_file` (all [UNK])
    fast = (transformers.BertTokenizerFast(vocab=str(vocab_file), do_lower_case=False) if major >= 5
            else transformers.BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=False))
    slow_class = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer
    slow = slow_class(vocab_file=str(vocab_file), do_lower_case=False)
    assert fast.is_fast and not slow.is_fast
    rows = [text_pair(words(20), words(2, 50), words(20, 80)), text_pair("", words(3, 50), words(1, 80))]
    reference, _ = tokenize_pairs(rows, encoder_tokenizer, 10, encoder=True)
    for tok in (fast, slow):
        assert tokenize_pairs(rows, tok, 10, encoder=True)[0] == reference


# ---------------------------------------------------------------------------------------------------------------------
# collate_pairs


def test_collate_puts_chosen_rows_first_then_rejected_right_padded():
    examples = [
        {"chosen_ids": [5, 6, 7], "rejected_ids": [5, 8], "margin": 1.0},
        {"chosen_ids": [9], "rejected_ids": [9, 10, 11, 12], "margin": 0.0},
    ]
    batch = collate_pairs(examples, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 4)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["margin"].tolist() == [1.0, 0.0] and batch["margin"].dtype == torch.float32


def test_collate_tokenized_pairs_last_real_token_is_eos(tokenizer):
    rows = [text_pair(words(3), words(2, 50), words(5, 60)), text_pair(words(1), words(1, 50), "")]
    examples, _ = tokenize_pairs(rows, tokenizer, 32, encoder=False)
    batch = collate_pairs(examples, pad_id=tokenizer.pad_token_id)
    last = batch["attention_mask"].sum(dim=1) - 1
    assert batch["input_ids"][torch.arange(4), last].tolist() == [EOS] * 4
    assert batch["margin"].tolist() == [0.0, 0.0]
