#!/usr/bin/env bash
# Checks that need a running service on the tiny model: the OpenAPI contract fuzzed with schemathesis,
# the Prometheus exposition linted by promtool and scraped by a real Prometheus, Swagger UI driven in
# headless Chromium. Any failure fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
ART=${CI_ARTIFACTS:-ci-artifacts}
mkdir -p "$ART"
PORT=${CI_PORT:-18002}
BASE=http://127.0.0.1:$PORT

"$VENV/bin/pip" install -q -r .ci/requirements.txt
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null || ! [ -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus chromium >/dev/null
fi
# Debian's package starts its own daemon where an init system runs; ours must own the port below.
pkill -x prometheus 2>/dev/null || true

DEMO_DIR=$(mktemp -d)
BASE_MODEL_ID=demo DEMO_DIR="$DEMO_DIR/demo" HOST=127.0.0.1 PORT=$PORT MAX_NEW_TOKENS=16 MAX_QUEUE=64 \
  "$VENV/bin/python" -m app >"$ART/service.log" 2>&1 &
SERVICE_PID=$!
PROM_PID=
KEYED_PID=
cleanup() {
  [ -n "$PROM_PID" ] && kill "$PROM_PID" 2>/dev/null || true
  [ -n "$KEYED_PID" ] && kill "$KEYED_PID" 2>/dev/null || true
  kill "$SERVICE_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DEMO_DIR"
}
trap cleanup EXIT

for _ in $(seq 1 240); do
  if curl -fsS "$BASE/health" >/dev/null 2>&1; then break; fi
  kill -0 "$SERVICE_PID" 2>/dev/null || { cat "$ART/service.log"; exit 1; }
  sleep 0.5
done
curl -fsS "$BASE/health" >/dev/null || { echo "service never became healthy"; cat "$ART/service.log"; exit 1; }

echo "--- schemathesis: no 5xx, every response matches its documented schema"
# positive_data_acceptance is excluded: the schema says "a binary file", and random bytes are
# schema-valid yet rightly refused (415/400) - no OpenAPI schema can say "a decodable image".
# One worker: with two threads, hypothesis' ast.parse of its filter lambdas now and then raised "SystemError: AST
# constructor recursion depth mismatch" inside schemathesis (CPython gh-106905, a threaded race fixed after this
# machine's 3.11.7), which fails the run with nothing wrong on the service's side (seen once, 2026-12-08).
"$VENV/bin/st" run "$BASE/openapi.json" --checks all --exclude-checks positive_data_acceptance \
  --max-examples 100 --workers 1 --suppress-health-check all

echo "--- a few requests, so every metric has data"
"$VENV/bin/python" - "$ART/diagram.png" <<'PY'
import sys
from PIL import Image, ImageDraw
image = Image.new("RGB", (640, 480), "white")
draw = ImageDraw.Draw(image)
for i, role in enumerate(["Manager", "Lawyer", "Accountant"]):
    draw.rectangle((20, 20 + 150 * i, 620, 150 + 150 * i), outline="black", width=2)
    draw.text((30, 30 + 150 * i), role, fill="black")
    draw.rectangle((200, 60 + 150 * i, 360, 110 + 150 * i), outline="blue", width=2)
image.save(sys.argv[1])
PY
for _ in 1 2 3; do
  curl -fsS -F "file=@$ART/diagram.png" "$BASE/infer" >/dev/null
done

echo "--- promtool check metrics on the live exposition"
curl -fsS -H 'Accept: text/plain' "$BASE/metrics" >"$ART/metrics.prom"
promtool check metrics <"$ART/metrics.prom"

echo "--- a real Prometheus scrapes the service"
PROM_PORT=${CI_PROM_PORT:-19090}
PROM_DIR=$DEMO_DIR/prometheus
mkdir -p "$PROM_DIR"
cat >"$PROM_DIR/prometheus.yml" <<YML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: vlm-inference
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$PORT"]
YML
promtool check config "$PROM_DIR/prometheus.yml"
prometheus --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$ART/prometheus.log" 2>&1 &
PROM_PID=$!
query() { curl -fsS --get "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1"; }
value() { "$VENV/bin/python" -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "none")'; }
up=none; total=none
for _ in $(seq 1 60); do
  up=$(query 'up{job="vlm-inference"}' 2>/dev/null | value 2>/dev/null || echo none)
  total=$(query 'sum(vlm_requests_total{job="vlm-inference",endpoint="/infer"})' 2>/dev/null | value 2>/dev/null || echo none)
  if [ "$up" = "1" ] && [ "$total" != "none" ] && [ "${total%%.*}" -gt 0 ]; then break; fi
  sleep 1
done
echo "prometheus: up=$up vlm_requests_total{endpoint=\"/infer\"}=$total"
[ "$up" = "1" ] && [ "$total" != "none" ] && [ "${total%%.*}" -gt 0 ] || { cat "$ART/prometheus.log"; exit 1; }

echo "--- Swagger UI in headless Chromium: Try it out on POST /infer"
"$VENV/bin/python" .ci/swagger_check.py "$BASE" "$ART/diagram.png" "$ART/swagger-infer.png"

echo "--- Swagger UI with API_KEY set: Authorize, then Execute"
KEYED_PORT=$((PORT + 1))
BASE_MODEL_ID=demo DEMO_DIR="$DEMO_DIR/demo" HOST=127.0.0.1 PORT=$KEYED_PORT MAX_NEW_TOKENS=16 API_KEY=ci-secret \
  "$VENV/bin/python" -m app >"$ART/service-keyed.log" 2>&1 &
KEYED_PID=$!
for _ in $(seq 1 240); do
  if curl -fsS "http://127.0.0.1:$KEYED_PORT/health" >/dev/null 2>&1; then break; fi
  kill -0 "$KEYED_PID" 2>/dev/null || { cat "$ART/service-keyed.log"; exit 1; }
  sleep 0.5
done
"$VENV/bin/python" .ci/swagger_check.py "http://127.0.0.1:$KEYED_PORT" "$ART/diagram.png" \
  "$ART/swagger-authorize.png" ci-secret
kill "$KEYED_PID" 2>/dev/null || true

echo "--- the KEDA trigger's query on a real Prometheus scraping two replicas (requests waiting, jobs queued)"
"$VENV/bin/python" .ci/keda_query_check.py "$DEMO_DIR/demo" $((PORT + 2)) $((PROM_PORT + 1)) "$ART"
