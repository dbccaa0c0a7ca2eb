"""Clients of the service: the evaluation command and the BPMN reader."""
