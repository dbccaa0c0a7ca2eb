"""The CPUs a container may use, read from fake cgroup folders (v2 cpu.max, v1 cfs quota), and OMP_NUM_THREADS."""

from __future__ import annotations

import os

import pytest
import torch

from app.cpu_quota import apply_torch_threads, available_cpus, cgroup_quota_cpus, compute_threads
from app.pipeline import decode_pool
from app.service.inference import decoder_workers

PINNED = len(os.sched_getaffinity(0))


def v2(tmp_path, cpu_max: str, path: str = "/"):
    """A cgroup v2 tree with ``cpu.max`` in the process's own cgroup ``path``."""
    folder = tmp_path / "cgroup" / path.strip("/")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{path}\n")
    return tmp_path / "cgroup", proc


def v1(tmp_path, quota: int, period: int = 100000, path: str = "/"):
    folder = tmp_path / "cgroup" / "cpu,cpuacct" / path.strip("/")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (folder / "cpu.cfs_period_us").write_text(f"{period}\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"4:memory:{path}\n3:cpu,cpuacct:{path}\n0::/\n")
    return tmp_path / "cgroup", proc


def test_v2_quota_in_cpus(tmp_path):
    assert cgroup_quota_cpus(*v2(tmp_path, "150000 100000")) == 1.5


def test_v2_without_a_quota(tmp_path):
    assert cgroup_quota_cpus(*v2(tmp_path, "max 100000")) is None
    assert available_cpus(*v2(tmp_path, "max 100000")) == PINNED


def test_v2_quota_in_the_process_own_cgroup_or_a_parent(tmp_path):
    root, proc = v2(tmp_path, "max 100000", "/kubepods/pod1/container")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("100000 100000\n")
    assert cgroup_quota_cpus(root, proc) == 1.0


def test_v1_cfs_quota(tmp_path):
    assert cgroup_quota_cpus(*v1(tmp_path, 50000)) == 0.5
    assert cgroup_quota_cpus(*v1(tmp_path, -1)) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_quota_cpus(tmp_path / "nothing", tmp_path / "no-proc-file") is None


def test_threads_follow_the_quota_rounded_up_and_capped_by_the_pinned_cpus(tmp_path):
    assert compute_threads({}, *v2(tmp_path, "100000 100000"))[0] == 1
    assert compute_threads({}, *v2(tmp_path, "50000 100000"))[0] == 1  # never zero
    assert compute_threads({}, *v2(tmp_path, f"{PINNED * 100000 - 50000} 100000"))[0] == PINNED
    assert compute_threads({}, *v2(tmp_path, "6400000 100000"))[0] == PINNED  # a quota above the pinned CPUs


def test_omp_num_threads_wins_and_nonsense_is_ignored(tmp_path, caplog):
    quota = v2(tmp_path, "100000 100000")
    assert compute_threads({"OMP_NUM_THREADS": "3"}, *quota) == (3, "OMP_NUM_THREADS")
    with caplog.at_level("WARNING"):
        assert compute_threads({"OMP_NUM_THREADS": "lots"}, *quota)[0] == 1
    assert "not a positive integer" in caplog.text


def test_torch_threads_are_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert apply_torch_threads({"OMP_NUM_THREADS": "1"}) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_decoder_workers_at_most_one_per_cpu(monkeypatch):
    monkeypatch.setattr("app.service.inference.available_cpus", lambda: 1)
    assert decoder_workers(2) == 1
    monkeypatch.setattr("app.service.inference.available_cpus", lambda: 8)
    assert decoder_workers(2) == 2


def test_decoder_workers_run_at_a_lower_priority(monkeypatch):
    """The worker initializer lowers its own priority (here: in this process, so the call is faked)."""
    calls = []
    monkeypatch.setattr(decode_pool.os, "nice", calls.append)
    monkeypatch.setattr(decode_pool, "_exit_with_parent", lambda pid: None)
    decode_pool._start_worker(os.getpid())
    assert calls == [decode_pool.DECODER_NICENESS]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_real_machine_reads_without_error():
    assert 1 <= available_cpus() <= PINNED
