"""The job table, the same in both databases but for its column types, and how an older one is brought up to date.

Every statement elsewhere is written once, with ``?`` placeholders and ``epoch_now()`` for the database's own
clock (SQLite: a function the connection registers; PostgreSQL: one the migration creates), so leases are
compared on one clock whatever the replicas' clocks say.
"""

from __future__ import annotations

from dataclasses import dataclass

TYPES = {
    "sqlite": {"time": "REAL", "blob": "BLOB"},
    "postgresql": {"time": "DOUBLE PRECISION", "blob": "BYTEA"},  # PostgreSQL's REAL is 4 bytes: no use for epochs
}

COLUMNS = {  # name -> type; the first release had those up to finished_at
    "id": "TEXT PRIMARY KEY",
    "status": "TEXT NOT NULL",  # queued | running | done | failed | cancelled
    "params": "TEXT NOT NULL",  # the form fields, JSON
    "file": "{blob}",  # the upload, dropped once the job has ended
    "result": "TEXT",  # the answer as /infer gives it, JSON
    "error": "TEXT",  # {"status", "type", "message"}, JSON
    "owner": "TEXT",  # the process holding the job (host, pid, random part); the finisher once ended
    "created_at": "{time} NOT NULL",
    "started_at": "{time}",
    "finished_at": "{time}",
    "pages_done": "INTEGER",  # progress of a running job; NULL until it knows its page count
    "pages_total": "INTEGER",
    "lease_until": "{time}",  # a running job whose lease has passed (or is NULL) may be claimed again
    "attempts": "INTEGER NOT NULL DEFAULT 0",  # claims so far; the claim's number fences its result write
    "callback_url": "TEXT",
    "callback_status": "TEXT",  # pending | delivered | failed
    "callback_due": "{time}",  # when the next delivery try is due (NULL: none)
    "callback_attempts": "INTEGER NOT NULL DEFAULT 0",
}
INDEXES = [
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at)",
    "CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at)",
    "CREATE INDEX IF NOT EXISTS jobs_callbacks_due ON jobs (callback_due) WHERE callback_due IS NOT NULL",
]
PG_EPOCH_NOW = ("CREATE OR REPLACE FUNCTION epoch_now() RETURNS DOUBLE PRECISION LANGUAGE sql VOLATILE AS "
                "$$ SELECT extract(epoch FROM clock_timestamp())::double precision $$")


@dataclass(frozen=True)
class Result:
    rows: list[tuple]
    rowcount: int


def migrations(kind: str, present: set[str] | None) -> list[str]:
    """The statements that make the table current: all of it when ``present`` is None (no table), else the
    columns a store written by an earlier release lacks."""
    types = TYPES[kind]
    statements = []
    if kind == "postgresql":
        statements.append(PG_EPOCH_NOW)
    if present is None:
        columns = ",\n    ".join(f"{name} {kind_of.format(**types)}" for name, kind_of in COLUMNS.items())
        statements.append(f"CREATE TABLE IF NOT EXISTS jobs (\n    {columns}\n)")
    else:
        guard = "IF NOT EXISTS " if kind == "postgresql" else ""
        statements += [f"ALTER TABLE jobs ADD COLUMN {guard}{name} {kind_of.format(**types)}"
                       for name, kind_of in COLUMNS.items() if name not in present]
    return statements + INDEXES
