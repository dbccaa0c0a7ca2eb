#!/usr/bin/env bash
# Rehearse bench/gpu_check.sh on the CPU, on a Python made like the lent GPU machine's: CPython 3.12 with only
# torch 2.11, transformers 5.17, peft, accelerate, numpy, pillow, httpx and prometheus-client from the package
# index, plus the carried wheels (bench/gpu_wheels.sh), no network for the check itself. Every import error and
# API drift the GPU run would meet shows up here instead, where it costs no device time.
#   bash bench/gpu_wheels.sh && bash bench/gpu_rehearsal.sh        (CI runs both)
# Passes when gpu_check.sh exits 0, the engine stage wrote a figure (a row of gpu_check.json with no error)
# and the service stage did too (a concurrency of serve_bench.json). The venv is made once per Python and
# package list, in $GPU_REHEARSAL_CACHE (~7 GB: PyPI's torch 2.11 is the CUDA build, which runs on the CPU);
# then a rehearsal takes about a minute.
# Without a CPython 3.12 (this image's pyenv has one; or name one in REHEARSAL_PYTHON) it rehearses on 3.13 or 3.11,
# with the wheel set downloaded again for that version, and says so: everything but the cp312 wheel tags is then
# checked. Neither PyPI nor Debian 12 offers a CPython 3.12 to install.
set -euo pipefail
cd "$(dirname "$0")/.."
MACHINE_PACKAGES=${MACHINE_PACKAGES:-"torch==2.11.* transformers==5.17.* peft accelerate numpy pillow httpx \
prometheus-client"}
MACHINE_PYTHON=${MACHINE_PYTHON:-3.12}
CACHE=${GPU_REHEARSAL_CACHE:-$HOME/.cache/vlm-gpu-rehearsal}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
started=$(date +%s)
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
run=$(mktemp -d)
trap 'rm -rf "$run/site" "$run/tmp" "$run/whl"' EXIT  # installed wheels, saved model, other wheels; output stays

python_of() {  # the interpreter's "major.minor" if it can make venvs, or nothing
  "$1" -c 'import sys, venv, ensurepip; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}
find_python() {  # find_python VERSION: a CPython of that minor version, from PATH or pyenv
  local wanted=$1 candidate
  for candidate in ${REHEARSAL_PYTHON:-} "python$wanted" "$HOME"/.pyenv/versions/"$wanted".*/bin/"python$wanted" \
    /root/.pyenv/versions/"$wanted".*/bin/"python$wanted" /usr/local/bin/"python$wanted" /usr/bin/"python$wanted"; do
    if command -v "$candidate" >/dev/null 2>&1 && [ "$(python_of "$candidate")" = "$wanted" ]; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

python=$(find_python "$MACHINE_PYTHON" || true)
if [ -z "$python" ]; then
  for version in 3.13 3.11; do
    python=$(find_python "$version" || true)
    [ -n "$python" ] && break
  done
  if [ -z "$python" ]; then
    echo "gpu_rehearsal.sh: FAIL: no CPython $MACHINE_PYTHON, 3.13 or 3.11 with venv here" >&2
    exit 1
  fi
  echo "gpu_rehearsal.sh: WARNING: no CPython $MACHINE_PYTHON here (pyenv's /root/.pyenv/versions/$MACHINE_PYTHON.*," \
    "or set REHEARSAL_PYTHON); rehearsing on $version with the wheel set downloaded again for $version:" \
    "everything but the cp${MACHINE_PYTHON/./} wheel tags is checked" >&2
  WHEELS=$run/whl
  WHEEL_PYTHON=$version bash bench/gpu_wheels.sh "$WHEELS"
fi
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "gpu_rehearsal.sh: FAIL: no wheels in $WHEELS: run bash bench/gpu_wheels.sh first" >&2
  exit 1
fi
full_version=$("$python" -c 'import platform; print(platform.python_version())')
key=$(printf '%s\n' "$full_version" "$MACHINE_PACKAGES" | sha1sum | cut -c1-12)
venv="$CACHE/venv-$full_version-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "=== making the machine's venv: CPython $full_version + $MACHINE_PACKAGES (once; cached in $venv)"
  rm -rf "$venv"  # a venv without .complete is one a run left half made
  mkdir -p "$CACHE"
  "$python" -m venv "$venv"
  # shellcheck disable=SC2086  # the package list is words
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $MACHINE_PACKAGES \
    2> >(grep -v "is ignored: it is neither" >&2)
  touch "$venv/.complete"
  echo "=== venv made in $(($(date +%s) - started)) s"
fi
"$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE '^(torch|transformers|tokenizers|huggingface.hub|peft|accelerate|numpy|pillow|httpx|prometheus.client) ' \
  | tr -s ' ' | paste -sd, | sed 's/^/machine: /'

out=${REHEARSAL_OUT:-$run/out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rehearsal_started=$(date +%s)
rc=0
# Its own temp folder: the benches' model folders under it come from this run's packages, not an earlier one's.
TMPDIR="$run/tmp" OUT="$out" PYTHON="$venv/bin/python" BENCH_DEVICE=cpu GPU_CHECK_WHEELS="$WHEELS" \
  GPU_CHECK_SITE="$run/site" bash -c 'mkdir -p "$TMPDIR" && bash bench/gpu_check.sh' || rc=$?
took=$(($(date +%s) - rehearsal_started))

problems=$("$venv/bin/python" - "$out" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
problems = []
try:
    engine = json.loads((out / "gpu_check.json").read_text())
    good = [row for row in engine.get("rows", []) if "error" not in row and row.get("total_tok_s", 0) > 0]
    if not good:
        problems.append("gpu_check.json has no row with a figure")
    problems += [f"gpu_check {row['mode']} x{row['rows']}: {row['error']}" for row in engine["rows"] if "error" in row]
except (OSError, ValueError) as error:
    problems.append(f"no gpu_check.json ({error})")
try:
    service = json.loads((out / "serve_bench.json").read_text())
    figures = [level for name, levels in service.items() if name != "failed" for level in levels.values()
               if level.get("diagrams_per_min", 0) > 0]
    if not figures:
        problems.append("serve_bench.json has no figure")
    problems += [f"serve_bench {name}: {why.splitlines()[0]}" for name, why in service.get("failed", {}).items()]
except (OSError, ValueError, AttributeError) as error:
    problems.append(f"no serve_bench.json ({error})")
print("; ".join(problems))
EOF
)
carried=$(grep -E '^transformers ' "$out/preflight.txt" | tr -s ' ' || true)
echo "gpu_rehearsal.sh: gpu_check.sh took $took s (exit $rc), $(($(date +%s) - started)) s in all;" \
  "$carried; output in $out"
stopped=$(grep -h "^gpu_check.sh: stopped:" "$out/preflight.txt" 2>/dev/null | tail -1 || true)
if [ -n "$stopped" ]; then
  problems=${stopped#gpu_check.sh: }
fi
if [ "$rc" -ne 0 ] || [ -n "$problems" ]; then
  echo "gpu_rehearsal.sh: FAIL: ${problems:-gpu_check.sh exited $rc}" >&2
  exit 1
fi
echo "gpu_rehearsal.sh: passed: the engine and the service stages both reached their figures"
