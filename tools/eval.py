"""Score a running instance against diagrams with known answers: precision / recall / F1 for actions,
roles and (action, role) pairs.

    python -m tools.eval --url http://localhost:8002 DATA_DIR [--json] [--threshold 0.8]

DATA_DIR holds images (PNG, JPEG, WebP, GIF, BMP, TIFF, PDF, SVG), each with its expected rows beside it
under the same stem: ``name.bpmn`` (BPMN 2.0 XML), ``name.json`` (a list of {"action", "role"} objects,
or {"rows": [...]}) or ``name.csv`` (a header with action and role columns, Russian or English).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import csv
import difflib
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from app.pipeline.bpmn import ExpectedRow, expected_rows
from app.pipeline.table import column_roles

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".pdf", ".svg"}


def normalize(text: str) -> str:
    """Lower case, ё -> е, punctuation dropped, white space folded."""
    text = text.lower().replace("ё", "е")
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def similarity(a: str, b: str) -> float:
    a, b = normalize(a), normalize(b)
    if not a or not b:
        return 1.0 if a == b else 0.0
    return difflib.SequenceMatcher(None, a, b).ratio()


def match_count(predicted: list[Any], expected: list[Any], score, threshold: float) -> int:
    """One-to-one matches, best pairs first, each at least ``threshold`` similar."""
    return len(matches(predicted, expected, score, threshold))


def matches(predicted: list[Any], expected: list[Any], score, threshold: float) -> list[tuple[int, int]]:
    """The one-to-one matches as (predicted index, expected index), best pairs first."""
    candidates = sorted(
        ((score(p, e), i, j) for i, p in enumerate(predicted) for j, e in enumerate(expected)),
        reverse=True,
    )
    used_p: set[int] = set()
    used_e: set[int] = set()
    pairs = []
    for value, i, j in candidates:
        if value < threshold:
            break
        if i not in used_p and j not in used_e:
            used_p.add(i)
            used_e.add(j)
            pairs.append((i, j))
    return pairs


def in_order(pairs: list[tuple[int, int]]) -> int:
    """How many matched rows keep their order: the longest common subsequence of the two orders of the matched
    rows, which with one-to-one matches is the longest increasing run of expected positions in predicted order."""
    tails: list[int] = []
    for _, j in sorted(pairs):
        at = bisect.bisect_left(tails, j)
        tails[at:at + 1] = [j]
    return len(tails)


@dataclass
class Order:
    """The table's order: of the matched actions, how many stand in the expected order (1.0: all of them)."""

    in_order: int = 0
    matched: int = 0

    def add(self, other: "Order") -> None:
        self.in_order += other.in_order
        self.matched += other.matched

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "ratio": round(self.in_order / self.matched, 4) if self.matched else 1.0}


@dataclass
class Score:
    matched: int = 0
    predicted: int = 0
    expected: int = 0

    def add(self, other: "Score") -> None:
        self.matched += other.matched
        self.predicted += other.predicted
        self.expected += other.expected

    @property
    def precision(self) -> float:
        return self.matched / self.predicted if self.predicted else (1.0 if not self.expected else 0.0)

    @property
    def recall(self) -> float:
        return self.matched / self.expected if self.expected else (1.0 if not self.predicted else 0.0)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "precision": round(self.precision, 4), "recall": round(self.recall, 4),
                "f1": round(self.f1, 4)}


def score_rows(predicted: list[ExpectedRow], expected: list[ExpectedRow], threshold: float
               ) -> dict[str, Score | Order]:
    actions_p, actions_e = [r.action for r in predicted], [r.action for r in expected]
    roles_p = sorted({normalize(r.role) for r in predicted if r.role.strip()})
    roles_e = sorted({normalize(r.role) for r in expected if r.role.strip()})

    def pair_score(p: ExpectedRow, e: ExpectedRow) -> float:
        return min(similarity(p.action, e.action), similarity(p.role, e.role))

    action_pairs = matches(actions_p, actions_e, similarity, threshold)
    return {
        "actions": Score(len(action_pairs), len(actions_p), len(actions_e)),
        "roles": Score(match_count(roles_p, roles_e, similarity, threshold), len(roles_p), len(roles_e)),
        "pairs": Score(match_count(predicted, expected, pair_score, threshold), len(predicted), len(expected)),
        "order": Order(in_order(action_pairs), len(action_pairs)),
    }


def read_expected(image: Path) -> list[ExpectedRow] | None:
    """The expected rows beside ``image`` (.bpmn, .json or .csv), or None when there are none."""
    for suffix in (".bpmn", ".json", ".csv"):
        path = image.with_suffix(suffix)
        if not path.is_file():
            continue
        if suffix == ".bpmn":
            return expected_rows(path)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data["rows"] if isinstance(data, dict) else data
            return [ExpectedRow(str(r.get("action", "")), str(r.get("role", ""))) for r in rows]
        with path.open(newline="", encoding="utf-8-sig") as handle:
            table = list(csv.reader(handle))
        if not table:
            return []
        columns = column_roles(table[0])
        if "action" not in columns or "role" not in columns:
            raise ValueError(f"{path}: the header needs an action and a role column, got {table[0]}")
        return [ExpectedRow(row[columns["action"]], row[columns["role"]]) for row in table[1:] if any(row)]
    return None


