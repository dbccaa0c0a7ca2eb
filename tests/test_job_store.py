"""The job store on both databases: leases, the fence, attempts, atomic cancels, monotonic progress, MAX_JOBS
across replicas, migration of an older store, and bounded waits on a locked or unopenable one."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from app.jobs.records import StoreFullError, StoreUnavailableError
from app.jobs.store import JobStore, open_database


async def opened(jobs_db: str, timeout_s: float = 5.0) -> JobStore:
    store = JobStore(open_database(jobs_db, timeout_s), timeout_s)
    await store.open()
    return store


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_lease_that_passes_lets_another_replica_claim_and_fences_the_first(jobs_db):
    async def scenario():
        store = await opened(jobs_db)
        job = await store.add({}, b"file", 10)
        first = await store.claim("replica-a", 0.3, 3)
        assert first.id == job.id and first.attempt == 1 and first.file == b"file"
        assert await store.claim("replica-b", 0.3, 3) is None  # held: nobody else gets it
        assert await store.heartbeat("replica-a", [job.id], 0.3) == {job.id}
        await asyncio.sleep(0.5)  # replica-a stops beating (dead)
        second = await store.claim("replica-b", 60, 3)
        assert second.id == job.id and second.attempt == 2
        assert await store.heartbeat("replica-a", [job.id], 60) == set()  # a has lost it, and learns so
        assert not await store.finish(first, "replica-a", "done", '{"by": "a"}')  # the fence
        assert await store.finish(second, "replica-b", "done", '{"by": "b"}')
        assert not await store.finish(second, "replica-b", "done", '{"by": "b again"}')  # written once
        done = await store.get(job.id)
        assert done.status == "done" and done.result == {"by": "b"} and done.attempts == 2
        await store.close()

    run(scenario())


def test_a_job_that_loses_its_replica_max_attempts_times_ends_failed(jobs_db):
    async def scenario():
        store = await opened(jobs_db)
        job = await store.add({}, b"poison", 10)
        for attempt in (1, 2, 3):  # each claimant dies on it: the lease passes without an end
            claim = await store.claim(f"replica-{attempt}", 0.05, 3)
            assert claim.attempt == attempt
            await asyncio.sleep(0.1)
        assert await store.claim("replica-4", 60, 3) is None
        failed = await store.get(job.id)
        assert failed.status == "failed" and "MAX_JOB_ATTEMPTS=3" in failed.error["message"]
        assert failed.finished_at is not None
        await store.close()

    run(scenario())


def test_giving_a_job_back_is_not_an_attempt_and_clears_its_progress(jobs_db):
    async def scenario():
        store = await opened(jobs_db)
        job = await store.add({}, b"x", 10)
        claim = await store.claim("a", 60, 1)
        await store.progress(job.id, "a", 1, 4)
        assert await store.give_back(claim, "a")
        queued = await store.get(job.id)
        assert (queued.status, queued.attempts, queued.pages_total, queued.started_at) == ("queued", 0, None, None)
        again = await store.claim("b", 60, 1)  # MAX_JOB_ATTEMPTS=1 and still runnable: the give-back did not count
        assert again is not None and again.attempt == 1
        await store.close()

    run(scenario())


def test_progress_never_goes_back_and_a_done_job_shows_all_its_pages(jobs_db):
    async def scenario():
        store = await opened(jobs_db)
        job = await store.add({}, b"x", 10)
        claim = await store.claim("a", 60, 3)
        await store.progress(job.id, "a", 0, 20)
        await asyncio.gather(*(store.progress(job.id, "a", done, 20) for done in (3, 5, 4, 1, 2)))
        assert (await store.get(job.id)).pages_done == 5
        await store.progress(job.id, "b", 9, 20)  # not the owner: ignored
        assert (await store.get(job.id)).pages_done == 5
        await store.finish(claim, "a", "done", "{}")
        assert ((await store.get(job.id)).pages_done, (await store.get(job.id)).pages_total) == (20, 20)
        await store.close()

    run(scenario())


def test_of_concurrent_cancels_exactly_one_gets_the_job(jobs_db):
    async def scenario():
        stores = [await opened(jobs_db) for _ in range(2)]  # two replicas
        job = await stores[0].add({}, b"x", 10)
        await stores[0].claim("a", 60, 3)
        outcomes = await asyncio.gather(*(stores[i % 2].cancel(job.id) for i in range(6)))
        assert sum(outcome is not None for outcome in outcomes) == 1
        assert next(o for o in outcomes if o).status == "cancelled"
        assert await stores[0].heartbeat("a", [job.id], 60) == set()  # its runner learns at its next beat
        forgets = await asyncio.gather(*(stores[i % 2].forget(job.id) for i in range(4)))
        assert forgets.count("forgotten") == 1 and set(forgets) == {"forgotten", "none"}
        for store in stores:
            await store.close()

    run(scenario())


def test_max_jobs_holds_across_replicas_submitting_at_once(jobs_db):
    async def scenario():
        stores = [await opened(jobs_db) for _ in range(2)]
        accepted, refused = [], []

        async def submit_many(store: JobStore) -> None:
            for _ in range(10):
                try:
                    accepted.append(await store.add({}, b"x", max_unfinished=5))
                except StoreFullError as full:
                    refused.append(full.unfinished)

        await asyncio.gather(*(submit_many(store) for store in stores for _ in range(2)))
        assert len(accepted) == 5 and len(refused) == 35 and set(refused) == {5}
        assert (await stores[0].counts())["queued"] == 5
        for store in stores:
            await store.close()

    run(scenario())


def test_a_store_from_before_leases_opens_with_its_jobs(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)  # the first release's table, and a job its replica was running when it died
    old.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, params TEXT NOT NULL, file BLOB, "
                "result TEXT, error TEXT, owner TEXT, created_at REAL NOT NULL, started_at REAL, finished_at REAL)")
    old.execute("INSERT INTO jobs (id, status, params, file, created_at, owner, started_at) "
                "VALUES ('abc', 'running', '{}', x'00', 1.0, 'old-host', 2.0)")
    old.commit()
    old.close()

    async def scenario():
        store = await opened(str(path))
        job = await store.get("abc")
        assert job.status == "running" and job.pages_total is None and job.attempts == 0
        claim = await store.claim("new", 60, 3)  # no lease: claimable at once
        assert claim.id == "abc" and claim.attempt == 1
        await store.close()

    run(scenario())


def test_a_postgres_store_from_before_leases_is_migrated(postgres):
    import psycopg

    url = postgres.create_database("old_release")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, params TEXT NOT NULL, "
                           "file BYTEA, result TEXT, error TEXT, owner TEXT, created_at DOUBLE PRECISION NOT NULL, "
                           "started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION)")
        connection.execute("INSERT INTO jobs (id, status, params, created_at) VALUES ('abc', 'queued', '{}', 1.0)")

    async def scenario():
        stores = await asyncio.gather(*(opened(url) for _ in range(3)))  # replicas migrating at once
        assert (await stores[0].claim("new", 60, 3)).id == "abc"
        for store in stores:
            await store.close()

    run(scenario())


def test_a_locked_sqlite_store_answers_unavailable_within_its_timeout(tmp_path):
    path = tmp_path / "jobs.sqlite3"

    async def scenario():
        store = await opened(str(path), timeout_s=0.5)
        job = await store.add({}, b"x", 10)
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # another process (a backup, the sqlite3 shell) holds the write lock
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                await store.add({}, b"y", 10)
            assert time.monotonic() - started < 1.5
            assert (await store.get(job.id)).status == "queued"  # readers are not blocked (WAL)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert (await store.add({}, b"z", 10)).status == "queued"  # back once the lock is gone
        assert (await store.counts())["queued"] == 2
        await store.close()

    run(scenario())


@pytest.mark.parametrize("kind", ["a folder", "not a database", "unreachable server"])
def test_a_store_that_cannot_be_opened_says_why(tmp_path, kind):
    if kind == "a folder":
        jobs_db = str(tmp_path)
    elif kind == "not a database":
        (tmp_path / "jobs.sqlite3").write_bytes(b"this is not an SQLite file" * 100)
        jobs_db = str(tmp_path / "jobs.sqlite3")
    else:
        jobs_db = "postgresql://nobody:secret@127.0.0.1:9/jobs"  # port 9: nothing listens

    async def scenario():
        store = JobStore(open_database(jobs_db, 1.0), 1.0)
        with pytest.raises(StoreUnavailableError):
            await store.open()
        assert store.error and "secret" not in store.error and "secret" not in store.label
        with pytest.raises(StoreUnavailableError):
            await store.get("x")

    run(scenario())
