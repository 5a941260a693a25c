"""SFT rows: normalising and validating, rendering, tokenising with the truncation policy, and collating."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlhf_cli.data.loading import load_rows
from rlhf_cli.data.sft import collate_sft, normalize_sft_rows, tokenize_sft
from rlhf_cli.data.text import render
from rlhf_cli.errors import ConfigError, DataError

SHARED_HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
SOURCE = "/data/train.jsonl"
PAD, BOS, EOS = 0, 1, 2
FIRST_WORD_ID = 4  # w0 -> 4, w1 -> 5, ...
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def words(count: int, start: int = 0) -> str:
    """`count` distinct one-token words: "w0 w1 ..."; word i has id FIRST_WORD_ID + i."""
    return " ".join(f"w{i}" for i in range(start, start + count))


def ids(count: int, start: int = 0) -> list[int]:
    return list(range(FIRST_WORD_ID + start, FIRST_WORD_ID + start + count))


def make_tokenizer(adds_bos: bool = False, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A whitespace WordLevel tokenizer: one token a word, so lengths can be computed by hand."""
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


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(adds_bos=True)


@pytest.fixture(scope="module")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(chat_template=CHAT_TEMPLATE)


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# ---------------------------------------------------------------------------------------------------------------------
# normalize_sft_rows


def test_normalize_auto_detects_each_format_and_drops_other_fields():
    rows = [
        {"prompt": "p", "completion": "c", "id": 7},
        {"messages": [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "yo"}]},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        # what datasets returns for a file mixing formats: absent fields are None
        {"prompt": None, "completion": None, "messages": None, "chosen": "\n\nHuman: a\n\nAssistant: b"},
    ]
    assert normalize_sft_rows(rows, SOURCE) == [
        {"prompt": "p", "completion": "c"},
        chat(("user", "hi"), ("assistant", "yo")),
        {"prompt": "\n\nHuman: hi\n\nAssistant:", "completion": " hello"},
        {"prompt": "\n\nHuman: a\n\nAssistant:", "completion": " b"},
    ]


def test_normalize_explicit_format_is_enforced():
    with pytest.raises(DataError) as caught:
        normalize_sft_rows([{"prompt": "p", "completion": "c"}], SOURCE, fmt="messages")
    assert caught.value.message == f"{SOURCE}: row 1: field 'messages' is missing"


def test_normalize_unknown_format_lists_the_valid_ones():
    with pytest.raises(DataError) as caught:
        normalize_sft_rows([], SOURCE, fmt="alpaca")
    assert "alpaca" in caught.value.message
    assert caught.value.hint == "use one of: auto, prompt_completion, messages, hh"


def test_normalize_allows_an_empty_prompt():
    assert normalize_sft_rows([{"prompt": "", "completion": "c"}], SOURCE) == [{"prompt": "", "completion": "c"}]


