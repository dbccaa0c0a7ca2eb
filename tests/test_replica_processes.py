"""Real service processes (the tiny model) sharing one job store: three on PostgreSQL with one killed by SIGKILL
mid-job, and two on one SQLite file, the second started while the first runs jobs. Every job ends done, once."""

from __future__ import annotations

import contextlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from .test_pages import document
from .test_server import running_server

LEASE_S = 4
ENV = {"MAX_NEW_TOKENS": "48", "FORCE_MAX_NEW_TOKENS": "true", "MAX_BATCH_SIZE": "2", "JOB_LEASE_S": str(LEASE_S),
       "WARMUP": "false", "DECODE_WORKERS": "1"}


def submit(base: str, pages: int = 2) -> str:
    response = httpx.post(f"{base}/jobs", files={"file": ("d.pdf", document(pages), "application/pdf")},
                          data={"pages": "all"}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def done_count(base: str) -> int:
    """Jobs this replica finished and wrote, from its own metrics."""
    text = httpx.get(f"{base}/metrics", headers={"Accept": "text/plain"}, timeout=10).text
    for line in text.splitlines():
        if line.startswith('vlm_job_duration_seconds_count{status="done"}'):
            return int(float(line.split()[-1]))
    return 0


def discarded(base: str) -> int:
    text = httpx.get(f"{base}/metrics", headers={"Accept": "text/plain"}, timeout=10).text
    return int(float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("vlm_job_results_discarded_total "))))


def wait_all_done(base: str, job_ids: list[str], timeout_s: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    statuses: dict[str, dict] = {}
    while time.monotonic() < deadline:
        statuses = {job_id: httpx.get(f"{base}/jobs/{job_id}", timeout=10).json() for job_id in job_ids}
        assert not [s for s in statuses.values() if s["status"] not in ("queued", "running", "done")], statuses
        if all(status["status"] == "done" for status in statuses.values()):
            return statuses
        time.sleep(0.5)
    raise AssertionError(f"not all done: {[s['status'] for s in statuses.values()]}")


def owners_of_done_jobs(url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url) as connection:
        return dict(connection.execute("SELECT owner, COUNT(*) FROM jobs WHERE status = 'done' GROUP BY owner"
                                       ).fetchall())


def test_three_replicas_on_postgres_survive_one_killed_mid_job(tiny_model_dir, postgres):
    url = postgres.create_database("three_replicas")
    env = {**ENV, "JOBS_DB": url}
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(3) as pool:
        servers = list(pool.map(lambda _: stack.enter_context(running_server(tiny_model_dir, **env)), range(3)))
        bases = [base for base, _ in servers]
        owners = [httpx.get(f"{base}/health").json()["instance_id"] for base in bases]
        assert len(set(owners)) == 3
        job_ids = [submit(bases[number % 3]) for number in range(24)]
        deadline = time.monotonic() + 60
        running = None  # the victim: the first replica seen running a job
        while running is None:
            assert time.monotonic() < deadline, "no replica was ever seen running a job"
            running = next((number for number, base in enumerate(bases)
                            if httpx.get(f"{base}/health").json()["jobs_running_here"]), None)
        order = [running] + [number for number in range(3) if number != running]
        servers, bases, owners = ([items[number] for number in order] for items in (servers, bases, owners))
        victim = servers[0][1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        killed_at = time.monotonic()
        import psycopg

        with psycopg.connect(url) as connection:
            stranded = [row[0] for row in connection.execute(
                "SELECT id FROM jobs WHERE status = 'running' AND owner = %s", (owners[0],)).fetchall()]
        assert stranded, "the killed replica held no job"
        survivors = bases[1:]
        statuses = wait_all_done(survivors[0], job_ids, timeout_s=240)
        resumed_after = max(statuses[job_id]["finished_at"] for job_id in stranded) - (time.time() -
                                                                                         (time.monotonic() - killed_at))
        assert resumed_after < LEASE_S + 60, resumed_after  # the lease, then a 2-page job's run on a busy machine
        for base in survivors:  # every survivor serves every result
            for job_id in job_ids:
                assert httpx.get(f"{base}/jobs/{job_id}/result", timeout=10).status_code == 200
        by_owner = owners_of_done_jobs(url)
        assert sum(by_owner.values()) == 24 and set(by_owner) <= set(owners)
        for base, owner in zip(survivors, owners[1:]):
            assert done_count(base) == by_owner.get(owner, 0)  # each end written once, by the replica that ran it
            assert discarded(base) == 0
        assert all(status["progress"] == {"pages_done": 2, "pages_total": 2} for status in statuses.values())


def test_a_second_process_on_one_sqlite_file_takes_none_of_the_first_ones_live_jobs(tiny_model_dir, tmp_path):
    env = {**ENV, "JOBS_DB": str(tmp_path / "shared.sqlite3")}
    with running_server(tiny_model_dir, **env) as (first, _):
        job_ids = [submit(first) for _ in range(6)]
        deadline = time.monotonic() + 60
        while httpx.get(f"{first}/health").json()["jobs_running_here"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with running_server(tiny_model_dir, **env) as (second, _):
            statuses = wait_all_done(second, job_ids, timeout_s=240)
            counts = done_count(first), done_count(second)
            assert sum(counts) == 6, counts  # each job ran once, whichever replica ran it
            assert discarded(first) == 0 and discarded(second) == 0
            assert all(status["progress"]["pages_done"] == 2 for status in statuses.values())
