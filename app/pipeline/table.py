"""Markdown table -> rows, tolerant of what models really emit. No torch, no web imports.

Handles missing outer pipes, a missing separator row, extra whitespace, escaped pipes, a code fence
around the table and text before or after it.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field

_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_SEPARATOR_CELL = re.compile(r"^:?-{1,}:?$")
_NUMBER = re.compile(r"^\d+[.)]?$")
# Header words (normalized: lower case, ё -> е, no punctuation) that identify each column.
NUMBER_HEADERS = ("№", "#", "no", "n", "num", "number", "номер", "п/п", "№ п/п", "nn", "пп")
ACTION_WORDS = ("действ", "наименование", "шаг", "операц", "задач", "этап", "action", "step", "activity",
                "task", "name")
ROLE_WORDS = ("роль", "исполнител", "ответствен", "участник", "role", "actor", "performer", "lane",
              "responsible", "owner")
DEFAULT_COLUMNS = ["№", "Наименование действия", "Роль"]


class TableNotFoundError(ValueError):
    """The text holds no markdown table."""


@dataclass
class ParsedTable:
    columns: list[str]
    rows: list[list[str]]
    records: list[dict[str, str]] | None = None  # number/action/role, when the columns are recognized
    truncated: bool = False  # the answer was cut at max_new_tokens
    dropped_incomplete_row: bool = False
    warnings: list[str] = field(default_factory=list)


def normalize_header(text: str) -> str:
    return re.sub(r"[^\w№#/ ]+", "", text.lower().replace("ё", "е")).strip()


def split_row(line: str) -> list[str]:
    """Cells of one table line; outer pipes optional, ``\\|`` is a literal pipe inside a cell."""
    stripped = line.strip()
    if stripped.startswith("|"):
        stripped = stripped[1:]
    if stripped.endswith("|") and not stripped.endswith("\\|"):
        stripped = stripped[:-1]
    return [cell.strip().replace("\\|", "|") for cell in _CELL_SPLIT.split(stripped)]


def _is_separator(cells: list[str]) -> bool:
    return all(_SEPARATOR_CELL.match(cell.replace(" ", "")) for cell in cells) and any(cells)


def _table_lines(text: str) -> list[str]:
    """The first run of table-like lines, code fences and surrounding prose removed."""
    lines = [line for line in text.splitlines() if not line.strip().startswith("```")]
    block: list[str] = []
    for line in lines:
        if len(_CELL_SPLIT.findall(line)) >= 1 and len(split_row(line)) >= 2:
            block.append(line)
        elif block and line.strip():
            break  # prose after the table ends it
    return block


def column_roles(columns: list[str], rows: list[list[str]] | None = None) -> dict[str, int]:
    """Which column holds the number, the action and the role: by header words, and for the number also
    by content (a "Step" column holding 1, 2, 3 is the number, not the action)."""
    found: dict[str, int] = {}

    def numeric(index: int) -> bool:
        values = [row[index] for row in rows or [] if index < len(row) and row[index]]
        return bool(values) and all(_NUMBER.match(value) for value in values)

    for index, column in enumerate(columns):
        header = normalize_header(column)
        if "number" not in found and (header in NUMBER_HEADERS or header.startswith("№") or numeric(index)):
            found["number"] = index
        elif "role" not in found and any(word in header for word in ROLE_WORDS):
            found["role"] = index
        elif "action" not in found and any(word in header for word in ACTION_WORDS):
            found["action"] = index
    return found


def parse_table(text: str, *, truncated: bool = False) -> ParsedTable:
    """Parse the first markdown table in ``text``. ``truncated``: the generation hit its token cap."""
    block = _table_lines(text)
    if len(block) < 2:  # one line with a pipe is prose, not a table
        raise TableNotFoundError("no markdown table found in the model's answer")
    raw_rows = [split_row(line) for line in block]
    warnings: list[str] = []
    if len(raw_rows) > 1 and _is_separator(raw_rows[1]):
        columns, body = raw_rows[0], raw_rows[2:]
    elif _NUMBER.match(raw_rows[0][0]) and len(raw_rows[0]) == len(DEFAULT_COLUMNS):
        columns, body = list(DEFAULT_COLUMNS), raw_rows
        warnings.append("no header row; assumed the default columns")
    else:
        columns, body = raw_rows[0], raw_rows[1:]
        warnings.append("no separator row")
    body = [cells for cells in body if not _is_separator(cells)]
    width = len(columns)
    dropped = False
    if truncated and body:
        last_line = block[-1].rstrip()
        closed = last_line.endswith("|") or not block[0].rstrip().endswith("|")
        if len(body[-1]) < width or not closed:
            body = body[:-1]
            dropped = True
    rows = [_fit(cells, width) for cells in body if any(cells)]
    roles = column_roles(columns, rows)
    records = None
    if "action" in roles and "role" in roles:
        records = [
            {
                "number": row[roles["number"]] if "number" in roles else str(index),
                "action": row[roles["action"]],
                "role": row[roles["role"]],
            }
            for index, row in enumerate(rows, start=1)
        ]
    return ParsedTable(columns, rows, records, truncated, dropped, warnings)


def _fit(cells: list[str], width: int) -> list[str]:
    """Pad a short row; fold the overflow of a long one into its last cell."""
    if len(cells) < width:
        return cells + [""] * (width - len(cells))
    if len(cells) > width:
        return cells[: width - 1] + [" | ".join(cells[width - 1:])]
    return cells


def to_markdown(columns: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(columns), "|" + "---|" * len(columns)] + [line(row) for row in rows]) + "\n"


# OWASP's CSV injection advice: a cell a spreadsheet would read as a formula (or a DDE call) starts with a quote,
# which makes it text. Diagram labels such as "-> approve" or "=total" keep their text, visibly prefixed.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _neutralised(cell: str) -> str:
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell


def to_csv(columns: list[str], rows: list[list[str]]) -> str:
    """The table as CSV, every cell safe to open in a spreadsheet (see _FORMULA_STARTS)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([_neutralised(cell) for cell in columns])
    writer.writerows([_neutralised(cell) for cell in row] for row in rows)
    return buffer.getvalue()
