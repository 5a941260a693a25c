"""Load rows from a local file or a hub dataset, turning every failure caused by the user's data into a DataError.

Policy:

- A path that exists is a local file. Its extension picks the `datasets` builder: `.json`, `.jsonl`, `.json.gz`,
  `.jsonl.gz` -> "json"; `.parquet` -> "parquet"; `.csv` -> "csv". Any other extension is a DataError.
- A path that does not exist is a *hub dataset name* when it looks like one (`name` or `owner/name`, no known
  extension, not starting with `/`, `./`, `../` or `~`). Anything else that does not exist is "file not found".
  (A plain "contains os.sep" rule would misread every `owner/name` hub id as a path.)
- `datasets` reports a malformed JSON Lines file as "An error occurred while generating the dataset", with a pyarrow
  message underneath whose row counts from 0 within the chunk being parsed (line 250,001 of a 34 MB file came out as
  "in row 64410"). When it fails on a json file we scan the file ourselves and report the first line that is
  not valid JSON or not a JSON object, or else the first field whose type changes between rows.
- Every line of a json or csv file must be UTF-8: the first that is not is a DataError naming its line and column
  (`datasets` fails on it without naming a line). The file is read once in binary for this before `datasets` runs.
- A CSV row with more fields than the header is a DataError (pandas would silently turn the extras into an index).
- Errors name a row where an editor shows it. A row of a JSON Lines or CSV file is "file: line N": the 1-based line
  it starts on, blank and whitespace-only lines counted (`datasets` and pandas skip those, so a row's index is not its
  line), a CSV's header being a line too. Any other row (a JSON array's element, parquet, a hub dataset) is
  "source: row N", counting rows from 1. `load_rows` returns the lines in its `Source`; `row_location` gives the text.
  Should our count of a file's rows ever differ from what `datasets` loaded, its rows are named "row N" instead.
- `datasets` merges the schemas of all rows: a field missing from one row comes back as `None` in that row. Callers
  should treat `None` as "missing".
- An empty file, or one with no rows, is a DataError. `max_rows` keeps the first N rows.
- Local files are built in a temporary cache folder that is removed afterwards, so nothing lands in the user's home.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
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
_UTF8_HINT = "re-save the file as UTF-8 (most editors offer 'Save with Encoding'), or fix the bytes on that line"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where loaded rows came from.

    `name` (also `str(source)`) is a local file's absolute path or the hub dataset name. `lines` holds the 1-based
    line each row starts on, for a JSON Lines or CSV file, and is None where rows are not lines (a JSON array,
    parquet, a hub dataset). Its repr leaves the lines out: they may be millions.
    """

    name: str
    lines: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)

    def __str__(self) -> str:
        return self.name


def row_location(source: Source | str, index: int) -> str:
    """Where row `index` (0-based) of the rows loaded from `source` is, for error messages.

    "{file}: line N" when `source` knows its rows' lines, else "{source}: row {index + 1}", which is also the text for
    a plain string naming rows built in memory (e.g. "rollout").
    """
    if isinstance(source, Source) and source.lines is not None:
        return f"{source}: line {source.lines[index]}"
    return f"{source}: row {index + 1}"


def source_for(rows: list, source: Source | str) -> Source | str:
    """`source` when `rows` are as many as the rows it loaded, else its bare name.

    A Source's lines hold only for the rows it was loaded with, in order. A held-out split, or what is left after
    dropping rows, has fewer rows; naming those by their bare source makes their errors "row N", counting `rows`.
    """
    if isinstance(source, Source) and source.lines is not None and len(source.lines) != len(rows):
        return source.name
    return source


def load_rows(path: str, split: str = "train", max_rows: int | None = None) -> tuple[list[dict], Source]:
    """Return the rows of a local data file or hub dataset, and where they came from.

    The Source's name is the absolute file path for a local file, or the hub name; for a JSON Lines or CSV file it
    also holds each row's line. See the module docstring for the policy on paths, hub names and errors.
    """
    if max_rows is not None and max_rows < 1:
        raise ConfigError(
            f"max_rows must be a positive number of rows, got {max_rows}", hint="leave it unset to load every row"
        )
    file = Path(path).expanduser()
    if file.exists():
        rows, lines = _load_local(file, path, max_rows)
        source = Source(str(file.resolve()), lines)
    elif _looks_like_path(path):
        raise DataError(
            f"{path}: file not found",
            hint=f"check the path (relative paths start from {os.getcwd()})",
        )
    else:
        rows = _load_hub(path, split, max_rows)
        source = Source(path)
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


def _load_local(file: Path, shown: str, max_rows: int | None) -> tuple[list[dict], tuple[int, ...] | None]:
    """The file's first `max_rows` rows, and the line each starts on (None where rows are not lines)."""
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
        lines = None if blank or builder == "parquet" else _row_lines(file, shown, builder)
    except (OSError, EOFError) as error:  # unreadable, or a corrupt/truncated .gz
        raise DataError(
            f"{shown}: cannot read the file ({error})", hint="check the file is complete and, for .gz, really gzipped"
        ) from error
    if blank:
        raise DataError(f"{shown}: the file is empty", hint="point the data path at a file with at least one example")
    try:
        rows, total = _load_with_datasets(builder, str(file), max_rows)
    except Exception as error:  # noqa: BLE001 - any failure here is about the user's file; diagnose it below
        raise _diagnose(file, shown, builder, error) from error
    if builder == "csv" and rows and any(key.startswith("__index_level_") for key in rows[0]):
        # pandas turns the extra fields of the first data row into an index instead of failing
        raise _find_csv_problem(file, shown) or DataError(
            f"{shown}: some rows have more fields than the header", hint="quote values that contain commas"
        )
    if lines is None or len(lines) != total:  # not line-based, or a layout we do not count as datasets does
        return rows, None
    return rows, lines[: len(rows)]


