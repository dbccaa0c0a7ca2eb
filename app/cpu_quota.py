"""How many CPUs this process may really use: the container's CPU quota, not the host's core count.

``os.cpu_count()`` and torch's default thread count see the host's cores; a container limited to 2 CPUs on a
64-core host would run 64 threads in a 2-CPU quota, and a parallel region whose threads are throttled stalls the
whole step. The quota is cgroup v2's ``cpu.max`` ("200000 100000" = 2 CPUs, "max 100000" = none) or v1's
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 = none), in the process's own cgroup or an enclosing one.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_quota_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (2.5 for 250000/100000), the tightest along the process's cgroup path; None
    when there is no quota or no cgroup file to read."""
    limits = [limit for folder in _cgroup_folders(root, proc_cgroup) if (limit := _quota_in(folder)) is not None]
    return min(limits) if limits else None


def _cgroup_folders(root: Path, proc_cgroup: Path) -> list[Path]:
    """Folders that may hold this process's CPU limit: its own cgroup's and each parent's, up to the root (inside a
    container the root itself is usually the container's cgroup)."""
    relative = []
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "" or "cpu" in controllers.split(","):  # v2's single hierarchy, or v1's cpu one
                relative.append((controllers, path.lstrip("/")))
    except (OSError, ValueError):
        pass
    folders = []
    for controllers, path in relative:
        base = root if controllers == "" else _v1_cpu_root(root)
        parts = Path(path).parts if path else ()
        folders += [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return folders or [root, _v1_cpu_root(root)]


def _v1_cpu_root(root: Path) -> Path:
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (root / name).is_dir():
            return root / name
    return root / "cpu"


def _quota_in(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process may use: the ones it is pinned to (cpuset, taskset), capped by the cgroup quota rounded
    up (1.5 CPUs of quota still run two threads at once, each part of the time)."""
    pinned = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota_cpus(root, proc_cgroup)
    return max(1, min(pinned, math.ceil(quota))) if quota is not None else max(1, pinned)


def compute_threads(environ: dict[str, str] | None = None, root: Path = CGROUP_ROOT,
                    proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[int, str]:
    """Threads for torch's matrix work, and why: OMP_NUM_THREADS when set to a positive integer (an operator's
    choice wins), else the CPUs available to this process."""
    environ = os.environ if environ is None else environ
    value = environ.get("OMP_NUM_THREADS", "").strip()
    if value:
        try:
            if int(value) > 0:
                return int(value), "OMP_NUM_THREADS"
        except ValueError:
            pass
        logger.warning("OMP_NUM_THREADS=%r is not a positive integer; ignored", value)
    cpus = available_cpus(root, proc_cgroup)
    quota = cgroup_quota_cpus(root, proc_cgroup)
    return cpus, f"cgroup CPU quota {quota:g}" if quota is not None and math.ceil(quota) == cpus else "CPUs available"


def apply_torch_threads(environ: dict[str, str] | None = None) -> int:
    """Set torch's intra-op threads (process-wide) from compute_threads; returns the count."""
    import torch

    threads, why = compute_threads(environ)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info("torch uses %d threads (%s)", threads, why)
    return threads
