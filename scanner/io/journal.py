"""Crash-safe scan output: results are committed in parts, then merged into the output.

While a scan runs, `OUT.parts/` holds `manifest.json` (what run this is) and parts named
`<start>-<end>.parquet`, each covering input rows `[start, end)`: the rename of a part is
its commit, so a kill at any point (also SIGKILL) leaves only whole parts. Re-running the
same command skips the committed rows; nothing is lost or written twice. At the end the
parts are merged into `OUT` (`.parquet` or `.jsonl`) and `OUT`'s rejects file, and removed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import MemscanError

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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ScanJournal:
    """Parts of one scan's output, keyed by the run (inputs, model, settings) in a manifest."""

    def __init__(self, out: str | Path, run_key: dict, overwrite: bool = False):
        self.out = Path(out)
        if self.out.suffix.lower() not in OUTPUT_SUFFIXES:
            raise MemscanError(f"{self.out}: output must end in {' or '.join(OUTPUT_SUFFIXES)}")
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.run_key = json.loads(json.dumps(run_key))  # the form it takes once stored
        parent = self.out.parent
        if not parent.is_dir():
            raise MemscanError(f"{self.out}: output folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise MemscanError(f"{self.out}: output folder {parent} is not writable")
        if self.parts.is_dir():
            if self._stored_key() != self.run_key:
                if not overwrite:
                    raise MemscanError(
                        f"{self.parts} holds a different run's partial output (other inputs, model or "
                        "settings); re-run that command to finish it, or pass --overwrite to discard it"
                    )
                shutil.rmtree(self.parts)
        elif self.out.exists() and not overwrite:
            raise MemscanError(f"{self.out} already exists; pass --overwrite to replace it")
        try:
            self.parts.mkdir(exist_ok=True)
            _write_atomic(self.parts / "manifest.json", json.dumps(self.run_key, indent=2, sort_keys=True))
        except OSError as exc:
            raise MemscanError(f"{self.out}: cannot write beside the output ({exc.strerror})") from exc

    def _stored_key(self) -> dict | None:
        try:
            return json.loads((self.parts / "manifest.json").read_text(encoding="utf-8"))
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
        parts = self._committed()
        return parts[-1][1] if parts else 0

    def commit(self, start: int, end: int, results: list[dict], rejects: list[dict]) -> None:
        """Commit input rows `[start, end)`: their results and their rejects, atomically."""
        name = f"{start:012d}-{end:012d}"
        rejects_file = self.parts / f"{name}.rejects.jsonl"
        _write_atomic(rejects_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
        tmp = self.parts / f"{name}.parquet.tmp"
        pq.write_table(pa.Table.from_pylist(results, schema=RESULT_SCHEMA), tmp)
        os.replace(tmp, self.parts / f"{name}.parquet")  # the commit point

    def finalize(self) -> OutputTotals:
        """Merge the parts into the output and its rejects file, then remove the parts."""
        parts = self._committed()
        totals = OutputTotals(0, 0, 0)
        out_tmp = self.out.with_name(self.out.name + ".tmp")
        if self.out.suffix.lower() == ".parquet":
            with pq.ParquetWriter(out_tmp, RESULT_SCHEMA) as writer:
                for _, _, part in parts:
                    table = pq.read_table(part, schema=RESULT_SCHEMA)
                    writer.write_table(table)
                    totals.rows += table.num_rows
                    totals.flagged += sum(bool(f) for f in table.column("flagged").to_pylist())
        else:
            with out_tmp.open("w", encoding="utf-8") as f:
                for _, _, part in parts:
                    for row in pq.read_table(part, schema=RESULT_SCHEMA).to_pylist():
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        totals.rows += 1
                        totals.flagged += bool(row["flagged"])
        rejects_tmp = self.out.with_name(self.out.name + ".rejects.tmp")
        with rejects_tmp.open("w", encoding="utf-8") as f:
            for _, _, part in parts:
                text = part.with_name(part.stem + ".rejects.jsonl").read_text(encoding="utf-8")
                totals.rejected += text.count("\n")
                f.write(text)
        os.replace(out_tmp, self.out)
        os.replace(rejects_tmp, rejects_path(self.out))
        shutil.rmtree(self.parts)
        return totals
