"""Jobs: 202 at once, polled, fetched, cancelled, expired, bounded, keyed, and surviving a restart."""

from __future__ import annotations

import signal
import time

import httpx
from fastapi.testclient import TestClient

from app.http.app import create_app
from app.service.inference import InferenceService
from app.settings import Settings

from .helpers import FakeEngine, diagram_png, fake_factory, wait_for_status
from .test_pages import document
from .test_server import running_server


def client_with(jobs_db: str, engine: FakeEngine | None = None, load_s: float = 0.0, **settings) -> TestClient:
    settings = Settings(jobs_db=jobs_db, **settings)
    service = InferenceService(settings, engine_factory=fake_factory(engine or FakeEngine(), load_s=load_s))
    return TestClient(create_app(service=service), raise_server_exceptions=False)


def submit(client, data: bytes | None = None, headers=None, **form) -> dict:
    response = client.post("/jobs", files={"file": ("d.png", data or diagram_png(), "image/png")}, data=form,
                           headers=headers or {})
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == response.json()["status_url"]
    return response.json()


def wait_until(client, job_id: str, statuses: set[str], timeout_s: float = 30, headers=None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{job_id}", headers=headers or {}).json()
        if status["status"] in statuses:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {statuses}: {status}")


def test_a_job_answers_what_infer_answers(jobs_db):
    engine = FakeEngine(generate_s=0.5)
    with client_with(jobs_db, engine) as client:
        wait_for_status(client, "healthy")
        job = submit(client)
        assert job["status"] in ("queued", "running") and len(job["id"]) >= 20
        early = client.get(job["result_url"])
        assert early.status_code == 409 and early.json()["error"]["type"] == "job_not_done"
        assert early.headers["Retry-After"]
        done = wait_until(client, job["id"], {"done"})
        assert done["finished_at"] >= done["started_at"] >= done["created_at"]
        result = client.get(job["result_url"]).json()
        direct = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")}).json()
        assert result["rows"] == direct["rows"] and result["description"] == direct["description"]
        assert result["metadata"]["request_id"].startswith("job-")
        markdown = submit(client, format="markdown")
        wait_until(client, markdown["id"], {"done"})
        assert client.get(markdown["result_url"]).headers["content-type"].startswith("text/markdown")
        assert client.delete(f"/jobs/{job['id']}").status_code == 204  # forgotten
        assert client.get(f"/jobs/{job['id']}").status_code == 404


def test_a_job_reports_its_progress_page_by_page(jobs_db):
    engine = FakeEngine(generate_s=0.4, max_rows=1)  # one page at a time: progress has steps to see
    with client_with(jobs_db, engine, load_s=0.5) as client:
        job = submit(client, document(3), pages="all")
        assert job["progress"] is None  # queued: the file is not opened yet
        wait_for_status(client, "healthy")
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = client.get(f"/jobs/{job['id']}").json()
            seen.append(status["progress"])
            if status["status"] == "done":
                break
            time.sleep(0.05)
        assert seen[-1] == {"pages_done": 3, "pages_total": 3}
        assert {"pages_done": 1, "pages_total": 3} in seen or {"pages_done": 2, "pages_total": 3} in seen, seen
        single = submit(client)
        assert wait_until(client, single["id"], {"done"})["progress"] == {"pages_done": 1, "pages_total": 1}


def test_a_bad_file_fails_its_job_with_the_error_infer_would_give(jobs_db):
    with client_with(jobs_db) as client:
        wait_for_status(client, "healthy")
        refused = client.post("/jobs", files={"file": ("x.bin", b"not a picture", "image/png")})
        assert refused.status_code == 415  # what needs no model is said at once, not by a failed job
        assert client.post("/jobs", files={"file": ("d.png", diagram_png(), "image/png")},
                           data={"pages": "two"}).status_code == 400
        job = submit(client, diagram_png()[:200])  # a PNG by its signature, cut short: only decoding tells
        failed = wait_until(client, job["id"], {"failed"})
        assert failed["error"]["type"] == "invalid_image"
        result = client.get(job["result_url"])
        assert result.status_code == 400 and result.json()["error"]["type"] == "invalid_image"


def test_a_cancelled_job_never_reaches_the_model(jobs_db):
    engine = FakeEngine()
    with client_with(jobs_db, engine, load_s=1.5) as client:  # jobs are accepted while the model loads
        job = submit(client)
        assert job["status"] == "queued"
        cancelled = client.delete(f"/jobs/{job['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        wait_for_status(client, "healthy")
        time.sleep(1.5)  # the worker has looked for work since
        assert engine.prefills == 0 and client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"
        assert client.get(job["result_url"]).status_code == 409


def test_a_running_job_can_be_cancelled(jobs_db):
    engine = FakeEngine(generate_s=10.0)
    with client_with(jobs_db, engine) as client:
        wait_for_status(client, "healthy")
        job = submit(client)
        wait_until(client, job["id"], {"running"})
        time.sleep(0.3)
        assert client.delete(f"/jobs/{job['id']}").json()["status"] == "cancelled"
        deadline = time.monotonic() + 3
        while client.get("/health").json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["in_flight"] == 0  # its generation stopped


def test_results_expire_max_jobs_holds_and_the_key_is_needed(jobs_db):
    key = {"X-API-Key": "k"}
    with client_with(jobs_db, FakeEngine(generate_s=1.0, max_rows=1), api_key="k", job_ttl_s=3.0,
                     max_jobs=2) as client:
        wait_for_status(client, "healthy")
        assert client.post("/jobs", files={"file": ("d.png", diagram_png(), "image/png")}).status_code == 401
        too_big = client.post("/jobs", files={"file": ("d.png", b"x" * 21 * 2 ** 20, "image/png")}, headers=key)
        assert too_big.status_code == 413 and "MAX_UPLOAD_MB=20" in too_big.json()["error"]["message"]
        first, second = submit(client, headers=key), submit(client, headers=key)
        full = client.post("/jobs", files={"file": ("d.png", diagram_png(), "image/png")}, headers=key)
        assert full.status_code == 503 and full.headers["Retry-After"]
        assert client.get(f"/jobs/{first['id']}").status_code == 401
        # The model takes one at a time, in either order: both are polled together, since the one that ends first
        # may expire (JOB_TTL_S) while a poll waits on the other.
        seen, deadline = set(), time.monotonic() + 30
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"only {seen} seen done"
            for job in (first, second):
                if client.get(f"/jobs/{job['id']}", headers=key).json().get("status") == "done":
                    seen.add(job["id"])
            time.sleep(0.05)
        deadline = time.monotonic() + 12  # JOB_TTL_S after it finished, then the worker's next tick
        while client.get(f"/jobs/{first['id']}", headers=key).status_code != 404:
            assert time.monotonic() < deadline, "the finished job never expired"
            time.sleep(0.2)
        prometheus = client.get("/metrics", headers={"Accept": "text/plain"}).text
        assert 'vlm_job_duration_seconds_count{status="done"} 2.0' in prometheus


def test_a_job_survives_a_restart_of_the_service(tiny_model_dir, tmp_path):
    env = {"JOBS_DB": str(tmp_path / "jobs.sqlite3"), "MAX_NEW_TOKENS": "600", "FORCE_MAX_NEW_TOKENS": "true",
           "MAX_BATCH_SIZE": "1", "JOB_LEASE_S": "3"}  # the killed process's lease passes 3 s after its death
    with running_server(tiny_model_dir, **env) as (base, process):
        response = httpx.post(f"{base}/jobs", files={"file": ("d.png", diagram_png(), "image/png")},
                              data={"max_new_tokens": "600"})
        assert response.status_code == 202
        job_id = response.json()["id"]
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/jobs/{job_id}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # no drain, no goodbye: a crash mid-job
        process.wait(timeout=30)
    with running_server(tiny_model_dir, **env) as (base, _):
        deadline = time.monotonic() + 120
        while (status := httpx.get(f"{base}/jobs/{job_id}").json())["status"] != "done":
            assert status["status"] in ("queued", "running") and time.monotonic() < deadline, status
            time.sleep(0.2)
        result = httpx.get(f"{base}/jobs/{job_id}/result").json()
        assert result["metadata"]["completion_tokens"] == 600


def test_a_job_may_run_longer_than_a_synchronous_request(jobs_db):
    with client_with(jobs_db, FakeEngine(generate_s=1.0), request_timeout_s=0.5, job_timeout_s=30) as client:
        wait_for_status(client, "healthy")
        assert client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")}).status_code == 504
        job = submit(client)
        assert wait_until(client, job["id"], {"done", "failed"})["status"] == "done"


def test_a_wrong_method_names_every_method_of_the_path(jobs_db):
    with client_with(jobs_db) as client:
        response = client.request("PUT", "/jobs/some-id")
        assert response.status_code == 405 and response.headers["Allow"] == "DELETE, GET"
        assert client.request("PUT", "/infer").headers["Allow"] == "POST"
