"""examples/: the files the README's commands send, made by tools/make_examples.py, answer as the README says."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.make_examples import bpmn, svg

from .helpers import FakeEngine, wait_for_status
from .test_http import make_client

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROWS = [{"number": "1", "action": "Принять заказ", "role": "Менеджер"},
        {"number": "2", "action": "Проверить наличие", "role": "Склад"},
        {"number": "3", "action": "Выставить счёт", "role": "Бухгалтер"},
        {"number": "4", "action": "Отгрузить товар", "role": "Склад"}]


@pytest.fixture(scope="module")
def client():
    with make_client(FakeEngine()) as client:
        wait_for_status(client, "healthy")
        yield client


def post(client, name: str, **form):
    return client.post("/infer", files={"file": (name, (EXAMPLES / name).read_bytes())}, data=form)


def test_the_text_examples_are_what_the_script_writes():
    assert (EXAMPLES / "order-process.bpmn").read_text() == bpmn()
    assert (EXAMPLES / "order-process.svg").read_text() == svg()


def test_the_bpmn_example_gives_the_real_table(client):
    response = post(client, "order-process.bpmn")
    assert response.status_code == 200 and response.json()["rows"] == ROWS
    markdown = post(client, "order-process.bpmn", format="markdown")
    assert markdown.status_code == 200 and "| 3 | Выставить счёт | Бухгалтер |" in markdown.text


@pytest.mark.parametrize("name, source_format", [("order-process.png", "PNG"), ("order-process.svg", "SVG"),
                                                 ("order-process.pdf", "PDF")])
def test_the_pictures_reach_the_model(client, name, source_format):
    response = post(client, name, **({"pages": "all"} if name.endswith(".pdf") else {}))
    assert response.status_code == 200, response.text
    body = response.json()
    if name.endswith(".pdf"):
        assert [page["page"] for page in body["pages"]] == [1, 2]
    else:
        assert body["metadata"]["source_format"] == source_format
