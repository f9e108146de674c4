"""The sweep store: one SQLite file holding every prompt scored per (model, settings), and the sweeps.

Prompts are keyed by `prompt_key(normalize_prompt(p))` within a config (a model fingerprint
and a settings record), so the lookup of new against known prompts is a primary-key probe
however many millions of rows the store holds. `times_scored` counts the inserts of a key:
it stays 1 unless a prompt is scored twice, which the sweep never does (the tests check it).

One sweep writes at a time: it holds an exclusive `flock` on the store file for its whole
run, because SQLite's own write lock lasts one transaction only, and two sweeps that
interleave their transactions would both score the same new prompts. A second sweep waits
up to `wait_s` for it; SQLite's `busy_timeout` (the same bound) covers other writers. WAL
lets reports and `sqlite3` shells read while a sweep writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MemscanError, one_line
from ..io.lock import lock_file

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS configs (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    settings TEXT NOT NULL,
    UNIQUE (model, settings)
);
CREATE TABLE IF NOT EXISTS sweeps (
    id INTEGER PRIMARY KEY,
    config INTEGER NOT NULL REFERENCES configs (id),
    inputs TEXT NOT NULL,
    threshold REAL,
    status TEXT NOT NULL,
    started TEXT NOT NULL,
    finished TEXT,
    rows INTEGER,
    new INTEGER,
    known INTEGER,
    rejected INTEGER,
    flagged INTEGER,
    seconds REAL
);
CREATE TABLE IF NOT EXISTS prompts (
    config INTEGER NOT NULL REFERENCES configs (id),
    key BLOB NOT NULL,
    prompt TEXT NOT NULL,
    score REAL NOT NULL,
    n_tokens INTEGER NOT NULL,
    truncated INTEGER NOT NULL,
    source TEXT NOT NULL,
    sweep INTEGER NOT NULL REFERENCES sweeps (id),
    times_scored INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (config, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS prompts_by_sweep ON prompts (sweep, score);
CREATE TABLE IF NOT EXISTS rejects (
    sweep INTEGER NOT NULL REFERENCES sweeps (id),
    source TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rejects_by_sweep ON rejects (sweep);
"""
LOOKUP_CHUNK = 500  # keys per IN (...) query, under every SQLite build's variable limit


def normalize_prompt(prompt: str) -> str:
    """Unicode NFC, every whitespace run collapsed to one space, stripped: how prompts are keyed and scored."""
    return " ".join(unicodedata.normalize("NFC", prompt).split())


def prompt_key(normalized: str) -> bytes:
    """The store key of a normalized prompt: the first 16 bytes of its UTF-8 SHA-256."""
    return hashlib.sha256(normalized.encode("utf-8")).digest()[:16]