GOOD = [{"prompt": "p", "completion": "c"}, chat(("user", "hi"), ("assistant", "yo"))]
BAD_ROWS = [
    ({"prompt": "p"}, "auto", "field 'completion' is missing"),
    ({"completion": "c"}, "auto", "field 'prompt' is missing"),
    ({"prompt": "p", "completion": 5}, "auto", "field 'completion' must be a string, got int 5"),
    ({"prompt": ["p"], "completion": "c"}, "auto", "field 'prompt' must be a string, got list"),
    ({"prompt": "p", "completion": "  \n"}, "auto", "field 'completion' is empty"),
    ({"messages": "hello"}, "auto", "field 'messages' must be a list of messages, got str"),
    ({"messages": ["hi", {"role": "assistant", "content": "x"}]}, "auto", "field 'messages[0]' must be an object"),
    (chat(("user", "hi"), ("assistant", 3)), "auto", "field 'messages[1].content' must be a string, got int"),
    (
        {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
        "auto",
        "field 'messages[0].role' is missing",
    ),
    (
        chat(("bot", "hi"), ("assistant", "x")),
        "auto",
        "field 'messages[0].role' is 'bot', expected one of: system, user, assistant",
    ),
    (
        chat(("user", "hi"), ("assistant", "x"), ("user", "bye")),
        "auto",
        "field 'messages[2].role' is 'user', but the last message must be the assistant's",
    ),
    (chat(("assistant", "x")), "auto", "field 'messages' needs at least 2 messages"),
    (chat(("user", "hi"), ("assistant", " ")), "auto", "field 'messages[1].content' is empty"),
    ({"text": "hello", "label": 1}, "auto", "no SFT fields found"),
    ({"chosen": "just text"}, "auto", "field 'chosen' is not an HH transcript"),
    ({"chosen": 3}, "hh", "field 'chosen' must be a string"),
    ({"prompt": "p", "completion": "c"}, "hh", "field 'chosen' is missing"),
]


@pytest.mark.parametrize(("row", "fmt", "problem"), BAD_ROWS)
def test_normalize_errors_name_source_row_and_field(row, fmt, problem):
    good = [] if fmt == "hh" else GOOD
    with pytest.raises(DataError) as caught:
        normalize_sft_rows([*good, row], SOURCE, fmt=fmt)
    assert caught.value.message.startswith(f"{SOURCE}: row {len(good) + 1}: ")
    assert problem in caught.value.message
    assert caught.value.hint


def test_normalize_rejects_a_row_that_is_not_an_object():
    with pytest.raises(DataError, match=f"{SOURCE}: row 1 is not an object"):
        normalize_sft_rows(["just a string"], SOURCE)  # type: ignore[list-item]


def write_lines(path: Path, lines: list[str]) -> Path:
    """Write `lines` as a (possibly gzipped) text file, one a line."""
    text = "".join(line + "\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["train.jsonl", "train.jsonl.gz"])
def test_normalize_names_the_files_line_after_blank_and_whitespace_lines(tmp_path, name):
    good = json.dumps({"prompt": "p", "completion": "c"})
    path = write_lines(tmp_path / name, [good, "", "  \t", good, "", json.dumps({"prompt": "no completion"}), good])
    rows, source = load_rows(str(path))
    with pytest.raises(DataError) as caught:
        normalize_sft_rows(rows, source)
    assert caught.value.message == f"{path}: line 6: field 'completion' is missing"


# ---------------------------------------------------------------------------------------------------------------------
# render


def test_render_plain_row_as_is(tokenizer):
    assert render({"prompt": "a b", "completion": " c"}, tokenizer) == ("a b", " c")


def test_render_chat_without_template_uses_the_hh_format(tokenizer):
    row = chat(("system", "be nice"), ("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao"))
    prompt, completion = render(row, tokenizer)
    assert prompt == "\n\nSystem: be nice\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert completion == " ciao"


def test_render_chat_with_template(chat_tokenizer):
    prompt, completion = render(chat(("user", "hi"), ("assistant", "hello")), chat_tokenizer)
    assert prompt == "<user> hi <assistant>"
    assert completion == "hello"


def test_template_rejecting_a_conversation_is_a_data_error():
    strict = make_tokenizer(chat_template="{{ raise_exception('Conversation roles must alternate') }}")
    rows = [{"prompt": "w1", "completion": "w2"}, chat(("user", "hi"), ("assistant", "hello"))]
    with pytest.raises(DataError) as caught:
        tokenize_sft(rows, strict, max_seq_len=16, source=SOURCE)
    assert caught.value.message.startswith(f"{SOURCE}: row 2: field 'messages' was rejected by the tokenizer's chat")
    assert "Conversation roles must alternate" in caught.value.message


def test_template_rejection_names_the_files_line_or_the_rows_position_in_a_split(tmp_path):
    strict = make_tokenizer(chat_template="{{ raise_exception('Conversation roles must alternate') }}")
    plain, chat_row = {"prompt": "w1", "completion": "w2"}, chat(("user", "hi"), ("assistant", "hello"))
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(plain), "", json.dumps(chat_row)])
    rows, source = load_rows(str(path))
    rows = normalize_sft_rows(rows, source)
    with pytest.raises(DataError, match=f"^{path}: line 3: field 'messages' was rejected"):
        tokenize_sft(rows, strict, max_seq_len=16, source=source)
    with pytest.raises(DataError, match=f"^{path}: row 1: field 'messages' was rejected"):  # lines unknown in a split
        tokenize_sft(rows[1:], strict, max_seq_len=16, source=source)


# ---------------------------------------------------------------------------------------------------------------------
# tokenize_sft: layout, masking and the truncation policy (max_seq_len = 10 throughout)


def test_short_row_is_untouched_and_masked(tokenizer):
    (example,), stats = tokenize_sft([{"prompt": words(3), "completion": words(2, 50)}], tokenizer, 10)
    assert example["input_ids"] == ids(3) + ids(2, 50) + [EOS]
    assert example["labels"] == [-100] * 3 + ids(2, 50) + [EOS]
    assert stats == {"rows": 1, "truncated": 0, "tokens": 6, "completion_tokens": 3}


def test_labels_cover_everything_without_completion_only(tokenizer):
    (example,), stats = tokenize_sft([{"prompt": words(3), "completion": words(2, 50)}], tokenizer, 10, False)
    assert example["labels"] == example["input_ids"]
    assert stats["completion_tokens"] == stats["tokens"] == 6


