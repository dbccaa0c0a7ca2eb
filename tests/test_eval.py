"""The evaluation command against a running app (fake engine with a known answer), and response formats."""

from __future__ import annotations

import csv
import json

import pytest
from fastapi.testclient import TestClient

from app.http.app import create_app
from app.pipeline.bpmn import ExpectedRow
from app.service.inference import InferenceService
from app.settings import Settings
from tools.eval import evaluate, format_report, read_expected, score_rows

from .helpers import FakeEngine, diagram_png, fake_factory, wait_for_status
from .test_bpmn import LANES

ANSWER = ("Вот таблица:\n| № | Наименование действия | Роль |\n|---|---|---|\n"
          "| 1 | Принять заявку | Менеджер |\n| 2 | Проверить документы | Юрист |\n"
          "| 3 | Выставить счёт | Бухгалтер |")


@pytest.fixture()
def client():
    service = InferenceService(Settings(), engine_factory=fake_factory(FakeEngine(text=ANSWER)))
    with TestClient(create_app(service=service)) as client:
        wait_for_status(client, "healthy")
        yield client


def test_response_carries_the_parsed_table(client):
    body = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")}).json()
    assert body["description"] == ANSWER  # the raw answer, unchanged
    assert body["table"]["columns"] == ["№", "Наименование действия", "Роль"]
    assert body["table"]["rows"][2] == ["3", "Выставить счёт", "Бухгалтер"]
    assert body["rows"][0] == {"number": "1", "action": "Принять заявку", "role": "Менеджер"}
    assert body["table_error"] is None and body["table"]["truncated"] is False


@pytest.mark.parametrize("how, media_type", [
    ({"data": {"format": "markdown"}}, "text/markdown"),
    ({"headers": {"Accept": "text/markdown"}}, "text/markdown"),
    ({"data": {"format": "csv"}}, "text/csv"),
    ({"headers": {"Accept": "text/csv"}}, "text/csv"),
])
def test_markdown_and_csv_formats(client, how, media_type):
    response = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")}, **how)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    text = response.text
    if media_type == "text/csv":
        rows = list(csv.reader(text.splitlines()))
        assert rows[0] == ["№", "Наименование действия", "Роль"] and rows[1][1] == "Принять заявку"
    else:
        assert text.startswith("| № | Наименование действия | Роль |\n|---|---|---|\n| 1 | Принять заявку")
        assert "Вот таблица" not in text


def test_table_format_without_a_table_is_a_422():
    service = InferenceService(Settings(), engine_factory=fake_factory(FakeEngine(text="no table here")))
    with TestClient(create_app(service=service)) as client:
        wait_for_status(client, "healthy")
        body = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")}).json()
        assert body["table"] is None and body["rows"] is None and "no markdown table" in body["table_error"]
        response = client.post("/infer", files={"file": ("d.png", diagram_png(), "image/png")},
                               data={"format": "csv"})
        assert response.status_code == 422 and response.json()["error"]["type"] == "no_table"


def test_scores_count_fuzzy_one_to_one_matches():
    expected = [ExpectedRow("Принять заявку", "Менеджер"), ExpectedRow("Проверить документы", "Юрист"),
                ExpectedRow("Отправить уведомление", "Менеджер")]
    predicted = [ExpectedRow("Принять  заявку.", "менеджер"), ExpectedRow("Проверить документ", "Юрист"),
                 ExpectedRow("Выставить счёт", "Бухгалтер")]
    scores = score_rows(predicted, expected, threshold=0.8)
    assert (scores["actions"].matched, scores["actions"].predicted, scores["actions"].expected) == (2, 3, 3)
    assert (scores["roles"].matched, scores["roles"].predicted, scores["roles"].expected) == (2, 3, 2)
    assert scores["pairs"].matched == 2
    assert scores["roles"].recall == 1.0 and round(scores["roles"].precision, 3) == 0.667


def test_the_order_of_the_rows_is_scored_beside_f1():
    expected = [ExpectedRow(name, "R") for name in ("Принять", "Проверить", "Согласовать", "Отправить")]
    same = score_rows(list(expected), expected, threshold=0.8)["order"]
    assert (same.in_order, same.matched, same.as_dict()["ratio"]) == (4, 4, 1.0)
    swapped = [expected[0], expected[2], expected[1], expected[3]]  # F1 is perfect, the order is not
    scores = score_rows(swapped, expected, threshold=0.8)
    assert scores["actions"].f1 == 1.0 and (scores["order"].in_order, scores["order"].matched) == (3, 4)
    reversed_ = score_rows(expected[::-1], expected, threshold=0.8)["order"]
    assert reversed_.in_order == 1


def test_evaluate_a_folder_against_the_service(client, tmp_path):
    (tmp_path / "a.png").write_bytes(diagram_png())
    (tmp_path / "a.bpmn").write_text(LANES)
    (tmp_path / "b.png").write_bytes(diagram_png(200, 200))
    (tmp_path / "b.json").write_text(json.dumps([{"action": "Принять заявку", "role": "Менеджер"}]))
    (tmp_path / "c.jpg").write_bytes(diagram_png(fmt="JPEG"))
    (tmp_path / "c.csv").write_text("Наименование действия,Роль\nВыставить счет,Бухгалтер\n")
    (tmp_path / "d.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="300" height="100">'
                                    '<text x="10" y="50">Принять заявку</text></svg>')
    (tmp_path / "d.json").write_text(json.dumps([{"action": "Принять заявку", "role": "Менеджер"}]))
    (tmp_path / "no-truth.png").write_bytes(diagram_png())  # skipped: nothing to compare with
    report = evaluate("http://testserver", tmp_path, client=client, progress=False)
    assert [f["file"] for f in report["files"]] == ["a.png", "b.png", "c.jpg", "d.svg"]
    actions = report["overall"]["actions"]
    # a: 2 of 3 expected found (3 predicted); b, d: 1 of 1 (3 predicted); c: 1 of 1 (ё = е; 3 predicted)
    assert (actions["matched"], actions["predicted"], actions["expected"]) == (5, 12, 6)
    assert report["failed_requests"] == 0
    assert set(report["overall"]["order"]) == {"in_order", "matched", "ratio"} and "order:" in format_report(report)
    text = format_report(report)
    assert "overall" in text and "a.png" in text
    json.dumps(report)  # --json output is serializable


def test_read_expected_prefers_bpmn_and_rejects_unknown_csv_headers(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    assert read_expected(tmp_path / "x.png") is None
    (tmp_path / "x.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="action and a role"):
        read_expected(tmp_path / "x.png")