@dataclass(frozen=True)
class ScoredPrompt:
    """One new prompt's row: normalized text, key, score, tokens, where it was first read."""

    key: bytes
    prompt: str
    score: float
    n_tokens: int
    truncated: bool
    source: str


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class SweepStore:
    """An open, locked store; `with SweepStore(path) as store:` releases the lock on exit."""

    def __init__(self, path: str | Path, wait_s: float = 60.0):
        """Open (or create) the store at `path`, waiting up to `wait_s` for another sweep's lock."""
        self.path = Path(path)
        folder = self.path.parent
        if not folder.is_dir():
            raise MemscanError(f"{self.path}: store folder {folder} does not exist")
        # WAL keeps -wal and -shm files beside the store, so the folder must be writable too.
        for place in (folder, self.path):
            if place.exists() and not os.access(place, os.W_OK):
                raise MemscanError(f"{self.path}: {place} is not writable")
        self._lock = self._acquire(wait_s)  # before any SQLite access: a running sweep is never disturbed
        try:
            self.db = self._open_database(wait_s)
        except sqlite3.Error as exc:
            self._lock.close()
            raise MemscanError(f"{self.path}: cannot open the store ({one_line(exc)})") from exc

    def _acquire(self, wait_s: float):
        busy = f"{self.path}: the store is in use by another sweep (waited {wait_s:g} s); try later or raise --wait"
        try:
            # Append mode creates a missing store as an empty file, which SQLite takes as an empty database.
            return lock_file(self.path, wait_s, busy)
        except OSError as exc:
            raise MemscanError(f"{self.path}: cannot open the store ({exc.strerror})") from exc

    def _open_database(self, wait_s: float) -> sqlite3.Connection:
        # Transactions are explicit (BEGIN IMMEDIATE ... COMMIT): autocommit mode otherwise.
        db = sqlite3.connect(self.path, timeout=wait_s, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # WAL stays consistent; a power cut may lose the last commit
            db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def close(self) -> None:
        """Close the database and release the sweep lock."""
        self.db.close()
        self._lock.close()

    def __enter__(self) -> SweepStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------
    def begin(self) -> None:
        """Open a write transaction (immediately, so a conflict shows here and not mid-batch)."""
        self._write("BEGIN IMMEDIATE")

    def commit(self) -> None:
        """Commit the open transaction: what was added is now durable."""
        self._write("COMMIT")

    def _write(self, sql: str, rows: Iterable[tuple] | None = None) -> None:
        """Run a writing statement; a full disk or an I/O error becomes one line."""
        try:
            self.db.execute(sql) if rows is None else self.db.executemany(sql, rows)
        except sqlite3.OperationalError as exc:
            raise MemscanError(f"{self.path}: cannot write the store ({one_line(exc)})") from exc

    def config_id(self, model: str, settings: str) -> int:
        """The id of (model fingerprint, settings record), created on first use."""
        self.db.execute("INSERT OR IGNORE INTO configs (model, settings) VALUES (?, ?)", (model, settings))
        (config,) = self.db.execute("SELECT id FROM configs WHERE model = ? AND settings = ?", (model, settings)).fetchone()
        return config

    def start_sweep(self, config: int, inputs: Sequence[str], threshold: float | None) -> tuple[int, bool]:
        """A sweep id and whether it resumes an interrupted sweep of the same config and inputs.

        Any sweep still marked running was killed (this process holds the lock): the last one
        is resumed when it swept the same inputs, the others are marked interrupted.
        """
        inputs_json = json.dumps(list(inputs))
        stale = self.db.execute(
            "SELECT id, config, inputs FROM sweeps WHERE status = 'running' ORDER BY id DESC"
        ).fetchall()
        resume = next((sid for sid, cfg, inp in stale[:1] if cfg == config and inp == inputs_json), None)
        self.db.executemany(
            "UPDATE sweeps SET status = 'interrupted' WHERE id = ?", [(sid,) for sid, _, _ in stale if sid != resume]
        )
        if resume is not None:
            # The inputs are read again from the start, so their rejects are found again.
            self.db.execute("DELETE FROM rejects WHERE sweep = ?", (resume,))
            self.db.execute("UPDATE sweeps SET threshold = ? WHERE id = ?", (threshold, resume))
            return resume, True
        cursor = self.db.execute(
            "INSERT INTO sweeps (config, inputs, threshold, status, started) VALUES (?, ?, ?, 'running', ?)",
            (config, inputs_json, threshold, _now()),
        )
        return cursor.lastrowid, False

    def add(self, config: int, sweep: int, rows: Iterable[ScoredPrompt]) -> None:
        """Insert newly scored prompts; a key already stored has its `times_scored` raised instead."""
        self._write(
            "INSERT INTO prompts (config, key, prompt, score, n_tokens, truncated, source, sweep) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (config, key) DO UPDATE SET times_scored = times_scored + 1",
            [(config, r.key, r.prompt, r.score, r.n_tokens, r.truncated, r.source, sweep) for r in rows],
        )

    def add_rejects(self, sweep: int, rejects: Iterable[tuple[str, str]]) -> None:
        """Record `(source, reason)` of input rows or files that could not be swept."""
        self._write("INSERT INTO rejects (sweep, source, reason) VALUES (?, ?, ?)", [(sweep, *r) for r in rejects])

    def finish_sweep(self, sweep: int, counts: dict) -> None:
        """Mark the sweep done with its counts (`rows`, `new`, `known`, `rejected`, `flagged`, `seconds`)."""
        self.db.execute(
            "UPDATE sweeps SET status = 'done', finished = :finished, rows = :rows, new = :new, known = :known, "
            "rejected = :rejected, flagged = :flagged, seconds = :seconds WHERE id = :id",
            {**counts, "finished": _now(), "id": sweep},
        )

    # -- reading ---------------------------------------------------------------------------
    def known(self, config: int, keys: Sequence[bytes]) -> set[bytes]:
        """Those of `keys` already stored for `config` (this transaction's inserts included)."""
        found: set[bytes] = set()
        for start in range(0, len(keys), LOOKUP_CHUNK):
            chunk = keys[start : start + LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(f"SELECT key FROM prompts WHERE config = ? AND key IN ({marks})", (config, *chunk))
            found.update(key for (key,) in rows)
        return found

    def sweep_info(self, sweep: int) -> dict:
        """The sweeps table's row of `sweep` as a dict."""
        cursor = self.db.execute("SELECT * FROM sweeps WHERE id = ?", (sweep,))
        return dict(zip([c[0] for c in cursor.description], cursor.fetchone()))

    def count(self, sweep: int, threshold: float | None = None) -> int:
        """Prompts first scored by `sweep` (with a threshold: those of them it flags)."""
        low = -float("inf") if threshold is None else threshold
        (n,) = self.db.execute("SELECT COUNT(*) FROM prompts WHERE sweep = ? AND score >= ?", (sweep, low)).fetchone()
        return n

    def score_range(self, by: str, value: int) -> tuple[float, float] | None:
        """(min, max) score of the prompts whose `by` ("config" or "sweep") is `value`; None if none."""
        low, high = self.db.execute(f"SELECT MIN(score), MAX(score) FROM prompts WHERE {_column(by)} = ?", (value,)).fetchone()
        return None if low is None else (low, high)

    def histogram(self, by: str, value: int, low: float, high: float, bins: int) -> list[int]:
        """Counts in `bins` equal bins over [low, high] of the scores whose `by` is `value`, binned in SQL."""
        width = (high - low) / bins or 1.0
        counts = [0] * bins
        rows = self.db.execute(
            f"SELECT MIN(CAST((score - ?) / ? AS INTEGER), ?) AS bin, COUNT(*) FROM prompts "
            f"WHERE {_column(by)} = ? AND score BETWEEN ? AND ? GROUP BY bin",
            (low, width, bins - 1, value, low, high),
        )
        for index, n in rows:
            counts[index] += n
        return counts

    def top(self, sweep: int, count: int) -> list[dict]:
        """The `count` highest-scoring prompts first scored by `sweep`."""
        cursor = self.db.execute(
            "SELECT prompt, score, source FROM prompts WHERE sweep = ? ORDER BY score DESC LIMIT ?", (sweep, count)
        )
        return [dict(zip([c[0] for c in cursor.description], row)) for row in cursor]

    def rejects(self, sweep: int) -> Iterator[tuple[str, str]]:
        """`(source, reason)` of the sweep's rejects, in input order, streamed."""
        yield from self.db.execute("SELECT source, reason FROM rejects WHERE sweep = ? ORDER BY rowid", (sweep,))

    def history(self, config: int, limit: int = 60) -> list[dict]:
        """The last `limit` finished sweeps of `config`, oldest first."""
        cursor = self.db.execute(
            "SELECT id, started, finished, rows, new, known, rejected, flagged, threshold, seconds FROM sweeps "
            "WHERE config = ? AND status = 'done' ORDER BY id DESC LIMIT ?",
            (config, limit),
        )
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row)) for row in reversed(cursor.fetchall())]


def _column(by: str) -> str:
    if by not in ("config", "sweep"):
        raise ValueError(f"prompts are selected by config or sweep, not {by!r}")
    return by
