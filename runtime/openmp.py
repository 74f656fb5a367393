"""Keep one OpenMP thread pool per process, so that a decode loop on its own thread runs at full speed.

GNU OpenMP (libgomp, which torch's Linux wheels ship and run their CPU kernels on) keeps a pool of
worker threads for every thread that has started a parallel region. While it manages more threads
than there are CPUs, a worker spins only about 100 times (instead of about 300,000) before it
sleeps on a futex, so every short parallel region then waits for a wake-up. A decode step is
hundreds of such regions (one small matrix product per linear layer). So when the main thread has
loaded a model (its pool stays, idle) and a second thread decodes (a pool of its own), a 2-core
machine runs the steps about 2x slower, with the second core mostly idle (BENCHMARKS.md).

`release_openmp_threads()` frees the calling thread's idle pool through OpenMP 5.0's
`omp_pause_resource_all`, which libgomp implements per calling thread; a later parallel region on
that thread starts a new pool. It does nothing where torch runs on another OpenMP runtime (LLVM's
or Intel's pause the whole process's runtime, which another thread may be using).
"""
from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp this process has loaded (found in /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already mapped: the same handle, no second runtime
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):  # an older libgomp without OpenMP 5.0's pause
            continue
    return None


def release_openmp_threads() -> bool:
    """Free the calling thread's idle OpenMP worker threads; True when a pool was released or none
    existed. Call it from a thread that is about to hand its torch work to another thread."""
    lib = _libgomp()
    if lib is None:
        return False
    if lib.omp_pause_resource_all(_OMP_PAUSE_SOFT) != 0:  # inside a parallel region: nothing freed
        log.debug("omp_pause_resource_all refused to release this thread's OpenMP pool")
        return False
    return True
