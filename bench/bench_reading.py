"""Input reading: rows/s of each input format, through `read_prompts` (validation included).

    python -m pytest bench/bench_reading.py --benchmark-enable
"""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scanner.benchmark import sample_prompts
from scanner.io import read_prompts

ROWS = 20_000


def _write(path, prompts):
    if path.suffix == ".txt":
        path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["prompt"], *([p] for p in prompts)])
    else:
        pq.write_table(pa.table({"prompt": prompts}), path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_read(benchmark, tmp_path, suffix):
    benchmark.group = f"reading {ROWS} prompts"
    path = tmp_path / f"prompts{suffix}"
    _write(path, sample_prompts(ROWS))
    count = benchmark(lambda: sum(1 for row in read_prompts([path]) if row.error is None))
    assert count == ROWS
