"""BPMN 2.0 XML -> expected rows: lanes, nested lanes, pools, namespaces, order, unnamed elements."""

from __future__ import annotations

from app.pipeline.bpmn import ExpectedRow, expected_rows

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
        ExpectedRow("Score risk", "Risk"),  # the innermost lane wins
        ExpectedRow("Book loan", "Back office"),  # an unnamed lane falls back to its parent
    ]


def test_tasks_without_flows_keep_document_order(tmp_path):
    source = f"""<bpmn:definitions {NS}><bpmn:process id="p" name="Pool">
      <bpmn:task id="a" name="First"/><bpmn:manualTask id="b" name="Second"/></bpmn:process></bpmn:definitions>"""
    path = tmp_path / "x.bpmn"
    path.write_text(source)
    assert expected_rows(path) == [ExpectedRow("First", "Pool"), ExpectedRow("Second", "Pool")]