@pytest.mark.parametrize(
    ("prompt_len", "completion_len", "kept_prompt", "kept_completion", "has_eos"),
    [
        # fits: 3 + 2 + EOS <= 10
        (3, 2, 3, 2, True),
        # long prompt: completion+EOS (3) fits in max(10 // 2, 10 - 20) = 5 -> whole; prompt keeps its last 7
        (20, 2, 7, 2, True),
        # long completion: keeps max(5, 10 - 3) = 7 tokens from its start, no EOS; prompt whole
        (3, 20, 3, 7, False),
        # both long: completion keeps max(5, 10 - 20) = 5 from its start, prompt its last 5
        (20, 20, 5, 5, False),
        # edge: 4 + 6 + EOS = 11; completion+EOS keeps max(5, 6) = 6 tokens: all its text, but EOS is cut
        (4, 6, 4, 6, False),
        # exactly full: 4 + 5 + EOS = 10
        (4, 5, 4, 5, True),
    ],
)
def test_truncation_policy_by_hand(tokenizer, prompt_len, completion_len, kept_prompt, kept_completion, has_eos):
    row = {"prompt": words(prompt_len), "completion": words(completion_len, 50)}
    (example,), stats = tokenize_sft([row], tokenizer, 10)
    expected_prompt = ids(prompt_len)[prompt_len - kept_prompt :]  # left truncation: the prompt's end survives
    expected_completion = ids(kept_completion, 50) + ([EOS] if has_eos else [])  # right truncation
    assert example["input_ids"] == expected_prompt + expected_completion
    assert example["labels"] == [-100] * kept_prompt + expected_completion
    assert len(example["input_ids"]) <= 10
    assert stats["truncated"] == (not (kept_prompt == prompt_len and has_eos))


def test_stats_count_every_row_and_truncations(tokenizer):
    rows = [
        {"prompt": words(3), "completion": words(2, 50)},  # 6 tokens, 3 supervised
        {"prompt": words(20), "completion": words(2, 50)},  # 10 tokens, 3 supervised, truncated
        {"prompt": words(3), "completion": words(20, 50)},  # 10 tokens, 7 supervised, truncated
    ]
    examples, stats = tokenize_sft(rows, tokenizer, 10)
    assert len(examples) == 3
    assert stats == {"rows": 3, "truncated": 2, "tokens": 26, "completion_tokens": 13}


def test_bos_is_prepended_masked_and_counted_in_the_budget(bos_tokenizer):
    (short, long), stats = tokenize_sft(
        [{"prompt": words(2), "completion": words(1, 50)}, {"prompt": words(20), "completion": words(20, 50)}],
        bos_tokenizer,
        10,
    )
    assert short["input_ids"] == [BOS] + ids(2) + ids(1, 50) + [EOS]
    assert short["labels"] == [-100] * 3 + ids(1, 50) + [EOS]
    # budget 9: completion keeps max(9 // 2, 9 - 20) = 4, the prompt its last 5, BOS stays in front
    assert long["input_ids"] == [BOS] + ids(5, 15) + ids(4, 50)
    assert stats["truncated"] == 1


def test_no_bos_when_the_tokenizer_does_not_add_one(tokenizer):
    (example,), _ = tokenize_sft([{"prompt": words(2), "completion": words(1, 50)}], tokenizer, 10)
    assert BOS not in example["input_ids"]


def test_bos_written_by_the_chat_template_is_not_doubled_nor_truncated():
    template = "<s>" + CHAT_TEMPLATE
    tokenizer = make_tokenizer(adds_bos=True, chat_template=template)
    row = chat(("user", words(20)), ("assistant", "w50"))
    (example,), _ = tokenize_sft([row], tokenizer, 8)
    # prompt "<s> <user> w0..w19 <assistant>" -> BOS kept, then the last 8 - 1 - 2 = 5 prompt tokens
    assert example["input_ids"][0] == BOS and example["input_ids"].count(BOS) == 1
    assert example["input_ids"][-2:] == ids(1, 50) + [EOS]
    assert len(example["input_ids"]) == 8


def test_chat_rows_with_template_mask_the_rendered_prompt(chat_tokenizer):
    rows = normalize_sft_rows([chat(("user", "w1 w2"), ("assistant", "w3"))], SOURCE)
    (example,), _ = tokenize_sft(rows, chat_tokenizer, 32)
    assert len(example["input_ids"]) == 4 + 2  # "<user> w1 w2 <assistant>" + "w3" + EOS
    assert example["labels"] == [-100] * 4 + ids(1, 3) + [EOS]


def test_max_seq_len_too_small(tokenizer):
    with pytest.raises(ConfigError, match="max_seq_len must be at least 3"):
        tokenize_sft([{"prompt": "w1", "completion": "w2"}], tokenizer, 2)


def test_shared_hh_file_tokenizes_without_dropping_rows(tokenizer):
    if not SHARED_HH.exists():
        pytest.skip(f"shared HH data not found at {SHARED_HH} (expected ../shared/data beside the checkout)")
    with gzip.open(SHARED_HH, "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for line in handle]
    rows = normalize_sft_rows(raw, str(SHARED_HH), fmt="hh")
    examples, stats = tokenize_sft(rows, tokenizer, 64)
    assert stats["rows"] == len(examples) == 2312
    assert 0 < stats["truncated"] < 2312
    assert all(len(ex["input_ids"]) <= 64 for ex in examples)
    assert all(any(label != -100 for label in ex["labels"]) for ex in examples)


# ---------------------------------------------------------------------------------------------------------------------
# collate_sft


def test_collate_right_pads_to_the_longest():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
    ]
    batch = collate_sft(examples, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, PAD, PAD], [5, 6, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 7, 8, 9]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