def _row_lines(file: Path, shown: str, builder: str) -> tuple[int, ...] | None:
    """The line each row of a JSON Lines or CSV file starts on (None for a JSON array), checking every line is UTF-8."""
    lines = _utf8_lines(file, shown)
    if builder == "csv":
        return _csv_row_lines(lines)
    if _is_json_array_file(file):
        _read_all(lines)
        return None
    return tuple(number for number, text in lines if text.strip())


def _utf8_lines(file: Path, shown: str) -> Iterator[tuple[int, str]]:
    """Each line of a (possibly gzipped) file as (1-based number, text); a DataError at the first that is not UTF-8.

    Lines end at b"\n" only; the text keeps its line ending.
    """
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    with opener(file, "rb") as handle:  # type: ignore[operator]
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(shown, number, raw, error) from None


def _not_utf8(shown: str, number: int, raw: bytes, error: UnicodeDecodeError) -> DataError:
    """'line N is not valid UTF-8 (byte 0x.. at column C)': C counts characters, as an editor shows the column."""
    column = len(raw[: error.start].decode("utf-8")) + 1
    return DataError(
        f"{shown}: line {number} is not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {column})",
        hint=_UTF8_HINT,
    )


def _read_all(lines: Iterable[object]) -> None:
    """Read `lines` to the end: reading `_utf8_lines` is what checks them."""
    for _ in lines:
        pass


def _csv_row_lines(lines: Iterator[tuple[int, str]]) -> tuple[int, ...] | None:
    """The line each CSV data row starts on (the header is not a row); None if Python's csv module cannot parse it.

    All lines are read even then, so that every one is checked to be UTF-8.
    """
    try:
        starts = [number for number, _ in _csv_records(text for _, text in lines)]
    except csv.Error:
        _read_all(lines)
        return None
    return tuple(starts[1:])


def _csv_records(texts: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """(line it starts on, fields) of each CSV record, header included, skipping blank and whitespace-only lines.

    pandas skips those lines too. csv.reader reads an empty line as [] and a whitespace-only one as one field of
    whitespace; a line holding just "" is one empty field, a row (of missing values) for pandas as well.
    """
    reader = csv.reader(texts)
    start = 1
    for fields in reader:
        blank = not fields or (len(fields) == 1 and fields[0] != "" and not fields[0].strip())
        if not blank:
            yield start, fields
        start = reader.line_num + 1


def _find_csv_problem(file: Path, shown: str) -> DataError | None:
    """The first CSV row with more fields than the header, if any."""
    records = _csv_records(text for _, text in _utf8_lines(file, shown))
    width = len(next(records, (0, []))[1])
    for number, fields in records:
        if len(fields) > width:
            return DataError(
                f"{shown}: line {number} has {len(fields)} fields but the header has {width}",
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


def _load_with_datasets(builder: str, data_file: str, max_rows: int | None) -> tuple[list[dict], int]:
    """The first `max_rows` rows of the file, and how many rows it has in all."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="rlhf_cli_data_") as cache_dir, _quiet_datasets():
        dataset = datasets.load_dataset(builder, data_files=data_file, split="train", cache_dir=cache_dir)
        return _first_rows(dataset, max_rows), len(dataset)


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
    """Scan a json/jsonl file: the first unparsable line, non-object line, or field whose type changes."""
    if _is_json_array_file(file):
        return _find_json_array_problem(file, shown)
    types: dict[str, tuple[str, str]] = {}
    for number, line in _utf8_lines(file, shown):
        if not line.strip():
            continue
        problem = _check_json_line(line, shown, f"line {number}", types)
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


def _check_json_line(line: str, shown: str, place: str, types: dict[str, tuple[str, str]]) -> DataError | None:
    """The problem with one line of a JSON Lines file (`place` is "line N"), if any."""
    where = f"{shown}: {place}"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        return DataError(
            f"{where} is not valid JSON ({error.msg}: column {error.colno})",
            hint=_JSON_HINT + "; a common cause is a missing comma or an unescaped quote or newline",
        )
    if not isinstance(value, dict):
        return DataError(f"{where} is not a JSON object (it is {_json_type(value)})", hint=_JSON_HINT)
    return _check_field_types(value, shown, place, types)


def _check_field_types(row: dict, shown: str, place: str, types: dict[str, tuple[str, str]]) -> DataError | None:
    """Record each field's JSON type and where (`place`, "line N" or "row N") it was first seen; report the first
    field whose type differs from an earlier row's (nulls aside)."""
    for field, value in row.items():
        kind = _json_type(value)
        if kind == "null":
            continue
        seen = types.setdefault(field, (kind, place))
        if seen[0] != kind:
            return DataError(
                f"{shown}: {place}: field '{field}' is {kind} but {seen[1]} has {seen[0]}",
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
    types: dict[str, tuple[str, str]] = {}
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            return DataError(f"{shown}: row {number} is not a JSON object (it is {_json_type(item)})", hint=_JSON_HINT)
        problem = _check_field_types(item, shown, f"row {number}", types)
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
    """Open a possibly gzipped text file, decoding UTF-8 and replacing undecodable bytes (`_utf8_lines` finds those)."""
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8", errors="replace") as handle:  # type: ignore[operator]
        yield handle
