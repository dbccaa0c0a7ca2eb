"""The job table's operations, written once for both databases. Each is one transaction, bounded in time by
JOB_STORE_TIMEOUT_S; a database error or a timeout is a StoreUnavailableError, never a hang.

Claims carry leases: a worker holds a job while it renews the lease (``heartbeat``), a job whose lease passed is
claimable again by any replica, and a result is written only by the claim that still holds the job (``finish``
is fenced by owner and attempt), so a job's end is written once whatever process dies.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any, Awaitable, Callable, Protocol, Sequence

from app.errors import one_line
from app.jobs.postgres_db import PostgresDatabase, is_postgres_url
from app.jobs.records import STATUSES, Claim, Job, StoreFullError, StoreUnavailableError
from app.jobs.schema import Result
from app.jobs.sqlite_db import SQLiteDatabase

_JOB_COLUMNS = ("id, status, params, created_at, started_at, finished_at, result, error, pages_done, pages_total, "
                "attempts, callback_url, callback_status, callback_attempts")
_UNFINISHED = "status IN ('queued', 'running')"
# A job that has ended: no lease, no file to keep, and its callback (if it has one) due now.
_ENDED = ("finished_at = epoch_now(), file = NULL, lease_until = NULL, "
          "callback_status = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END, "
          "callback_due = CASE WHEN callback_url IS NULL THEN NULL ELSE epoch_now() END")
# Claimable: queued, or running under a lease that has passed (its replica died or lost the store).
_CLAIMABLE = "(status = 'queued' OR (status = 'running' AND (lease_until IS NULL OR lease_until < epoch_now())))"
# A held job given back (not an attempt): queued again, with no trace of the run that stopped.
_QUEUED_AGAIN = ("status = 'queued', owner = NULL, started_at = NULL, lease_until = NULL, pages_done = NULL, "
                 "pages_total = NULL, attempts = attempts - 1")
_GIVEN_UP = ("its replica was lost {attempts} times while running it (killed, e.g. out of memory, or cut off from "
             "the job store; MAX_JOB_ATTEMPTS={attempts}): it is not run again")


class Transaction(Protocol):
    async def execute(self, sql: str, args: Sequence[Any] = ()) -> Result: ...


class Database(Protocol):
    kind: str
    label: str
    errors: tuple[type[BaseException], ...]
    serialize_adds: str | None

    async def open(self) -> None: ...
    def transaction(self, write: bool) -> Any: ...
    async def close(self) -> None: ...


def open_database(jobs_db: str, timeout_s: float) -> Database:
    if is_postgres_url(jobs_db):
        return PostgresDatabase(jobs_db, timeout_s)
    return SQLiteDatabase(jobs_db, timeout_s)


def _job(row: tuple) -> Job:
    return Job(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5],
               json.loads(row[6]) if row[6] else None, json.loads(row[7]) if row[7] else None, row[8], row[9],
               row[10], row[11], row[12], row[13])


class JobStore:
    def __init__(self, database: Database, timeout_s: float):
        self.database = database
        self.timeout_s = timeout_s
        self.kind, self.label = database.kind, database.label
        self.error: str | None = "not opened yet"  # why the store cannot be used now; None when it can
        self._open = False

    @property
    def available(self) -> bool:
        return self._open

    async def open(self) -> None:
        """Open and migrate; on failure ``error`` says why and StoreUnavailableError is raised."""
        try:
            async with asyncio.timeout(max(self.timeout_s, 10.0)):  # a first connection may be slower
                await self.database.open()
        except (TimeoutError, *self.database.errors, OSError) as error:
            self.error = one_line(error)
            raise StoreUnavailableError(self.error) from None
        self._open, self.error = True, None

    async def close(self) -> None:
        self._open = False
        await self.database.close()

    async def _run(self, write: bool, work: Callable[[Transaction], Awaitable[Any]]) -> Any:
        if not self._open:
            raise StoreUnavailableError(self.error or "closed")
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.database.transaction(write) as transaction:
                    return await work(transaction)
        except TimeoutError:
            raise StoreUnavailableError(f"no answer within JOB_STORE_TIMEOUT_S={self.timeout_s:g} s "
                                        "(locked, busy or unreachable)") from None
        except self.database.errors as error:
            raise StoreUnavailableError(one_line(error)) from None

    async def _one(self, write: bool, sql: str, *args: Any) -> Result:
        async def work(transaction: Transaction) -> Result:
            return await transaction.execute(sql, args)

        return await self._run(write, work)

    # --- the routes ---------------------------------------------------------------------------------
    async def add(self, params: dict[str, Any], data: bytes, max_unfinished: int,
                  callback_url: str | None = None) -> Job:
        """The new job. Raises StoreFullError when ``max_unfinished`` jobs are already queued or running: counted
        and inserted in one serialized transaction, so replicas submitting at once cannot overshoot it."""
        job_id = secrets.token_urlsafe(18)  # unguessable: the id is the only key to a job's result

        async def work(transaction: Transaction) -> Job:
            if self.database.serialize_adds:
                await transaction.execute(self.database.serialize_adds)
            unfinished = (await transaction.execute(f"SELECT COUNT(*) FROM jobs WHERE {_UNFINISHED}")).rows[0][0]
            if unfinished >= max_unfinished:
                raise StoreFullError(unfinished)
            rows = (await transaction.execute(
                "INSERT INTO jobs (id, status, params, file, created_at, attempts, callback_url) "
                f"VALUES (?, 'queued', ?, ?, epoch_now(), 0, ?) RETURNING {_JOB_COLUMNS}",
                (job_id, json.dumps(params), data, callback_url))).rows
            return _job(rows[0])

        return await self._run(True, work)

    async def get(self, job_id: str) -> Job | None:
        rows = (await self._one(False, f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", job_id)).rows
        return _job(rows[0]) if rows else None

    async def statuses(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The status of each job that still exists."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        return dict((await self._one(False, f"SELECT id, status FROM jobs WHERE id IN ({marks})", *job_ids)).rows)

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job in one statement: the job as cancelled, or None when it had already
        ended (so of concurrent cancels exactly one gets the job)."""
        rows = (await self._one(True, f"UPDATE jobs SET status = 'cancelled', {_ENDED} "
                                      f"WHERE id = ? AND {_UNFINISHED} RETURNING {_JOB_COLUMNS}", job_id)).rows
        return _job(rows[0]) if rows else None

    async def forget(self, job_id: str) -> str:
        """Delete a job that has ended: "forgotten"; "callback pending" when its callback is still to be delivered
        (the row is its outbox); "none" when there is no such ended job."""
        async def work(transaction: Transaction) -> str:
            deleted = await transaction.execute(
                f"DELETE FROM jobs WHERE id = ? AND NOT {_UNFINISHED} AND "
                "(callback_status IS NULL OR callback_status <> 'pending') RETURNING id", (job_id,))
            if deleted.rows:
                return "forgotten"
            pending = await transaction.execute("SELECT 1 FROM jobs WHERE id = ? AND callback_status = 'pending' "
                                                f"AND NOT {_UNFINISHED}", (job_id,))
            return "callback pending" if pending.rows else "none"

        return await self._run(True, work)

    async def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        counts.update(dict((await self._one(False, "SELECT status, COUNT(*) FROM jobs GROUP BY status")).rows))
        return counts

    # --- the worker ---------------------------------------------------------------------------------
    async def claim(self, owner: str, lease_s: float, max_attempts: int) -> Claim | None:
        """The oldest claimable job, marked running under ``owner``'s lease in the same transaction. A job whose
        replica was lost ``max_attempts`` times ends failed here instead of running again."""
        async def work(transaction: Transaction) -> Claim | None:
            error = json.dumps({"status": 500, "type": "internal_error",
                                "message": _GIVEN_UP.format(attempts=max_attempts)})
            await transaction.execute(f"UPDATE jobs SET status = 'failed', error = ?, {_ENDED} "
                                      f"WHERE {_CLAIMABLE} AND status = 'running' AND attempts >= ?",
                                      (error, max_attempts))
            lock = " FOR UPDATE SKIP LOCKED" if self.kind == "postgresql" else ""  # SQLite: one writer anyway
            rows = (await transaction.execute(
                "UPDATE jobs SET status = 'running', owner = ?, started_at = epoch_now(), "
                "lease_until = epoch_now() + ?, attempts = attempts + 1, pages_done = NULL, pages_total = NULL "
                f"WHERE id = (SELECT id FROM jobs WHERE {_CLAIMABLE} AND (status = 'queued' OR attempts < ?) "
                f"ORDER BY created_at LIMIT 1{lock}) RETURNING id, params, file, attempts",
                (owner, lease_s, max_attempts))).rows
            if not rows:
                return None
            job_id, params, data, attempt = rows[0]
            return Claim(job_id, json.loads(params), bytes(data) if data is not None else b"", attempt)

        return await self._run(True, work)

    async def heartbeat(self, owner: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        """Renew the leases of the jobs this owner runs; the ids it still holds (a job missing from the answer was
        cancelled, forgotten, or claimed by another replica after its lease passed: stop it)."""
        if not job_ids:
            return set()
        marks = ",".join("?" * len(job_ids))
        rows = (await self._one(True, "UPDATE jobs SET lease_until = epoch_now() + ? "
                                      f"WHERE owner = ? AND status = 'running' AND id IN ({marks}) RETURNING id",
                                lease_s, owner, *job_ids)).rows
        return {row[0] for row in rows}

    async def progress(self, job_id: str, owner: str, done: int, total: int) -> None:
        """Pages done so far, never going back (two pages finishing together may report out of order)."""
        await self._one(True, "UPDATE jobs SET pages_total = ?, pages_done = CASE WHEN pages_done IS NULL OR "
                              "pages_done < ? THEN ? ELSE pages_done END WHERE id = ? AND owner = ? AND "
                              "status = 'running'", total, done, done, job_id, owner)

    async def finish(self, claim: Claim, owner: str, status: str, result: str | None = None,
                     error: dict[str, Any] | None = None) -> bool:
        """Write a job's end, only if this claim still holds it (the fence); False when it does not: the job was
        cancelled, forgotten, or claimed again after this claim's lease passed. ``result`` is JSON text."""
        full_progress = ", pages_done = pages_total" if status == "done" else ""
        changed = await self._one(
            True, f"UPDATE jobs SET status = ?, result = ?, error = ?, {_ENDED}{full_progress} "
                  "WHERE id = ? AND owner = ? AND attempts = ? AND status = 'running'",
            status, result, json.dumps(error) if error is not None else None, claim.id, owner, claim.attempt)
        return changed.rowcount > 0

    async def give_back(self, claim: Claim, owner: str) -> bool:
        """Queue a held job again (the model was full, or this replica is shutting down): not an attempt."""
        changed = await self._one(True, f"UPDATE jobs SET {_QUEUED_AGAIN} WHERE id = ? AND owner = ? AND attempts = ? "
                                        "AND status = 'running'", claim.id, owner, claim.attempt)
        return changed.rowcount > 0

    async def give_back_all(self, owner: str) -> int:
        """At a graceful stop: every job still marked running under ``owner`` is queued again, not an attempt
        (one whose claim committed while the stop cut the worker short has no task behind it)."""
        return (await self._one(True, f"UPDATE jobs SET {_QUEUED_AGAIN} WHERE owner = ? AND status = 'running'",
                                owner)).rowcount

    async def expire(self, ttl_s: float) -> int:
        return (await self._one(True, "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < "
                                      "epoch_now() - ?", ttl_s)).rowcount

    # --- callbacks ----------------------------------------------------------------------------------
    async def due_callbacks(self, limit: int, hold_s: float) -> list[Job]:
        """Ended jobs whose callback is due, each held for ``hold_s`` (moved out of due) so one replica sends it."""
        async def work(transaction: Transaction) -> list[Job]:
            lock = " FOR UPDATE SKIP LOCKED" if self.kind == "postgresql" else ""
            ids = [row[0] for row in (await transaction.execute(
                "SELECT id FROM jobs WHERE callback_due IS NOT NULL AND callback_due <= epoch_now() "
                f"ORDER BY callback_due LIMIT ?{lock}", (limit,))).rows]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            rows = (await transaction.execute(f"UPDATE jobs SET callback_due = epoch_now() + ? WHERE id IN ({marks}) "
                                              f"RETURNING {_JOB_COLUMNS}", (hold_s, *ids))).rows
            return [_job(row) for row in rows]

        return await self._run(True, work)

    async def callback_tried(self, job_id: str, delivered: bool, retry_in_s: float | None) -> None:
        """Record one delivery try: delivered, to be retried in ``retry_in_s``, or (None) given up."""
        if delivered or retry_in_s is None:
            await self._one(True, "UPDATE jobs SET callback_status = ?, callback_attempts = callback_attempts + 1, "
                                  "callback_due = NULL WHERE id = ?", "delivered" if delivered else "failed", job_id)
        else:
            await self._one(True, "UPDATE jobs SET callback_status = 'pending', callback_attempts = "
                                  "callback_attempts + 1, callback_due = epoch_now() + ? WHERE id = ?",
                            retry_in_s, job_id)
