"""Validate the Kubernetes manifests offline and strictly, and fail on any kind nothing here can check.

Built-in kinds go to kubernetes-validate (--strict: unknown fields fail). It only warns about a kind it has no
schema for and passes, so the custom resources (KEDA's ScaledObject, the Prometheus Operator's PodMonitor) are
validated against the CRD schemas vendored in deploy/k8s/schemas/ instead. Then what no schema can see: the
ScaledObject's target exists, the PodMonitor selects those pods on a port they name, and the trigger's
PromQL selects the `job` label that PodMonitor gives them.

    python .ci/validate_manifests.py deploy/k8s/*.yaml
    python .ci/validate_manifests.py --self-test deploy/k8s/*.yaml  # and broken copies fail (what CI runs)
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import re
import sys
from collections.abc import Callable

import jsonschema
import yaml
from kubernetes_validate import utils as kubernetes_validate
from referencing import Registry, Resource

SCHEMAS = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "schemas"
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
}
K8S_VERSION = kubernetes_validate.latest_version()
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
# KEDA reads a trigger's metadata only when it reconciles (the CRD types it as a map of strings), so a missing
# key would surface as a ScaledObject that never scales; these are the prometheus scaler's required ones.
PROMETHEUS_TRIGGER_KEYS = ("serverAddress", "query", "threshold")
METRIC_TYPES = {"AverageValue", "Value", "Utilization"}

Document = tuple[str, dict]  # (file name, resource)


def load(paths: list[str]) -> list[Document]:
    """Every non-empty YAML document of these files, with the file it came from."""
    documents = []
    for path in paths:
        with open(path) as stream:
            documents += [(path, doc) for doc in yaml.safe_load_all(stream) if doc]
    return documents


def custom_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """A validator per vendored CRD schema; their `$ref`s to ObjectMeta and LabelSelector resolve to the strict
    definitions kubernetes-validate ships for the Kubernetes version it validates against."""
    definitions = kubernetes_validate.schema_contents(
        f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(definitions) @ Registry()
    validators = {}
    for key, name in CUSTOM_KINDS.items():
        schema = json.loads((SCHEMAS / name).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return validators


def name_of(doc: dict) -> str:
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def schema_errors(doc: dict, validators: dict) -> tuple[list[str], str]:
    """Errors of one resource against its schema, and what it was checked against."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in validators:
        errors = sorted(validators[key].iter_errors(doc), key=lambda error: list(error.absolute_path))
        return [f"{dotted(e.absolute_path)}: {e.message}" for e in errors], f"vendored {CUSTOM_KINDS[key]}"
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{dotted(error.path)}: {error.message}"], f"Kubernetes {K8S_VERSION}"
    except kubernetes_validate.SchemaNotFoundError:
        return [(f"no schema for {key[1]} {key[0]}: add its CRD schema to deploy/k8s/schemas/ and CUSTOM_KINDS, "
                 "or fix the apiVersion/kind")], "nothing"
    return [], f"Kubernetes {K8S_VERSION} (strict)"


def dotted(path) -> str:
    return ".".join(map(str, path)) or "(root)"


def trigger_errors(doc: dict) -> list[str]:
    errors = []
    for index, trigger in enumerate(doc["spec"]["triggers"]):
        where = f"spec.triggers.{index}"
        if trigger.get("metricType", "AverageValue") not in METRIC_TYPES:
            errors.append(f"{where}.metricType: {trigger['metricType']!r} is not one of {sorted(METRIC_TYPES)}")
        if trigger["type"] != "prometheus":
            continue
        metadata = trigger["metadata"]
        errors += [f"{where}.metadata: the prometheus scaler needs {key!r}"
                   for key in PROMETHEUS_TRIGGER_KEYS if key not in metadata]
        try:
            float(metadata.get("threshold", "0"))
        except ValueError:
            errors.append(f"{where}.metadata.threshold: {metadata['threshold']!r} is not a number")
    return errors


def pod_labels(workload: dict) -> dict:
    return (workload["spec"]["template"].get("metadata") or {}).get("labels") or {}


def pods_matched(selector: dict, workload: dict) -> bool:
    labels = pod_labels(workload)
    # matchExpressions are not evaluated here: a selector using them is reported as matching nothing.
    return (bool(selector.get("matchLabels")) and selector["matchLabels"].items() <= labels.items()
            and not selector.get("matchExpressions"))


