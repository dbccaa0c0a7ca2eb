"""Prometheus exposition, format negotiation, request ids in logs, JSON log lines."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.http.app import create_app
from app.logs import JsonFormatter, configure_logging
from app.model.sequence import PreparedInputs
from app.service.inference import InferenceService
from app.settings import Settings

from .helpers import FakeEngine, diagram_png, fake_factory, wait_for_status


@pytest.fixture(scope="module")
def client(tiny_client):
    return tiny_client


def scrape(client) -> dict[str, float]:
    response = client.get("/metrics", headers={"Accept": "text/plain"})
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def infer(client, **data):
    response = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")}, data=data)
    assert response.status_code == 200, response.text
    return response.json()


def test_counters_and_histograms_move_after_infer(client):
    before = scrape(client)
    body = infer(client, max_new_tokens="6")
    after = scrape(client)
    ok = 'vlm_requests_total{endpoint="/infer",status="200"}'
    assert after[ok] == before.get(ok, 0) + 1
    duration = 'vlm_request_duration_seconds_count{route="/infer"}'
    assert after[duration] == before.get(duration, 0) + 1
    assert after["vlm_time_to_first_token_seconds_count"] == before["vlm_time_to_first_token_seconds_count"] + 1
    assert after["vlm_queue_wait_seconds_count"] > before["vlm_queue_wait_seconds_count"]
    generated = body["metadata"]["completion_tokens"]
    assert after["vlm_generated_tokens_total"] == before["vlm_generated_tokens_total"] + generated
    assert after["vlm_image_tokens_total"] - before["vlm_image_tokens_total"] == body["metadata"]["image_tokens"]
    reason = body["metadata"]["finish_reason"]
    key = f'vlm_finish_reason_total{{reason="{reason}"}}'
    assert after[key] == before[key] + 1
    assert after["vlm_model_load_seconds"] > 0
    info = [k for k, v in after.items() if k.startswith("vlm_model_info{") and v == 1]
    assert len(info) == 1 and 'device="cpu"' in info[0] and 'dtype="float32"' in info[0]
    assert "process_resident_memory_bytes" in after and "vlm_queue_depth" in after
    per_token = "vlm_time_per_output_token_seconds_count"
    assert after[per_token] == before[per_token] + (1 if generated > 1 else 0)
    assert after["vlm_kv_slots"] == 8 and after["vlm_kv_slots_in_use"] == 0  # the CPU default, all free again


def test_health_and_metrics_are_not_inference_traffic(client):
    before = scrape(client)
    client.get("/health")
    client.get("/metrics")
    after = scrape(client)
    duration = 'vlm_request_duration_seconds_count{route="/infer"}'
    assert after.get(duration) == before.get(duration)
    assert after['vlm_requests_total{endpoint="/health",status="200"}'] >= 1


def test_client_errors_after_admission_are_counted_apart_from_server_failures(client):
    before = scrape(client)
    response = client.post("/infer", files={"file": ("x.bin", b"\x00\x01junk", "application/octet-stream")})
    assert response.status_code == 415
    after = scrape(client)
    key = 'vlm_client_error_requests_total{reason="unsupported_media_type",route="/infer"}'
    assert after[key] == before.get(key, 0) + 1
    failed = sum(value for sample, value in after.items() if sample.startswith("vlm_failed_requests_total"))
    assert failed == sum(value for sample, value in before.items() if sample.startswith("vlm_failed_requests_total"))


def test_a_grammar_queue_that_is_full_counts_as_a_refusal_not_a_failure(client, monkeypatch):
    """Admitted, then 503 overloaded because JSON schemas wait to compile: something to retry, not what ops page on."""
    from app.errors import OverloadedError
    from app.model.grammar import Grammars

    def backed_up(self, wanted, timeout_s=0):
        raise OverloadedError("4 JSON schemas are already waiting to be compiled; retry shortly")

    monkeypatch.setattr(Grammars, "compile", backed_up)
    before = scrape(client)
    response = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                           data={"json_schema": '{"type": "object"}'})
    assert response.status_code == 503 and response.json()["error"]["type"] == "overloaded"
    after = scrape(client)
    key = 'vlm_rejected_requests_total{reason="overloaded",route="/infer"}'
    assert after[key] == before.get(key, 0) + 1
    failed = sum(value for sample, value in after.items() if sample.startswith("vlm_failed_requests_total"))
    assert failed == sum(value for sample, value in before.items() if sample.startswith("vlm_failed_requests_total"))


@pytest.mark.parametrize("accept, query, expected", [
    ("application/json", None, "application/json"),
    ("*/*", None, "application/json"),
    ("text/html,application/xhtml+xml,*/*;q=0.8", None, "application/json"),
    ("text/plain", None, "text/plain; version=0.0.4"),
    ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", None,
     "application/openmetrics-text"),
    ("*/*", "prometheus", "text/plain; version=0.0.4"),
    ("text/plain", "json", "application/json"),
])
def test_metrics_format_follows_accept(client, accept, query, expected):
    response = client.get("/metrics", headers={"Accept": accept}, params={"format": query} if query else None)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(expected)
    if expected == "application/json":
        assert {"inference_count", "total_inference_time", "avg_inference_time", "model_load_time",
                "gpu_memory_allocated_gb", "gpu_memory_reserved_gb"} <= set(response.json())


def test_request_id_reaches_every_log_record_of_the_request(client, caplog):
    caplog.set_level(logging.INFO)
    response = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                           data={"max_new_tokens": "2"}, headers={"X-Request-ID": "trace-42"})
    assert response.headers["X-Request-ID"] == "trace-42"
    assert response.json()["metadata"]["request_id"] == "trace-42"
    access = [r for r in caplog.records if r.name == "app.access" and r.request_id == "trace-42"]
    assert len(access) == 1
    fields = access[0].access
    assert fields["status"] == 200 and fields["path"] == "/infer" and fields["image_size"] == [320, 240]
    assert fields["completion_tokens"] >= 1 and fields["finish_reason"] in {"stop", "length"}
    error = client.get("/nope", headers={"X-Request-ID": "trace-43"})
    assert error.json()["error"]["request_id"] == "trace-43"


def test_json_formatter_writes_one_parseable_object():
    record = logging.LogRecord("app.access", logging.INFO, __file__, 1, "POST /infer %s", (200,), None)
    record.request_id = "abc"
    record.access = {"status": 200, "image_size": [10, 20]}
    line = JsonFormatter().format(record)
    parsed = json.loads(line)
    assert parsed["request_id"] == "abc" and parsed["message"] == "POST /infer 200"
    assert parsed["image_size"] == [10, 20] and "\n" not in line


def test_library_records_are_json_lines_printed_once(capfd):
    """The Hub client's retries (and transformers' warnings) come through our handler, not their own."""
    import huggingface_hub  # noqa: F401 - attaches its own stderr handler at import, as in the service

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(Settings(log_format="json"))
        capfd.readouterr()
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("transformers.modeling_utils").warning("some weights were not used")
        lines = capfd.readouterr().err.splitlines()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert [json.loads(line)["message"] for line in lines] == ["Retrying in 1s [Retry 1/5].",
                                                                 "some weights were not used"]


class ExplodingEngine(FakeEngine):
    """Fails the decoding step of a request whose prompt is "explode", as a device error would."""

    def prepare(self, image, prompt, system=None) -> PreparedInputs:
        return PreparedInputs({"explode": prompt == "explode"}, prompt_tokens=10, image_tokens=4)

    def decode(self, sequences) -> list[tuple]:
        if any(sequence.inputs.tensors["explode"] for sequence in sequences):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().decode(sequences)


def test_json_metrics_and_prometheus_agree_after_a_mix_of_outcomes():
    engine = ExplodingEngine(max_rows=1)
    settings = Settings(api_key="k", max_queue=0, max_upload_mb=0.05)
    service = InferenceService(settings, engine_factory=fake_factory(engine))
    key = {"X-API-Key": "k"}

    def post(data: bytes = diagram_png(), headers=key, **form):
        return client.post("/infer", files={"file": ("d.png", data, "image/png")}, data=form, headers=headers)

    with TestClient(create_app(service=service), raise_server_exceptions=False) as client:
        wait_for_status(client, "healthy")
        assert [post().status_code for _ in range(2)] == [200, 200]
        assert post(b"not a picture").status_code == 415  # admitted, then failed
        assert post(prompt="explode").status_code == 500  # admitted, then the device failed
        assert post(headers={}).status_code == 401  # refused at the door
        assert post(b"x" * 100_000).status_code == 413  # refused at the door
        engine.generate_s = 1.0
        running = threading.Thread(target=post)
        running.start()
        time.sleep(0.3)
        assert post().status_code == 503  # the only slot is busy and no queue: refused at the door
        running.join()
        as_json = client.get("/metrics", headers=key).json()
        prometheus = scrape(client)

    def total(name: str) -> float:
        return sum(value for sample, value in prometheus.items() if sample.split("{")[0] == name)

    assert as_json["inference_count"] == total("vlm_inference_duration_seconds_count") == 3
    assert as_json["total_inference_time"] == pytest.approx(total("vlm_inference_duration_seconds_sum"), abs=1e-3)
    assert as_json["failed_count"] == total("vlm_failed_requests_total") == 1  # the device: the service's failure
    assert prometheus['vlm_failed_requests_total{reason="internal_error",route="/infer"}'] == 1
    assert as_json["client_error_count"] == total("vlm_client_error_requests_total") == 1  # the bad file
    assert as_json["rejected_count"] == total("vlm_rejected_requests_total") == 3
    assert as_json["prompt_tokens_total"] == total("vlm_prompt_tokens_total") == 30
    assert as_json["completion_tokens_total"] == total("vlm_generated_tokens_total") > 0
