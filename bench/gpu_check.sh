#!/usr/bin/env bash
# One prepared GPU check (fits in 8 minutes on one H100/H200): the engine on the full Qwen3-VL-2B
# architecture in bf16 (eager, TORCH_COMPILE, bitsandbytes int8). The lent machine has torch/transformers/peft
# but not pydantic-settings or bitsandbytes: carry those wheels in .whl (see the device tool's README) and
# name .whl in the run's carry list.
#   here:  pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl \
#            pydantic-settings==2.16.3 python-dotenv bitsandbytes==0.50.2      (46 MB, under the 64 MiB carry)
#   there: bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
OUT=${OUT:-/tmp}
PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --batches 1,8,32 --new-tokens 128 --json "$OUT/gpu_check.json" \
  2>&1 | tee "$OUT/gpu_check.txt"
