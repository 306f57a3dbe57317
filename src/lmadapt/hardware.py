"""What this machine computes well: how many CPU threads to use, and whether half precision pays.

Threads: the cores that are idle now, not the cores the machine has.

On a shared machine a 2-thread run with one core busy elsewhere can be several times slower than a
1-thread run (each parallel region waits for the thread that shares a core), so ``threads: 0`` (auto)
measures how busy the cores are for a moment and takes the idle ones.

Half precision: bf16 is the fast path on GPUs and on CPUs with bf16 matrix units, and a very slow one on
CPUs without them, so ``precision: auto`` measures which this is (:func:`cpu_matmul_speedup`).
"""

from __future__ import annotations

import functools
import os
import time
import warnings

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


# ----------------------------------------------------------------------------------------------- half precision

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_matmul_speedup(dtype: torch.dtype) -> float:
    """How many times faster a 256 x 256 matmul runs in ``dtype`` than in fp32 on this CPU (best of 5 each).

    CPUs with bf16 matrix instructions (AVX512-BF16, AMX) run bf16 several times faster than fp32; CPUs
    without them (e.g. AVX2-only) fall back to a scalar path that was measured ~50x *slower* than fp32.
    Measured once per process (under 0.2 s even on the slow path). The operands come from a generator of their own:
    drawing them from torch's global one would make a run's initialisation depend on whether this process had
    measured already (the first bf16 run in a process drew them after seeding, a later one did not).
    """
    own = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=own), torch.randn(256, 256, generator=own)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y
        times = []
        for _ in range(5):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return max(min(times), 1e-9)

    return best(a, b) / best(a.to(dtype), b.to(dtype))


def half_is_fast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` computes ``dtype`` matmuls at least as fast as fp32."""
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_matmul_speedup(dtype) >= 1.0
    return True  # mps and others: trust the user's choice


def resolve_precision(spec: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where ``device`` runs bf16 matmuls faster than fp32, else ``fp32``; others unchanged."""
    if spec != "auto":
        return spec
    return "bf16" if half_is_fast(torch.bfloat16, device) else "fp32"


def warn_if_slow(dtype: torch.dtype | str, device: torch.device, setting: str) -> None:
    """Warn when ``setting`` asks for bf16/fp16 compute on a CPU that runs it far slower than fp32."""
    dtype = _HALF.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return
    speedup = cpu_matmul_speedup(dtype)
    if speedup < 0.5:
        name = "bf16" if dtype == torch.bfloat16 else "fp16"
        warnings.warn(f"{setting} is {name}, but this CPU has no {name} matrix instructions: a {name} matmul "
                      f"measured {1 / speedup:.0f}x slower than fp32 here, so this will run far slower than in "
                      f"fp32. Set {setting} to fp32, or to auto to get bf16 only where it is faster.",
                      stacklevel=3)
