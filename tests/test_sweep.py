"""`memscan sweep`: only new prompts are scored, the store at scale, the report, exit codes, and the
faults: SIGKILL mid-run, corrupt inputs, unwritable locations, a second concurrent sweep."""

from __future__ import annotations

import base64
import html
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unicodedata
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_output import one_line_error

from scanner.calibration import fit_calibration
from scanner.cli import main
from scanner.detect import DetectSettings, Scanner
from scanner.errors import MemscanError
from scanner.model import load_model
from scanner.scan import scanner_settings
from scanner.sweep import SweepStore, normalize_prompt, prompt_key, run_sweep, usable_inputs
from scanner.sweep.store import ScoredPrompt


@pytest.fixture(scope="module")
def scanner(tiny_sd1):
    return Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings())


def _random_prompts(count: int) -> list[str]:
    """`count` different prompts, fresh each run."""
    words = ["cat", "dog", "red", "a", "photo", "of", "the", "café", "blue", "house", "über", "sky"]
    rng = random.Random()
    prompts: dict[str, None] = {}
    while len(prompts) < count:
        prompts[" ".join(rng.choices(words, k=rng.randint(2, 7)))] = None
    return list(prompts)


def _stored(db: Path) -> list[tuple]:
    with closing(sqlite3.connect(db)) as connection:
        return connection.execute("SELECT prompt, score, sweep, times_scored FROM prompts").fetchall()


def test_normalization_against_a_regex_reference():
    rng = random.Random()
    pieces = ["a", "cafe\u0301", "café", " ", "\t", "\n", "\u00a0", "\u2003", "\u3000", "x", "\r\n", "Å", "A\u030a"]
    for _ in range(500):
        text = "".join(rng.choices(pieces, k=rng.randint(0, 12)))
        expected = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()
        assert normalize_prompt(text) == expected
        assert normalize_prompt(expected) == expected
    assert prompt_key(normalize_prompt("  a   cafe\u0301\n")) == prompt_key("a café")
    assert prompt_key("a café") != prompt_key("a cafe")


def test_only_new_prompts_are_scored(tmp_path, scanner, monkeypatch):
    prompts = _random_prompts(30)
    first, second = prompts[:20], prompts[15:]
    a = tmp_path / "a.txt"  # variants of the same prompt, an empty line, bytes that are not UTF-8
    a.write_bytes("\n".join([*first, "  " + first[0] + "\t", ""]).encode() + b"\n\xff\xfe\n")
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in second))
    scored: list[str] = []
    real_score = Scanner.submit

    def counting_score(self, prompts, indices=None, tokens=None):
        scored.extend(prompts)
        return real_score(self, prompts, indices, tokens)

    monkeypatch.setattr(Scanner, "submit", counting_score)
    db = tmp_path / "store.db"
    with SweepStore(db) as store:
        one = run_sweep(scanner, store, *usable_inputs([a]), batch_size=3, commit_rows=4)
    assert sorted(scored) == sorted(first)
    assert (one.rows, one.new, one.known, one.rejected) == (23, 20, 1, 2)
    scored.clear()
    with SweepStore(db) as store:
        two = run_sweep(scanner, store, *usable_inputs([a, b]), batch_size=3, commit_rows=4)
    assert sorted(scored) == sorted(prompts[20:])
    assert (two.rows, two.new, two.known, two.rejected, two.sweep) == (23 + 15, 10, 23 + 5 - 2, 2, 2)
    monkeypatch.setattr(Scanner, "submit", real_score)
    rows = _stored(db)
    assert sorted(p for p, *_ in rows) == sorted(prompts) and {t for *_, t in rows} == {1}
    by_prompt = {p: (s, sweep) for p, s, sweep, _ in rows}
    expected = scanner.score(prompts).score
    assert [by_prompt[p][0] for p in prompts] == pytest.approx(expected.tolist(), rel=1e-5)
    assert [by_prompt[p][1] for p in prompts] == [1] * 20 + [2] * 10


def test_store_lookups_with_many_rows(tmp_path):
    db = tmp_path / "big.db"
    stored = [f"synthetic prompt {i}" for i in range(60_000)]
    with SweepStore(db) as store:
        store.begin()
        config = store.config_id("sha256:x", "{}")
        sweep, _ = store.start_sweep(config, ["synthetic"], None)
        for start in range(0, len(stored), 20_000):
            batch = stored[start : start + 20_000]
            store.add(config, sweep, (ScoredPrompt(prompt_key(p), p, 0.5, 4, False, "synthetic") for p in batch))
            store.commit()
            store.begin()
        store.commit()
    rng = random.Random()
    existing = rng.sample(stored, 3000)
    fresh = [f"fresh prompt {rng.random()}" for _ in range(3000)]
    with SweepStore(db) as store:
        keys = [prompt_key(p) for p in existing + fresh]
        rng.shuffle(keys)
        assert store.known(config, keys) == {prompt_key(p) for p in existing}
        assert store.known(config + 1, keys) == set()  # another model or settings knows none of them
        plan = " ".join(row[-1] for row in store.db.execute("EXPLAIN QUERY PLAN SELECT key FROM prompts WHERE config = 1 AND key IN (x'00', x'01')"))
        assert "USING PRIMARY KEY" in plan  # a key probe, not a scan of the table
        assert store.count(sweep) == 60_000


