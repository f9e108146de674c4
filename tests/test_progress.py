"""Nothing silent: the readers report how far into the inputs each row is, scan's bar shows bytes read of
bytes total (so a total and an ETA), and calibrate shows a bar while it scores; bars go to stderr only."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from scanner.cli import main
from scanner.cli.progress import ScanBar
from scanner.io import check_inputs, input_bytes, read_prompts


def _prompts(count: int) -> list[str]:
    words = ["a", "red", "fox", "watercolor", "of", "the", "city", "at", "night", "café"]
    return [" ".join(random.choices(words, k=random.randint(1, 8))) for _ in range(count)]


def test_row_offsets_rise_to_the_inputs_size(tmp_path):
    prompts = _prompts(random.randint(30, 60))
    (tmp_path / "a.txt").write_text("\n".join(prompts[:10]) + "\n\n", encoding="utf-8")  # an empty row too
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[10:20]), encoding="utf-8")
    (tmp_path / "c.csv").write_text("prompt\n" + "".join(f'"{p}"\n' for p in prompts[20:25]), encoding="utf-8")
    pq.write_table(pa.table({"prompt": prompts[25:]}), tmp_path / "d.parquet")
    paths = check_inputs([str(tmp_path / "*")])
    rows = list(read_prompts(paths))
    offsets = [row.offset for row in rows]
    assert len(rows) == len(prompts) + 1 and offsets == sorted(offsets) and 0 < offsets[0]
    assert offsets[-1] == input_bytes([str(tmp_path / "*")]) == sum(p.stat().st_size for p in paths)
    # txt and jsonl rows end exactly where their line does.
    text = (tmp_path / "a.txt").read_bytes()
    assert offsets[:11] == [text.index(b"\n", 0 if i == 0 else offsets[i - 1]) + 1 for i in range(11)]
    txt_size = len(text)
    jsonl = (tmp_path / "b.jsonl").read_bytes()
    assert offsets[11:21] == [txt_size + jsonl.index(b"\n", 0 if i == 0 else offsets[10 + i] - txt_size) + 1 for i in range(10)]


def test_scan_bar_shows_bytes_of_the_total_and_the_prompts(capsys, monkeypatch):
    monkeypatch.setattr("scanner.cli.progress.DISABLE", False)
    with ScanBar(4096) as bar:
        bar.add_rows(16)
        bar.read(1024)
        bar.add_rows(16)
        bar.read(4096)
    err = capsys.readouterr().err
    last = err.split("\r")[-1]
    assert "100%" in last and "4.00kB/4.00kB read" in last and "32 prompts" in last and "<00:00" in last
    with ScanBar(None) as bar:  # Ray: rows only, a counter
        bar.add_rows(7)
    assert "scanning: 7 prompts" in capsys.readouterr().err.split("\r")[-1]


def test_scan_and_calibrate_show_bars_on_stderr_only(tmp_path, tiny_sd1, capsys, monkeypatch):
    monkeypatch.setattr("scanner.cli.progress.DISABLE", False)  # as on a terminal
    prompts = _prompts(40)
    inputs = tmp_path / "p.txt"
    inputs.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    size = inputs.stat().st_size
    out = tmp_path / "s.jsonl"
    assert main(["scan", str(inputs), "--model", str(tiny_sd1), "--out", str(out), "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    assert "scanning" not in captured.out and captured.out.startswith("scored 40")
    last = captured.err.split("\r")[-1]
    shown = tqdm.format_sizeof(size, divisor=1024)  # e.g. 1.01k
    assert "100%" in last and f"{shown}B/{shown}B read" in last and "40 prompts" in last

    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"prompt": p, "label": i % 2}) + "\n" for i, p in enumerate(prompts)))
    code = main(["calibrate", "--labels", str(labels), "--model", str(tiny_sd1), "--out", str(tmp_path / "c.json"),
                 "--batch-size", "16"])
    assert code == 0
    captured = capsys.readouterr()
    assert "scoring" not in captured.out and "scoring: 100%" in captured.err and "40/40" in captured.err


def test_explain_shows_a_bar_over_its_prompts_on_stderr_only(tmp_path, tiny_sd1, capsys, monkeypatch):
    monkeypatch.setattr("scanner.cli.progress.DISABLE", False)
    prompts = _prompts(random.randint(5, 9))
    inputs = tmp_path / "p.txt"
    inputs.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    code = main(["explain", "--input", str(inputs), "--model", str(tiny_sd1), "--batch-size", "4", "--format", "json",
                 "--method", "grad", "--threshold", "1"])
    assert code == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["prompt"] for line in captured.out.splitlines()] == prompts
    assert "explaining: 100%" in captured.err.split("\r")[-1] and f"{len(prompts)}/{len(prompts)}" in captured.err
