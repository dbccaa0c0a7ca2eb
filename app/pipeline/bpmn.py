"""BPMN 2.0 XML -> the rows of the diagram's table: (action, role), in process order. /infer answers a BPMN
upload with them, without the model; the evaluation command uses them as the expected answer.

Tasks are the actions; the lane holding a task (the innermost one, for nested lanes) is its role, or the
pool (participant) when the process has no lanes. The order follows the sequence flows from the start
events, breadth first (a boundary event continues from the activity it is attached to); tasks no flow reaches
keep their document order at the end.

The rows are what the diagram shows: the tasks inside an expanded sub-process follow it, in the sub-process's
lane, unless the diagram draws it collapsed; a call activity drawn expanded shows the process it calls the same
way. A process that is only called (no pool of its own) is not listed by itself. Checked against the BPMN MIWG
reference models (tests/test_bpmn_miwg.py).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from app.errors import InvalidImageError
from app.pipeline.xml_upload import local_name, parse_upload

BPMN_NAMESPACE = b"http://www.omg.org/spec/BPMN/20100524/MODEL"
# A BPMN document needs no DTD: one is refused before parsing, so neither entity expansion (the "billion
# laughs") nor external references (files, URLs) can happen.
_DECLARATION = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)
_ROOT = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?definitions[\s>]")

TASK_TYPES = {
    "task", "userTask", "serviceTask", "manualTask", "scriptTask", "sendTask", "receiveTask",
    "businessRuleTask", "callActivity", "subProcess", "adHocSubProcess", "transaction",
}
SUB_PROCESS_TYPES = {"subProcess", "adHocSubProcess", "transaction"}
MAX_TASKS = 10_000


class TooManyTasksError(ValueError):
    pass


@dataclass(frozen=True)
class ExpectedRow:
    action: str
    role: str


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element if local_name(child.tag) == name]


def _name(element: ElementTree.Element) -> str:
    return " ".join((element.get("name") or "").split())


def _lane_roles(process: ElementTree.Element, fallback: str) -> dict[str, str]:
    """flow node id -> name of the innermost named lane containing it (or ``fallback``)."""
    roles: dict[str, str] = {}

    def walk(lane_set: ElementTree.Element, inherited: str) -> None:
        for lane in _children(lane_set, "lane"):
            role = _name(lane) or inherited
            for ref in _children(lane, "flowNodeRef"):
                roles[(ref.text or "").strip()] = role  # deeper lanes, visited later, override
            for child_set in _children(lane, "childLaneSet"):
                walk(child_set, role)

    for lane_set in _children(process, "laneSet"):
        walk(lane_set, fallback)
    return roles


def _flow_order(container: ElementTree.Element) -> list[ElementTree.Element]:
    """The tasks directly inside a process or sub-process, in flow order."""
    nodes = {node.get("id"): node for node in container if node.get("id")}
    tasks = [node for node in container if local_name(node.tag) in TASK_TYPES]
    successors: dict[str, list[str]] = {}
    for flow in _children(container, "sequenceFlow"):
        successors.setdefault(flow.get("sourceRef", ""), []).append(flow.get("targetRef", ""))
    for boundary in _children(container, "boundaryEvent"):  # no incoming flow: it leaves from its activity
        successors.setdefault(boundary.get("attachedToRef", ""), []).append(boundary.get("id", ""))
    queue = deque(node.get("id") for node in container if local_name(node.tag) == "startEvent")
    seen: set[str] = set(queue)
    order: list[ElementTree.Element] = []
    while queue:
        node_id = queue.popleft()
        node = nodes.get(node_id)
        if node is not None and local_name(node.tag) in TASK_TYPES:
            order.append(node)
        for target in successors.get(node_id, []):
            if target not in seen:
                seen.add(target)
                queue.append(target)
    reached = {id(node) for node in order}
    return order + [task for task in tasks if id(task) not in reached]


class _Document:
    """What the reading of one file needs beyond a process: the processes by id and how the diagram draws
    sub-processes and call activities (expanded or collapsed)."""

    def __init__(self, root: ElementTree.Element):
        self._rows_left = MAX_TASKS
        self._orders: dict[int, list[ElementTree.Element]] = {}  # a process called many times is ordered once
        self.processes = {process.get("id"): process for process in root
                          if local_name(process.tag) == "process" and process.get("id")}
        self.expanded: dict[str, bool] = {}
        for shape in root.iter():
            if local_name(shape.tag) == "BPMNShape" and shape.get("isExpanded") is not None:
                # The first diagram is the main one; later planes draw a collapsed sub-process's inside.
                self.expanded.setdefault(shape.get("bpmnElement", ""), shape.get("isExpanded") == "true")

    def inside(self, activity: ElementTree.Element) -> ElementTree.Element | None:
        """The container whose tasks the diagram shows inside ``activity``, if it shows any."""
        activity_id = activity.get("id", "")
        if local_name(activity.tag) in SUB_PROCESS_TYPES:
            return activity if self.expanded.get(activity_id, True) else None
        called = self.processes.get(activity.get("calledElement", "")) if local_name(activity.tag) == "callActivity" \
            else None
        return called if called is not None and self.expanded.get(activity_id, False) else None

    def tasks(self, container: ElementTree.Element, placed_by: str | None = None,
              visiting: frozenset[str] | None = None) -> list[tuple[ElementTree.Element, str]]:
        """(task, id of the top-level node whose lane it is in), nested tasks right after their parent."""
        visiting = visiting or frozenset({container.get("id", "")})
        rows = []
        order = self._orders.get(id(container))
        if order is None:
            order = self._orders[id(container)] = _flow_order(container)
        for task in order:
            lane_node = placed_by or task.get("id", "")
            rows.append((task, lane_node))
            self._rows_left -= 1
            if self._rows_left < 0:  # call activities can multiply a small file into millions of rows
                raise TooManyTasksError(f"the BPMN file expands to more than {MAX_TASKS} tasks")
            inner = self.inside(task)
            if inner is not None and inner.get("id", "") not in visiting:  # a process calling itself: shown once
                rows += self.tasks(inner, lane_node, visiting | {inner.get("id", "")})
        return rows


def looks_like_bpmn(data: bytes) -> bool:
    """XML whose root element is BPMN's ``definitions``, judged from the start of the file."""
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"<") and BPMN_NAMESPACE in head and _ROOT.search(head) is not None