def _png_images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_cli_sweep_report_calibration_and_fail_on_flagged(tmp_path, tiny_sd1, scanner, capsys):
    prompts = _random_prompts(24)
    inp = tmp_path / "p.jsonl"
    inp.write_bytes(b"".join(json.dumps({"prompt": p}).encode() + b"\n" for p in prompts) + b'{"prompt": "caf\xe9"}\n')
    not_parquet = tmp_path / "broken.parquet"
    not_parquet.write_bytes(os.urandom(256))
    scores = scanner.score(prompts).score
    high = scores >= np.median(scores)  # the upper half plays "memorized"
    calibration = tmp_path / "calib.json"
    fit_calibration(high, scores, 0.0, model=scanner.model.fingerprint, settings=scanner_settings(scanner)).save(calibration)
    report = tmp_path / "reports"
    args = ["sweep", str(inp), str(not_parquet), "--model", str(tiny_sd1), "--device", "cpu", "--store", str(tmp_path / "s.db")]
    args += ["--report", str(report), "--calibration", str(calibration), "--fail-on-flagged", "--top", "3"]

    assert main(args) == 3
    assert f"rejected {not_parquet}: not a readable Parquet file" in capsys.readouterr().err
    (summary_file,) = report.glob("sweep-1-*.json")
    summary = json.loads(summary_file.read_text())
    assert summary["counts"] == {"rows": 26, "new": 24, "known": 0, "rejected": 2, "flagged": int(high.sum())}
    assert summary["threshold_source"] == f"calibration {calibration}"
    assert summary["model"]["fingerprint"] == scanner.model.fingerprint
    top = [entry["prompt"] for entry in summary["top"]]
    assert top == [prompts[i] for i in np.argsort(-scores, kind="stable")[:3]]
    assert all(entry["flagged"] and entry["words"] for entry in summary["top"])
    rejects = [json.loads(line) for line in (report / summary["files"]["rejects.jsonl"]).read_text().splitlines()]
    assert [r["id"] for r in rejects] == [str(not_parquet), f"{inp}:25"]
    assert rejects[1]["reason"] == "not UTF-8"

    page = (report / summary["files"]["html"]).read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    images = _png_images(page)
    assert len(images) == 2 and all(image.startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    # Every word with a share of the significance is highlighted, and only those.
    assert page.count("<mark ") == sum(w["share"] > 0 for entry in summary["top"] for w in entry["words"])
    assert page.count("FLAGGED") == 3 and html.escape(summary["top"][0]["source"]) in page

    # Nothing new the second time: nothing flagged, so exit 0; the trend has both sweeps.
    assert main(args) == 0
    assert "0 new, 24 already known" in capsys.readouterr().out
    (second,) = report.glob("sweep-2-*.json")
    summary = json.loads(second.read_text())
    assert summary["counts"]["flagged"] == 0 and [h["id"] for h in summary["history"]] == [1, 2]
    assert {t for *_, t in _stored(tmp_path / "s.db")} == {1}


def test_a_file_that_breaks_mid_read_is_rejected_from_there_and_the_rest_swept(tmp_path, scanner):
    prompts = _random_prompts(60)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": prompts}), parquet, row_group_size=20, compression="snappy")
    data = bytearray(parquet.read_bytes())
    page = pq.ParquetFile(parquet).metadata.row_group(1).column(0).data_page_offset
    data[page : page + 40] = bytes(b ^ 0xFF for b in data[page : page + 40])  # the second row group's page header
    parquet.write_bytes(bytes(data))
    other = tmp_path / "other.txt"
    other.write_text("a lighthouse at dusk\n")
    with SweepStore(tmp_path / "s.db") as store:
        summary = run_sweep(scanner, store, *usable_inputs([parquet, other]))
        reasons = list(store.rejects(summary.sweep))
    assert (summary.new, summary.rejected) == (21, 1)
    assert reasons[0][0] == str(parquet) and reasons[0][1].startswith("unreadable after row 20:")
    assert sorted(p for p, *_ in _stored(tmp_path / "s.db")) == sorted(prompts[:20] + ["a lighthouse at dusk"])


def test_unwritable_store_or_report_fails_before_model_work(tmp_path, tiny_sd1, capsys, monkeypatch):
    def no_model_work(spec):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("scanner.detect.ScannerSpec.load", no_model_work)
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    base = ["sweep", str(inp), "--model", str(tiny_sd1), "--threshold", "0.5"]
    good_store, good_report = str(tmp_path / "s.db"), str(tmp_path / "reports")
    not_a_store = tmp_path / "notes.db"
    not_a_store.write_text("these are notes, not SQLite\n" * 100)
    cases = [
        (["--store", "/proc/memscan.db", "--report", good_report], "cannot open the store" if os.geteuid() == 0 else "not writable"),
        (["--store", good_store, "--report", "/proc/memscan-reports"], "report folder is not writable"),
        (["--store", str(tmp_path / "missing" / "s.db")], "does not exist"),
        (["--store", str(not_a_store)], "not a database"),
    ]
    if os.geteuid():  # modes bind everyone but root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        read_only = tmp_path / "read-only.db"
        SweepStore(read_only).close()
        read_only.chmod(0o444)
        cases += [(["--store", str(locked / "s.db")], "not writable"), (["--store", str(read_only)], "not writable")]
    for options, reason in cases:
        assert reason in one_line_error(capsys, main([*base, *options]))


def test_a_second_sweep_waits_for_the_store_then_fails_clearly(tmp_path, tiny_sd1, capsys):
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\na dog\n")
    db = tmp_path / "s.db"
    args = ["sweep", str(inp), "--model", str(tiny_sd1), "--device", "cpu", "--store", str(db)]
    holding, release = threading.Event(), threading.Event()

    def another_sweep() -> None:  # holds the store as a running sweep does, until released
        with SweepStore(db):
            holding.set()
            release.wait(timeout=60)

    thread = threading.Thread(target=another_sweep)
    thread.start()
    holding.wait(timeout=60)
    started = time.monotonic()
    err = one_line_error(capsys, main([*args, "--wait", "0.5"]))
    assert "in use by another sweep (waited 0.5 s)" in err and time.monotonic() - started >= 0.5
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    assert main([*args, "--wait", "60"]) == 0  # it waited for the other sweep to finish, then swept
    assert time.monotonic() - started >= 1.0 and len(_stored(db)) == 2
    thread.join()


@pytest.mark.slow  # a real kill -9 of a sweep process; tests/test_faults.py kills at every sweep commit in-process
def test_sigkill_mid_sweep_then_rerun_loses_nothing_and_scores_nothing_twice(tmp_path, tiny_sd1, capsys):
    prompts = [f"prompt number {i}" for i in range(300)]
    inp = tmp_path / "p.txt"
    inp.write_text("\n".join(prompts + [" prompt  number 7", "prompt number 8"]) + "\n")  # two repeats
    db = tmp_path / "s.db"
    report = tmp_path / "reports"
    cmd = [sys.executable, "-m", "scanner.cli", "sweep", str(inp), "--model", str(tiny_sd1), "--device", "cpu"]
    cmd += ["--store", str(db), "--report", str(report), "--batch-size", "2", "--checkpoint-rows", "4", "--generations", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if len(_stored(db)) >= 8:
                break
        except sqlite3.OperationalError:  # the store's tables are not created yet
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    # A real concurrent sweep: the running one holds the store, so this one gives up.
    assert "in use by another sweep" in one_line_error(capsys, main([*cmd[3:], "--wait", "0.2"]))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(_stored(db))
    assert 8 <= committed < 300

    capsys.readouterr()
    assert main(cmd[3:]) == 0  # the re-run
    assert "sweep 1 (resumed): 302 rows, 300 new, 2 already known" in capsys.readouterr().out
    rows = _stored(db)
    assert sorted(p for p, *_ in rows) == sorted(prompts)
    assert {t for *_, t in rows} == {1} and {sweep for _, _, sweep, _ in rows} == {1}
    (summary_file,) = report.glob("sweep-1-*.json")
    assert json.loads(summary_file.read_text())["scored_by_this_run"] == 300 - committed
    with closing(sqlite3.connect(db)) as connection:
        assert connection.execute("SELECT id, status, new FROM sweeps").fetchall() == [(1, "done", 300)]
    scanner = Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings(generations=2))
    by_prompt = {p: s for p, s, *_ in rows}
    sample = [prompts[i] for i in (0, 1, 150, 299)]
    assert [by_prompt[p] for p in sample] == pytest.approx(scanner.score(sample).score.tolist(), rel=1e-5)


def test_reference_noise_is_refused(tmp_path, scanner):
    inp = tmp_path / "p.txt"
    inp.write_text("a cat\n")
    reference = Scanner(scanner.model, DetectSettings(noise="reference"))
    with SweepStore(tmp_path / "s.db") as store, pytest.raises(MemscanError, match="--noise shared"):
        run_sweep(reference, store, *usable_inputs([inp]))


def test_help_documents_the_exit_codes(capsys):
    for command in ("sweep", "calibrate"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exited.value.code == 0 and "exit codes" in out and "--calibration" in out
        assert ("3    prompts flagged" in out) == (command == "sweep")  # calibrate flags nothing
