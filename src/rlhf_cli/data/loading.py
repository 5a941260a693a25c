"""Load rows from a local file or a hub dataset, turning every failure caused by the user's data into a DataError.

Policy:

- A path that exists is a local file. Its extension picks the `datasets` builder: `.json`, `.jsonl`, `.json.gz`,
  `.jsonl.gz` -> "json"; `.parquet` -> "parquet"; `.csv` -> "csv". Any other extension is a DataError.
- A path that does not exist is a *hub dataset name* when it looks like one (`name` or `owner/name`, no known
  extension, not starting with `/`, `./`, `../` or `~`). Anything else that does not exist is "file not found".
  (A plain "contains os.sep" rule would misread every `owner/name` hub id as a path.)
- `datasets` reports a malformed JSON Lines file as "An error occurred while generating the dataset", with a pyarrow
  message underneath whose row counts from 0 within the chunk being parsed (line 250,001 of a 34 MB file came out as
  "in row 64410"). When it fails on a json file we scan the file ourselves and report the first line (row) that is
  not valid JSON or not a JSON object, or else the first field whose type changes between rows.
- A CSV row with more fields than the header is a DataError (pandas would silently turn the extras into an index).
- Rows are numbered from 1 (a CSV's header is not a row) and, for JSON Lines, equal the line number as long as the
  file has no blank lines in the middle (`datasets` skips blank lines, so each one shifts later rows by one).
- `datasets` merges the schemas of all rows: a field missing from one row comes back as `None` in that row. Callers
  should treat `None` as "missing".
- An empty file, or one with no rows, is a DataError. `max_rows` keeps the first N rows.
- Local files are built in a temporary cache folder that is removed afterwards, so nothing lands in the user's home.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf_cli.errors import ConfigError, DataError

BUILDERS = {
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_JSON_HINT = "each line of a .jsonl file must be one JSON object, e.g. {\"prompt\": \"...\", \"completion\": \"...\"}"


def load_rows(path: str, split: str = "train", max_rows: int | None = None) -> tuple[list[dict], str]:
    """Return the rows of a local data file or hub dataset, and a human-readable source name.

    The source name is the absolute file path for a local file, or the hub name. See the module docstring for the
    policy on paths, hub names and errors.
    """
    if max_rows is not None and max_rows < 1:
        raise ConfigError(
            f"max_rows must be a positive number of rows, got {max_rows}", hint="leave it unset to load every row"
        )
    file = Path(path).expanduser()
    if file.exists():
        rows = _load_local(file, path, max_rows)
        source = str(file.resolve())
    elif _looks_like_path(path):
        raise DataError(
            f"{path}: file not found",
            hint=f"check the path (relative paths start from {os.getcwd()})",
        )
    else:
        rows = _load_hub(path, split, max_rows)
        source = path
    if not rows:
        raise DataError(f"{path}: the data has no rows", hint="point the data path at a file with at least one example")
    return rows, source


def _looks_like_path(name: str) -> bool:
    """A missing name is a path (not a hub id) if it has a data extension, starts like a path or isn't `owner/name`."""
    if _extension(name) is not None:
        return True
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name:
        return True
    return _HUB_ID.match(name) is None


def _extension(name: str) -> str | None:
    lower = name.lower()
    return next((ext for ext in BUILDERS if lower.endswith(ext)), None)


def _load_local(file: Path, shown: str, max_rows: int | None) -> list[dict]:
    if file.is_dir():
        raise DataError(
            f"{shown}: is a folder, not a data file", hint="point the data path at one .jsonl/.json/.csv/.parquet file"
        )
    ext = _extension(file.name)
    if ext is None:
        raise DataError(
            f"{shown}: unsupported file type '{file.suffix or file.name}'",
            hint=f"use one of {', '.join(BUILDERS)}",
        )
    builder = BUILDERS[ext]
    try:
        blank = _is_blank(file, builder)
    except (OSError, EOFError) as error:  # unreadable, or a corrupt/truncated .gz
        raise DataError(
            f"{shown}: cannot read the file ({error})", hint="check the file is complete and, for .gz, really gzipped"
        ) from error
    if blank:
        raise DataError(f"{shown}: the file is empty", hint="point the data path at a file with at least one example")
    try:
        rows = _load_with_datasets(builder, str(file), max_rows)
    except Exception as error:  # noqa: BLE001 - any failure here is about the user's file; diagnose it below
        raise _diagnose(file, shown, builder, error) from error
    if builder == "csv" and rows and any(key.startswith("__index_level_") for key in rows[0]):
        # pandas turns the extra fields of the first data row into an index instead of failing
        raise _find_csv_problem(file, shown) or DataError(
            f"{shown}: some rows have more fields than the header", hint="quote values that contain commas"
        )
    return rows


def _find_csv_problem(file: Path, shown: str) -> DataError | None:
    """The first CSV row with more fields than the header, if any."""
    with _open_text(file) as handle:
        reader = csv.reader(handle)
        width = len(next(reader, []))
        for number, fields in enumerate(reader, start=1):
            if len(fields) > width:
                return DataError(
                    f"{shown}: row {number} has {len(fields)} fields but the header has {width}",
                    hint="quote values that contain commas, or add the missing column names to the header",
                )
    return None


