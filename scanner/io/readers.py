"""Stream prompts from .txt, .jsonl, .csv and .parquet files, one row at a time.

Every data row becomes an `InputRow`: either a prompt or the reason it was rejected (not
UTF-8, a lone surrogate, not a string, missing field, empty, JSON nested too deeply, a line
over `MAX_LINE_BYTES`, a prompt over `MAX_PROMPT_CHARS`, a CSV quote never closed).
Problems with a whole file (missing, unreadable, unknown format, UTF-16, no prompt column)
raise `MemscanError` before any work; a file that breaks partway (corrupt data, an I/O
error) raises it when reading gets there. A UTF-8 byte-order mark is dropped.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from ..errors import MemscanError, one_line

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
DEFAULT_FIELDS = ("prompt", "caption", "text")
# Far above any prompt (the tokenizer keeps 77 tokens) and Python's 128 KiB default, yet
# finite: a stray opening quote swallows the rest of the file into one field, and this
# turns that into an error instead of one giant "prompt" held in memory.
CSV_FIELD_LIMIT = 1 << 24
# The same bound for a txt/jsonl line: a longer one is rejected and skipped without being held.
MAX_LINE_BYTES = CSV_FIELD_LIMIT
LONG_LINE = f"line over {MAX_LINE_BYTES} bytes"
# Prompts longer than this are rejected before tokenizing (the tokenizer keeps 77 tokens, a
# few hundred characters; a 50 MB line costs minutes and gigabytes to tokenize). The service
# caps its prompts at the same number.
MAX_PROMPT_CHARS = 10_000
UTF8_BOM = b"\xef\xbb\xbf"


class _Position:
    """How far a reader has got into its file, in bytes (what `InputRow.offset` reports)."""

    def __init__(self) -> None:
        self.bytes = 0


class InputRow(NamedTuple):
    """One data row: `id` is `file:line` (txt, jsonl) or `file:row` (csv, parquet; 1-based).

    A named tuple, not a dataclass: a scan makes one per row and sends them between processes, where a tuple
    is made and unpickled in a third of the time."""

    id: str
    index: int  # 0-based position over all inputs, in order (the reference's prompt number)
    prompt: str | None
    error: str | None = None
    offset: int = 0  # bytes of the inputs read through this row (all inputs, in order): scan's progress


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
                head = f.read(4096)
        except OSError as exc:
            raise MemscanError(f"{path}: cannot be read ({exc.strerror})") from exc
        if path.suffix.lower() != ".parquet" and _is_wide_text(head):
            raise MemscanError(f"{path}: UTF-16 or UTF-32 text; convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)")
        if path.suffix.lower() in (".csv", ".parquet"):
            _column(path, _columns(path), field)
        checked.append(path)
    return checked


def _is_wide_text(head: bytes) -> bool:
    """A UTF-16/32 byte-order mark, or NUL bytes in a quarter of the first bytes (text that is never UTF-8)."""
    return head.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")) or (
        len(head) >= 2 and head.count(b"\x00") * 4 >= len(head)
    )


def _columns(path: Path) -> list[str]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).schema_arrow.names
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for corrupt files
            raise MemscanError(f"{path}: not a readable Parquet file ({exc})") from exc
    try:
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
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
    paths: Sequence[Path],
    field: str | None = None,
    first_index: int = 0,
    base: Path | None = None,
    max_chars: int = MAX_PROMPT_CHARS,
) -> Iterator[InputRow]:
    """All rows of all inputs in order, streamed; indices count from `first_index`.

    Relative paths are opened under `base` (default: the working folder); ids keep them as given.
    Prompts over `max_chars` characters are rejected (never tokenized).
    """
    index, done = first_index, 0
    for path in paths:
        reader, at = _READERS[path.suffix.lower()], _Position()
        opened = base / path if base else path
        for number, prompt, error in reader(opened, field, at):
            if error is None and not prompt.strip():
                prompt, error = None, "empty prompt"
            elif error is None and len(prompt) > max_chars:
                prompt, error = None, f"prompt of {len(prompt)} characters, over the limit of {max_chars}"
            yield InputRow(f"{path}:{number}", index, prompt if error is None else None, error, done + at.bytes)
            index += 1
        done += opened.stat().st_size  # the whole file, so the last row's offset reaches `input_bytes`


def input_bytes(paths: Sequence[str | Path]) -> int:
    """The size of the inputs (globs expanded): the total of `InputRow.offset`."""
    return sum(path.stat().st_size for path in _expand_globs(paths))


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


def _numbered_lines(path: Path, at: _Position) -> Iterator[tuple[int, bytes | None]]:
    """The raw lines of `path` (BOM dropped), numbered from 1; None for a line over `MAX_LINE_BYTES`,
    which is skipped without being held. An I/O error partway raises `MemscanError`."""
    number = 0
    try:
        with path.open("rb") as f:
            if f.read(len(UTF8_BOM)) != UTF8_BOM:
                f.seek(0)
            while raw := f.readline(MAX_LINE_BYTES + 1):
                number += 1
                at.bytes = f.tell()
                if len(raw) <= MAX_LINE_BYTES:
                    yield number, raw
                    continue
                while raw and not raw.endswith(b"\n"):  # the rest of the long line, in bounded pieces
                    raw = f.readline(MAX_LINE_BYTES)
                at.bytes = f.tell()
                yield number, None
    except OSError as exc:
        raise _unreadable(path, number, exc) from exc


def _text(value: str) -> str | None:
    """Why `value` is not text (a lone surrogate, which JSON can carry and tokenizers choke on), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8 (lone surrogate)"
    return None


