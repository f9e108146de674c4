"""Stream prompts from .txt, .jsonl, .csv and .parquet files, one row at a time.

Every data row becomes an `InputRow`: either a prompt or the reason it was rejected (not
UTF-8, not a string, missing field, empty). Problems with a whole file (missing,
unreadable, unknown format, no prompt column) raise `MemscanError` before any work; a file
that breaks partway (corrupt data, an I/O error) raises it when reading gets there.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MemscanError, one_line

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
DEFAULT_FIELDS = ("prompt", "caption", "text")
# Far above any prompt (the tokenizer keeps 77 tokens) and Python's 128 KiB default, yet
# finite: a stray opening quote swallows the rest of the file into one field, and this
# turns that into an error instead of one giant "prompt" held in memory.
CSV_FIELD_LIMIT = 1 << 24


@dataclass(frozen=True)
class InputRow:
    """One data row: `id` is `file:line` (txt, jsonl) or `file:row` (csv, parquet; 1-based)."""

    id: str
    index: int  # 0-based position over all inputs, in order (the reference's prompt number)
    prompt: str | None
    error: str | None = None


def _expand_globs(paths: Sequence[str | Path]) -> list[Path]:
    """Inputs with glob patterns (`logs/*.jsonl`, `**`) replaced by their files, sorted."""
    expanded = []
    for raw in paths:
        pattern = str(raw)
        # A quoted glob reaches us unexpanded (the shell leaves it, or it names files on a
        # cluster's shared storage); an existing file whose name has brackets stays a file.
        if Path(pattern).exists() or not any(c in pattern for c in "*?["):
            expanded.append(Path(pattern))
            continue
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise MemscanError(f"{pattern}: no file matches")
        expanded.extend(Path(m) for m in matches)
    return expanded


def check_inputs(paths: Sequence[str | Path], field: str | None = None) -> list[Path]:
    """Validate every input (globs expanded) up front: exists, readable, supported, has a prompt column."""
    if not paths:
        raise MemscanError("no input files given")
    checked = []
    for path in _expand_globs(paths):
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise MemscanError(f"{path}: unsupported input type (use {', '.join(SUPPORTED_SUFFIXES)})")
        if not path.is_file():
            raise MemscanError(f"{path}: no such file")
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as exc:
            raise MemscanError(f"{path}: cannot be read ({exc.strerror})") from exc
        if path.suffix.lower() in (".csv", ".parquet"):
            _column(path, _columns(path), field)
        checked.append(path)
    return checked


def _columns(path: Path) -> list[str]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).schema_arrow.names
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for corrupt files
            raise MemscanError(f"{path}: not a readable Parquet file ({exc})") from exc
    try:
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            return next(_csv_reader(f), [])
    except csv.Error as exc:
        raise MemscanError(f"{path}: not a readable CSV header ({one_line(exc)})") from exc


def _csv_reader(lines: Iterable[str]) -> Iterator[list[str]]:
    """A `csv.reader` that takes fields up to `CSV_FIELD_LIMIT` characters (the limit is process-wide)."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    return csv.reader(lines)


def _column(path: Path, columns: list[str], field: str | None) -> str:
    if field is not None:
        if field not in columns:
            raise MemscanError(f"{path}: no column {field!r} (columns: {', '.join(columns) or 'none'})")
        return field
    for name in DEFAULT_FIELDS:
        if name in columns:
            return name
    raise MemscanError(f"{path}: no prompt, caption or text column; choose one with --field")


def read_prompts(
    paths: Sequence[Path], field: str | None = None, first_index: int = 0, base: Path | None = None
) -> Iterator[InputRow]:
    """All rows of all inputs in order, streamed; indices count from `first_index`.

    Relative paths are opened under `base` (default: the working folder); ids keep them as given.
    """
    index = first_index
    for path in paths:
        reader = _READERS[path.suffix.lower()]
        for number, prompt, error in reader(base / path if base else path, field):
            if error is None and not prompt.strip():
                prompt, error = None, "empty prompt"
            yield InputRow(f"{path}:{number}", index, prompt if error is None else None, error)
            index += 1


def count_rows(path: Path, field: str | None = None) -> int:
    """How many rows `read_prompts` yields for `path` (a checked input), without decoding prompts."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl"):  # one row per line, as iterating the binary file splits them
        lines, last = 0, b"\n"
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                lines += block.count(b"\n")
                last = block[-1:]
        return lines + (last != b"\n")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _ in _read_csv(path, field))  # quoted fields may span lines: parse


def _unreadable(path: Path, rows: int, exc: Exception) -> MemscanError:
    """The error for a file that broke after `rows` good rows (the rows before it were yielded)."""
    return MemscanError(f"{path}: unreadable after row {rows}: {one_line(exc)}")


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The raw lines of `path`, numbered from 1; an I/O error partway raises `MemscanError`."""
    number = 0
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                yield number, raw
    except OSError as exc:
        raise _unreadable(path, number, exc) from exc


def _read_txt(path: Path, field: str | None) -> Iterator[tuple[int, str | None, str | None]]:
    for number, raw in _numbered_lines(path):
        try:
            yield number, raw.rstrip(b"\r\n").decode("utf-8"), None
        except UnicodeDecodeError:
            yield number, None, "not UTF-8"


def _read_jsonl(path: Path, field: str | None) -> Iterator[tuple[int, str | None, str | None]]:
    for number, raw in _numbered_lines(path):
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield number, None, "not UTF-8"
            continue
        except json.JSONDecodeError as exc:
            yield number, None, f"invalid JSON ({exc.msg})"
            continue
        if not isinstance(record, dict):
            yield number, None, "not a JSON object"
            continue
        name = field or next((k for k in DEFAULT_FIELDS if k in record), None)
        if name is None or name not in record:
            yield number, None, f"missing field {field!r}" if field else "no prompt, caption or text field"
        elif not isinstance(record[name], str):
            yield number, None, f"field {name!r} is not a string"
        else:
            yield number, record[name], None


def _read_csv(path: Path, field: str | None) -> Iterator[tuple[int, str | None, str | None]]:
    number = 0
    try:
        # surrogateescape keeps bad bytes visible per row instead of failing the whole file.
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = _csv_reader(f)
            header = next(reader, [])
            position = header.index(_column(path, header, field))
            for number, row in enumerate(reader, 1):
                if position >= len(row):
                    yield number, None, "missing field"
                    continue
                value = row[position]
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    yield number, None, "not UTF-8"
                    continue
                yield number, value, None
    except (csv.Error, OSError) as exc:  # e.g. a field over CSV_FIELD_LIMIT
        raise _unreadable(path, number, exc) from exc


def _read_parquet(path: Path, field: str | None) -> Iterator[tuple[int, str | None, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        parquet = pq.ParquetFile(path)
        column = _column(path, parquet.schema_arrow.names, field)
        column_type = parquet.schema_arrow.field(column).type
        is_text = pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
        # Row group by row group: batches would span groups, so a corrupt group would also lose
        # the good rows read with it in one batch.
        batches = (
            batch
            for group in range(parquet.num_row_groups)
            for batch in parquet.iter_batches(columns=[column], batch_size=8192, row_groups=[group])
        )
        for batch in batches:
            for value in batch.column(0).to_pylist():
                number += 1
                if value is None:
                    yield number, None, "missing value"
                elif not is_text:
                    yield number, None, f"column {column!r} is not a string"
                else:
                    yield number, value, None
    except (OSError, pa.ArrowException) as exc:  # a corrupt row group: pyarrow raises OSError or ArrowInvalid
        raise _unreadable(path, number, exc) from exc


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
