"""The table parser on what models really emit, and the repetition guard on hand-written token runs."""

from __future__ import annotations

import pytest

from app.pipeline.repetition import RepetitionGuard
from app.pipeline.table import TableNotFoundError, parse_table, to_csv, to_markdown

CLEAN = "| № | Наименование действия | Роль |\n|---|---|---|\n| 1 | Принять заявку | Менеджер |\n" \
        "| 2 | Проверить документы | Юрист |"
EXPECTED = [["1", "Принять заявку", "Менеджер"], ["2", "Проверить документы", "Юрист"]]

VARIANTS = {
    "clean": CLEAN,
    "no outer pipes": "№ | Наименование действия | Роль\n---|---|---\n1 | Принять заявку | Менеджер\n"
                      "2 | Проверить документы | Юрист",
    "extra whitespace": "|  №  |   Наименование действия |Роль|\n| :--- | :---: | ---: |\n"
                        "|   1|  Принять заявку   | Менеджер |\n|2 | Проверить документы|Юрист   |",
    "code fence and prose": "Вот таблица:\n```markdown\n" + CLEAN + "\n```\nГотово.",
    "prose after": CLEAN + "\n\nВсего 2 действия.",
    "no separator": "| № | Наименование действия | Роль |\n| 1 | Принять заявку | Менеджер |\n"
                    "| 2 | Проверить документы | Юрист |",
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_parse_to_the_same_rows(name):
    table = parse_table(VARIANTS[name])
    assert table.columns == ["№", "Наименование действия", "Роль"]
    assert table.rows == EXPECTED
    assert table.records == [{"number": "1", "action": "Принять заявку", "role": "Менеджер"},
                             {"number": "2", "action": "Проверить документы", "role": "Юрист"}]


def test_escaped_pipe_stays_in_the_cell():
    table = parse_table("| # | Action | Role |\n|---|---|---|\n| 1 | Check A \\| B | Clerk |")
    assert table.rows == [["1", "Check A | B", "Clerk"]]
    assert table.records[0]["action"] == "Check A | B"
    assert "\\|" in to_markdown(table.columns, table.rows)


def test_english_headers_are_recognized():
    table = parse_table("| Step | Activity | Performer |\n|---|---|---|\n| 1 | Submit form | Customer |")
    assert table.records == [{"number": "1", "action": "Submit form", "role": "Customer"}]


def test_missing_header_gets_default_columns():
    table = parse_table("| 1 | Принять заявку | Менеджер |\n| 2 | Проверить документы | Юрист |")
    assert table.columns == ["№", "Наименование действия", "Роль"] and table.rows == EXPECTED
    assert table.warnings


def test_unrecognized_columns_give_rows_but_no_records():
    table = parse_table("| a | b |\n|---|---|\n| 1 | 2 |")
    assert table.rows == [["1", "2"]] and table.records is None


def test_truncated_answer_drops_the_incomplete_last_row():
    cut = CLEAN + "\n| 3 | Согласовать дог"
    table = parse_table(cut, truncated=True)
    assert table.truncated and table.dropped_incomplete_row
    assert table.rows == EXPECTED


def test_truncated_answer_keeps_a_complete_last_row():
    table = parse_table(CLEAN, truncated=True)
    assert table.truncated and not table.dropped_incomplete_row and table.rows == EXPECTED


def test_short_and_long_rows_are_fitted_to_the_header():
    table = parse_table("| № | Действие | Роль |\n|---|---|---|\n| 1 | Принять |\n| 2 | A | B | C |")
    assert table.rows == [["1", "Принять", ""], ["2", "A", "B | C"]]


@pytest.mark.parametrize("text", ["", "Диаграмма не распознана.", "a | b"])
def test_no_table(text):
    with pytest.raises(TableNotFoundError):
        parse_table(text)


def test_csv_quotes_cells():
    assert to_csv(["a", "b"], [["1", "x, y"]]) == 'a,b\n1,"x, y"\n'


GUARD = RepetitionGuard()


@pytest.mark.parametrize("tokens, tripped", [
    ([7] * 60, True),  # "<<<<<<<<…"
    ([1, 2] * 30, True),
    (list(range(20)) * 4, True),  # the same 20-token row four times
    (list(range(20)) * 2, False),  # twice is not degenerate
    ([5, 9] * 6 + list(range(100, 160)), False),  # a separator row, then varied text
    ([5] * 30, False),  # under the minimum span
    ([i % 7 + (i // 7) * 10 for i in range(200)], False),  # rows that differ in a number
])
def test_repetition_guard(tokens, tripped):
    assert GUARD.tripped(tokens) is tripped
