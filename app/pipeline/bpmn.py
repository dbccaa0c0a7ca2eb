"""BPMN 2.0 XML -> the rows of the diagram's table: (action, role), in process order. /infer answers a BPMN
upload with them, without the model; the evaluation command uses them as the expected answer.

Tasks are the actions; the lane holding a task (the innermost one, for nested lanes) is its role, or the
pool (participant) when the process has no lanes. The order follows the sequence flows from the start
events, breadth first; tasks no flow reaches keep their document order at the end.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from app.errors import InvalidImageError

BPMN_NAMESPACE = b"http://www.omg.org/spec/BPMN/20100524/MODEL"
# A BPMN document needs no DTD: one is refused before parsing, so neither entity expansion (the "billion
# laughs") nor external references (files, URLs) can happen.
_DECLARATION = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)
_ROOT = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?definitions[\s>]")

TASK_TYPES = {
    "task", "userTask", "serviceTask", "manualTask", "scriptTask", "sendTask", "receiveTask",
    "businessRuleTask", "callActivity", "subProcess", "adHocSubProcess", "transaction",
}


@dataclass(frozen=True)
class ExpectedRow:
    action: str
    role: str


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element if _local(child.tag) == name]


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


def _ordered_tasks(process: ElementTree.Element) -> list[ElementTree.Element]:
    nodes = {node.get("id"): node for node in process if node.get("id")}
    tasks = [node for node in process if _local(node.tag) in TASK_TYPES]
    successors: dict[str, list[str]] = {}
    for flow in _children(process, "sequenceFlow"):
        successors.setdefault(flow.get("sourceRef", ""), []).append(flow.get("targetRef", ""))
    queue = deque(node.get("id") for node in process if _local(node.tag) == "startEvent")
    seen: set[str] = set(queue)
    order: list[ElementTree.Element] = []
    while queue:
        node_id = queue.popleft()
        node = nodes.get(node_id)
        if node is not None and _local(node.tag) in TASK_TYPES:
            order.append(node)
        for target in successors.get(node_id, []):
            if target not in seen:
                seen.add(target)
                queue.append(target)
    reached = {id(node) for node in order}
    return order + [task for task in tasks if id(task) not in reached]


def looks_like_bpmn(data: bytes) -> bool:
    """XML whose root element is BPMN's ``definitions``, judged from the start of the file."""
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"<") and BPMN_NAMESPACE in head and _ROOT.search(head) is not None


def parse_bpmn(data: bytes) -> list[ExpectedRow]:
    """The rows of an uploaded BPMN file. Raises InvalidImageError (400) for a DTD or broken XML."""
    if _DECLARATION.search(data):
        raise InvalidImageError("the BPMN file declares a DOCTYPE or entities, which are refused (entity expansion, "
                                "external references); export it without them")
    try:
        return expected_rows(data)
    except ElementTree.ParseError as error:
        raise InvalidImageError(f"cannot read the BPMN XML: {error}") from None


def expected_rows(source: str | bytes | Path) -> list[ExpectedRow]:
    """Rows of a BPMN file (path) or document (str/bytes). Unnamed tasks are skipped."""
    if isinstance(source, Path):
        source = source.read_bytes()
    root = ElementTree.fromstring(source)
    participants: dict[str, str] = {}
    order: list[str] = []
    for collaboration in root.iter():
        if _local(collaboration.tag) == "participant" and collaboration.get("processRef"):
            participants[collaboration.get("processRef")] = _name(collaboration)
            order.append(collaboration.get("processRef"))
    processes = [element for element in root if _local(element.tag) == "process"]
    processes.sort(key=lambda p: order.index(p.get("id")) if p.get("id") in order else len(order))
    rows: list[ExpectedRow] = []
    for process in processes:
        pool = participants.get(process.get("id", ""), "") or _name(process)
        roles = _lane_roles(process, pool)
        for task in _ordered_tasks(process):
            action = _name(task)
            if action:
                rows.append(ExpectedRow(action, roles.get(task.get("id", ""), pool)))
    return rows
