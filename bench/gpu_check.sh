#!/usr/bin/env bash
# The prepared GPU check: one command on a lent H100/H200, about 6 minutes, never more than 8 (GPU_CHECK_BUDGET_S):
# the full Qwen3-VL-2B architecture with random weights, bf16, 1024x768 diagrams, forced token counts.
#   0. the carried wheels (bench/gpu_wheels.sh put them in .whl) installed into $GPU_CHECK_SITE, put first on
#      PYTHONPATH: they shadow the machine's older transformers & co.; no network is needed or used.
#   1. preflight (bench/gpu_preflight.py): versions, the SDPA backend torch picks for the decode call, every import
#      the benches and the service need. A failure stops the run here with one "PREFLIGHT FAILED" line.
#   2. bench/gpu_check.py: the engine alone - hf generate() vs our eager steps vs CUDA graphs, one stream and
#      1/8/32 concurrent diagrams, each decoding path checked against the model's own forward, graph vs eager.
#      It builds the random model once and saves it for stage 3.
#   3. bench/serve_bench.py: the service end to end over HTTP, ours at 1 and 32 concurrent clients, the naive
#      configuration (one at a time, eager) at 1 and 8, loading the model stage 2 saved.
# Each stage has its own time limit, cut to what is left of the budget: a hung stage cannot eat the others'.
# Output in $OUT: preflight.txt, gpu_check.{txt,json}, serve_bench.{txt,json}.
#   here:  bash bench/gpu_wheels.sh                        (the wheel set, ~54 MiB, into .whl)
#   there: the device tool's run with carry [".whl"], command "bash bench/gpu_check.sh", timeout_s 540
#   CPU rehearsal of the same steps with a small model: BENCH_DEVICE=cpu bash bench/gpu_check.sh
#   (bench/gpu_rehearsal.sh runs that in a venv made like the lent machine)
# No set -e: a missing tool or a failed stage is reported and the next stage still runs; the exit status is 1
# if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
DEVICE=${BENCH_DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu-check}
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
MODEL_DIR=${GPU_CHECK_MODEL_DIR:-${TMPDIR:-/tmp}/vlm-bench/gpu-check-model}  # built by stage 2, loaded by 3
case "$DEVICE" in
  cuda | cpu) ;;
  *) echo "gpu_check.sh: BENCH_DEVICE must be cuda or cpu, not $DEVICE" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
rm -rf "$MODEL_DIR"  # an earlier run's model must not stand in for this one's
rm -f "$OUT"/preflight.txt "$OUT"/gpu_check.txt "$OUT"/gpu_check.json "$OUT"/serve_bench.txt "$OUT"/serve_bench.json
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 \
  BENCH_DEVICE=$DEVICE
started=$(date +%s)
status=0

elapsed() { echo $(($(date +%s) - started)); }

# stage NAME CAP_S LOG COMMAND...: COMMAND under min(CAP_S, what is left of the budget), its output shown and
# appended to LOG. timeout signals the whole process group, so a service a bench started goes with it.
stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET_S - $(elapsed)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    echo "gpu_check.sh: $name not run: the ${BUDGET_S} s budget is spent" | tee -a "$log"
    status=1
    return 1
  fi
  echo "=== $name (at $(elapsed) s, limit $limit s)" | tee -a "$log"
  local began rc=0
  began=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log" || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "gpu_check.sh: $name stopped at its $limit s limit" | tee -a "$log"
  fi
  echo "=== $name: exit $rc after $(($(date +%s) - began)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

log="$OUT/preflight.txt"
echo "gpu_check.sh on $(hostname 2>/dev/null || echo '?'), BENCH_DEVICE=$DEVICE, budget $BUDGET_S s, $(date -u +%FT%TZ)" \
  | tee "$log"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$log" \
    || echo "nvidia-smi: not available" | tee -a "$log"
fi

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  rm -rf "$SITE"
  stage "install the carried wheels ($(ls "$WHEELS"/*.whl | wc -l) in $WHEELS)" 90 "$log" \
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  if [ ! -d "$SITE" ] || [ "$status" -ne 0 ]; then
    echo "gpu_check.sh: stopped: the carried wheels did not install into $SITE (see above)" | tee -a "$log"
    exit 1
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS: the machine's packages as they are (bench/gpu_wheels.sh makes the set)" | tee -a "$log"
fi

if ! stage preflight 90 "$log" "$PYTHON" bench/gpu_preflight.py --device "$DEVICE" --site "$SITE"; then
  reason=$(grep -h "^PREFLIGHT FAILED" "$log" | tail -1)
  echo "gpu_check.sh: stopped: ${reason:-the preflight did not finish (see $log)}" | tee -a "$log"
  exit 1
fi

if [ "$DEVICE" = cuda ]; then
  engine_args=(--rows 1,8,32 --new-tokens 128 --diagram-tokens 384 --save-model "$MODEL_DIR")
  serve_args=(--model full --model-dir "$MODEL_DIR" --concurrency 1,32 --naive-concurrency 1,8
    --requests-per-client 1 --new-tokens 128)
else  # the 2B's attention shapes in 2 small layers: the same steps and files in seconds, figures meaningless
  small=(--config bench/qwen3_vl_small_config.json)
  engine_args=(--device cpu "${small[@]}" --rows 1,2 --new-tokens 8 --diagram-tokens 16 --eager-tokens 8
    --check-steps 20 --save-model "$MODEL_DIR")
  serve_args=(--model full "${small[@]}" --model-dir "$MODEL_DIR" --concurrency 1,2 --naive-concurrency 1
    --requests-per-client 1 --new-tokens 8)
fi
stage "engine (bench/gpu_check.py)" 220 "$OUT/gpu_check.txt" \
  "$PYTHON" bench/gpu_check.py "${engine_args[@]}" --json "$OUT/gpu_check.json"
stage "service (bench/serve_bench.py)" 220 "$OUT/serve_bench.txt" \
  "$PYTHON" bench/serve_bench.py "${serve_args[@]}" --json "$OUT/serve_bench.json"

echo "gpu_check.sh: finished in $(elapsed) s, exit $status; in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$status"
