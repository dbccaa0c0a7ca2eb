"""Jobs past one process: replicas sharing a store (in one test process, as apps, and as real processes), a store
that is locked, unopenable or full, DELETE from any replica, long-polls, callbacks, and jobs yielding to
synchronous requests."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from fastapi.testclient import TestClient

from app.http.app import create_app
from app.service.inference import InferenceService
from app.settings import Settings

from .helpers import FakeEngine, diagram_png, fake_factory, wait_for_status
from .test_jobs import submit, wait_until
from .test_pages import document


def replica(jobs_db: str, engine: FakeEngine | None = None, **settings) -> TestClient:
    settings = Settings(jobs_db=jobs_db, **settings)
    service = InferenceService(settings, engine_factory=fake_factory(engine or FakeEngine()))
    return TestClient(create_app(service=service), raise_server_exceptions=False)


def infer(client, **headers) -> httpx.Response:
    return client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")}, headers=headers)


def test_a_delete_through_another_replica_stops_the_running_job(jobs_db):
    running_engine = FakeEngine(generate_s=6.0)  # steps of 0.75 s: a cancel shows within one
    with replica(jobs_db, running_engine) as owner, replica(jobs_db, FakeEngine(), job_concurrency=0) as other:
        wait_for_status(owner, "healthy")
        wait_for_status(other, "healthy")
        job = submit(other)  # submitted to a replica that runs no jobs: the other one claims it
        wait_until(owner, job["id"], {"running"})
        deadline = time.monotonic() + 5
        while not running_engine.occupants:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        answers = []
        threads = [threading.Thread(target=lambda client=client: answers.append(
            client.delete(f"/jobs/{job['id']}").status_code)) for client in (owner, other, other, owner, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(answers).count(200) == 1 and set(answers) <= {200, 204, 404}, answers
        deadline = time.monotonic() + 3  # the owner's next heartbeat (1 s) stops the generation
        while running_engine.occupants or owner.get("/health").json()["jobs_running_here"]:
            assert time.monotonic() < deadline, "the owner kept generating a cancelled job"
            time.sleep(0.05)
        assert other.get(f"/jobs/{job['id']}").status_code in (200, 404)


def test_a_long_poll_answers_as_soon_as_the_job_ends_on_another_replica(jobs_db):
    with replica(jobs_db, FakeEngine(generate_s=1.5)) as owner, \
            replica(jobs_db, FakeEngine(), job_concurrency=0) as other:
        wait_for_status(owner, "healthy")
        job = submit(owner)
        wait_until(owner, job["id"], {"running"})
        started = time.monotonic()
        waited = other.get(f"/jobs/{job['id']}", params={"wait": 20})
        elapsed = time.monotonic() - started
        assert waited.status_code == 200 and waited.json()["status"] == "done"
        finished_at = waited.json()["finished_at"]
        assert time.time() - finished_at < 1.0 + 0.5 and elapsed < 10, (elapsed, time.time() - finished_at)
        queued = submit(other)  # never claimed (the other replica runs none): the wait runs out, and says queued
        started = time.monotonic()
        owner_off = other.get(f"/jobs/{queued['id']}", params={"wait": 0.5})
        assert owner_off.status_code == 200 and 0.4 < time.monotonic() - started < 3
        assert other.get(f"/jobs/{job['id']}", params={"wait": 61}).status_code == 400


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict, bytes]] = []
    fail_first = 0

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), body))
        failing = len(type(self).received) <= type(self).fail_first
        self.send_response(500 if failing else 204)
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def receiver(fail_first: int):
    _Receiver.received, _Receiver.fail_first = [], fail_first
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/done"
    finally:
        server.shutdown()
        server.server_close()


def test_a_callback_is_retried_while_its_receiver_fails_and_is_signed(jobs_db):
    with receiver(fail_first=2) as url:
        with replica(jobs_db, job_callback_hosts="127.0.0.1", job_callback_secret="s3cret") as client:
            wait_for_status(client, "healthy")
            refused = client.post("/jobs", files={"file": ("d.png", diagram_png(), "image/png")},
                                  data={"callback_url": "http://elsewhere.example/done"})
            assert refused.status_code == 400 and "JOB_CALLBACK_HOSTS" in refused.json()["error"]["message"]
            job = submit(client, callback_url=url)
            assert job["callback"] == {"url": url, "status": None, "attempts": 0}
            deadline = time.monotonic() + 20  # tries 1 s and 2 s apart, then delivered
            while (status := client.get(f"/jobs/{job['id']}").json())["callback"]["status"] != "delivered":
                assert time.monotonic() < deadline, status
                time.sleep(0.1)
            assert status["callback"]["attempts"] == 3 and len(_Receiver.received) == 3
            headers, body = _Receiver.received[-1]
            expected = hmac.new(b"s3cret", headers["X-VLM-Timestamp"].encode() + b"." + body,
                                hashlib.sha256).hexdigest()
            assert headers["X-VLM-Signature"] == f"sha256={expected}"
            sent = json.loads(body)
            assert sent["id"] == job["id"] and sent["status"] == "done" and sent["result_url"].endswith("/result")
    with replica(jobs_db) as no_callbacks:
        refused = no_callbacks.post("/jobs", files={"file": ("d.png", diagram_png(), "image/png")},
                                    data={"callback_url": "http://127.0.0.1:9/x"})
        assert refused.status_code == 400 and "JOB_CALLBACK_HOSTS is empty" in refused.json()["error"]["message"]


def test_a_synchronous_request_overtakes_the_pages_of_running_jobs(jobs_db):
    engine = FakeEngine(generate_s=0.3, max_rows=2)
    with replica(jobs_db, engine, job_concurrency=2) as client:
        wait_for_status(client, "healthy")
        idle = min(_timed(lambda: infer(client)) for _ in range(3))
        jobs = [submit(client, document(20), pages="all") for _ in range(2)]
        for job in jobs:
            wait_until(client, job["id"], {"running"})
        time.sleep(0.5)
        health = client.get("/health").json()
        metrics = client.get("/metrics", headers={"Accept": "text/plain"}).text
        depth = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("vlm_queue_depth ")))
        assert health["queue_depth"] >= 20 and depth >= 20, (health["queue_depth"], depth)  # pages counted
        busy = [_timed(lambda: infer(client)) for _ in range(3)]
        assert max(busy) < 2 * idle + 0.3, (idle, busy)
        for job in jobs:
            done = wait_until(client, job["id"], {"done"}, timeout_s=60)
            assert done["progress"] == {"pages_done": 20, "pages_total": 20}
        assert client.get("/health").json()["queue_depth"] == 0


def _timed(call) -> float:
    started = time.monotonic()
    response = call()
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def test_a_locked_store_gives_the_job_routes_503_and_nothing_else_waits(tmp_path, caplog):
    path = tmp_path / "jobs.sqlite3"
    with replica(str(path), FakeEngine(), job_store_timeout_s=0.5) as client:
        wait_for_status(client, "healthy")
        job = submit(client)
        wait_until(client, job["id"], {"done"})
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            refused = client.post("/jobs", files={"file": ("d.png", diagram_png(), "image/png")})
            assert refused.status_code == 503 and refused.headers["Retry-After"]
            assert refused.json()["error"]["type"] == "job_store_unavailable"
            started = time.monotonic()
            for _ in range(3):
                assert infer(client).status_code == 200
                assert client.get("/health").status_code == 200
            assert time.monotonic() - started < 3
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        again = submit(client)
        assert wait_until(client, again["id"], {"done"})["status"] == "done"
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "done"  # nothing lost


def test_a_store_that_cannot_be_opened_leaves_infer_working(tmp_path, caplog):
    (tmp_path / "jobs.sqlite3").write_bytes(b"not an SQLite file at all" * 100)
    caplog.set_level(logging.ERROR, logger="app.jobs.worker")
    with replica(str(tmp_path / "jobs.sqlite3")) as client:
        health = wait_for_status(client, "healthy")
        assert health["job_store"] == "sqlite" and "could not be opened" in health["job_store_error"]
        assert infer(client).status_code == 200
        refused = client.post("/jobs", files={"file": ("d.png", diagram_png(), "image/png")})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "job_store_unavailable"
        assert client.get("/jobs/anything").status_code == 503
    lines = [record.getMessage() for record in caplog.records if "JOBS_DB=" in record.getMessage()]
    assert len(lines) == 1 and str(tmp_path / "jobs.sqlite3") in lines[0], lines


def test_a_store_that_comes_up_later_is_used_without_a_restart(postgres):
    url = postgres.url("created_later")
    with replica(url) as client:
        health = wait_for_status(client, "healthy")
        assert health["job_store"] == "postgresql" and health["job_store_error"]
        postgres.create_database("created_later")
        deadline = time.monotonic() + 15  # the worker tries again every 5 s
        while client.get("/health").json()["job_store_error"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        job = submit(client)
        assert wait_until(client, job["id"], {"done"})["status"] == "done"


@contextlib.contextmanager
def small_disk(folder, size: str = "3m"):
    """A tmpfs of ``size`` at ``folder``: a disk that really fills up (root only, as in CI)."""
    import os
    import subprocess

    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder) -> None:
    with open(folder / "filler", "wb") as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()


def test_a_full_disk_answers_503_and_the_job_end_is_written_once_space_returns(tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        with replica(str(disk / "jobs.sqlite3"), FakeEngine(generate_s=2.0)) as client:
            wait_for_status(client, "healthy")
            job = submit(client)
            wait_until(client, job["id"], {"running"})
            fill(disk)
            big = diagram_png(900, 700, fmt="BMP")  # needs new pages in the store, which a full disk cannot give
            refused = client.post("/jobs", files={"file": ("d.bmp", big, "image/bmp")})
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "job_store_unavailable", \
                refused.text
            time.sleep(2.5)  # the job's generation ends meanwhile: its end may not fit either
            (disk / "filler").unlink()
            done = wait_until(client, job["id"], {"done", "failed"}, timeout_s=30)
            assert done["status"] == "done"
            metrics = client.get("/metrics", headers={"Accept": "text/plain"}).text
            assert 'vlm_job_duration_seconds_count{status="done"} 1.0' in metrics
            assert client.get("/health").json()["running_jobs"] == 0


def test_an_answer_over_max_result_mb_fails_its_job_with_413(jobs_db):
    with replica(jobs_db, FakeEngine(text="| № | Действие | Роль |\n|---|---|---|\n" + "| 1 | шаг | роль |\n" * 200),
                 max_result_mb=0.001) as client:  # about 1 KB: the answer above is larger
        wait_for_status(client, "healthy")
        job = submit(client)
        failed = wait_until(client, job["id"], {"done", "failed"})
        assert failed["status"] == "failed" and "MAX_RESULT_MB" in failed["error"]["message"]
        result = client.get(job["result_url"])
        assert result.status_code == 413 and result.json()["error"]["type"] == "payload_too_large"


def test_a_shutdown_mid_job_gives_the_whole_job_back(jobs_db):
    with replica(jobs_db, FakeEngine(generate_s=0.6, max_rows=1), shutdown_grace_s=0.5) as first:
        wait_for_status(first, "healthy")
        job = submit(first, document(5), pages="all")
        deadline = time.monotonic() + 30
        while ((first.get(f"/jobs/{job['id']}").json()["progress"] or {}).get("pages_done") or 0) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # The grace period ended with pages unfinished: they were cut off by the shutdown, not failed by the file.
    with replica(jobs_db, FakeEngine()) as second:
        wait_for_status(second, "healthy")
        done = wait_until(second, job["id"], {"done", "failed"}, timeout_s=60)
        result = second.get(job["result_url"]).json()
        assert done["status"] == "done" and [page["error"] for page in result["pages"]] == [None] * 5, result


def test_ids_no_job_can_have_are_404_and_a_pending_callback_is_not_forgotten(jobs_db):
    with receiver(fail_first=1000) as url, replica(jobs_db, FakeEngine(generate_s=5.0),
                                                   job_callback_hosts="127.0.0.1") as client:
        wait_for_status(client, "healthy")
        for odd in ("%00x", "a%00b", "x" * 65, "%E2%98%83"):
            assert client.get(f"/jobs/{odd}").status_code == 404
            assert client.delete(f"/jobs/{odd}").status_code == 404
        job = submit(client, callback_url=url)
        assert client.delete(f"/jobs/{job['id']}").status_code == 200  # cancelled: its callback is due
        again = client.delete(f"/jobs/{job['id']}")
        assert again.status_code == 409 and again.headers["Retry-After"], again.text
        assert client.get(f"/jobs/{job['id']}").json()["callback"]["status"] in ("pending", "failed")
