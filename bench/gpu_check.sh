#!/usr/bin/env bash
# The prepared GPU check, about 6 minutes on one H100/H200 (give the run 8): the full Qwen3-VL-2B architecture
# with random weights, bf16, 1024x768 diagrams, forced token counts.
#   1. bench/gpu_check.py: the engine alone - hf generate() vs our eager step vs CUDA graphs, one stream and
#      1/8/32 concurrent diagrams, graph capture time, and the graph-vs-eager logits check.
#   2. bench/serve_bench.py: the service end to end over HTTP, ours at 1 and 32 concurrent clients, the naive
#      configuration (one at a time, eager) at 1 and 8, in the same run.
# The lent machine lacks some of requirements.txt: carry them as wheels in .whl (ignored via .git/info/exclude)
# and name .whl in the run's carry list.
#   here:  pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#            --platform any -d .whl transformers==5.24.0 peft==0.21.2 fastapi==0.165.0 starlette==1.10.0 \
#            uvicorn==0.54.0 python-multipart==0.0.34 pydantic==2.14.4 pydantic-core==2.50.5 \
#            pydantic-settings==2.16.3 python-dotenv annotated-types typing-inspection opentelemetry-api==1.44.0 \
#            pypdfium2==5.15.2 fastapi-swagger==0.4.64
#   there: bash bench/gpu_check.sh          (writes gpu_check.{txt,json} and serve_bench.{txt,json} to $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
status=0
timeout 200 python3 bench/gpu_check.py --rows 1,8,32 --new-tokens 128 --diagram-tokens 384 \
  --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.txt" || status=$?
BENCH_DEVICE=cuda timeout 260 python3 bench/serve_bench.py --model full --concurrency 1,32 --naive-concurrency 1,8 \
  --requests-per-client 1 --new-tokens 128 --json "$OUT/serve_bench.json" 2>&1 | tee "$OUT/serve_bench.txt" \
  || status=$?
exit $status
