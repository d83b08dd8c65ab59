"""The thread default (spine/distributed.py): one thread for a small step; for a large step alone on its node,
the cores other processes are not using, sampled at start; the cores split evenly between ranks on a node; a
container's cgroup CPU quota respected. Real processes make the machine busy; nothing is mocked."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

from spine.distributed import MULTI_THREAD_MACS, busy_cores, cgroup_cpu_quota, cores_per_rank, default_threads

LARGE = MULTI_THREAD_MACS * 10


@contextmanager
def spinners(n: int) -> Iterator[None]:
    """n busy Python processes, each killed by its pid on the way out."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)  # running, past interpreter start-up
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_a_small_step_takes_one_thread_without_probing_the_machine():
    started = time.perf_counter()
    assert default_threads(1, MULTI_THREAD_MACS - 1, probe_seconds=5.0) == 1
    assert time.perf_counter() - started < 1.0  # the 5-second probe never ran


def test_several_ranks_on_a_node_split_the_cores_without_a_probe():
    started = time.perf_counter()
    assert default_threads(2, LARGE, probe_seconds=5.0) == cores_per_rank(2)
    assert time.perf_counter() - started < 1.0
    assert cores_per_rank(2) == max(1, cores_per_rank(1) // 2)


@pytest.mark.timeout(60)
def test_busy_cores_sees_other_processes_and_a_large_step_leaves_their_cores_out():
    physical = psutil.cpu_count(logical=False) or 1
    before = busy_cores(0.5)  # whatever else runs now (another test worker, say)
    with spinners(physical):
        during = busy_cores(0.5)
        threads = default_threads(1, LARGE, probe_seconds=0.5)
    # More busy than before by half a core at least, or the machine saturated (it may have been busy already).
    assert during > min(before + 0.5, physical - 0.2), (before, during)
    assert during <= physical + 0.01
    assert threads == 1, f"every core was busy, yet {threads} threads (busy {during:.2f} of {physical})"


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, unlimited
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: rounded up
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, unlimited
    ({}, None),  # neither
])
def test_cgroup_cpu_quota_reads_both_cgroup_versions(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(str(tmp_path)) == expected
