"""Crash-safe scan output: results are committed in parts, then merged into the output.

While a scan runs, `OUT.parts/` holds `manifest.json` (what run this is: its key and the
size, modification time and SHA-256 of every input) and parts named `<start>-<end>.parquet`,
each covering input rows `[start, end)`: the rename of a fsynced part is its commit, so a
kill at any point (also SIGKILL) leaves only whole parts. Re-running the same command skips
the committed rows; nothing is lost or written twice. A changed input is refused.

At the end the parts are merged into `OUT.tmp` and `STEM.rejects.jsonl.tmp` (fsynced), and
`OUT.merged.json` records that the merge is done: from that commit on, any run rolls it
forward (renames the two into place, removes the parts, then `OUT.merged.json`), so a kill
anywhere in the merge or the cleanup is finished by the next run. One scan writes an output at a time:
it holds `OUT.lock` (an `flock`), and a second one waits for it up to `wait_s`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import MemscanError
from .lock import lock_file, unlock_and_remove

OUTPUT_SUFFIXES = (".parquet", ".jsonl")
RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("score", pa.float64()),
        ("scores", pa.list_(pa.float64())),
        ("flagged", pa.bool_()),
        ("n_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("model", pa.string()),
        ("settings", pa.string()),
    ]
)


def rejects_path(out: Path) -> Path:
    """Where the rejected rows of output `out` go: `scan.parquet` -> `scan.rejects.jsonl`."""
    return out.with_name(out.stem + ".rejects.jsonl")


@dataclass
class OutputTotals:
    """Counts over the whole output, resumed parts included."""

    rows: int
    flagged: int
    rejected: int


def input_fingerprint(path: Path) -> dict:
    """What a resume checks an input against: size, modification time and SHA-256 of its bytes."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (a rename is a change of the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write `PATH.tmp` with `write` and fsync it; on failure (a full disk) remove it and raise one line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        hint = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
        raise MemscanError(f"cannot write {tmp}: {exc.strerror or exc}{hint}") from exc
    return tmp


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` whole or not at all: a fsynced temporary file renamed over it."""
    os.replace(_write_temp(path, write), path)
    _fsync_dir(path.parent)


def _json_lines(rows: Sequence[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


class ScanJournal:
    """Parts of one scan's output, keyed by the run (inputs, model, settings) in a manifest.

    Holds the output's lock from construction to `finalize` or `close`.
    """

    def __init__(
        self, out: str | Path, run_key: dict, overwrite: bool = False, inputs: Sequence[Path] = (), wait_s: float = 60.0
    ):
        """Lock `out` (waiting up to `wait_s`), check it against `inputs`, and open or resume its parts."""
        self.out = Path(out)
        if self.out.suffix.lower() not in OUTPUT_SUFFIXES:
            raise MemscanError(f"{self.out}: output must end in {' or '.join(OUTPUT_SUFFIXES)}")
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.rejects = rejects_path(self.out)
        self.marker = self.out.with_name(self.out.name + ".merged.json")
        self._check_paths(inputs)
        busy = f"{self.out} is being written by another scan (waited {wait_s:g} s); try later or raise --wait"
        try:
            self._lock = lock_file(self.out.with_name(self.out.name + ".lock"), wait_s, busy)
        except OSError as exc:
            raise MemscanError(f"{self.out}: cannot write beside the output ({exc.strerror})") from exc
        try:
            self.manifest = {"run": json.loads(json.dumps(run_key)), "inputs": [input_fingerprint(p) for p in inputs]}
            self.merged: dict | None = None  # OUT.merged.json once the merge is committed
            self._open(overwrite)
        except BaseException:
            self.close()
            raise

    def _check_paths(self, inputs: Sequence[Path]) -> None:
        parent = self.out.parent
        if not parent.is_dir():
            raise MemscanError(f"{self.out}: output folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise MemscanError(f"{self.out}: output folder {parent} is not writable")
        for path in (self.out, self.rejects):
            if path.is_dir():
                raise MemscanError(f"{path} is a folder; --out must name a file")
        for path in inputs:
            if _same_file(path, self.out):
                raise MemscanError(f"{self.out} is also an input: the output would replace it; choose another --out")
            if _same_file(path, self.rejects):
                raise MemscanError(f"{path} is an input and would be replaced by the rejects of {self.out}; choose another --out")

    def _open(self, overwrite: bool) -> None:
        marker = self._read_json(self.marker)
        if marker is not None:  # a run was killed after its merge's commit: finish it first
            self.merged = marker
            self._roll_forward()
            if marker["manifest"] == self.manifest:
                return  # this very run: its output is complete
            self.merged = None
        elif self.parts.is_dir():
            self._check_stored_run(overwrite)
        if not self.parts.is_dir():
            for path in (self.out, self.rejects):
                if path.exists() and not overwrite:
                    raise MemscanError(f"{path} already exists; pass --overwrite to replace it")
        try:
            # Left by a killed or failed run; removed so they cannot keep a full disk full.
            for stale in (self.out.with_name(self.out.name + ".tmp"), self.rejects.with_name(self.rejects.name + ".tmp")):
                stale.unlink(missing_ok=True)
            self.parts.mkdir(exist_ok=True)
            for stale in self.parts.glob("*.tmp"):
                stale.unlink()
            manifest = json.dumps(self.manifest, indent=2, sort_keys=True).encode("utf-8")
            _write_atomic(self.parts / "manifest.json", lambda f: f.write(manifest))
        except OSError as exc:
            raise MemscanError(f"{self.out}: cannot write beside the output ({exc.strerror})") from exc

    def _check_stored_run(self, overwrite: bool) -> None:
        """Keep parts of this same run; discard (with `overwrite`) or refuse another's."""
        stored = self._read_json(self.parts / "manifest.json")
        if stored == self.manifest:
            return
        if stored is None and not self._committed():  # killed before its first commit
            shutil.rmtree(self.parts)
            return
        if not overwrite:
            if stored is not None and stored.get("run") == self.manifest["run"]:
                changed = next(
                    (new["path"] for old, new in zip(stored["inputs"], self.manifest["inputs"]) if old != new), "an input"
                )
                raise MemscanError(
                    f"{changed} changed since the interrupted scan of {self.out} (size, time or content); "
                    "pass --overwrite to start over"
                )
            raise MemscanError(
                f"{self.parts} holds a different run's partial output (other inputs, model or "
                "settings); re-run that command to finish it, or pass --overwrite to discard it"
            )
        shutil.rmtree(self.parts)

    @staticmethod
    def _read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _committed(self) -> list[tuple[int, int, Path]]:
        """Committed parts in order, as long as they cover the input without gaps."""
        spans = []
        for part in self.parts.glob("*.parquet"):
            start, _, end = part.stem.partition("-")
            if start.isdigit() and end.isdigit():
                spans.append((int(start), int(end), part))
        covered, expected = [], 0
        for start, end, part in sorted(spans):
            if start != expected:
                break
            covered.append((start, end, part))
            expected = end
        return covered

    @property
    def committed_rows(self) -> int:
        """How many input rows (scored or rejected) are already committed."""
        if self.merged is not None:
            return self.merged["end"]
        parts = self._committed()
        return parts[-1][1] if parts else 0

    def commit(self, start: int, end: int, results: list[dict], rejects: list[dict]) -> None:
        """Commit input rows `[start, end)`: their results and their rejects, atomically and durably."""
        name = f"{start:012d}-{end:012d}"
        lines = _json_lines(rejects)
        _write_atomic(self.parts / f"{name}.rejects.jsonl", lambda f: f.write(lines))
        table = pa.Table.from_pylist(results, schema=RESULT_SCHEMA)
        _write_atomic(self.parts / f"{name}.parquet", lambda f: pq.write_table(table, f))  # the commit point

    def finalize(self) -> OutputTotals:
        """Merge the parts into the output and its rejects file, then remove the parts; releases the lock."""
        try:
            if self.merged is None:
                self._merge()
            self._roll_forward()
        finally:
            self.close()
        return OutputTotals(**self.merged["totals"])

    def _merge(self) -> None:
        parts = self._committed()
        totals = OutputTotals(0, 0, 0)

        def write_output(f: BinaryIO) -> None:
            if self.out.suffix.lower() == ".parquet":
                with pq.ParquetWriter(f, RESULT_SCHEMA) as writer:
                    for _, _, part in parts:
                        table = pq.read_table(part, schema=RESULT_SCHEMA)
                        writer.write_table(table)
                        totals.rows += table.num_rows
                        totals.flagged += sum(bool(x) for x in table.column("flagged").to_pylist())
                return
            for _, _, part in parts:
                rows = pq.read_table(part, schema=RESULT_SCHEMA).to_pylist()
                f.write(_json_lines(rows))
                totals.rows += len(rows)
                totals.flagged += sum(bool(row["flagged"]) for row in rows)

        def write_rejects(f: BinaryIO) -> None:
            for _, _, part in parts:
                data = part.with_name(part.stem + ".rejects.jsonl").read_bytes()
                totals.rejected += data.count(b"\n")
                f.write(data)

        temporaries = []
        try:
            temporaries.append(_write_temp(self.out, write_output))
            temporaries.append(_write_temp(self.rejects, write_rejects))
            marker = {"manifest": self.manifest, "end": parts[-1][1] if parts else 0, "totals": asdict(totals)}
            text = json.dumps(marker, sort_keys=True).encode("utf-8")
            _write_atomic(self.marker, lambda f: f.write(text))  # the merge's commit point
        except MemscanError:  # a full disk: the parts stay for the next run, nothing else does
            for tmp in temporaries:
                tmp.unlink(missing_ok=True)
            raise
        self.merged = marker

    def _roll_forward(self) -> None:
        """After the merge's commit: rename its files into place, remove the parts, then the marker.

        Every step can be interrupted and redone: a renamed file's temporary is gone, a removed
        part is gone, and the marker goes last, in one unlink."""
        for dest in (self.out, self.rejects):
            tmp = dest.with_name(dest.name + ".tmp")
            if tmp.exists():
                os.replace(tmp, dest)
        _fsync_dir(self.out.parent)
        if self.parts.is_dir():
            for path in sorted(self.parts.iterdir()):
                path.unlink()
            self.parts.rmdir()
        self.marker.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the output's lock (finalize does); the parts stay for a resume."""
        if self._lock is not None:
            unlock_and_remove(self._lock)
            self._lock = None
