"""Fault injection for scan and sweep: a kill at every commit, merge and cleanup point, a full disk at
every write, and two runs at once. Nothing lost, nothing written twice, one line for the user."""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from scanner import scan as scan_module
from scanner.detect import DetectSettings, Scanner
from scanner.errors import MemscanError
from scanner.io import journal as journal_module
from scanner.model import load_model
from scanner.sweep import SweepStore, run_sweep

PROMPTS = [f"a photo of thing {i} on a shelf" for i in range(9)] + [""]  # 9 prompts and one reject


@pytest.fixture(scope="module")
def scanner(tiny_sd1):
    return Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings())


class Killed(BaseException):
    """A simulated SIGKILL: no `except Exception` or `except OSError` handler sees it."""


class KillAt:
    """Wraps the filesystem mutations (`os.replace`, `os.unlink`, `os.rmdir`) and dies before the `at`-th."""

    def __init__(self, monkeypatch, at: int | None):
        self.at, self.calls = at, 0
        for name in ("replace", "unlink", "rmdir"):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real):
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                raise Killed
            return real(*args, **kwargs)

        return call


def _scan(scanner, folder: Path, **options) -> scan_module.ScanSummary:
    inp = folder / "p.txt"
    if not inp.exists():
        inp.write_text("\n".join(PROMPTS) + "\n")
    return scan_module.run_scan(scanner, [inp], folder / "scan.parquet", batch_size=2, commit_rows=3, **options)


def _outputs(folder: Path) -> tuple[list[dict], str]:
    """The output rows and the rejects, ids made relative to `folder` (so runs in two folders compare)."""
    rows = [{**row, "id": row["id"].removeprefix(f"{folder}/")} for row in pq.read_table(folder / "scan.parquet").to_pylist()]
    return rows, (folder / "scan.rejects.jsonl").read_text().replace(f"{folder}/", "")


def test_a_kill_at_every_commit_merge_and_cleanup_point_is_resumed(tmp_path, scanner, monkeypatch):
    reference = tmp_path / "reference"
    reference.mkdir()
    with monkeypatch.context() as patch:
        counter = KillAt(patch, None)
        _scan(scanner, reference)
    expected = _outputs(reference)
    assert len(expected[0]) == 9 and expected[1].count("\n") == 1
    points = counter.calls
    assert points >= 20  # manifest, 3 parts x 2 files, the merge's commit, 2 renames, each removal, the lock
    for at in range(1, points + 1):
        folder = tmp_path / f"kill-{at}"
        folder.mkdir()
        with monkeypatch.context() as patch:
            KillAt(patch, at)
            with pytest.raises(Killed):
                _scan(scanner, folder)
        if any(folder.glob("scan.parquet.*")) or not (folder / "scan.parquet").exists():  # parts, marker, lock: unfinished
            summary = _scan(scanner, folder)  # the same command again
            assert (summary.rows, summary.rejected) == (9, 1)
        else:  # killed after its last step: done, and a re-run is refused as for any finished scan
            with pytest.raises(MemscanError, match="already exists"):
                _scan(scanner, folder)
        assert _outputs(folder) == expected, f"kill before mutation {at}"
        assert sorted(p.name for p in folder.iterdir()) == ["p.txt", "scan.parquet", "scan.rejects.jsonl"], at


