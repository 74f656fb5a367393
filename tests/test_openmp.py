"""release_openmp_threads: the calling thread's idle OpenMP workers go, and come back on demand.

Why it matters (runtime.openmp): with two libgomp pools on a 2-core CPU every short parallel
region waits for a futex wake-up, and a Session's decode steps ran about 2x slower.
"""
from __future__ import annotations

import os

import torch

from redrafter.runtime.openmp import release_openmp_threads


def os_threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def test_release_frees_the_calling_threads_idle_openmp_workers():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.ones(1 << 22).add_(1)  # a parallel region: this thread's pool now has a worker
        with_pool = os_threads()
        assert release_openmp_threads()
        without = os_threads()
        assert without < with_pool, "the pool's worker thread should have exited"
        torch.ones(1 << 22).add_(1)  # a later parallel region starts a new pool
        assert len(os_threads()) == len(with_pool)
    finally:
        torch.set_num_threads(before)
