#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on the lent GPU machine, which has no network and only Python 3.12,
# torch 2.11 (cu130), transformers 5.17, peft, accelerate, numpy, pillow, httpx and prometheus-client.
#   bash bench/gpu_wheels.sh [DIR]      (DIR defaults to .whl, which is ignored; name it in the run's carry list)
# The set: the dependency closure of requirements.txt's runtime packages for CPython 3.12 on x86_64 Linux, less
# what the machine's torch brings (torch, nvidia-*, triton, cuda-*, and what only torch needs), numpy and pillow
# (on the machine, 23 MiB as wheels: the set would not fit), bitsandbytes (QUANTIZATION=int8, not measured there)
# and psycopg (imported only for JOBS_DB=postgresql://...), with the torchvision built for the machine's torch
# instead of requirements.txt's. Versions pinned in requirements.txt win; the resolver picks the rest. Binary
# wheels only, from the package index pip is configured with. Everything carried shadows the machine's copy.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
MACHINE_TORCH=${MACHINE_TORCH:-2.11.0}
MACHINE_TORCHVISION=${MACHINE_TORCHVISION:-0.26.0}  # the release built for torch 2.11 (cu130, like the machine's)
LIMIT_MIB=${LIMIT_MIB:-60}                          # the device tool carries 64 MiB with the working tree
PYTHON=${PYTHON:-python3}
WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}                  # the machine's; gpu_rehearsal.sh may ask for another
MACHINE_PROVIDES=${MACHINE_PROVIDES:-numpy pillow}  # besides torch's own: used as the machine has them

platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for n in $(seq 5 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
target=(--only-binary=:all: --python-version "$WHEEL_PYTHON" --implementation cp "${platforms[@]}")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Runtime packages of requirements.txt, less those left to the machine or not imported there.
sed -e 's/#.*//' -e 's/[[:space:]]//g' requirements.txt | grep -v '^$' \
  | grep -viE '^(torch|torchvision|bitsandbytes|psycopg|psycopg-binary|psycopg-pool)(\[|=|<|>|~|!|$)' \
  >"$work/roots.txt"
{ cat "$work/roots.txt"; echo "torch==$MACHINE_TORCH"; echo "torchvision==$MACHINE_TORCHVISION"; } >"$work/resolve.txt"

echo "resolving for CPython $WHEEL_PYTHON x86_64 with torch==$MACHINE_TORCH (metadata only)"
"$PYTHON" -m pip install --dry-run --ignore-installed --quiet --report "$work/report.json" --target "$work/t" \
  "${target[@]}" -r "$work/resolve.txt" 2> >(grep -v "is ignored: it is neither" >&2)

# The closure of the roots plus torchvision, never walking into torch: what torch needs is on the machine.
"$PYTHON" - "$work/report.json" "$work/roots.txt" "torchvision==$MACHINE_TORCHVISION" "$MACHINE_PROVIDES" \
  "$WHEEL_PYTHON" >"$work/pins.txt" <<'EOF'
import json
import re
import sys

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

report, roots_file, extra_root, provided, python = sys.argv[1:6]
provided = provided.split()
environment = {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
               "platform_machine": "x86_64", "os_name": "posix", "implementation_version": f"{python}.0"}
machine = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
left: dict[str, set[str]] = {}
resolved = {canonicalize_name(item["metadata"]["name"]): item for item in json.load(open(report))["install"]}


def wanted(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in (extras or {""}))


pending = [Requirement(line) for line in open(roots_file).read().split()] + [Requirement(extra_root)]
extras_seen: dict[str, set[str]] = {}
while pending:
    requirement = pending.pop()
    name = canonicalize_name(requirement.name)
    if machine.match(name):
        continue
    if name in provided:
        left.setdefault(name, set()).add(str(requirement.specifier) or "any")
        continue
    seen = extras_seen.get(name)
    if seen is not None and set(requirement.extras) <= seen:
        continue
    extras_seen[name] = (seen or set()) | set(requirement.extras)
    if name not in resolved:
        sys.exit(f"{name} is needed but was not resolved")
    for line in resolved[name]["metadata"].get("requires_dist", []):
        dependency = Requirement(line)
        if wanted(dependency, extras_seen[name]):
            pending.append(dependency)
for name in sorted(extras_seen):
    print(f"{name}=={resolved[name]['metadata']['version']}")
for name, specifiers in sorted(left.items()):
    print(f"left to the machine: {name} ({', '.join(sorted(specifiers))})", file=sys.stderr)
EOF

rm -rf "$DEST"
mkdir -p "$DEST"
echo "downloading $(wc -l <"$work/pins.txt") wheels into $DEST"
"$PYTHON" -m pip download --no-deps --quiet "${target[@]}" -d "$DEST" -r "$work/pins.txt" \
  2> >(grep -v "is ignored: it is neither" >&2)
count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "$(wc -l <"$work/pins.txt")" ]; then
  echo "FAIL: $count wheels for $(wc -l <"$work/pins.txt") pins" >&2
  exit 1
fi
(cd "$DEST" && du -k -- *.whl | sort -rn | awk '{printf "%6d KiB  %s\n", $1, $2}')
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "wheel set: $count wheels, $mib MiB in $DEST (limit $LIMIT_MIB MiB)"
if [ "$bytes" -ge $((LIMIT_MIB * 1048576)) ]; then
  echo "FAIL: the wheel set is $mib MiB, not under $LIMIT_MIB MiB: the device tool carries 64 MiB in all" >&2
  exit 1
fi
