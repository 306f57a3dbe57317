"""Thread count from idle cores; half precision only where the device computes it fast."""

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


@pytest.mark.parametrize(("speedup", "expected"), [(6.0, "bf16"), (1.2, "bf16"), (0.9, "fp32"), (0.02, "fp32")])
def test_auto_precision_takes_bf16_only_where_it_is_faster(monkeypatch, speedup: float, expected: str) -> None:
    monkeypatch.setattr(hardware, "cpu_matmul_speedup", lambda dtype: speedup)
    assert hardware.resolve_precision("auto", torch.device("cpu")) == expected
    assert hardware.resolve_precision("fp16", torch.device("cpu")) == "fp16"  # an explicit choice is kept


def test_measured_speedup_is_a_real_ratio() -> None:
    speedup = hardware.cpu_matmul_speedup(torch.bfloat16)
    assert 0 < speedup < 100
    assert hardware.cpu_matmul_speedup(torch.bfloat16) == speedup  # measured once per process


def test_slow_half_precision_on_cpu_warns_with_the_setting_and_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(hardware, "cpu_matmul_speedup", lambda dtype: 0.025)
    with pytest.warns(UserWarning, match=r"train.precision is bf16.*40x slower than fp32.*fp32, or to auto"):
        hardware.warn_if_slow("bf16", torch.device("cpu"), "train.precision")
    monkeypatch.setattr(hardware, "cpu_matmul_speedup", lambda dtype: 4.0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hardware.warn_if_slow(torch.bfloat16, torch.device("cpu"), "model.dtype")
        hardware.warn_if_slow("fp32", torch.device("cpu"), "model.dtype")


@pytest.mark.parametrize(("speedup", "precision", "weights"), [(0.02, "fp32", "fp32"), (4.0, "bf16", "bf16")])
def test_training_with_auto_precision_runs_and_records_what_it_chose(monkeypatch, run_config, speedup: float,
                                                                     precision: str, weights: str) -> None:
    import yaml

    from lmadapt.methods import build_method
    from lmadapt.recipes.finetune import load_run_config, train, training_model_config

    monkeypatch.setattr(hardware, "cpu_matmul_speedup", lambda dtype: speedup)
    run_config["model"]["dtype"] = "auto"
    run_config["train"].update(precision="auto", max_steps=2)
    result = train(run_config, progress=False)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["train"]["precision"] == precision
    stored = training_model_config(load_run_config(saved), build_method(saved["method"])).dtype
    assert stored == weights  # a frozen base is stored in bf16 only when the run computes in bf16


def test_measuring_the_speedup_draws_nothing_from_the_global_generator() -> None:
    """A run seeds torch and then may measure (explicit bf16 warns when slow): the measurement must not move the
    global stream, or a run's initialisation depends on whether its process measured before."""
    hardware.cpu_matmul_speedup.cache_clear()
    torch.manual_seed(7)
    hardware.cpu_matmul_speedup(torch.bfloat16)
    after_measuring = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after_measuring, torch.rand(3))