def cross_errors(docs: list[dict]) -> list[str]:
    """What holds the manifests together, which no single schema sees."""
    errors = []
    workloads = [doc for doc in docs if doc.get("kind") in WORKLOADS]
    jobs = set()  # the `job` label values the PodMonitors give their pods' series
    for monitor in (doc for doc in docs if doc.get("kind") == "PodMonitor"):
        spec = monitor["spec"]
        selected = [w for w in workloads if pods_matched(spec["selector"], w)]
        if not selected:
            errors.append(f"{name_of(monitor)}: spec.selector matches no workload's pod labels here")
        for workload in selected:
            ports = {port.get("name") for container in workload["spec"]["template"]["spec"]["containers"]
                     for port in container.get("ports", [])}
            for endpoint in spec.get("podMetricsEndpoints", []):
                if "port" in endpoint and endpoint["port"] not in ports:
                    errors.append(f"{name_of(monitor)}: port {endpoint['port']!r} is not a named port of "
                                  f"{name_of(workload)} ({sorted(p for p in ports if p)})")
            label, labels = spec.get("jobLabel"), pod_labels(workload)
            if label and label not in labels:
                errors.append(f"{name_of(monitor)}: jobLabel {label!r} is not a label of {name_of(workload)}'s "
                              "pods, so their job label falls back to <namespace>/<PodMonitor name>")
            jobs.add(labels[label] if label in labels else
                     f"{(monitor['metadata'].get('namespace') or 'default')}/{monitor['metadata']['name']}")
    for scaled in (doc for doc in docs if doc.get("kind") == "ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]
        kind = target.get("kind", "Deployment")
        if not any(doc.get("kind") == kind and doc["metadata"].get("name") == target["name"] for doc in docs):
            errors.append(f"{name_of(scaled)}: scaleTargetRef {kind}/{target['name']} is not among these manifests")
        for trigger in scaled["spec"]["triggers"]:
            for job in re.findall(r'\bjob="([^"]*)"', trigger["metadata"].get("query", "")):
                if job not in jobs:
                    errors.append(f"{name_of(scaled)}: the query selects job={job!r}, but the PodMonitors here "
                                  f"label the series job={sorted(jobs)}")
    return errors


def validate(documents: list[Document], validators: dict) -> tuple[list[str], list[str]]:
    """The errors, and a line per resource that passed."""
    errors, passed = [], []
    for path, doc in documents:
        found, against = schema_errors(doc, validators)
        if not found and doc.get("kind") == "ScaledObject":
            found = trigger_errors(doc)
        errors += [f"{path} {name_of(doc)}: {error}" for error in found]
        if not found:
            passed.append(f"{path} {name_of(doc)} against {against}")
    if not errors:  # the resources are well formed: now check they fit together
        errors = cross_errors([doc for _, doc in documents])
    return errors, passed


def find(documents: list[Document], kind: str) -> dict:
    return next(doc for _, doc in documents if doc.get("kind") == kind)


# Each breaks a copy of the real manifests the way a hand edit would; every one must fail validation.
BREAKAGES: dict[str, Callable[[list[Document]], None]] = {
    "ScaledObject: a misspelt field (coolDownPeriod)":
        lambda docs: find(docs, "ScaledObject")["spec"].update(coolDownPeriod=600),
    "ScaledObject: threshold as a number, not a string":
        lambda docs: find(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(threshold=4),
    "ScaledObject: trigger metadata without threshold (treshold)":
        lambda docs: find(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(
            treshold=find(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"].pop("threshold")),
    "ScaledObject: the query selects a job no PodMonitor produces":
        lambda docs: find(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(
            query='sum(vlm_queue_depth{job="vlm"})'),
    "PodMonitor: a misspelt endpoint field (paht)":
        lambda docs: find(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(paht="/metrics"),
    "PodMonitor: a port the pods do not name":
        lambda docs: find(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(port="metrics"),
    "PodMonitor: no selector":
        lambda docs: find(docs, "PodMonitor")["spec"].pop("selector"),
    "Deployment: a misspelt container field (imagePullPolicyy)":
        lambda docs: find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0].update(
            imagePullPolicyy="IfNotPresent"),
    "a kind without a schema (keda.sh ScaledJob)":
        lambda docs: docs.append(("(self-test)", {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob",
                                                  "metadata": {"name": "x"}, "spec": {}})),
}


def self_test(documents: list[Document], validators: dict) -> int:
    """Every breakage fails; the number that did not."""
    missed = 0
    for what, breakage in BREAKAGES.items():
        broken = copy.deepcopy(documents)
        breakage(broken)
        errors, _ = validate(broken, validators)
        print(f"self-test: {what}: " + (f"fails, as it must ({errors[0]})" if errors else "PASSED, missed"))
        missed += not errors
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--self-test", action="store_true", help="also check that broken copies of them fail")
    args = parser.parse_args()
    documents, validators = load(args.files), custom_validators()
    errors, passed = validate(documents, validators)
    for line in passed:
        print(f"ok    {line}")
    for line in errors:
        print(f"ERROR {line}")
    print(f"{len(documents)} resources in {len(args.files)} files: {len(errors) or 'no'} errors")
    if errors:
        return 1
    if args.self_test and (missed := self_test(documents, validators)):
        print(f"self-test: {missed} broken manifests passed validation")
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
