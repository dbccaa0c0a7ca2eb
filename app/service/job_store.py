"""Accepted jobs and their results in an embedded SQLite database, so a restart loses none of them.

Plain synchronous calls, one connection behind a lock; the job queue calls them from a worker thread, never from
the event loop. Several replicas may share one database file on one host (SQLite locks the file): a job is
claimed by exactly one of them, which writes its name as the job's owner.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,            -- queued | running | done | failed | cancelled
    params TEXT NOT NULL,            -- the form fields, JSON
    file BLOB,                       -- the upload, dropped once the job has ended
    result TEXT,                     -- the answer as /infer gives it, JSON
    error TEXT,                      -- {"status", "type", "message"}, JSON
    owner TEXT,                      -- the replica running it
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    pages_done INTEGER,              -- progress of a running job; NULL until it knows its page count
    pages_total INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
"""
# Columns added after the first release: a database written by it gains them on open.
ADDED_COLUMNS = {"pages_done": "INTEGER", "pages_total": "INTEGER"}
UNFINISHED = ("queued", "running")
# A job put back in the queue (its replica restarted or was full) starts over: no start time, no progress.
_QUEUED_AGAIN = "status = 'queued', started_at = NULL, pages_done = NULL, pages_total = NULL"


class StoreFullError(Exception):
    def __init__(self, unfinished: int):
        super().__init__(f"{unfinished} jobs queued or running")
        self.unfinished = unfinished


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    params: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    pages_done: int | None = None
    pages_total: int | None = None


class JobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        self._lock = threading.Lock()

    def _query(self, sql: str, *args: Any) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def add(self, params: dict[str, Any], data: bytes, max_unfinished: int) -> str:
        """The new job's id. Raises StoreFullError when ``max_unfinished`` jobs are already queued or running:
        counted and inserted in one transaction, so replicas sharing the store cannot overshoot it together."""
        job_id = secrets.token_urlsafe(18)  # unguessable: the id is the only key to a job's result
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                unfinished = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
                                              ).fetchone()[0]
                if unfinished >= max_unfinished:
                    raise StoreFullError(unfinished)
                self._db.execute("INSERT INTO jobs (id, status, params, file, created_at) "
                                 "VALUES (?, 'queued', ?, ?, ?)", (job_id, json.dumps(params), data, time.time()))
            finally:
                self._db.execute("COMMIT")
        return job_id

    def get(self, job_id: str) -> Job | None:
        rows = self._query("SELECT id, status, params, created_at, started_at, finished_at, result, error, "
                           "pages_done, pages_total FROM jobs WHERE id = ?", job_id)
        if not rows:
            return None
        row = rows[0]
        return Job(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5],
                   json.loads(row[6]) if row[6] else None, json.loads(row[7]) if row[7] else None, row[8], row[9])

    def claim_next(self, owner: str) -> tuple[str, dict[str, Any], bytes] | None:
        """The oldest queued job, marked running in the same transaction (one claimant, whatever the replica)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT id, params, file FROM jobs WHERE status = 'queued' "
                                       "ORDER BY created_at LIMIT 1").fetchone()
                if row is not None:
                    self._db.execute("UPDATE jobs SET status = 'running', started_at = ?, owner = ? WHERE id = ?",
                                     (time.time(), owner, row[0]))
            finally:
                self._db.execute("COMMIT")
        return (row[0], json.loads(row[1]), row[2]) if row is not None else None

    def finish(self, job_id: str, status: str, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> bool:
        """End a running or queued job; False when it had already ended (cancelled meanwhile)."""
        with self._lock:
            changed = self._db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ?, file = NULL "
                "WHERE id = ? AND status IN ('queued', 'running')",
                (status, json.dumps(result) if result is not None else None,
                 json.dumps(error) if error is not None else None, time.time(), job_id)).rowcount
        return bool(changed)

    def progress(self, job_id: str, done: int, total: int) -> None:
        self._query("UPDATE jobs SET pages_done = ?, pages_total = ? WHERE id = ? AND status = 'running'",
                    done, total, job_id)

    def requeue(self, job_id: str) -> None:
        self._query(f"UPDATE jobs SET {_QUEUED_AGAIN} WHERE id = ? AND status = 'running'", job_id)

    def requeue_abandoned(self, owner: str, stale_after_s: float) -> int:
        """Running jobs whose replica restarted (this owner, at its start) or vanished (running for longer than
        any request may): they run again."""
        with self._lock:
            return self._db.execute(f"UPDATE jobs SET {_QUEUED_AGAIN}, owner = NULL "
                                    "WHERE status = 'running' AND (owner = ? OR started_at < ?)",
                                    (owner, time.time() - stale_after_s)).rowcount

    def statuses(self, job_ids: list[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        return dict(self._query(f"SELECT id, status FROM jobs WHERE id IN ({marks})", *job_ids))

    def forget(self, job_id: str) -> None:
        self._query("DELETE FROM jobs WHERE id = ?", job_id)

    def expire(self, ttl_s: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?",
                                    (time.time() - ttl_s,)).rowcount

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("queued", "running", "done", "failed", "cancelled"), 0)
        counts.update(dict(self._query("SELECT status, COUNT(*) FROM jobs GROUP BY status")))
        return counts

    def close(self) -> None:
        with self._lock:
            self._db.close()
