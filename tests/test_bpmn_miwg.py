"""The BPMN reader against the BPMN Model Interchange Working Group's reference models: real exports with
pools, lanes, boundary events, expanded and collapsed sub-processes and call activities.

The suite is not vendored (https://github.com/bpmn-miwg/bpmn-miwg-test-suite, CC BY 3.0): point MIWG_SUITE at
a checkout to run these; without it they are skipped. The expected rows are what each reference diagram shows,
read off the diagram, in the reader's order (breadth first along the flows).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.pipeline.bpmn import ExpectedRow, parse_bpmn

SUITE = Path(os.environ.get("MIWG_SUITE", "")) if os.environ.get("MIWG_SUITE") else None
A = "A - Fixed Digrams with Variations of Attributes/Reference"
B = "B - Validate that tool covers conformance class set/Reference"


def rows(role: str, *actions: str) -> list[ExpectedRow]:
    return [ExpectedRow(action, role) for action in actions]


EXPECTED = {
    f"{A}/A.1.0.bpmn": rows("", "Task 1", "Task 2", "Task 3"),  # no pool, no lanes: no role to read
    f"{A}/A.2.0.bpmn": rows("", "Task 1", "Task 2", "Task 3", "Task 4"),  # a split gateway's branches in order
    # Tasks 3 and 4 hang off boundary events of the collapsed sub-process.
    f"{A}/A.3.0.bpmn": rows("", "Task 1", "Collapsed Sub-Process", "Task 2", "Task 3", "Task 4"),
    # A pool, then a lane-only process whose expanded sub-processes each hold one task.
    f"{A}/A.4.0.bpmn": rows("Pool", "Task 1", "Task 2")
    + rows("Lane 1", "Task 3", "Expanded Sub-Process 1", "Task 4")
    + rows("Lane 2", "Expanded Sub-Process 2", "Task 6")
    + rows("Lane 1", "Task 5"),
    # Two pools; an expanded call activity shows its called process, a collapsed one does not.
    f"{B}/B.1.0.bpmn": rows("Participant", "Abstract Task 1", "User Task 2", "Service Task 3")
    + rows("Lane 2", "User Task 5")
    + rows("Lane 1", "Call Activity Collapsed", "Call Activity Calling a Global Task")
    + rows("Lane 2", "Collapsed Sub-Process", "Service Task 7")
    + rows("Lane 1", "Call Activity - Expanded", "Abstract Task 4")
    + rows("Lane 2", "Sub Process - Expanded", "Abstract Task 6"),
}


@pytest.mark.skipif(SUITE is None, reason="MIWG_SUITE (a checkout of bpmn-miwg-test-suite) is not set")
@pytest.mark.parametrize("path", sorted(EXPECTED), ids=lambda path: Path(path).stem)
def test_reference_model(path):
    assert parse_bpmn((SUITE / path).read_bytes()) == EXPECTED[path]
