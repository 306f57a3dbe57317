"""Thread count from idle cores."""

import os

import pytest
import torch

from lmadapt import hardware


def test_idle_cpus_is_a_share_of_the_machine() -> None:
    idle = hardware.idle_cpus(0.05)
    if idle is None:
        pytest.skip("this OS has no /proc/stat")
    assert 0.0 <= idle <= os.cpu_count()


@pytest.mark.parametrize(("idle", "expected"), [(0.3, 1), (1.2, 1), (1.6, 2), (7.9, 8)])
def test_auto_threads_take_the_idle_cores(monkeypatch, idle: float, expected: int) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "idle_cpus", lambda interval=0.3: idle)
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 8)
    assert hardware.choose_threads(0) == expected


def test_explicit_and_environment_counts_win(monkeypatch) -> None:
    monkeypatch.setattr(hardware, "idle_cpus", lambda interval=0.3: 0.0)
    assert hardware.choose_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert hardware.choose_threads(0) == torch.get_num_threads()