@dataclass
class FileResult:
    file: str
    status: int
    latency_s: float
    scores: dict[str, dict[str, float | int]] = field(default_factory=dict)
    error: str | None = None
    finish_reason: str | None = None


def predicted_rows(body: dict[str, Any]) -> list[ExpectedRow]:
    return [ExpectedRow(row["action"], row["role"]) for row in body.get("rows") or []]


def evaluate(url: str, data_dir: Path, threshold: float = 0.8, timeout_s: float = 600.0,
             api_key: str | None = None, progress: bool = True, client: Any = None) -> dict[str, Any]:
    """Post every diagram to ``url`` and score the answers. ``client``: an httpx.Client to reuse."""
    import httpx
    from tqdm import tqdm

    images = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    cases = [(image, read_expected(image)) for image in images]
    cases = [(image, rows) for image, rows in cases if rows is not None]
    if not cases:
        raise SystemExit(f"no image in {data_dir} has a .bpmn, .json or .csv of expected rows beside it")
    headers = {"X-API-Key": api_key} if api_key else {}
    totals: dict[str, Score | Order] = {name: Score() for name in ("actions", "roles", "pairs")}
    totals["order"] = Order()
    results: list[FileResult] = []
    with contextlib.nullcontext(client) if client is not None else httpx.Client(timeout=timeout_s) as client:
        for image, expected in tqdm(cases, desc="diagrams", unit="img", disable=not progress, file=sys.stderr):
            started = time.perf_counter()
            try:
                response = client.post(f"{url.rstrip('/')}/infer", files={"file": (image.name, image.read_bytes())},
                                       headers=headers)
            except httpx.HTTPError as error:
                results.append(FileResult(image.name, 0, time.perf_counter() - started, error=str(error)))
                scores = score_rows([], expected, threshold)
            else:
                latency = time.perf_counter() - started
                body = response.json() if response.headers.get("content-type", "").startswith("application/json") \
                    else {}
                if response.status_code == 200:
                    scores = score_rows(predicted_rows(body), expected, threshold)
                    results.append(FileResult(image.name, 200, latency, error=body.get("table_error"),
                                              finish_reason=body["metadata"]["finish_reason"]))
                else:
                    scores = score_rows([], expected, threshold)
                    message = (body.get("error") or {}).get("message", response.text[:200])
                    results.append(FileResult(image.name, response.status_code, latency, error=message))
            results[-1].scores = {name: score.as_dict() for name, score in scores.items()}
            for name, score in scores.items():
                totals[name].add(score)
    latencies = sorted(r.latency_s for r in results)
    return {
        "url": url,
        "threshold": threshold,
        "files": [asdict(r) for r in results],
        "overall": {name: score.as_dict() for name, score in totals.items()},
        "latency_s": {"mean": sum(latencies) / len(latencies), "p50": latencies[len(latencies) // 2],
                      "max": latencies[-1]},
        "failed_requests": sum(r.status != 200 for r in results),
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'file':<32}{'status':>7}{'latency s':>11}{'action F1':>11}{'role F1':>9}{'pair F1':>9}{'order':>7}"]
    for item in report["files"]:
        s = item["scores"]
        lines.append(f"{item['file'][:31]:<32}{item['status']:>7}{item['latency_s']:>11.2f}"
                     f"{s['actions']['f1']:>11.3f}{s['roles']['f1']:>9.3f}{s['pairs']['f1']:>9.3f}"
                     f"{s['order']['ratio']:>7.3f}")
    lines.append("")
    lines.append(f"{'overall':<10}{'precision':>11}{'recall':>9}{'F1':>8}{'matched':>9}{'predicted':>11}"
                 f"{'expected':>10}")
    overall = report["overall"]
    for name, score in overall.items():
        if name == "order":
            continue
        lines.append(f"{name:<10}{score['precision']:>11.3f}{score['recall']:>9.3f}{score['f1']:>8.3f}"
                     f"{score['matched']:>9}{score['predicted']:>11}{score['expected']:>10}")
    order = overall["order"]
    lines.append(f"order: {order['in_order']} of {order['matched']} matched actions in the expected order "
                 f"({order['ratio']:.3f}; the longest common subsequence of the two orders)")
    latency = report["latency_s"]
    lines.append(f"\nlatency: mean {latency['mean']:.2f} s, p50 {latency['p50']:.2f} s, max {latency['max']:.2f} s; "
                 f"failed requests: {report['failed_requests']}")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.eval", description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--url", default="http://localhost:8002", help="a running instance")
    parser.add_argument("--threshold", type=float, default=0.8,
                        help="minimum text similarity (0-1) for a predicted row to match an expected one")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--api-key", default=None, help="sent as X-API-Key when the instance needs one")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not args.data_dir.is_dir():
        parser.error(f"{args.data_dir} is not a folder")
    report = evaluate(args.url, args.data_dir, args.threshold, args.timeout, args.api_key, progress=not args.json)
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
