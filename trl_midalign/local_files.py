"""The one loader of local data files: [`load_rows`].

JSONL, JSON, CSV and TSV files are read with the standard library, so that every error names the file, the line and
the fix (datasets reports neither); Parquet files and folders written by `Dataset.save_to_disk` are read by datasets,
whose failures are re-raised with the path and the underlying cause.
"""

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import datasets


TEXT_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")
EXTENSIONS = (*TEXT_EXTENSIONS, ".parquet")
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_SPLIT_NAMES = ("train", "validation", "valid", "dev", "test", "eval")


class LocalFileError(ValueError):
    """A local data file that cannot be read as rows; the message names the file, the line and the fix."""


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in _SAVED_DATASET_FILES)


def load_rows(
    path: str | os.PathLike,
    split: str = "train",
    required_columns: Sequence[str] | Mapping[str, str] = (),
    option: str = "--data",
    *,
    row_name: str = "row",
) -> datasets.Dataset:
    r"""
    Read the rows of a local data file or folder.

    Accepted layouts:

    - a `.jsonl` file (one JSON object per line; blank lines, CRLF and a UTF-8 byte-order mark are fine);
    - a `.json` file holding a list of objects, an object of equal-length columns, or JSON Lines;
    - a `.csv` or `.tsv` file with a header line;
    - a `.parquet` file;
    - a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
    - a folder of such files named after their splits (`train.jsonl`, `test.jsonl`, `train-00000-of-00002.parquet`).

    A single file, and a folder none of whose files is named after a split, hold the `"train"` split. Every row of a
    text file must have the same columns (a column missing on some rows is refused, naming the line: a JSON Lines
    reader would silently fill it with `None`), and a column may not mix value types (for example a number on one
    line and a string on the next).

    Args:
        path (`str` or `os.PathLike`):
            The file or folder.
        split (`str`, *optional*, defaults to `"train"`):
            Split to read from a `DatasetDict` folder or a folder of per-split files.
        required_columns (`Sequence[str]` or `Mapping[str, str]`, *optional*, defaults to `()`):
            Columns every row must have. A mapping gives, for each column, the command-line option that renames it
            (for example `{"parallel_source": "--source_column"}`), which the error message then suggests.
        option (`str`, *optional*, defaults to `"--data"`):
            The setting `path` came from, named in error messages.
        row_name (`str`, *optional*, defaults to `"row"`):
            What one row is, for error messages (for example `"pair"`).

    Returns:
        `datasets.Dataset`: The rows.

    Raises:
        `FileNotFoundError`: `path` does not exist, or a folder holds nothing readable for `split`.
        `ValueError`: The file cannot be read as rows; the message names the file, the line or item, and the fix.
    """
    path = os.fspath(path)
    if is_saved_dataset(path):
        try:
            data = datasets.load_from_disk(path)
        except (OSError, ValueError, KeyError) as error:
            raise _dataset_error(path, option, error) from error
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{option} {path} has the splits {list(data)}, not {split!r}; choose one of those.")
            data = data[split]
        _check_columns(data, path, required_columns, row_name)
        return data
    if os.path.isdir(path):
        return _load_split_folder(path, split, required_columns, option, row_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{option} {path!r} does not exist. Pass a {'/'.join(e[1:].upper() for e in EXTENSIONS)} file, a folder "
            "of such files named after their splits (train.jsonl, test.jsonl), or a folder written by "
            "Dataset.save_to_disk."
        )
    if split != "train":
        raise ValueError(
            f"{option} {path} is a single file, which holds only the 'train' split, not {split!r}. Give a folder "
            f"with one file per split (train.jsonl, {split}.jsonl), or read the 'train' split."
        )
    return _load_file(path, required_columns, option, row_name)


def _load_split_folder(
    path: str, split: str, required_columns: Sequence[str] | Mapping[str, str], option: str, row_name: str
) -> datasets.Dataset:
    files = sorted(name for name in os.listdir(path) if os.path.splitext(name)[1].lower() in EXTENSIONS)
    if not files:
        raise FileNotFoundError(
            f"{option} {path} holds no {'/'.join(EXTENSIONS)} files and is not a folder written by "
            "Dataset.save_to_disk."
        )
    by_split: dict[str, list[str]] = {}
    for name in files:  # train.jsonl, train-00000-of-00002.parquet, test.csv
        by_split.setdefault(name.split("-")[0].split(".")[0], []).append(os.path.join(path, name))
    if not set(by_split) & set(_SPLIT_NAMES):  # pairs.jsonl, more.csv: no file is named after a split
        by_split = {"train": [os.path.join(path, name) for name in files]}
    if split not in by_split:
        raise ValueError(
            f"{option} {path} has files for the splits {sorted(by_split)}, none for {split!r}. Name the file "
            f"{split}.jsonl (or .json/.csv/.tsv/.parquet), or choose one of those splits."
        )
    parts = [_load_file(file, required_columns, option, row_name) for file in by_split[split]]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_file(
    path: str, required_columns: Sequence[str] | Mapping[str, str], option: str, row_name: str
) -> datasets.Dataset:
    extension = os.path.splitext(path)[1].lower()
    if extension not in EXTENSIONS:
        raise ValueError(
            f"Cannot read {path} ({option}): use a JSONL, JSON, CSV, TSV or Parquet file (one {row_name} per row), "
            "or a folder written by Dataset.save_to_disk."
        )
    if extension == ".parquet":
        try:
            data = datasets.load_dataset("parquet", data_files=path, split="train")
        except (datasets.exceptions.DatasetGenerationError, OSError, ValueError, StopIteration) as error:
            raise _dataset_error(path, option, error) from error
        _check_columns(data, path, required_columns, row_name)
        return data
    rows, where = _read_text_file(path, extension, required_columns, option, row_name)
    return _to_dataset(path, rows, where)


