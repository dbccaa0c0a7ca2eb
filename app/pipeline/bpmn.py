"""BPMN 2.0 XML -> the rows of the diagram's table: (action, role), in process order. /infer answers a BPMN
upload with them, without the model; the evaluation command uses them as the expected answer.

Tasks are the actions; the lane holding a task (the innermost one, for nested lanes) is its role, or the
pool (participant) when the process has no lanes. The order follows the sequence flows from the start
events: a task comes after every task that flows into it (at a join, the branch that flows into the other comes
first), otherwise in the order the flows reach them; a loop is entered where the flows first reach it, and a
boundary event continues from the activity it is attached to. Tasks no flow reaches keep their document order at
the end.

The rows are what the diagram shows: the tasks inside an expanded sub-process follow it, in the sub-process's
lane, unless the diagram draws it collapsed; a call activity drawn expanded shows the process it calls the same
way. A process that is only called (no pool of its own) is not listed by itself. Checked against the BPMN MIWG
reference models (tests/test_bpmn_miwg.py).
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
import heapq
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from app.errors import InvalidImageError, PayloadTooLargeError
from app.pipeline.xml_upload import local_name, parse_upload, root_tag

BPMN_NAMESPACE = "http://www.omg.org/spec/BPMN/20100524/MODEL"

TASK_TYPES = {
    "task", "userTask", "serviceTask", "manualTask", "scriptTask", "sendTask", "receiveTask",
    "businessRuleTask", "callActivity", "subProcess", "adHocSubProcess", "transaction",
}
SUB_PROCESS_TYPES = {"subProcess", "adHocSubProcess", "transaction"}
MAX_TASKS = 10_000
# The rows' text in all: call activities copy a process's tasks (and their names) each time they are called, so a
# few hundred KB of XML can expand to a table of hundreds of MB. Real diagrams stay far below.
MAX_TABLE_CHARS = 2_000_000


class TooManyTasksError(ValueError):
    pass


class TableTooLargeError(ValueError):
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
    starts = [node.get("id") for node in container if local_name(node.tag) == "startEvent"]
    order = [nodes[node_id] for node_id in _topological(starts, successors)
             if node_id in nodes and local_name(nodes[node_id].tag) in TASK_TYPES]
    reached = {id(node) for node in order}
    return order + [task for task in tasks if id(task) not in reached]


def _topological(starts: list[str], successors: dict[str, list[str]]) -> list[str]:
    """The nodes reachable from ``starts``, each after every reachable node that flows into it (at a join, the
    branch that flows into another is listed first); ties in the order the flows discover them. A loop has no
    such order: its entry is taken as soon as nothing outside the loop is left to wait for."""
    discovered: dict[str, int] = {}
    queue = deque(starts)
    for node_id in starts:
        discovered.setdefault(node_id, len(discovered))
    while queue:
        for target in successors.get(queue.popleft(), []):
            if target not in discovered:
                discovered[target] = len(discovered)
                queue.append(target)
    waiting_on = dict.fromkeys(discovered, 0)
    for source in discovered:
        for target in successors.get(source, []):
            waiting_on[target] += 1
    ready = [(discovered[node_id], node_id) for node_id, count in waiting_on.items() if count == 0]
    heapq.heapify(ready)
    order: list[str] = []
    done: set[str] = set()
    by_discovery = list(discovered)  # a dict keeps insertion order: discovery order
    first_left = 0
    while len(order) < len(discovered):
        if not ready:  # only loops are left: enter the first one the flows reached
            while by_discovery[first_left] in done:
                first_left += 1
            entry = by_discovery[first_left]
            ready = [(discovered[entry], entry)]
            waiting_on[entry] = 0
        _, node_id = heapq.heappop(ready)
        if node_id in done:
            continue
        done.add(node_id)
        order.append(node_id)
        for target in successors.get(node_id, []):
            if target not in done:
                waiting_on[target] -= 1
                if waiting_on[target] == 0:
                    heapq.heappush(ready, (discovered[target], target))
    return order


class _Document:
    """What the reading of one file needs beyond a process: the processes by id and how the diagram draws
    sub-processes and call activities (expanded or collapsed)."""

    def __init__(self, root: ElementTree.Element):
        self._rows_left = MAX_TASKS
        self._chars_left = MAX_TABLE_CHARS
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
            self._chars_left -= len(task.get("name") or "")
            if self._chars_left < 0:  # counted before any row's text is built: memory stays flat
                raise TableTooLargeError(f"the BPMN file expands to a table of more than {MAX_TABLE_CHARS} "
                                         "characters (its call activities repeat long task names)")
            inner = self.inside(task)
            if inner is not None and inner.get("id", "") not in visiting:  # a process calling itself: shown once
                rows += self.tasks(inner, lane_node, visiting | {inner.get("id", "")})
        return rows


def looks_like_bpmn(data: bytes) -> bool:
    """XML whose root element is ``definitions`` declaring BPMN's namespace, judged from the decoded start of the
    file (any encoding; a namespace planted in a comment does not count)."""
    tag = root_tag(data, "definitions")
    return tag is not None and BPMN_NAMESPACE in tag


def parse_bpmn(data: bytes) -> list[ExpectedRow]:
    """The rows of an uploaded BPMN file. Raises InvalidImageError (400) for a DTD, broken XML or a file too
    large to read."""
    # A BPMN document needs no DTD: any DOCTYPE is refused by the parser, in whatever encoding the file is.
    root = parse_upload(data, "BPMN", allow_doctype=False)
    try:
        return _rows(root)
    except TooManyTasksError as error:
        raise InvalidImageError(str(error)) from None
    except TableTooLargeError as error:
        raise PayloadTooLargeError(str(error)) from None
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
    chars = 0
    for process in shown:
        pool = pools.get(process.get("id", ""), "") or _name(process)
        roles = _lane_roles(process, pool)
        for task, lane_node in document.tasks(process):
            action = _name(task)
            if action:
                rows.append(ExpectedRow(action, roles.get(lane_node, pool)))
                chars += len(action) + len(rows[-1].role)  # a long lane name repeated on every row counts too
                if chars > MAX_TABLE_CHARS:
                    raise TableTooLargeError(f"the BPMN file's table is more than {MAX_TABLE_CHARS} characters")
    return rows
