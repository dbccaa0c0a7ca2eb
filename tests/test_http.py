"""HTTP behaviour with a fake engine: readiness, load failure, responsiveness, admission, deadlines."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.http.app import create_app
from app.service.inference import InferenceService
from app.settings import Settings

from .helpers import TABLE, FakeEngine, diagram_png, fake_factory, wait_for_status


def make_client(engine=None, load_s=0.0, error=None, **settings) -> TestClient:
    service = InferenceService(Settings(**settings), engine_factory=fake_factory(engine, load_s, error))
    return TestClient(create_app(service=service), raise_server_exceptions=False)


def post_png(client, **data):
    return client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")}, data=data)


def test_slow_load_reports_loading_then_healthy():
    with make_client(load_s=1.0) as client:
        first = client.get("/health")
        assert first.status_code == 503
        assert first.json()["status"] == "loading"
        assert first.json()["error"]["type"] == "not_ready" and first.json()["phase"]
        refused = post_png(client)
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        wait_for_status(client, "healthy")
        ready = client.get("/health")
        assert ready.status_code == 200 and ready.json()["model_loaded"] is True
        assert ready.json()["phase"] is None and ready.json()["kv_cache"]["slots"] == 8


def test_failed_load_reports_failed_with_one_line_reason():
    with make_client(error=RuntimeError("weights corrupt\nTraceback (most recent call last): ...")) as client:
        body = wait_for_status(client, "failed")
        response = client.get("/health")
        assert response.status_code == 503
        assert body["reason"] == "RuntimeError: weights corrupt"
        assert "Traceback" not in response.text
        assert post_png(client).status_code == 503


def test_health_answers_fast_while_generation_runs():
    with make_client(engine=FakeEngine(generate_s=3.0)) as client:
        wait_for_status(client, "healthy")
        outcome = {}
        worker = threading.Thread(target=lambda: outcome.setdefault("r", post_png(client)))
        worker.start()
        time.sleep(0.5)
        started = time.perf_counter()
        health = client.get("/health")
        metrics = client.get("/metrics")
        elapsed = time.perf_counter() - started
        assert health.status_code == 200 and metrics.status_code == 200
        assert health.json()["in_flight"] == 1
        assert elapsed < 1.0
        worker.join()
        assert outcome["r"].status_code == 200
        assert outcome["r"].json()["description"] == TABLE


def test_queue_full_is_refused_at_once_with_retry_after():
    engine = FakeEngine(generate_s=2.0, max_rows=1)
    with make_client(engine=engine, max_queue=0) as client:
        wait_for_status(client, "healthy")
        worker = threading.Thread(target=lambda: post_png(client))
        worker.start()
        time.sleep(0.5)
        started = time.perf_counter()
        refused = post_png(client)
        assert time.perf_counter() - started < 1.0
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "overloaded"
        assert int(refused.headers["Retry-After"]) >= 1
        worker.join()
        assert client.get("/metrics").json()["rejected_count"] == 1


def test_deadline_returns_504_and_frees_the_model():
    engine = FakeEngine(generate_s=5.0)
    with make_client(engine=engine, request_timeout_s=0.5) as client:
        wait_for_status(client, "healthy")
        started = time.perf_counter()
        response = post_png(client)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout"
        engine.generate_s = 0.0
        follow_up = post_png(client)
        assert follow_up.status_code == 200
        # The cancelled generation stopped at its next step instead of running its 5 s out.
        assert time.perf_counter() - started < 2.5


def test_every_error_uses_the_envelope_and_echoes_the_request_id():
    with make_client() as client:
        wait_for_status(client, "healthy")
        cases = [
            client.get("/nope"),
            client.post("/infer"),
            client.delete("/health"),
            client.post("/infer", files={"file": ("x.txt", b"hello world", "text/plain")}),
            post_png(client, max_new_tokens="many"),
        ]
        for response in cases:
            body = response.json()
            assert set(body) == {"error"}, body
            assert set(body["error"]) == {"type", "message", "request_id"}
            assert body["error"]["request_id"] == response.headers["X-Request-ID"]
        assert [r.status_code for r in cases] == [404, 422, 405, 415, 400]
        assert "file" in cases[1].json()["error"]["message"]
        assert "PNG" in cases[3].json()["error"]["message"]


def test_request_id_is_taken_from_the_client_and_sanitized():
    with make_client() as client:
        wait_for_status(client, "healthy")
        response = post_png(client, **{})
        assert response.json()["metadata"]["request_id"] == response.headers["X-Request-ID"]
        tagged = client.get("/", headers={"X-Request-ID": "abc-123<script>"})
        assert tagged.headers["X-Request-ID"] == "abc-123script"


def test_max_new_tokens_over_the_limit_is_a_400():
    with make_client(max_new_tokens=32) as client:
        wait_for_status(client, "healthy")
        response = post_png(client, max_new_tokens="64")
        assert response.status_code == 400
        assert "max_new_tokens" in response.json()["error"]["message"]


def test_root_lists_service_and_links():
    with make_client() as client:
        wait_for_status(client, "healthy")
        body = client.get("/").json()
        assert body["service"] == "vlm-inference"
        assert body["docs"] == "/docs" and body["health"] == "/health" and body["metrics"] == "/metrics"


def test_openapi_documents_routes_and_errors():
    with make_client() as client:
        spec = client.get("/openapi.json").json()
        infer = spec["paths"]["/infer"]["post"]
        assert infer["operationId"] == "infer_diagram"
        assert {"400", "413", "415", "422", "503", "504"} <= set(infer["responses"])
        schema_ref = infer["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        form = spec["components"]["schemas"][schema_ref.rsplit("/", 1)[-1]]
        file_schema = form["properties"]["file"]
        assert file_schema.get("format") == "binary" or "contentMediaType" in file_schema, file_schema
        for path in ("/health", "/metrics", "/"):
            assert spec["paths"][path]["get"]["summary"]
        docs = client.get("/docs")
        assert docs.status_code == 200 and "cdn." not in docs.text  # works without internet
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_openapi_examples_match_each_status_and_no_undelivered_422_is_documented():
    with make_client() as client:
        spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # a bad parameter is our 400 envelope
    seen = set()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                assert not (code == "422" and "Validation" in json.dumps(response)), (path, method)
                content = response.get("content", {}).get("application/json", {})
                example = content.get("example")
                if content.get("schema", {}).get("$ref", "").endswith("ErrorResponse"):
                    assert example is not None, (path, method, code)
                    error = example["error"]
                    kind = error["code"] if path.startswith("/v1/") else error["type"]
                    seen.add((path.split("/")[1], code, kind))
    assert ("infer", "504", "timeout") in seen and ("infer", "401", "unauthorized") in seen
    assert ("jobs", "404", "job_not_found") in seen and ("v1", "404", "model_not_found") in seen
    assert ("infer", "413", "payload_too_large") in seen and ("infer", "503", "not_ready") in seen
    infer_ok = spec["components"]["schemas"]["TableData"]["properties"]["truncated"]
    assert infer_ok["examples"] == [False]


def test_a_file_sent_as_a_text_field_is_told_how_to_send_it():
    with make_client() as client:
        wait_for_status(client, "healthy")
        for route in ("/infer", "/jobs"):
            answer = client.post(route, data={"file": "diagram.png"})
            message = answer.json()["error"]["message"]
            assert answer.status_code == 400 and "file part" in message and "class" not in message, answer.text


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
def test_api_key_guards_infer_but_not_health(header):
    with make_client(api_key="s3cret") as client:
        wait_for_status(client, "healthy")
        assert post_png(client).status_code == 401
        value = "Bearer s3cret" if header == "Authorization" else "s3cret"
        ok = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")}, headers={header: value})
        assert ok.status_code == 200
        wrong = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                            headers={header: value + "x"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_metrics_can_require_the_key():
    with make_client(api_key="k", metrics_require_key=True) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": "k"}).status_code == 200


def test_oversized_upload_is_413_by_content_length():
    with make_client(max_upload_mb=0.01) as client:
        wait_for_status(client, "healthy")
        big = diagram_png(1200, 1200, fmt="BMP")
        response = client.post("/infer", files={"file": ("d.bmp", big, "image/bmp")})
        assert response.status_code == 413
        assert "MAX_UPLOAD_MB" in response.json()["error"]["message"]


def test_oversized_chunked_upload_is_413():
    def chunks():
        for _ in range(20):
            yield b"x" * (64 * 1024)

    with make_client(max_upload_mb=0.5) as client:
        wait_for_status(client, "healthy")
        response = client.post("/infer", content=chunks(),
                               headers={"Content-Type": "multipart/form-data; boundary=zzz"})
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "payload_too_large"


class FailingPrepare(FakeEngine):
    def prepare(self, image, prompt, system=None):
        raise RuntimeError("processor bug")


def test_unexpected_error_is_the_500_envelope_with_the_request_id_in_body_and_log(caplog):
    with make_client(engine=FailingPrepare()) as client:
        wait_for_status(client, "healthy")
        with caplog.at_level("ERROR"):
            response = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                                   headers={"X-Request-ID": "trace-500"})
    assert response.status_code == 500
    assert response.json()["error"] == {"type": "internal_error", "request_id": "trace-500",
                                        "message": "internal error; the request id is in the service log"}
    assert "processor bug" not in response.text
    logged = [r for r in caplog.records if r.getMessage().startswith("unhandled error on POST /infer")]
    assert logged and logged[0].request_id == "trace-500" and "processor bug" in logged[0].exc_text


def test_head_health_gives_the_status_without_a_body():
    with make_client(load_s=0.5) as client:
        assert client.head("/health").status_code == 503
        wait_for_status(client, "healthy")
        response = client.head("/health")
    assert response.status_code == 200 and response.content == b""


def test_cors_preflight_is_allowed_only_for_listed_origins():
    with make_client(cors_origins="https://portal.example") as client:
        wait_for_status(client, "healthy")
        allowed = client.options("/infer", headers={"Origin": "https://portal.example",
                                                    "Access-Control-Request-Method": "POST"})
        other = client.options("/infer", headers={"Origin": "https://evil.example",
                                                  "Access-Control-Request-Method": "POST"})
        answer = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                             headers={"Origin": "https://portal.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://portal.example"
    assert "access-control-allow-origin" not in other.headers
    assert answer.headers["access-control-allow-origin"] == "https://portal.example"
    with make_client() as client:  # no CORS_ORIGINS: no browser page on another origin may call it
        preflight = client.options("/infer", headers={"Origin": "https://portal.example",
                                                      "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_openapi_declares_the_api_key_schemes_only_when_a_key_is_set():
    with make_client(api_key="secret", metrics_require_key=True) as client:
        spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["apiKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer"}
    assert spec["paths"]["/infer"]["post"]["security"] == [{"apiKeyHeader": []}, {"bearer": []}]
    assert "security" in spec["paths"]["/metrics"]["get"] and "security" not in spec["paths"]["/health"]["get"]
    with make_client() as client:
        open_spec = client.get("/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert "security" not in open_spec["paths"]["/infer"]["post"]


def test_one_file_per_request_and_no_unknown_fields():
    engine = FakeEngine()
    with make_client(engine=engine) as client:
        wait_for_status(client, "healthy")
        png = ("d.png", diagram_png(), "image/png")
        two = client.post("/infer", files=[("file", png), ("file", png)])
        assert two.status_code == 400 and "one file per request (2 file parts" in two.json()["error"]["message"]
        typo = client.post("/infer", files={"file": png}, data={"max_tokens": "5"})
        assert typo.status_code == 400 and "max_tokens" in typo.json()["error"]["message"]
        assert engine.prefills == 0  # neither reached the model
        assert post_png(client, prompt="", page="1").status_code == 200


BPMN = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL" id="d1">
  <bpmn:process id="p1">
    <bpmn:laneSet><bpmn:lane id="l1" name="Менеджер"><bpmn:flowNodeRef>t1</bpmn:flowNodeRef></bpmn:lane>
      <bpmn:lane id="l2" name="Юрист"><bpmn:flowNodeRef>t2</bpmn:flowNodeRef></bpmn:lane></bpmn:laneSet>
    <bpmn:startEvent id="s"/>
    <bpmn:task id="t2" name="Проверить документы"/>
    <bpmn:userTask id="t1" name="Принять заявку"/>
    <bpmn:sequenceFlow id="f1" sourceRef="s" targetRef="t1"/>
    <bpmn:sequenceFlow id="f2" sourceRef="t1" targetRef="t2"/>
  </bpmn:process>
</bpmn:definitions>""".encode()


