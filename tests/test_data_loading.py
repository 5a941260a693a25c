"""load_rows: every supported file type, max_rows, and a DataError naming file/row/field for each user mistake."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import gzip  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from rlhf_cli.data.loading import load_rows, row_location, source_for  # noqa: E402
from rlhf_cli.data.prompts import prompt_texts  # noqa: E402
from rlhf_cli.errors import ConfigError, DataError  # noqa: E402

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(1, 6)]
SHARED_HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Supported formats


def test_jsonl_loads_rows_and_names_absolute_source(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "data.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    rows, source = load_rows("data.jsonl")
    assert rows == ROWS
    assert str(source) == str((tmp_path / "data.jsonl").resolve())
    assert json.dumps({"source": source}, default=str) == json.dumps({"source": str(source)})  # as manifests write it


def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert load_rows(str(path))[0] == ROWS


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.json.gz"])
def test_gzipped_json_lines(tmp_path, name):
    path = tmp_path / name
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in ROWS)
    assert load_rows(str(path))[0] == ROWS


def test_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in ROWS))
    assert load_rows(str(path))[0] == ROWS


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_rows(str(path))[0] == ROWS


def test_max_rows_keeps_the_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    rows, _ = load_rows(str(path), max_rows=2)
    assert rows == ROWS[:2]
    assert load_rows(str(path), max_rows=100)[0] == ROWS


def test_max_rows_must_be_positive(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(ConfigError, match="max_rows"):
        load_rows(str(path), max_rows=0)


def test_missing_fields_come_back_as_none(tmp_path):
    """datasets merges the rows' schemas: document that a field absent from a row reads as None."""
    chat_row = {"messages": [{"role": "user", "content": "hi"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "completion": "c"}, chat_row])
    rows, _ = load_rows(str(path))
    assert rows[0]["messages"] is None
    assert rows[1]["prompt"] is None and rows[1]["messages"] == [{"role": "user", "content": "hi"}]


def test_shared_hh_file_loads():
    if not SHARED_HH.exists():
        pytest.skip(f"shared HH data not found at {SHARED_HH} (expected ../shared/data beside the checkout)")
    rows, source = load_rows(str(SHARED_HH))
    assert len(rows) == 2312
    assert set(rows[0]) == {"chosen", "rejected"}
    assert str(source) == str(SHARED_HH)
    assert row_location(source, 2311) == f"{SHARED_HH}: line 2312"


# ---------------------------------------------------------------------------------------------------------------------
# User mistakes


def test_malformed_jsonl_line_is_reported_by_line_number(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(row) for row in ROWS] + ['{"prompt": "x" "completion": "y"}'] + [json.dumps(ROWS[0])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    message = caught.value.message
    assert message.startswith(f"{path}: line 6 is not valid JSON (Expecting ',' delimiter: column 16)")
    assert caught.value.hint and "one JSON object" in caught.value.hint


def test_malformed_line_in_gzipped_jsonl(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(ROWS[0]) + "\n" + '{"prompt": "unterminated\n')
    with pytest.raises(DataError, match=r"data\.jsonl\.gz: line 2 is not valid JSON"):
        load_rows(str(path))


def test_jsonl_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(["a", "list"]) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl: line 2 is not a JSON object \(it is a list\)"):
        load_rows(str(path))


def test_field_changing_type_is_reported_when_datasets_fails(tmp_path):
    path = tmp_path / "data.jsonl"
    # The blank line makes datasets' pandas fallback fail too, so the type clash surfaces as an error.
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": 5}\n')
    with pytest.raises(DataError, match=r"data\.jsonl: line 3: field 'completion' is a number but line 1 has a string"):
        load_rows(str(path))


def test_malformed_json_array_is_reported_by_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]\n')
    with pytest.raises(DataError, match=r"data\.json: line 3 is not valid JSON"):
        load_rows(str(path))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, content):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"data\.jsonl: the file is empty"):
        load_rows(str(path))


def test_empty_gzipped_jsonl(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("")
    with pytest.raises(DataError, match="the file is empty"):
        load_rows(str(path))


def test_csv_with_only_a_header_has_no_rows(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\n")
    with pytest.raises(DataError, match=r"data\.csv: the file has no rows"):
        load_rows(str(path))


def test_csv_row_with_extra_fields(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\nhello,world\nhello, world,again\n")
    with pytest.raises(DataError, match=r"data\.csv: line 3 has 3 fields but the header has 2"):
        load_rows(str(path))


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=r"data\.jsonl\.gz: cannot read the file"):
        load_rows(str(path))


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match=r"data\.parquet: could not read the parquet file"):
        load_rows(str(path))


@pytest.mark.parametrize("name", ["missing.jsonl", "no/such/folder/data", "./data", "missing.parquet"])
def test_missing_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as caught:
        load_rows(name)
    assert caught.value.message == f"{name}: file not found"
    assert str(tmp_path) in caught.value.hint


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"data\.txt: unsupported file type '\.txt'") as caught:
        load_rows(str(path))
    assert ".jsonl" in caught.value.hint


def test_folder_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        load_rows(str(tmp_path))


