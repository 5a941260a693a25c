"""load_rows: every supported file type, max_rows, and a DataError naming file/row/field for each user mistake."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import gzip  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from rlhf_cli.data.loading import load_rows  # noqa: E402
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
    assert source == str((tmp_path / "data.jsonl").resolve())


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
    assert source == str(SHARED_HH)


# ---------------------------------------------------------------------------------------------------------------------
# User mistakes


def test_malformed_jsonl_line_is_reported_by_line_number(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(row) for row in ROWS] + ['{"prompt": "x" "completion": "y"}'] + [json.dumps(ROWS[0])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    message = caught.value.message
    assert message.startswith(f"{path}: row 6 is not valid JSON (Expecting ',' delimiter: column 16)")
    assert caught.value.hint and "one JSON object" in caught.value.hint


def test_malformed_line_in_gzipped_jsonl(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(ROWS[0]) + "\n" + '{"prompt": "unterminated\n')
    with pytest.raises(DataError, match=r"data\.jsonl\.gz: row 2 is not valid JSON"):
        load_rows(str(path))


def test_jsonl_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(["a", "list"]) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl: row 2 is not a JSON object \(it is a list\)"):
        load_rows(str(path))


def test_field_changing_type_is_reported_when_datasets_fails(tmp_path):
    path = tmp_path / "data.jsonl"
    # The blank line makes datasets' pandas fallback fail too, so the type clash surfaces as an error.
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": 5}\n')
    with pytest.raises(DataError, match=r"data\.jsonl: row 3: field 'completion' is a number but row 1 has a string"):
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
    with pytest.raises(DataError, match=r"data\.csv: row 2 has 3 fields but the header has 2"):
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
