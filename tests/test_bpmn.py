"""BPMN 2.0 XML -> expected rows: lanes, nested lanes, pools, namespaces, order, unnamed elements."""

from __future__ import annotations

import pytest

from app.errors import InvalidImageError
from app.pipeline.bpmn import ExpectedRow, expected_rows, parse_bpmn

NS = 'xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"'

LANES = f"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions {NS} id="d1">
  <bpmn:process id="p1" name="Заявка">
    <bpmn:laneSet id="ls1">
      <bpmn:lane id="l1" name="Менеджер"><bpmn:flowNodeRef>start</bpmn:flowNodeRef>
        <bpmn:flowNodeRef>t1</bpmn:flowNodeRef><bpmn:flowNodeRef>t3</bpmn:flowNodeRef></bpmn:lane>
      <bpmn:lane id="l2" name="Юрист"><bpmn:flowNodeRef>t2</bpmn:flowNodeRef>
        <bpmn:flowNodeRef>gw</bpmn:flowNodeRef></bpmn:lane>
    </bpmn:laneSet>
    <bpmn:startEvent id="start"/>
    <bpmn:userTask id="t3" name="Отправить  уведомление"/>
    <bpmn:task id="t1" name="Принять заявку"/>
    <bpmn:serviceTask id="t2" name="Проверить документы"/>
    <bpmn:exclusiveGateway id="gw"/>
    <bpmn:task id="unnamed"/>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="t1"/>
    <bpmn:sequenceFlow id="f2" sourceRef="t1" targetRef="t2"/>
    <bpmn:sequenceFlow id="f3" sourceRef="t2" targetRef="gw"/>
    <bpmn:sequenceFlow id="f4" sourceRef="gw" targetRef="t3"/>
    <bpmn:sequenceFlow id="f5" sourceRef="gw" targetRef="t1"/>
  </bpmn:process>
</bpmn:definitions>"""


def test_lanes_give_roles_and_flows_give_the_order():
    assert expected_rows(LANES) == [
        ExpectedRow("Принять заявку", "Менеджер"),
        ExpectedRow("Проверить документы", "Юрист"),
        ExpectedRow("Отправить уведомление", "Менеджер"),
    ]


NESTED_AND_POOLS = """<definitions xmlns="http://www.omg.org/spec/BPMN/20100524/MODEL" id="d2">
  <collaboration id="c1">
    <participant id="pa" name="Customer" processRef="pc"/>
    <participant id="pb" name="Bank" processRef="pb_process"/>
  </collaboration>
  <process id="pb_process">
    <laneSet><lane id="back" name="Back office">
      <childLaneSet><lane id="risk" name="Risk"><flowNodeRef>check</flowNodeRef></lane>
                    <lane id="anon"><flowNodeRef>book</flowNodeRef></lane></childLaneSet>
      <flowNodeRef>check</flowNodeRef><flowNodeRef>book</flowNodeRef><flowNodeRef>s2</flowNodeRef>
    </lane></laneSet>
    <startEvent id="s2"/>
    <businessRuleTask id="check" name="Score risk"/>
    <callActivity id="book" name="Book loan"/>
    <sequenceFlow id="g1" sourceRef="s2" targetRef="check"/>
    <sequenceFlow id="g2" sourceRef="check" targetRef="book"/>
  </process>
  <process id="pc">
    <startEvent id="s1"/>
    <sendTask id="apply" name="Apply for loan"/>
    <subProcess id="sub" name="Sign contract"><task id="inner" name="inner step"/></subProcess>
    <sequenceFlow id="h1" sourceRef="s1" targetRef="apply"/>
    <sequenceFlow id="h2" sourceRef="apply" targetRef="sub"/>
  </process>