def test_unknown_hub_name_offline(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as caught:
        load_rows("some-org/no-such-dataset")
    expected = "some-org/no-such-dataset: neither an existing local file nor a reachable hub dataset"
    assert caught.value.message.startswith(expected)


# ---------------------------------------------------------------------------------------------------------------------
# Where a row is: the line an editor shows for JSON Lines and CSV, the row's position otherwise

GAPS = {"one blank line": "\n", "several blank lines": "\n\n\n", "whitespace-only lines": "  \n\t\n \r\n"}


def prompt_location_error(path: Path) -> str:
    """The message prompt_texts gives for the first row of `path` without a prompt."""
    rows, source = load_rows(str(path))
    with pytest.raises(DataError) as caught:
        prompt_texts(rows, source, tokenizer=None)  # plain string prompts never reach the tokenizer
    return caught.value.message


@pytest.mark.parametrize("gap", GAPS.values(), ids=GAPS.keys())
def test_prompt_rows_are_named_by_line_after_blank_lines(tmp_path, gap):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n' + gap + '{"prompt": "b"}\n' + gap + '{"prompt": ""}\n')
    line = 3 + 2 * gap.count("\n")
    assert prompt_location_error(path) == (
        f"{path}: line {line}: no prompt (expected a non-empty 'prompt', 'messages', or an HH 'chosen')"
    )


def test_gzipped_rows_are_named_by_line(tmp_path):
    path = tmp_path / "prompts.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write('\n{"prompt": "a"}\n\n\n{"prompt": ""}\n')
    assert prompt_location_error(path).startswith(f"{path}: line 5: no prompt")


def test_json_lines_in_a_dot_json_file_are_named_by_line(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('{"prompt": "a"}\n\n{"prompt": ""}\n')
    assert prompt_location_error(path).startswith(f"{path}: line 3: no prompt")


def test_json_array_rows_are_named_by_position(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('[\n  {"prompt": "a"},\n\n  {"prompt": "b"},\n  {"prompt": ""}\n]\n')
    assert prompt_location_error(path).startswith(f"{path}: row 3: no prompt")


def test_csv_rows_are_named_by_the_line_they_start_on(tmp_path):
    path = tmp_path / "prompts.csv"
    # line 1 header, 2 a row, 3 blank, 4 whitespace only, 5-6 one row with a quoted newline, 7 the empty prompt
    path.write_text('prompt,completion\na,b\n\n  \n"two\nlines",c\n,d\n')
    rows, source = load_rows(str(path))
    assert [row["prompt"] for row in rows] == ["a", "two\nlines", None]
    assert [row_location(source, index) for index in range(3)] == [f"{path}: line {n}" for n in (2, 5, 7)]
    assert prompt_location_error(path).startswith(f"{path}: line 7: no prompt")


def test_max_rows_keeps_each_rows_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n" + "".join(json.dumps(row) + "\n\n" for row in ROWS))
    rows, source = load_rows(str(path), max_rows=3)
    assert rows == ROWS[:3]
    assert [row_location(source, index) for index in range(3)] == [f"{path}: line {n}" for n in (2, 4, 6)]


def test_a_split_of_the_rows_is_named_by_position_not_by_line(tmp_path):
    """Line numbers hold only for all the rows loaded: a held-out split falls back to "row N" among its rows."""
    path = tmp_path / "data.jsonl"
    path.write_text("\n\n" + "".join(json.dumps(row) + "\n" for row in ROWS))
    rows, source = load_rows(str(path))
    assert row_location(source_for(rows, source), 0) == f"{path}: line 3"
    assert row_location(source_for(rows[1:], source), 0) == f"{path}: row 1"


def test_plain_string_sources_name_rows_by_position():
    assert row_location("rollout", 4) == "rollout: row 5"


def test_malformed_json_after_blank_lines_names_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n \n" + '{"prompt": "x" "completion": "y"}\n')
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    assert caught.value.message == f"{path}: line 4 is not valid JSON (Expecting ',' delimiter: column 16)"


# ---------------------------------------------------------------------------------------------------------------------
# Invalid UTF-8: named by file, line and column

GOOD_LINE = b'{"prompt": "a", "completion": "b"}\n'
BAD_LINE = b'{"prompt": "caf\xff\xfe", "completion": "b"}\n'  # 0xff comes 16th


def write_bytes(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz", "data.json"])
def test_invalid_utf8_in_json_lines_names_the_line(tmp_path, name):
    path = write_bytes(tmp_path / name, GOOD_LINE + b"\n" + BAD_LINE + GOOD_LINE)
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    assert caught.value.message == f"{path}: line 3 is not valid UTF-8 (byte 0xff at column 16)"
    assert "re-save the file as UTF-8" in caught.value.hint


def test_invalid_utf8_in_a_json_array_names_the_line(tmp_path):
    path = write_bytes(tmp_path / "data.json", b"[\n" + GOOD_LINE.rstrip() + b",\n" + BAD_LINE + b"]\n")
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    assert caught.value.message == f"{path}: line 3 is not valid UTF-8 (byte 0xff at column 16)"


def test_invalid_utf8_in_a_csv_names_the_line_and_counts_columns_in_characters(tmp_path):
    path = write_bytes(tmp_path / "data.csv", "prompt,completion\ncafé,b\n\nnaïve".encode() + b"\xff,b\n")
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    assert caught.value.message == f"{path}: line 4 is not valid UTF-8 (byte 0xff at column 6)"