def _is_blank(file: Path, builder: str) -> bool:
    """True for a 0-byte file, or a json file holding only whitespace (datasets raises StopIteration on those)."""
    if file.stat().st_size == 0:
        return True
    if builder != "json":
        return False
    with _open_text(file) as lines:
        return all(not line.strip() for line in lines)


def _load_with_datasets(builder: str, data_file: str, max_rows: int | None) -> list[dict]:
    import datasets

    with tempfile.TemporaryDirectory(prefix="rlhf_cli_data_") as cache_dir, _quiet_datasets():
        dataset = datasets.load_dataset(builder, data_files=data_file, split="train", cache_dir=cache_dir)
        return _first_rows(dataset, max_rows)


def _load_hub(name: str, split: str, max_rows: int | None) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # noqa: BLE001 - offline, unknown name, bad split, ...: all the user's to fix
        raise DataError(
            f"{name}: neither an existing local file nor a reachable hub dataset (split '{split}')",
            hint=f"check the path or dataset name; the hub said: {_innermost_message(error)}",
        ) from error
    return _first_rows(dataset, max_rows)


def _first_rows(dataset: Any, max_rows: int | None) -> list[dict]:
    if max_rows is not None and max_rows < len(dataset):
        dataset = dataset.select(range(max_rows))
    return dataset.to_list()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' progress bars and its 'Failed to load JSON' log lines; we report errors ourselves."""
    from datasets.utils import logging as ds_logging

    verbosity = ds_logging.get_verbosity()
    bars_were_on = ds_logging.is_progress_bar_enabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # the loaders log parse failures at ERROR level
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars_were_on:
            ds_logging.enable_progress_bar()


def _diagnose(file: Path, shown: str, builder: str, error: Exception) -> DataError:
    """Explain why `datasets` could not read `file`, pointing at a row and field where we can find one."""
    finders = {"json": _find_json_problem, "csv": _find_csv_problem}
    if builder in finders:
        with contextlib.suppress(OSError, EOFError, csv.Error):
            found = finders[builder](file, shown)
            if found is not None:
                return found
    message = _innermost_message(error)
    if "corresponds to no data" in message:
        return DataError(f"{shown}: the file has no rows", hint="add at least one example below the header")
    return DataError(
        f"{shown}: could not read the {builder} file ({message})",
        hint=f"check that it is a valid {builder} file with one example per row",
    )


def _innermost_message(error: BaseException) -> str:
    """The message of the deepest cause: datasets wraps the useful pyarrow/pandas error in a generic one."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return str(error) or type(error).__name__


def _find_json_problem(file: Path, shown: str) -> DataError | None:
    """Scan a json/jsonl file: the first unparsable row, non-object row, or field whose type changes."""
    if _is_json_array_file(file):
        return _find_json_array_problem(file, shown)
    types: dict[str, tuple[str, int]] = {}
    with _open_text(file) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            problem = _check_json_line(line, f"{shown}: row {number}", number, types)
            if problem is not None:
                return problem
    return None


def _is_json_array_file(file: Path) -> bool:
    """A `.json` file whose text starts with '[' holds one array; `.jsonl` files are always read line by line."""
    if ".jsonl" in file.name.lower():
        return False
    with _open_text(file) as lines:
        first = next((line for line in lines if line.strip()), "")
    return first.lstrip().startswith("[")


def _check_json_line(line: str, where: str, number: int, types: dict[str, tuple[str, int]]) -> DataError | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        return DataError(
            f"{where} is not valid JSON ({error.msg}: column {error.colno})",
            hint=_JSON_HINT + "; a common cause is a missing comma or an unescaped quote or newline",
        )
    if not isinstance(value, dict):
        return DataError(f"{where} is not a JSON object (it is {_json_type(value)})", hint=_JSON_HINT)
    return _check_field_types(value, where, number, types)


def _check_field_types(row: dict, where: str, number: int, types: dict[str, tuple[str, int]]) -> DataError | None:
    """Record each field's JSON type; report the first field whose type differs from an earlier row (nulls aside)."""
    for field, value in row.items():
        kind = _json_type(value)
        if kind == "null":
            continue
        seen = types.setdefault(field, (kind, number))
        if seen[0] != kind:
            return DataError(
                f"{where}: field '{field}' is {kind} but row {seen[1]} has {seen[0]}",
                hint=f"give '{field}' the same type in every row (e.g. quote numbers meant as text)",
            )
    return None


def _find_json_array_problem(file: Path, shown: str) -> DataError | None:
    """A .json file holding one array of objects: report a syntax error by line, a non-object element by row."""
    with _open_text(file) as lines:
        text = "".join(lines)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return DataError(
            f"{shown}: line {error.lineno} is not valid JSON ({error.msg}: column {error.colno})",
            hint="a .json file must hold one JSON array of objects, or use .jsonl with one object per line",
        )
    if not isinstance(value, list):
        return None
    types: dict[str, tuple[str, int]] = {}
    for number, item in enumerate(value, start=1):
        where = f"{shown}: row {number}"
        if not isinstance(item, dict):
            return DataError(f"{where} is not a JSON object (it is {_json_type(item)})", hint=_JSON_HINT)
        problem = _check_field_types(item, where, number, types)
        if problem is not None:
            return problem
    return None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


@contextlib.contextmanager
def _open_text(file: Path) -> Iterator[Any]:
    """Open a possibly gzipped text file, decoding UTF-8 and replacing undecodable bytes."""
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8", errors="replace") as handle:  # type: ignore[operator]
        yield handle
