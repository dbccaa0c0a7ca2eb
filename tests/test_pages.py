"""Several pages of a PDF or TIFF in one request: an entry per page, the rows joined with their page numbers,
pages generated side by side, MAX_PAGES, and a page that fails without failing the others."""

from __future__ import annotations

import io

from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from app.errors import InvalidImageError
from app.http.app import create_app
from app.service.inference import InferenceService
from app.settings import Settings

from .helpers import FakeEngine, diagram_png, fake_factory, wait_for_status


def document(pages: int, fmt: str = "PDF") -> bytes:
    images = []
    for number in range(pages):
        image = Image.new("RGB", (400, 300), "white")
        ImageDraw.Draw(image).rectangle((20 + 8 * number, 20, 200 + 8 * number, 120), outline="black", width=3)
        images.append(image)
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt, save_all=True, append_images=images[1:])
    return buffer.getvalue()


def client_with(engine: FakeEngine | None = None, **settings) -> TestClient:
    service = InferenceService(Settings(**settings), engine_factory=fake_factory(engine or FakeEngine()))
    return TestClient(create_app(service=service), raise_server_exceptions=False)


def post(client, data: bytes, name: str = "doc.pdf", **form):
    return client.post("/infer", files={"file": (name, data, "application/octet-stream")}, data=form)


def test_all_pages_of_a_pdf_give_an_entry_each_and_rows_with_page_numbers():
    engine = FakeEngine(generate_s=0.3)
    with client_with(engine) as client:
        wait_for_status(client, "healthy")
        body = post(client, document(3), pages="all").json()
        assert [entry["page"] for entry in body["pages"]] == [1, 2, 3]
        assert all(entry["rows"] and entry["error"] is None for entry in body["pages"])
        assert [row["page"] for row in body["rows"]] == [1, 2, 3]
        assert body["rows"][0] == {"number": "1", "action": "Принять заявку", "role": "Менеджер", "page": 1}
        assert len(body["table"]["rows"]) == 3
        assert body["metadata"]["page_count"] == 3
        assert body["metadata"]["completion_tokens"] == sum(e["metadata"]["completion_tokens"] for e in body["pages"])
        assert max(engine.rows_per_step) >= 2  # the pages were decoded side by side, not one after another
        csv = post(client, document(3), pages="2-3", format="csv").text.splitlines()
        assert len(csv) == 3  # the header and the rows of pages 2 and 3


def test_one_page_keeps_the_single_page_answer_and_reports_the_page_count():
    with client_with() as client:
        wait_for_status(client, "healthy")
        body = post(client, document(3), pages="2").json()
        assert body["pages"] is None and "page" not in body["rows"][0]
        assert body["metadata"]["page_count"] == 3
        assert post(client, diagram_png(), name="d.png").json()["metadata"]["page_count"] == 1


def test_pages_past_the_end_or_over_max_pages_are_refused():
    engine = FakeEngine()
    with client_with(engine, max_pages=2) as client:
        wait_for_status(client, "healthy")
        past = post(client, document(3), pages="2-9")
        assert past.status_code == 400 and "has 3 page(s)" in past.json()["error"]["message"]
        over = post(client, document(3), pages="all")
        assert over.status_code == 413 and "MAX_PAGES" in over.json()["error"]["message"]
        assert "3" in over.json()["error"]["message"]
        both = post(client, document(3), page="2", pages="1-2")
        assert both.status_code == 400
        assert post(client, document(3), pages="two").status_code == 400


def test_a_two_page_tiff():
    with client_with() as client:
        wait_for_status(client, "healthy")
        body = post(client, document(2, "TIFF"), name="scan.tiff", pages="all").json()
        assert [entry["page"] for entry in body["pages"]] == [1, 2] and body["metadata"]["source_format"] == "TIFF"
        assert post(client, document(2, "TIFF"), name="scan.tiff", page="2").status_code == 200


def test_a_page_that_fails_says_so_and_the_others_answer():
    engine = FakeEngine()
    original = engine.prepare
    calls = []

    def prepare(image, prompt, system=None):
        calls.append(image)
        if len(calls) == 2:
            raise InvalidImageError("this page cannot be read")
        return original(image, prompt)

    engine.prepare = prepare
    with client_with(engine) as client:
        wait_for_status(client, "healthy")
        response = post(client, document(3), pages="all")
        body = response.json()
        assert response.status_code == 200
        errors = [entry["error"] for entry in body["pages"]]
        assert sum(error is not None for error in errors) == 1
        assert next(e for e in errors if e)["message"] == "this page cannot be read"
        assert len(body["rows"]) == 2 and "have no answer" in body["table_error"]
