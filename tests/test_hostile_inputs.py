"""A hostile tester's findings on SVG, BPMN, /v1 URLs, CSV and the decoder pool: each one a test that failed
before its fix."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import resource
import time

import pytest

from app.pipeline.decode_pool import DecoderPool
from app.pipeline.imaging import VisionGeometry

from .helpers import FakeEngine, diagram_png, wait_for_status
from .hostile import hostile_decode
from .test_http import make_client

SVG_NS = 'xmlns="http://www.w3.org/2000/svg"'
BPMN_NS = 'xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"'
GEOMETRY = VisionGeometry(factor=32, min_pixels=64 * 64, max_pixels=32 * 32 * 64)


def post(client, data: bytes, name: str = "d.svg", mime: str = "image/svg+xml", **form):
    return client.post("/infer", files={"file": (name, data, mime)}, data=form)


@pytest.fixture(scope="module")
def client():
    with make_client(FakeEngine()) as client:
        wait_for_status(client, "healthy")
        yield client


def test_a_deeply_nested_svg_is_a_400_not_a_500_or_a_dead_decoder(client):
    for depth in (500, 1000, 5000):
        nested = f'<svg {SVG_NS} width="100" height="100">' + "<g>" * depth + "</g>" * depth + "</svg>"
        response = post(client, nested.encode())
        assert response.status_code == 400 and "deep" in response.json()["error"]["message"], response.text
    assert post(client, diagram_png(), "d.png", "image/png").status_code == 200


@pytest.mark.parametrize("size", ['width="1e-300" height="1e-300"', 'width="1e-300" height="100"',
                                  'width="0.0000001" height="0.0000001"'])
def test_an_svg_with_a_vanishing_size_is_a_400(client, size):
    response = post(client, f'<svg {SVG_NS} {size}><rect width="1" height="1"/></svg>'.encode())
    assert response.status_code == 400 and "no area" in response.json()["error"]["message"], response.text


def bpmn(doctype: str = "", name: str = "Принять заявку") -> str:
    return (f'<?xml version="1.0" encoding="UTF-16"?>{doctype}<bpmn:definitions {BPMN_NS} id="d">'
            f'<bpmn:process id="p"><bpmn:startEvent id="s"/><bpmn:task id="t" name="{name}"/>'
            '<bpmn:sequenceFlow id="f" sourceRef="s" targetRef="t"/></bpmn:process></bpmn:definitions>')


def test_a_utf16_bpmn_is_read_and_its_doctype_refused(client):
    honest = post(client, bpmn().encode("utf-16-le"), "d.bpmn", "application/xml")
    assert honest.status_code == 200 and honest.json()["rows"][0]["action"] == "Принять заявку"
    assert post(client, bpmn().encode("utf-16"), "d.bpmn", "application/xml").status_code == 200  # with a BOM
    planted = bpmn('<!DOCTYPE d [<!ENTITY e "INJECTED">]><!-- http://www.omg.org/spec/BPMN/20100524/MODEL -->',
                   name="&e;")
    refused = post(client, planted.encode("utf-16-le"), "d.bpmn", "application/xml")
    assert refused.status_code == 400 and "DOCTYPE" in refused.json()["error"]["message"], refused.text
    assert "INJECTED" not in refused.text


def test_xml_with_the_bpmn_namespace_only_in_a_comment_is_not_bpmn(client):
    fake = '<!-- http://www.omg.org/spec/BPMN/20100524/MODEL --><definitions id="x"><task name="t"/></definitions>'
    assert post(client, fake.encode(), "d.bpmn", "application/xml").status_code == 415


def test_a_bpmn_file_that_expands_to_a_huge_table_is_a_413_quickly_with_flat_memory(client):
    name = "x" * 30_000  # one long task name, copied by each call of the process that holds it
    calls = "".join(f'<bpmn:callActivity id="c{number}" calledElement="inner"/>' for number in range(1000))
    shapes = "".join(f'<bpmndi:BPMNShape bpmnElement="c{number}" isExpanded="true"/>' for number in range(1000))
    data = (f'<bpmn:definitions {BPMN_NS} xmlns:bpmndi="http://www.omg.org/spec/BPMN/20100524/DI" id="d">'
            f'<bpmn:process id="inner"><bpmn:task id="t" name="{name}"/></bpmn:process>'
            f'<bpmn:process id="main">{calls}</bpmn:process><bpmndi:BPMNDiagram><bpmndi:BPMNPlane>{shapes}'
            '</bpmndi:BPMNPlane></bpmndi:BPMNDiagram></bpmn:definitions>').encode()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    response = post(client, data, "d.bpmn", "application/xml")
    assert response.status_code == 413 and "characters" in response.json()["error"]["message"], response.text[:300]
    assert time.monotonic() - started < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: under 200 MB grown


def test_a_join_lists_the_branch_that_flows_into_the_other_first(client):
    data = (f'<bpmn:definitions {BPMN_NS} id="d"><bpmn:process id="p"><bpmn:startEvent id="s"/>'
            '<bpmn:parallelGateway id="g"/><bpmn:task id="a" name="A"/><bpmn:task id="b" name="B"/>'
            '<bpmn:sequenceFlow id="f0" sourceRef="s" targetRef="g"/>'
            '<bpmn:sequenceFlow id="f1" sourceRef="g" targetRef="a"/>'
            '<bpmn:sequenceFlow id="f2" sourceRef="g" targetRef="b"/>'
            '<bpmn:sequenceFlow id="f3" sourceRef="b" targetRef="a"/></bpmn:process></bpmn:definitions>').encode()
    rows = post(client, data, "d.bpmn", "application/xml").json()["rows"]
    assert [row["action"] for row in rows] == ["B", "A"]


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(client):
    data = (f'<bpmn:definitions {BPMN_NS} id="d"><bpmn:process id="p"><bpmn:laneSet><bpmn:lane id="l" '
            'name="@SUM(1+1)"><bpmn:flowNodeRef>t</bpmn:flowNodeRef></bpmn:lane></bpmn:laneSet>'
            '<bpmn:startEvent id="s"/><bpmn:task id="t" name="=HYPERLINK(&quot;http://x&quot;)"/>'
            '<bpmn:sequenceFlow id="f" sourceRef="s" targetRef="t"/></bpmn:process></bpmn:definitions>').encode()
    text = post(client, data, "d.bpmn", "application/xml", format="csv").text
    assert "'=HYPERLINK" in text and "'@SUM(1+1)" in text and "\n=" not in text and ",=" not in text


def test_health_reports_the_processor_and_no_provisional_dtype():
    with make_client(FakeEngine(), load_s=1.0) as loading:
        early = loading.get("/health").json()
        assert early["status"] == "loading" and early["dtype"] is None and early["processor_loaded"] is False
        ready = wait_for_status(loading, "healthy")
        assert ready["processor_loaded"] is True and ready["dtype"] == "float32"


@pytest.mark.parametrize("url", ["http://[::1/x.png", "http://ex ample.com/x.png", "http://example.com/\x07.png",
                                 "http://example.com:99999/x.png", "http://[::1]:80\r\nX: y/x.png"])
def test_malformed_image_urls_are_400_on_v1(url):
    with make_client(FakeEngine(), allowed_image_hosts="example.com,[::1]") as client:
        wait_for_status(client, "healthy")
        body = {"model": client.get("/v1/models").json()["data"][0]["id"], "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text


def test_a_stream_read_to_its_end_logs_no_abandonment(caplog):
    caplog.set_level(logging.INFO, logger="app.http.disconnect")
    with make_client(FakeEngine()) as client:
        wait_for_status(client, "healthy")
        url = "data:image/png;base64," + base64.b64encode(diagram_png()).decode()
        body = {"model": client.get("/v1/models").json()["data"][0]["id"], "stream": True,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
    assert not [record for record in caplog.records if "abandoned" in record.getMessage()]


def test_files_that_kill_their_decoder_do_not_break_other_requests_decoding():
    pool = DecoderPool(2, decode=hostile_decode)

    async def scenario() -> list:
        await pool.warm()
        stop = asyncio.Event()

        async def attacker() -> None:
            while not stop.is_set():
                with pytest.raises(Exception):
                    await pool.prepare(b"CRASH", GEOMETRY, page=1, max_decoded_pixels=10_000_000, timeout_s=20)

        attackers = [asyncio.create_task(attacker()) for _ in range(2)]
        outcomes = []
        for _ in range(12):
            try:
                outcomes.append((await pool.prepare(diagram_png(), GEOMETRY, page=1, max_decoded_pixels=10_000_000,
                                                    timeout_s=30)).source_format)
            except Exception as error:  # noqa: BLE001 - what the legitimate client would have been answered
                outcomes.append(type(error).__name__)
        stop.set()
        await asyncio.gather(*attackers, return_exceptions=True)
        return outcomes

    try:
        started = time.monotonic()
        outcomes = asyncio.run(scenario())
        assert outcomes == ["PNG"] * 12 and time.monotonic() - started < 120, outcomes
    finally:
        pool.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_a_huge_request_head_is_a_431_with_flat_memory_and_dripping_bodies_cannot_crowd_out_probes(tiny_model_dir):
    import socket

    import httpx

    from .test_server import running_server

    with running_server(tiny_model_dir, MAX_CONNECTIONS="16", UPLOAD_TIMEOUT_S="3", WARMUP="false") as (base, server):
        port = int(base.rsplit(":", 1)[1])
        before = rss_kib(server.pid)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(10)
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 * 2 ** 20))
            except OSError:
                pass  # the server closed on us once it had seen enough: what it should do
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
        assert rss_kib(server.pid) - before < 50 * 1024
        with socket.create_connection(("127.0.0.1", port)) as sock:  # not HTTP: the envelope, not plain text
            sock.settimeout(10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\x01: y\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, answer[:300]
        assert json.loads(body)["error"]["type"] == "invalid_request"
        metrics = httpx.get(f"{base}/metrics", params={"format": "text"}, timeout=5).text
        for status in ("400", "431"):  # counted like any request, though no route saw them
            assert f'vlm_requests_total{{endpoint="other",status="{status}"}} 1.0' in metrics, status
        drippers = []
        for _ in range(40):  # far past MAX_CONNECTIONS, each a GET whose chunked body never ends
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
            drippers.append(sock)
        started = time.monotonic()
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 5
        time.sleep(3 + 5 + 1)  # UPLOAD_TIMEOUT_S + the margin: no body of any route drips longer
        still_open = 0
        for sock in drippers:
            sock.settimeout(0.5)
            try:
                while sock.recv(65536):  # whatever it was answered, then the server's close
                    pass
            except TimeoutError:
                still_open += 1
            except OSError:
                pass  # reset: closed as well
            finally:
                sock.close()
        assert still_open == 0
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200


def test_small_contracts_page_numbers_digits_and_metrics_formats(client):
    data = bpmn().encode("utf-8").replace(b'encoding="UTF-16"', b'encoding="UTF-8"')
    for form in ({"page": "2"}, {"pages": "2-3"}):
        refused = post(client, data, "d.bpmn", "application/xml", **form)
        assert refused.status_code == 400 and "BPMN" in refused.json()["error"]["message"], refused.text
    assert post(client, data, "d.bpmn", "application/xml", pages="all").status_code == 200
    assert post(client, diagram_png(), "d.png", "image/png", pages="٣").status_code == 400  # an Arabic-Indic 3
    text = client.get("/metrics", params={"format": "text"})
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    openmetrics = client.get("/metrics", params={"format": "openmetrics"})
    assert openmetrics.status_code == 200
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")


def test_a_missing_adapter_is_reported_before_the_base_model_is_fetched(tmp_path):
    from app.errors import ModelLoadError
    from app.model.device import Placement
    from app.model.loader import load_model
    from app.settings import Settings

    import torch

    settings = Settings(base_model_id="Qwen/Qwen3-VL-2B-Instruct", adapter_path=tmp_path, device="cpu",
                        torch_dtype="float32")
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="no adapter at"):
        load_model(settings, Placement("cpu", torch.float32))
    assert time.monotonic() - started < 2  # no Hub lookups first
