"""How many CPU threads to use: the cores that are idle now, not the cores the machine has.

On a shared machine a 2-thread run with one core busy elsewhere can be several times slower than a
1-thread run (each parallel region waits for the thread that shares a core), so ``threads: 0`` (auto)
measures how busy the cores are for a moment and takes the idle ones.
"""

from __future__ import annotations

import os
import time

import torch


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])


def idle_cpus(interval: float = 0.3) -> float | None:
    """How many CPUs were idle, on average, over the next ``interval`` seconds (None: unknown)."""
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(interval)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    return share * (os.cpu_count() or 1)


def choose_threads(requested: int = 0) -> int:
    """The thread count to use: ``requested`` when > 0; else OMP_NUM_THREADS when it is set; else the
    idle CPUs (rounded, at least 1, at most the usable CPUs)."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    idle = idle_cpus()
    if idle is None:
        return torch.get_num_threads()
    return max(1, min(usable_cpus(), round(idle)))