</definitions>"""


def test_pools_nested_lanes_and_default_namespace():
    assert expected_rows(NESTED_AND_POOLS) == [
        ExpectedRow("Apply for loan", "Customer"),  # no lanes: the pool is the role
        ExpectedRow("Sign contract", "Customer"),  # a sub-process counts by its name
        ExpectedRow("inner step", "Customer"),  # and its tasks follow it (no diagram says it is collapsed)
        ExpectedRow("Score risk", "Risk"),  # the innermost lane wins
        ExpectedRow("Book loan", "Back office"),  # an unnamed lane falls back to its parent
    ]


def test_tasks_without_flows_keep_document_order(tmp_path):
    source = f"""<bpmn:definitions {NS}><bpmn:process id="p" name="Pool">
      <bpmn:task id="a" name="First"/><bpmn:manualTask id="b" name="Second"/></bpmn:process></bpmn:definitions>"""
    path = tmp_path / "x.bpmn"
    path.write_text(source)
    assert expected_rows(path) == [ExpectedRow("First", "Pool"), ExpectedRow("Second", "Pool")]


DI = 'xmlns:di="http://www.omg.org/spec/BPMN/20100524/DI"'
SUBPROCESSES_AND_CALLS = f"""<?xml version="1.0" encoding="ISO-8859-1"?>
<semantic:definitions xmlns:semantic="http://www.omg.org/spec/BPMN/20100524/MODEL" {DI} id="d">
  <semantic:collaboration id="c">
    <semantic:participant id="pp" name="Caf\xe9" processRef="main"/></semantic:collaboration>
  <semantic:process id="main">
    <semantic:laneSet><semantic:lane id="l1" name="Front"><semantic:flowNodeRef>open</semantic:flowNodeRef>
      <semantic:flowNodeRef>cook</semantic:flowNodeRef></semantic:lane>
      <semantic:lane id="l2" name="Back"><semantic:flowNodeRef>stock</semantic:flowNodeRef>
      <semantic:flowNodeRef>audit</semantic:flowNodeRef><semantic:flowNodeRef>late</semantic:flowNodeRef>
      <semantic:flowNodeRef>pay</semantic:flowNodeRef></semantic:lane></semantic:laneSet>
    <semantic:startEvent id="s"/>
    <semantic:task id="open" name="Open  shop "/>
    <semantic:subProcess id="cook" name="Cook">
      <semantic:startEvent id="cs"/><semantic:task id="chop" name="Chop"/><semantic:task id="fry" name="Fry"/>
      <semantic:sequenceFlow id="c1" sourceRef="cs" targetRef="chop"/>
      <semantic:sequenceFlow id="c2" sourceRef="chop" targetRef="fry"/>
    </semantic:subProcess>
    <semantic:boundaryEvent id="timer" attachedToRef="cook"/>
    <semantic:task id="late" name="Apologise"/>
    <semantic:subProcess id="stock" name="Restock">
      <semantic:task id="hidden" name="Count shelves"/></semantic:subProcess>
    <semantic:callActivity id="audit" name="Audit" calledElement="audit_process"/>
    <semantic:callActivity id="pay" name="Pay taxes" calledElement="tax_process"/>
    <semantic:sequenceFlow id="f1" sourceRef="s" targetRef="open"/>
    <semantic:sequenceFlow id="f2" sourceRef="open" targetRef="cook"/>
    <semantic:sequenceFlow id="f3" sourceRef="cook" targetRef="stock"/>
    <semantic:sequenceFlow id="f4" sourceRef="timer" targetRef="late"/>
    <semantic:sequenceFlow id="f5" sourceRef="stock" targetRef="audit"/>
    <semantic:sequenceFlow id="f6" sourceRef="audit" targetRef="pay"/>
  </semantic:process>
  <semantic:process id="audit_process"><semantic:task id="a1" name="Check books"/>
    <semantic:callActivity id="again" name="Audit again" calledElement="audit_process"/></semantic:process>
  <semantic:process id="tax_process"><semantic:task id="t1" name="File return"/></semantic:process>
  <di:BPMNDiagram><di:BPMNPlane>
    <di:BPMNShape bpmnElement="cook" isExpanded="true"/>
    <di:BPMNShape bpmnElement="stock" isExpanded="false"/>
    <di:BPMNShape bpmnElement="audit" isExpanded="true"/>
    <di:BPMNShape bpmnElement="again" isExpanded="true"/>
    <di:BPMNShape bpmnElement="pay" isExpanded="false"/>
  </di:BPMNPlane></di:BPMNDiagram>
  <di:BPMNDiagram><di:BPMNPlane><di:BPMNShape bpmnElement="stock" isExpanded="true"/></di:BPMNPlane></di:BPMNDiagram>
</semantic:definitions>""".encode("latin-1")


def test_what_the_diagram_shows_inside_sub_processes_and_call_activities():
    assert expected_rows(SUBPROCESSES_AND_CALLS) == [
        ExpectedRow("Open shop", "Front"),
        ExpectedRow("Cook", "Front"),
        ExpectedRow("Chop", "Front"),  # inside an expanded sub-process: its lane, its own flow order
        ExpectedRow("Fry", "Front"),
        ExpectedRow("Restock", "Back"),  # drawn collapsed in the main diagram: its inside is not shown
        ExpectedRow("Audit", "Back"),
        ExpectedRow("Check books", "Back"),  # the called process, drawn expanded
        ExpectedRow("Audit again", "Back"),  # calls its own process: not expanded a second time
        ExpectedRow("Apologise", "Back"),  # reached through the boundary event of "Cook", as far as "Audit"
        ExpectedRow("Pay taxes", "Back"),  # collapsed call: "File return" is not on the diagram
    ]  # and neither called process is listed as a pool of its own


def test_a_file_that_multiplies_into_too_many_tasks_is_refused():
    calls = "".join(f'<callActivity id="c{i}" name="c" calledElement="p{{next}}"/>' for i in range(10))
    shapes = "".join(f'<di:BPMNShape bpmnElement="c{i}" isExpanded="true"/>' for i in range(10))
    processes = "".join(f'<process id="p{level}">{calls.format(next=level + 1)}</process>' for level in range(6))
    source = (f'<definitions xmlns="http://www.omg.org/spec/BPMN/20100524/MODEL" {DI}>{processes}'
              f'<di:BPMNDiagram><di:BPMNPlane>{shapes}</di:BPMNPlane></di:BPMNDiagram></definitions>').encode()
    with pytest.raises(InvalidImageError, match="more than 10000 tasks"):
        parse_bpmn(source)


def test_processes_without_ids_are_each_read():
    source = """<definitions xmlns="http://www.omg.org/spec/BPMN/20100524/MODEL">
      <process name="Sales"><task name="Quote"/></process><process name="Billing"><task name="Invoice"/></process>
    </definitions>"""
    assert expected_rows(source) == [ExpectedRow("Quote", "Sales"), ExpectedRow("Invoice", "Billing")]
