"""How many threads kvc's torch computations use.

torch sizes its intra-op pool from the machine (or from what its OpenMP runtime sees of it), which
can be more than the cores a scheduler, ``taskset`` or a container's cpuset lets this process run
on. More threads than cores oversubscribe: each parallel region then waits for its slowest thread,
and on cores other processes share that is up to 10x slower than one thread
(docs/benchmarks/analyze_speed.md).
"""

from __future__ import annotations

import os

import torch

_STARTING_THREADS = torch.get_num_threads()  # torch's own count when kvc first imported it


def cpu_threads() -> int:
    """Cap torch's intra-op threads at the cores this process may use; return the count in force.

    The cap is min(``torch.get_num_threads()``, ``len(os.sched_getaffinity(0))``); it never raises
    the count. A count the user chose is kept as it is: ``OMP_NUM_THREADS`` set, or
    ``torch.set_num_threads`` called after kvc was imported. The ``kvc`` commands that compute and
    the functions of ``kvc.api`` call this first; calling it again changes nothing.
    """
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ or threads != _STARTING_THREADS:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads > cores:
        torch.set_num_threads(cores)
    return min(threads, cores)