def _check_columns(
    data: datasets.Dataset, path: str, required_columns: Sequence[str] | Mapping[str, str], row_name: str
) -> None:
    missing = [name for name in required_columns if name not in data.column_names]
    if missing:
        raise LocalFileError(
            f"{path}: no {' and no '.join(map(repr, missing))} column (columns: {data.column_names}). Every "
            f"{row_name} needs {_listing(required_columns)}: {_rename_fix(required_columns, missing)}."
        )


def _listing(columns: Sequence[str]) -> str:
    names = [repr(name) for name in columns]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _rename_fix(required_columns: Sequence[str] | Mapping[str, str], missing: Sequence[str]) -> str:
    options = [required_columns[name] for name in missing if isinstance(required_columns, Mapping)]
    if options:
        return f"rename the columns in the file, or name yours with {' / '.join(options)}"
    return "rename the columns in the file"


def _example_row(required_columns: Sequence[str]) -> str:
    return json.dumps({name: "..." for name in required_columns}) if required_columns else '{"column": "value"}'


def _utf8_name(path: str) -> str:
    stem, extension = os.path.splitext(path)
    return f"{stem}-utf8{extension}"


def _decode_utf8(path: str, data: bytes, option: str) -> str:
    """The text of `data`, or an error naming the line and column of the first byte that is not UTF-8."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise LocalFileError(
            f"{path} is UTF-16 encoded (it starts with a UTF-16 byte-order mark); {option} files must be UTF-8. "
            f"Convert it, for example with `iconv -f UTF-16 -t UTF-8 {path} > {_utf8_name(path)}`."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise LocalFileError(
            f"{path}, line {line}: not valid UTF-8 (byte 0x{data[error.start]:02x} at byte {column} of the line). "
            f"{option} files must be UTF-8: convert the file from its real encoding, for example with "
            f"`iconv -f LATIN1 -t UTF-8 {path} > {_utf8_name(path)}` (LATIN1 standing for that encoding), or fix "
            "that line."
        ) from None
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is harmless


def _read_jsonl(path: str, text: str, example: str) -> tuple[list[Any], list[str]]:
    rows, where = [], []
    # Split on "\n" only: str.splitlines() also splits on U+2028 and other separators, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise LocalFileError(
                f"{path}, line {number}: not valid JSON ({error.msg}: column {error.colno}). Each line of a JSONL "
                f"file must be one complete JSON object with the row's columns, for example {example}. Fix or "
                "remove that line."
            ) from None
        where.append(f"line {number}")
    return rows, where


def _read_json(path: str, text: str, example: str, row_name: str) -> tuple[list[Any], list[str]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # more than one top-level value: JSON Lines in a .json file
            return _read_jsonl(path, text, example)
        raise LocalFileError(
            f"{path}, line {error.lineno}: not valid JSON ({error.msg}: column {error.colno}). A .json file must "
            f"hold a list of objects, one per {row_name}, or one object per line (JSON Lines), for example "
            f"{example}. Fix the file at that line."
        ) from None
    if isinstance(value, dict) and value and all(isinstance(column, list) for column in value.values()):
        lengths = {name: len(column) for name, column in value.items()}
        if len(set(lengths.values())) > 1:
            raise LocalFileError(
                f"{path} holds columns of different lengths {lengths}; every column needs one value per {row_name}."
            )
        count = next(iter(lengths.values()))
        rows = [{name: column[i] for name, column in value.items()} for i in range(count)]
        return rows, [f"row {i} of its columns" for i in range(count)]
    if isinstance(value, dict):
        return [value], ["its top-level object"]
    if isinstance(value, list):
        return value, [f"item {i} of its top-level list" for i in range(len(value))]
    raise LocalFileError(
        f"{path} holds a single JSON {type(value).__name__}; it must hold a list of objects, one per {row_name}, or "
        f"one object per line (JSON Lines), for example {example}."
    )


def _read_csv(path: str, text: str, delimiter: str, row_name: str) -> tuple[list[Any], list[str]]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows, where = [], []
    header, start = None, 1  # start: the line where the record being read begins
    try:
        for row in reader:
            if row and header is None:
                header = row
                duplicated = sorted({name for name in header if header.count(name) > 1})
                if duplicated:
                    raise LocalFileError(
                        f"{path}, line {start}: the header names the column(s) {duplicated} more than once; give "
                        "every column a distinct name."
                    )
            elif row:
                if len(row) != len(header):
                    raise LocalFileError(
                        f"{path}, line {start}: {len(row)} field(s), but the header has {len(header)} ({header}). "
                        f'Quote fields that contain the delimiter {delimiter!r} ("..."), or fix that line.'
                    )
                rows.append(dict(zip(header, row)))
                where.append(f"line {start}")
            start = reader.line_num + 1
    except csv.Error as error:
        raise LocalFileError(
            f"{path}, line {start}: not valid {kind} ({error}). Fix that line: a quoted field must be closed by a "
            'quote followed by the delimiter or the end of the line (write a quote inside it as "").'
        ) from None
    if header is not None and not rows:
        raise LocalFileError(
            f"{path} has a header line ({header}) but no rows: there are no {row_name}s. Add one {row_name} per line."
        )
    return rows, where


def _read_text_file(
    path: str, extension: str, required_columns: Sequence[str] | Mapping[str, str], option: str, row_name: str
) -> tuple[list[dict], list[str]]:
    """The rows of a JSONL, JSON, CSV or TSV file and where each one is, every row checked for its columns."""
    example = _example_row(list(required_columns))
    with open(path, "rb") as f:
        text = _decode_utf8(path, f.read(), option)
    if not text.strip():
        raise LocalFileError(
            f"{path} is empty: it holds no {row_name}s. Write one {row_name} per line, for example {example}"
            + (" (JSONL)." if extension in (".jsonl", ".json") else ", or a CSV/TSV file with a header line.")
        )
    if extension == ".jsonl":
        rows, where = _read_jsonl(path, text, example)
    elif extension == ".json":
        rows, where = _read_json(path, text, example, row_name)
    else:
        rows, where = _read_csv(path, text, "\t" if extension == ".tsv" else ",", row_name)
    if not rows:
        raise LocalFileError(f"{path} holds no {row_name}s (an empty list). Add one object per {row_name}.")
    columns: dict[str, None] = {}
    for row, location in zip(rows, where):
        if not isinstance(row, dict):
            raise LocalFileError(
                f"{path}, {location}: a JSON {type(row).__name__} ({json.dumps(row, ensure_ascii=False)[:80]}), "
                f"expected an object with the {row_name}'s columns, for example {example}."
            )
        missing = [name for name in required_columns if name not in row]
        if missing:
            raise LocalFileError(
                f"{path}, {location}: no {' and no '.join(map(repr, missing))} (columns there: {sorted(row)}). "
                f"Every {row_name} needs {_listing(list(required_columns))}: "
                f"{_rename_fix(required_columns, missing)}."
            )
        columns.update(dict.fromkeys(row))
    for row, location in zip(rows, where):
        absent = [name for name in columns if name not in row]
        if absent:
            raise LocalFileError(
                f"{path}, {location}: no {' and no '.join(map(repr, absent))}, which the other rows have. Give every "
                f"{row_name} the same columns (null where a value is unknown), or leave the column out everywhere."
            )
    return rows, where


def _to_dataset(path: str, rows: list[dict], where: list[str]) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_list(rows)
    except (ValueError, TypeError) as error:  # pyarrow's ArrowInvalid / ArrowTypeError derive from these
        for column in rows[0]:
            first: dict[str, str] = {}
            for row, location in zip(rows, where):
                if row[column] is not None:
                    first.setdefault(type(row[column]).__name__, location)
            if len(first) > 1:
                found = ", ".join(f"{kind} at {location}" for kind, location in first.items())
                raise LocalFileError(
                    f"{path}: the column {column!r} mixes value types ({found}). Give every row a value of the same "
                    "type (for example quote numbers that are text)."
                ) from error
        raise LocalFileError(f"{path}: the rows cannot form a table ({error}).") from error


def _dataset_error(path: str, option: str, error: BaseException) -> ValueError:
    """A datasets failure re-raised with the path and the underlying cause, which datasets' own message hides."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return LocalFileError(
        f"{option} {path!r} could not be read by datasets ({detail}). Check that it is a complete, valid file of its "
        "format, or convert it to JSONL (one JSON object per line), which is read with exact line numbers in any "
        "error."
    )
