"""Data parallelism on CPU (gloo): two processes with the same global batch train the same adapter as one, and a
two-process run killed and resumed ends identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lmadapt.recipes.finetune import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, resume: bool, kill_at: int | None) -> None:
    import test_method_contract as probe  # the module pytest imported, by name
    import torch.distributed as dist

    from lmadapt.methods.registry import METHODS

    METHODS.register(probe.Probe)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    probe.KILL_AT["step"] = kill_at
    try:
        train(cfg, resume=resume, progress=False)
    except probe.Killed:
        pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch(world: int, cfg: dict, *, resume: bool = False, kill_at: int | None = None) -> None:
    if world == 1:
        env = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK") if k in os.environ}
        try:
            _worker_single(cfg, resume)
        finally:
            os.environ.update(env)
        return
    mp.spawn(_worker, args=(world, _free_port(), cfg, resume, kill_at), nprocs=world, join=True)


def _worker_single(cfg: dict, resume: bool) -> None:
    train(cfg, resume=resume, progress=False)


@pytest.fixture
def probe_method():
    import test_method_contract as probe

    from lmadapt.methods.registry import METHODS

    METHODS.register(probe.Probe)
    yield probe.Probe
    METHODS.unregister(probe.Probe.name)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture
def ddp_config(run_config, probe_method):
    run_config["method"] = {"name": "probe", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                            "switch_at": 2}
    run_config["train"].update({"threads": 1, "max_steps": 4, "grad_accum": 2})
    return run_config


def test_two_processes_train_the_adapter_of_one_with_the_same_global_batch(ddp_config, tmp_path):
    one = {**ddp_config, "output_dir": str(tmp_path / "one"),
           "train": {**ddp_config["train"], "batch_size": 4}}
    two = {**ddp_config, "output_dir": str(tmp_path / "two"),
           "train": {**ddp_config["train"], "batch_size": 2}}  # 2 rows per process: the same 4-row global batch
    _launch(1, one)
    _launch(2, two)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, worst
    assert any(float(a[k].abs().max()) > 1e-3 for k in a if "lora_B" in k)  # it trained
    # one process logged: one line per step (and one validation line), the same loss curve as the single run
    logs = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")}
    assert [r["step"] for r in logs["two"] if "loss" in r] == [1, 2, 3, 4]
    for x, y in zip(logs["one"], logs["two"]):
        assert x.get("loss", 0) == pytest.approx(y.get("loss", 0), rel=1e-5)
        assert x["tokens"] == y["tokens"] if "tokens" in x else True
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["final_val_loss"] == pytest.approx(
        json.loads((tmp_path / "one" / "report.json").read_text())["final_val_loss"], rel=1e-5)


def test_a_short_last_batch_leaves_one_process_without_rows(ddp_config, tmp_path):
    """45 rows in global batches of 4: the last one has a single row, so one process gets none in that
    micro-batch; it still joins the gradient sum, and the result equals one process's."""
    from conftest import make_rows, write_jsonl

    data = tmp_path / "odd.jsonl"
    write_jsonl(data, make_rows(45, seed=3))
    base = {**ddp_config, "data": {**ddp_config["data"], "train": [str(data)], "validation_fraction": 0.0,
                                   "batching": "padded"}}
    steps = {"max_steps": 6, "grad_accum": 2}  # 12 micro-batches: the 12th is the 1-row one
    _launch(1, {**base, "output_dir": str(tmp_path / "one"), "train": {**base["train"], **steps, "batch_size": 4}})
    _launch(2, {**base, "output_dir": str(tmp_path / "two"), "train": {**base["train"], **steps, "batch_size": 2}})
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    # fp32 after 6 Adam steps over 12 micro-batches padded differently per process (measured: 1.2e-6)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 5e-6


def test_a_killed_two_process_run_resumes_to_the_same_weights(ddp_config, tmp_path):
    cfg = {**ddp_config, "train": {**ddp_config["train"], "batch_size": 2, "max_steps": 6, "save_every": 3}}
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    _launch(2, {**cfg, "output_dir": whole})
    _launch(2, {**cfg, "output_dir": killed}, kill_at=5)
    assert not (tmp_path / "killed" / "adapter").exists()
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step-0000003"]
    _launch(2, {**cfg, "output_dir": killed}, resume=True)
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
