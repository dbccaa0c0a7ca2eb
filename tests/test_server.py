"""A real ``python -m app`` process on loopback with the tiny model: drain on SIGTERM, streamed-body
limits, load shedding under a burst, and deadlines that free the device."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .helpers import diagram_png


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(tiny_model_dir, **env: str):
    port = free_port()
    environment = {
        **os.environ, "BASE_MODEL_ID": str(tiny_model_dir / "base-model"),
        "ADAPTER_PATH": str(tiny_model_dir / "weights"), "DEVICE": "cpu", "HOST": "127.0.0.1",
        "PORT": str(port), "HF_HUB_OFFLINE": "1", **env,
    }
    process = subprocess.Popen([sys.executable, "-m", "app"], env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server never became healthy"
            time.sleep(0.2)
        yield base, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(timeout=30)


def post(base: str, timeout: float = 60.0, **data) -> httpx.Response:
    return httpx.post(f"{base}/infer", files={"file": ("d.png", diagram_png(), "image/png")}, data=data,
                      timeout=timeout)


def test_sigterm_drains_in_flight_request_and_exits_zero(tiny_model_dir):
    with running_server(tiny_model_dir, MAX_NEW_TOKENS="4000", SHUTDOWN_GRACE_S="60",
                        FORCE_MAX_NEW_TOKENS="true") as (base, process):
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("r", post(base, max_new_tokens="2000")))
        worker.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/health").json()["in_flight"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = post(base)
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        worker.join(timeout=60)
        assert result["r"].status_code == 200
        assert result["r"].json()["metadata"]["completion_tokens"] > 0
        assert process.wait(timeout=30) == 0


def test_streamed_body_over_the_limit_is_cut_off_early(tiny_model_dir):
    with running_server(tiny_model_dir, MAX_UPLOAD_MB="1") as (base, _):
        port = int(base.rsplit(":", 1)[1])
        sent = 0
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: multipart/form-data; boundary=zzz\r\n\r\n")
            part = (b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
                    b"Content-Type: image/png\r\n\r\n")
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            chunk = b"x" * 65536
            answer = b""
            with contextlib.suppress(OSError):  # the server may close while we still send
                while sent < 64 * 1024 * 1024:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                    if select.select([sock], [], [], 0)[0]:
                        break
            sock.settimeout(10)
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):  # head and body may come in separate segments
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"payload_too_large" in answer
        assert sent < 16 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_burst_is_answered_or_shed_never_500(tiny_model_dir):
    with running_server(tiny_model_dir, MAX_QUEUE="4") as (base, process):
        post(base, max_new_tokens="8")  # first request warms caches before measuring memory
        rss_before = rss_bytes(process.pid)
        health_latency: list[float] = []
        stop = threading.Event()

        def watch_health():
            while not stop.is_set():
                started = time.perf_counter()
                assert httpx.get(f"{base}/health", timeout=5).status_code == 200
                health_latency.append(time.perf_counter() - started)
                time.sleep(0.1)

        watcher = threading.Thread(target=watch_health)
        watcher.start()
        png = diagram_png()
        clients = threading.local()  # one keep-alive client per worker, like separate backends

        def one(_):
            if not hasattr(clients, "client"):
                clients.client = httpx.Client(timeout=60)
            return clients.client.post(f"{base}/infer", files={"file": ("d.png", png, "image/png")},
                                       data={"max_new_tokens": "16"})

        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(one, range(200)))
        stop.set()
        watcher.join()
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 5
        assert all("Retry-After" in r.headers for r in responses if r.status_code == 503)
        # Refused after its body was read: the connection stays usable (no reset, no forced close).
        assert all(r.headers.get("connection") != "close" for r in responses if r.status_code == 503)
        assert all(r.json()["error"]["type"] == "overloaded" for r in responses if r.status_code == 503)
        assert max(health_latency) < 1.0
        assert rss_bytes(process.pid) - rss_before < 300 * 1024 * 1024
        metrics = httpx.get(f"{base}/metrics").json()
        assert metrics["rejected_count"] == codes.count(503) and metrics["queue_depth"] == 0


def test_deadline_stops_generation_and_the_next_request_starts_at_once(tiny_model_dir):
    with running_server(tiny_model_dir, MAX_NEW_TOKENS="4000", REQUEST_TIMEOUT_S="1.5",
                        FORCE_MAX_NEW_TOKENS="true") as (base, _):
        started = time.perf_counter()
        late = post(base, max_new_tokens="3000")
        assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"
        assert time.perf_counter() - started < 3.0
        follow_up = post(base, max_new_tokens="4")
        assert follow_up.status_code == 200
        assert follow_up.json()["metadata"]["queue_time"] < 1.0


def test_json_logs_are_one_object_per_line_with_request_ids(tiny_model_dir):
    with running_server(tiny_model_dir, LOG_FORMAT="json") as (base, process):
        response = httpx.post(f"{base}/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                              data={"max_new_tokens": "2"}, headers={"X-Request-ID": "json-check"})
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    lines = [line for line in output.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line must parse
    access = [e for e in entries if e["logger"] == "app.access" and e["request_id"] == "json-check"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["completion_tokens"] >= 1
    assert any("merged" in e["message"] for e in entries)  # the startup log says what was loaded
    assert any(e["logger"].startswith("uvicorn") for e in entries)


def test_client_disconnect_frees_the_model(tiny_model_dir):
    with running_server(tiny_model_dir, MAX_NEW_TOKENS="4000", MAX_BATCH_SIZE="1",
                        FORCE_MAX_NEW_TOKENS="true") as (base, _):
        with contextlib.suppress(httpx.ReadTimeout):
            post(base, timeout=1.0, max_new_tokens="3000")  # gives up after 1 s and closes the connection
        deadline = time.monotonic() + 3
        while httpx.get(f"{base}/health").json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{base}/health").json()["in_flight"] == 0  # the abandoned generation stopped
        started = time.perf_counter()
        assert post(base, max_new_tokens="4").status_code == 200
        assert time.perf_counter() - started < 2.0
        exposition = httpx.get(f"{base}/metrics", headers={"Accept": "text/plain"}).text
        assert 'vlm_finish_reason_total{reason="cancelled"} 1.0' in exposition
