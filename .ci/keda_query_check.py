"""The KEDA trigger's PromQL, exactly as deploy/k8s/keda-scaledobject.yaml ships it, run against a real
Prometheus scraping two replicas that share one job store, with requests waiting and jobs queued.

The replicas run no jobs (JOB_CONCURRENCY=0), so the queued count holds still at JOBS; slow synchronous requests on
one KV slot each keep requests waiting. At each evaluation time the query must equal the sum of the replicas'
queue depths plus the store's queued jobs counted once (not once per replica), and one such time must have both.

usage: keda_query_check.py DEMO_DIR FIRST_PORT PROMETHEUS_PORT ARTIFACTS
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

JOBS = 5
REPO = Path(__file__).resolve().parent.parent


def shipped_query() -> str:
    document = yaml.safe_load((REPO / "deploy/k8s/keda-scaledobject.yaml").read_text())
    return document["spec"]["triggers"][0]["metadata"]["query"]


def wait_healthy(base: str, process: subprocess.Popen, log: Path) -> None:
    for _ in range(480):
        if process.poll() is not None:
            sys.exit(f"replica exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"{base} never became healthy")


def instant(prometheus: str, query: str, at: float) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": query, "time": f"{at:.3f}"}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]["result"]


def main() -> None:
    demo_dir, first_port, prom_port, artifacts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    work = Path(tempfile.mkdtemp(prefix="vlm-keda-"))
    ports = [first_port, first_port + 1]
    env = {**os.environ, "BASE_MODEL_ID": "demo", "DEMO_DIR": demo_dir, "HOST": "127.0.0.1",
           "JOBS_DB": str(work / "jobs.sqlite3"), "JOB_CONCURRENCY": "0", "MAX_BATCH_SIZE": "1",
           "MAX_NEW_TOKENS": "400", "FORCE_MAX_NEW_TOKENS": "true", "MAX_QUEUE": "16", "WARMUP": "false"}
    processes = []
    prometheus = None
    done = threading.Event()
    try:
        for port in ports:
            log = artifacts / f"keda-replica-{port}.log"
            processes.append((subprocess.Popen([sys.executable, "-m", "app"], env={**env, "PORT": str(port)},
                                               stdout=log.open("w"), stderr=subprocess.STDOUT), log))
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        for base, (process, log) in zip(bases, processes):
            wait_healthy(base, process, log)
        config = work / "prometheus.yml"
        targets = ", ".join(f'"127.0.0.1:{port}"' for port in ports)
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: vlm-inference\n"
                          f"    static_configs:\n      - targets: [{targets}]\n")
        prometheus = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work}/data",
                                       f"--web.listen-address=127.0.0.1:{prom_port}"],
                                      stdout=(artifacts / "keda-prometheus.log").open("w"), stderr=subprocess.STDOUT)
        server = f"http://127.0.0.1:{prom_port}"
        image = (artifacts / "diagram.png").read_bytes()
        for number in range(JOBS):  # submitted through either replica: one store, one count
            response = httpx.post(f"{bases[number % 2]}/jobs", files={"file": ("d.png", image, "image/png")},
                                  timeout=30)
            assert response.status_code == 202, response.text

        def keep_requests_waiting(base: str) -> None:  # one slot per replica: two of its three senders wait
            for _ in range(200):  # bounded: the check ends long before
                if done.is_set():
                    return
                httpx.post(f"{base}/infer", files={"file": ("d.png", image, "image/png")}, timeout=300)

        senders = [threading.Thread(target=keep_requests_waiting, args=(bases[number % 2],), daemon=True)
                   for number in range(6)]
        for sender in senders:
            sender.start()
        query = shipped_query()
        print(f"query: {' '.join(query.split())}")
        deadline, both_seen, checked = time.monotonic() + 120, False, 0
        while time.monotonic() < deadline and not both_seen:
            time.sleep(1.0)
            at = time.time() - 2  # a moment Prometheus has scraped both replicas past
            try:
                result = instant(server, query, at)
                depths = instant(server, 'vlm_queue_depth{job="vlm-inference"}', at)
                queued = instant(server, 'vlm_jobs{job="vlm-inference",status="queued"}', at)
            except httpx.HTTPError:
                continue  # Prometheus is still starting
            if len(depths) < 2 or len(queued) < 2 or not result:
                continue
            waiting = sum(float(series["value"][1]) for series in depths)
            jobs = {float(series["value"][1]) for series in queued}
            assert len(jobs) == 1, f"the replicas disagree on the store's queued count: {queued}"
            expected = waiting + jobs.pop()
            value = float(result[0]["value"][1])
            assert value == expected, f"query={value}, expected {expected} (waiting {waiting}, queued {queued})"
            checked += 1
            both_seen = waiting > 0 and expected - waiting == JOBS
            print(f"t={at:.0f}: query={value:g} = waiting requests {waiting:g} + queued jobs {expected - waiting:g}")
        assert both_seen, f"never saw requests waiting and {JOBS} jobs queued at once ({checked} checks)"
        done.set()
        print(f"KEDA query: matched the replicas' own numbers at {checked} evaluation times; queued jobs counted once")
    finally:
        done.set()
        for process, _ in processes:
            process.terminate()
        if prometheus is not None:
            prometheus.terminate()
        for process, _ in processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