def _read_txt(path: Path, field: str | None, at: _Position) -> Iterator[tuple[int, str | None, str | None]]:
    for number, raw in _numbered_lines(path, at):
        if raw is None:
            yield number, None, LONG_LINE
            continue
        try:
            yield number, raw.rstrip(b"\r\n").decode("utf-8"), None
        except UnicodeDecodeError:
            yield number, None, "not UTF-8"


def _read_jsonl(path: Path, field: str | None, at: _Position) -> Iterator[tuple[int, str | None, str | None]]:
    for number, raw in _numbered_lines(path, at):
        if raw is None:
            yield number, None, LONG_LINE
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield number, None, "not UTF-8"
            continue
        except json.JSONDecodeError as exc:
            yield number, None, f"invalid JSON ({exc.msg})"
            continue
        except RecursionError:
            yield number, None, "invalid JSON (nested too deeply)"
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
            error = _text(record[name])
            yield number, None if error else record[name], error


def _read_csv(
    path: Path, field: str | None, at: _Position | None = None
) -> Iterator[tuple[int, str | None, str | None]]:
    number, held = 0, None
    try:
        # surrogateescape keeps bad bytes visible per row instead of failing the whole file.
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            consumed: list[str] = []  # the raw lines of the row being parsed

            def lines() -> Iterator[str]:
                for line in f:
                    consumed.append(line)
                    if at is not None:  # the raw file's position: ahead by at most one decoded chunk
                        at.bytes = f.buffer.tell()
                    yield line

            reader = _csv_reader(lines())
            header = next(reader, [])
            position = header.index(_column(path, header, field))
            consumed.clear()
            # Each row is yielded once the next one is parsed: only then is it known not to be
            # the last, the one an unclosed quote would have stretched to the end of the file.
            held_open = False
            for number, row in enumerate(reader, 1):
                if held is not None:
                    yield held
                held = _csv_value(number, row, position)
                # A row spanning lines with an odd number of quotes opened one it never closed.
                held_open = len(consumed) > 1 and "".join(consumed).count('"') % 2 == 1
                consumed.clear()
            if held is not None:
                yield (held[0], None, "unclosed quote: this row swallowed every line after it") if held_open else held
    except (csv.Error, OSError) as exc:  # e.g. a field over CSV_FIELD_LIMIT
        if held is not None:  # the last good row, parsed before the break
            yield held
        raise _unreadable(path, number, exc) from exc


def _csv_value(number: int, row: list[str], position: int) -> tuple[int, str | None, str | None]:
    if position >= len(row):
        return number, None, "missing field"
    try:
        row[position].encode("utf-8")
    except UnicodeEncodeError:
        return number, None, "not UTF-8"
    return number, row[position], None


def _read_parquet(path: Path, field: str | None, at: _Position) -> Iterator[tuple[int, str | None, str | None]]:
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
        rows, size = max(1, parquet.metadata.num_rows), path.stat().st_size
        for batch in batches:
            for value in batch.column(0).to_pylist():
                number += 1
                at.bytes = size * number // rows  # compressed pages have no per-row offset: a row's share
                if value is None:
                    yield number, None, "missing value"
                elif not is_text:
                    yield number, None, f"column {column!r} is not a string"
                else:
                    yield number, value, None
    except (OSError, pa.ArrowException) as exc:  # a corrupt row group: pyarrow raises OSError or ArrowInvalid
        raise _unreadable(path, number, exc) from exc


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