def parse_bpmn(data: bytes) -> list[ExpectedRow]:
    """The rows of an uploaded BPMN file. Raises InvalidImageError (400) for a DTD, broken XML or a file too
    large to read."""
    root = parse_upload(data, "BPMN", _DECLARATION, "a DOCTYPE or entities")
    try:
        return _rows(root)
    except TooManyTasksError as error:
        raise InvalidImageError(str(error)) from None
    except RecursionError:
        raise InvalidImageError("the BPMN file nests sub-processes too deeply to read") from None


def expected_rows(source: str | bytes | Path) -> list[ExpectedRow]:
    """Rows of a BPMN file (path) or document (str/bytes). Unnamed tasks are skipped."""
    if isinstance(source, Path):
        source = source.read_bytes()
    return _rows(ElementTree.fromstring(source))


def _rows(root: ElementTree.Element) -> list[ExpectedRow]:
    document = _Document(root)
    pools: dict[str, str] = {}  # process id -> participant name, in the collaboration's order
    for participant in root.iter():
        if local_name(participant.tag) == "participant" and participant.get("processRef"):
            pools.setdefault(participant.get("processRef"), _name(participant))
    called = {activity.get("calledElement") for activity in root.iter() if local_name(activity.tag) == "callActivity"}
    shown = [document.processes[process_id] for process_id in pools if process_id in document.processes]
    shown += [process for process in root if local_name(process.tag) == "process"
              and process.get("id") not in pools and process.get("id") not in called]
    rows: list[ExpectedRow] = []
    for process in shown:
        pool = pools.get(process.get("id", ""), "") or _name(process)
        roles = _lane_roles(process, pool)
        for task, lane_node in document.tasks(process):
            action = _name(task)
            if action:
                rows.append(ExpectedRow(action, roles.get(lane_node, pool)))
    return rows