class FullDisk(io.FileIO):
    """A file on a full disk: the first byte is written, then ENOSPC."""

    def write(self, data) -> int:
        super().write(bytes(data[:1]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "target", ["*.parts/manifest.json.tmp", "*.parts/*.parquet.tmp", "*.parts/*.rejects.jsonl.tmp",
               "*/scan.parquet.tmp", "*/scan.rejects.jsonl.tmp", "*/scan.parquet.merged.json.tmp"],
)
def test_a_full_disk_is_one_line_leaves_no_temporary_file_and_the_rerun_finishes(tmp_path, scanner, monkeypatch, target):
    reference = tmp_path / "reference"
    reference.mkdir()
    _scan(scanner, reference)
    folder = tmp_path / "full"
    folder.mkdir()
    real_open = builtins.open

    def full_open(path, mode="r", *args, **kwargs):
        if mode == "wb" and fnmatch.fnmatch(str(path), target):
            return FullDisk(path, "wb")
        return real_open(path, mode, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(journal_module, "open", full_open, raising=False)
        with pytest.raises(MemscanError) as error:
            _scan(scanner, folder)
    message = str(error.value)
    assert "No space left on device" in message and "\n" not in message
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.lock"))
    _scan(scanner, folder)
    assert _outputs(folder) == _outputs(reference)


def test_part_commits_are_fsynced(tmp_path, scanner, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    committed: list[str] = []
    real_commit = journal_module.ScanJournal.commit

    def commit(self, start, end, results, rejects):
        real_commit(self, start, end, results, rejects)
        committed.append(f"{self.parts}/{start:012d}-{end:012d}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(journal_module.ScanJournal, "commit", commit)
    _scan(scanner, tmp_path)
    assert len(committed) == 3  # rows [0, 4), [4, 8), [8, 10)
    for part in committed:
        assert f"{part}.parquet.tmp" in synced and f"{part}.rejects.jsonl.tmp" in synced
    parts = str(tmp_path / "scan.parquet.parts")
    assert synced.count(parts) >= 2 * len(committed)  # each rename made durable in its folder


def test_two_scans_on_one_output_never_lose_a_row(tmp_path, scanner, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real_score = Scanner.submit

    def slow_score(self, *args, **kwargs):
        started.set()
        release.wait(timeout=60)
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(Scanner, "submit", slow_score)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.setdefault("summary", _scan(scanner, tmp_path)))
    thread.start()
    try:
        assert started.wait(timeout=60)
        began = time.monotonic()
        with pytest.raises(MemscanError, match="being written by another scan") as busy:
            _scan(scanner, tmp_path, wait=0.3)
        assert time.monotonic() - began >= 0.3 and "\n" not in str(busy.value)
        # A patient second scan waits for the first one, then finds its complete output.
        threading.Timer(0.5, release.set).start()
        with pytest.raises(MemscanError, match="already exists"):
            _scan(scanner, tmp_path, wait=60)
    finally:
        release.set()
        thread.join(timeout=120)
    assert first["summary"].rows == 9
    rows, rejects = _outputs(tmp_path)
    assert [r["prompt"] for r in rows] == PROMPTS[:9] and rejects.count("\n") == 1


def test_resume_refuses_a_changed_input_and_overwrite_starts_over(tmp_path, scanner, monkeypatch):
    inp = tmp_path / "p.txt"
    inp.write_text("\n".join(PROMPTS) + "\n")
    real_score = Scanner.submit
    calls = {"n": 0}

    def crash_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_score(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Scanner, "submit", crash_on_third)
        with pytest.raises(RuntimeError):
            _scan(scanner, tmp_path)
    # Same size, same modification time: only the hash of the bytes tells.
    stat = inp.stat()
    edited = "\n".join(p.replace("thing 1 ", "thing 7 ") for p in PROMPTS) + "\n"
    inp.write_text(edited)
    os.utime(inp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert inp.stat().st_size == stat.st_size
    with pytest.raises(MemscanError, match="changed since the interrupted scan") as error:
        _scan(scanner, tmp_path)
    assert str(inp) in str(error.value) and "--overwrite" in str(error.value)
    summary = _scan(scanner, tmp_path, overwrite=True)
    assert summary.resumed == 0
    rows, _ = _outputs(tmp_path)
    assert [r["prompt"] for r in rows] == edited.splitlines()[:9]


def test_outputs_that_would_replace_an_input_are_refused(tmp_path, scanner):
    inp = tmp_path / "p.jsonl"
    inp.write_text(json.dumps({"prompt": "a cat"}) + "\n")
    before = inp.read_bytes()
    with pytest.raises(MemscanError, match="also an input"):
        scan_module.run_scan(scanner, [inp], inp.with_suffix(".jsonl"), overwrite=True)
    with pytest.raises(MemscanError, match="also an input"):
        scan_module.run_scan(scanner, [inp], tmp_path / "." / "p.jsonl", overwrite=True)
    assert inp.read_bytes() == before
    own_rejects = tmp_path / "x.rejects.jsonl"
    own_rejects.write_text(json.dumps({"prompt": "a dog"}) + "\n")
    with pytest.raises(MemscanError, match="replaced by the rejects"):
        scan_module.run_scan(scanner, [own_rejects], tmp_path / "x.parquet", overwrite=True)
    assert json.loads(own_rejects.read_text()) == {"prompt": "a dog"}
    stale = tmp_path / "s.rejects.jsonl"
    stale.write_text("keep me\n")
    with pytest.raises(MemscanError, match="s.rejects.jsonl already exists"):
        scan_module.run_scan(scanner, [inp], tmp_path / "s.parquet")
    assert stale.read_text() == "keep me\n"
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(MemscanError, match="is a folder"):
        scan_module.run_scan(scanner, [inp], tmp_path / "folder.jsonl", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.jsonl", "p.jsonl", "s.rejects.jsonl", "x.rejects.jsonl"]


def _store_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT prompt, score, times_scored FROM prompts ORDER BY prompt").fetchall()


def test_a_kill_at_every_sweep_commit_is_resumed(tmp_path, scanner, monkeypatch):
    inp = tmp_path / "p.txt"
    inp.write_text("\n".join(PROMPTS) + "\n")

    def sweep(db: Path) -> None:
        with SweepStore(db) as store:
            run_sweep(scanner, store, [inp], batch_size=2, commit_rows=3)

    real_commit = SweepStore.commit
    commits = {"n": 0}

    def counting_commit(self):
        commits["n"] += 1
        real_commit(self)

    with monkeypatch.context() as patch:
        patch.setattr(SweepStore, "commit", counting_commit)
        sweep(tmp_path / "reference.db")
    expected = _store_rows(tmp_path / "reference.db")
    assert len(expected) == 9 and all(times == 1 for *_, times in expected)
    assert commits["n"] >= 4  # the set-up, the checkpoints, the sweep's last commit
    for at in range(1, commits["n"] + 1):
        calls = {"n": 0}

        def commit(self, at=at, calls=calls):
            calls["n"] += 1
            if calls["n"] == at:
                self.db.close()  # what a kill does: the open transaction is lost
                raise Killed
            real_commit(self)

        db = tmp_path / f"kill-{at}.db"
        with monkeypatch.context() as patch:
            patch.setattr(SweepStore, "commit", commit)
            with pytest.raises(Killed):
                sweep(db)
        sweep(db)
        assert _store_rows(db) == expected, at


class _FullDatabase:
    """A connection whose COMMIT finds the disk full (what SQLite says then)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def execute(self, sql: str, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.db, name)


def test_a_full_disk_under_the_sweep_store_is_one_line(tmp_path, scanner):
    inp = tmp_path / "p.txt"
    inp.write_text("\n".join(PROMPTS) + "\n")
    with SweepStore(tmp_path / "s.db") as store:
        store.db = _FullDatabase(store.db)
        with pytest.raises(MemscanError, match="disk is full") as error:
            run_sweep(scanner, store, [inp], batch_size=2, commit_rows=3)
        store.db = store.db.db
    assert "\n" not in str(error.value)