def test_a_bpmn_file_is_answered_from_the_xml_without_the_model():
    engine = FakeEngine()
    with make_client(engine=engine) as client:
        wait_for_status(client, "healthy")
        response = client.post("/infer", files={"file": ("order.bpmn", BPMN, "application/xml")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["rows"] == [{"number": "1", "action": "Принять заявку", "role": "Менеджер"},
                                {"number": "2", "action": "Проверить документы", "role": "Юрист"}]
        assert body["description"].splitlines()[2] == "| 1 | Принять заявку | Менеджер |"
        meta = body["metadata"]
        assert meta["source_format"] == "BPMN" and meta["model"] is None and meta["completion_tokens"] == 0
        csv = client.post("/infer", files={"file": ("order.bpmn", BPMN, "application/xml")}, data={"format": "csv"})
        assert csv.text.splitlines()[1] == "1,Принять заявку,Менеджер"
        assert engine.prefills == 0  # the model never ran


@pytest.mark.parametrize("declaration", [
    '<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>',
    '<!DOCTYPE d [<!ENTITY secret SYSTEM "file:///etc/passwd">]>',
], ids=["billion-laughs", "external-entity"])
def test_a_bpmn_file_with_entities_is_refused(declaration):
    prolog = f'<?xml version="1.0"?>\n{declaration}\n'.encode()
    hostile = BPMN.replace(b'<?xml version="1.0" encoding="UTF-8"?>\n', prolog)
    hostile = hostile.replace("Принять заявку".encode(), b"&lol3;")
    with make_client() as client:
        wait_for_status(client, "healthy")
        response = client.post("/infer", files={"file": ("x.bpmn", hostile, "application/xml")})
        assert response.status_code == 400 and "DOCTYPE" in response.json()["error"]["message"]
        broken = client.post("/infer", files={"file": ("x.bpmn", BPMN[:-20], "application/xml")})
        assert broken.status_code == 400 and "BPMN XML" in broken.json()["error"]["message"]
