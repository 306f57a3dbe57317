"""``--resume`` and the run folder: what may change on resume (and config.yaml follows it), what is refused
(one message, every difference), a finished run is not redone, Ctrl-C and a missing checkpoint say what
exists, and the public ``lmadapt.train`` can be called any number of times."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import interrupted_at as ctrl_c_at
from conftest import make_rows, write_jsonl
from safetensors.torch import load_file

from lmadapt.cli import main
from lmadapt.errors import LmadaptError
from lmadapt.recipes.finetune import train

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ helpers

@dataclass
class Outcome:
    rc: int | None
    err: str


def cli(*argv: object) -> Outcome:
    """``lmadapt ARGV`` in this process; an exception escaping ``main`` is a traceback (rc None)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in argv])
        except Exception as exc:  # noqa: BLE001 - what a user would see as a traceback
            return Outcome(None, f"{err.getvalue()}\nTraceback: {exc!r}")
    return Outcome(rc, err.getvalue())


def refused(res: Outcome, *named: str) -> None:
    assert res.rc == 2 and "Traceback" not in res.err, res.err
    for text in named:
        assert text in res.err, f"{text!r} not in {res.err!r}"


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def make_config(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(data, make_rows(48))

    def make(output_dir: Path, **train_fields) -> dict:
        return {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": [str(data)], "max_length": 128, "validation_fraction": 0.125},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 6, "tensorboard": False, "schedule": "constant",
                      "threads": 2, "save_every": 2, **train_fields},
            "output_dir": str(output_dir),
        }
    return make


@pytest.fixture(scope="module")
def finished_run(make_config, tmp_path_factory) -> Path:
    """6 steps, checkpoints at steps 2 and 4, report.json written."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(make_config(run), progress=False)
    assert json.loads((run / "report.json").read_text())["steps"] == 6
    return run


@pytest.fixture(scope="module")
def interrupted_run(make_config, tmp_path_factory) -> Path:
    """The same run stopped by Ctrl-C after step 5 (checkpoints at steps 2 and 4)."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    with ctrl_c_at(5), pytest.raises(KeyboardInterrupt):
        train(make_config(run), progress=False)
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ Ctrl-C

def test_ctrl_c_names_the_checkpoint_and_resume_ends_as_the_uninterrupted_run(make_config, finished_run, tmp_path,
                                                                              capfd):
    run = tmp_path / "run"
    with ctrl_c_at(5), pytest.raises(KeyboardInterrupt):
        train(make_config(run), progress=False)
    assert f"interrupted at step 5; --resume continues from {run / 'checkpoints' / 'step-0000004'}" \
        in capfd.readouterr().err
    train(make_config(run), resume=True, progress=False)
    assert same_weights(adapter(run), adapter(finished_run))


@pytest.mark.parametrize("save_every,said", [
    (4, "no checkpoint yet: the run stopped at step 3 before the first save (save_every = 4)"),
    (0, "the run keeps no checkpoints (train.save_every = 0)"),
])
def test_resume_without_a_checkpoint_says_where_the_run_stopped(make_config, tmp_path, capfd, save_every, said):
    cfg = make_config(tmp_path / "run", save_every=save_every)
    with ctrl_c_at(3), pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    interrupted = capfd.readouterr().err
    assert "interrupted at step 3;" in interrupted and "--resume cannot continue it" in interrupted
    assert ("the first is written at step 4" if save_every else "train.save_every = 0") in interrupted
    before = snapshot(tmp_path / "run")
    with pytest.raises(LmadaptError, match="without --resume") as exc:
        train(cfg, resume=True, progress=False)
    assert said in str(exc.value)
    assert snapshot(tmp_path / "run") == before


def test_a_real_sigint_exits_130_naming_the_checkpoint_without_a_traceback(make_config, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", make_config(tmp_path / "run", max_steps=5000))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmadapt.cli", "train", str(cfg), "--no-progress"], env=env,
                            stderr=subprocess.PIPE, text=True)
    first = tmp_path / "run" / "checkpoints" / "step-0000002" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "lmadapt train: interrupted" in err
    assert f"; --resume continues from {tmp_path / 'run' / 'checkpoints' / 'step-'}" in err, err


# ------------------------------------------------------------------------------------------------ what may change

def test_changed_settings_are_refused_in_one_message_and_nothing_changes(make_config, interrupted_run, tmp_path):
    run = copy_run(interrupted_run, tmp_path)
    cfg = make_config(run, lr=1e-3, schedule="cosine")
    cfg["method"]["r"] = 8
    cfg["data"]["max_length"] = 64
    cfg["evals"] = [{"task": "classification", "data": cfg["data"]["train"]}]
    before = snapshot(run)
    res = cli("train", write_config(tmp_path / "cfg.yaml", cfg), "--resume", "--no-progress")
    refused(res, f"{run / 'config.yaml'}", "data.max_length: run has 128, now 64", "method.r: run has 4, now 8",
            "train.lr: run has 0.005, now 0.001", "train.schedule: run has 'constant', now 'cosine'",
            "evals: run has [], now [{", "Resume with the run's own config", "another output_dir")
    assert res.err.count("error:") == 1
    assert snapshot(run) == before


@pytest.mark.parametrize("saved,now,why", [
    ({"schedule": "cosine"}, {"schedule": "cosine", "max_steps": 8}, "with schedule cosine the learning rate"),
    ({"warmup_ratio": 0.2}, {"warmup_ratio": 0.2, "max_steps": 8}, "warmup_ratio x max_steps"),
    ({}, {"max_steps": 4}, "max_steps may only grow"),
])
def test_max_steps_may_not_change_where_the_learning_rates_depend_on_it(make_config, finished_run, tmp_path,
                                                                        saved, now, why):
    """The run's config.yaml is edited to the schedule it would have been trained with: the check reads only it."""
    run = copy_run(finished_run, tmp_path)
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    recorded["train"].update(saved)
    write_config(run / "config.yaml", recorded)
    before = snapshot(run)
    res = cli("train", write_config(tmp_path / "cfg.yaml", make_config(run, **now)), "--resume", "--no-progress")
    refused(res, f"train.max_steps: run has 6, now {now['max_steps']} (", why)
    assert snapshot(run) == before


def test_allowed_changes_apply_and_config_yaml_records_them(make_config, interrupted_run, finished_run, tmp_path,
                                                            capfd):
    """Logging, validation and checkpoint settings may change; the thread count stays the run's; the weights
    are those of the uninterrupted run."""
    run = copy_run(interrupted_run, tmp_path)
    cfg = make_config(run, save_every=3, keep_last=1, log_every=2, eval_every=3, eval_batches=1, threads=1,
                      nan_policy="skip")
    train(cfg, resume=True, progress=False)
    assert same_weights(adapter(run), adapter(finished_run))
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    first = yaml.safe_load((finished_run / "config.yaml").read_text())
    expected = {**first["train"], "save_every": 3, "keep_last": 1, "log_every": 2, "eval_every": 3,
                "eval_batches": 1, "nan_policy": "skip", "threads": 2}
    assert recorded["train"] == expected and recorded["output_dir"] == str(run)
    assert {k: v for k, v in recorded.items() if k not in ("train", "output_dir")} == \
        {k: v for k, v in first.items() if k not in ("train", "output_dir")}
    said = next(line for line in capfd.readouterr().err.splitlines() if line.startswith("changed on resume: "))
    assert sorted(said.removeprefix("changed on resume: ").split("; ")) == [
        "train.eval_batches: 0 -> 1", "train.eval_every: 0 -> 3", "train.keep_last: 2 -> 1", "train.log_every: 1 -> 2",
        "train.nan_policy: 'stop' -> 'skip'", "train.save_every: 2 -> 3"]


def test_a_setting_the_runs_config_yaml_lacks_counts_as_its_default(make_config, interrupted_run, finished_run,
                                                                     tmp_path):
    """A run made before a setting existed: its config.yaml lacks the key, which then means the default."""
    run = copy_run(interrupted_run, tmp_path)
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    del recorded["train"]["cpu_attention"]  # default true
    write_config(run / "config.yaml", recorded)
    before = snapshot(run)
    cfg = make_config(run, cpu_attention=False)
    res = cli("train", write_config(tmp_path / "cfg.yaml", cfg), "--resume", "--no-progress")
    refused(res, "train.cpu_attention: run has True, now False")
    assert snapshot(run) == before
    train(make_config(run), resume=True, progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["cpu_attention"] is True
    assert same_weights(adapter(run), adapter(finished_run))


def test_a_finished_run_is_not_redone(make_config, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    res = cli("train", write_config(tmp_path / "cfg.yaml", make_config(run)), "--resume", "--no-progress")
    refused(res, f"{run} is already finished: it ran 6 steps", "larger train.max_steps")
    assert snapshot(run) == before


def test_a_finished_run_grows_with_max_steps_as_a_longer_run(make_config, finished_run, tmp_path, capfd):
    """Constant schedule: 6 steps then 2 more (from the checkpoint at step 4) equal 8 steps in one go."""
    longer = tmp_path / "longer"
    train(make_config(longer, max_steps=8), progress=False)
    run = copy_run(finished_run, tmp_path)
    capfd.readouterr()
    result = train(make_config(run, max_steps=8), resume=True, progress=False)
    err = capfd.readouterr().err
    assert same_weights(adapter(run), adapter(longer))
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 8
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 8 and result.loop.steps == 8
    assert "changed on resume: train.max_steps: 6 -> 8" in err and "resuming from" in err
    # the run ends with its final losses, as report.json records them
    assert (f"after 8 steps: final train loss {report['final_train_loss']:.4f}, validation loss "
            f"{report['final_val_loss']:.4f}") in err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))


def test_resume_and_overwrite_together_are_refused(make_config, interrupted_run, tmp_path):
    run = copy_run(interrupted_run, tmp_path)
    before = snapshot(run)
    res = cli("train", write_config(tmp_path / "cfg.yaml", make_config(run)), "--resume", "--overwrite",
              "--no-progress")
    refused(res, "--resume", "--overwrite", "Choose one")
    assert snapshot(run) == before


def test_resume_of_a_folder_that_holds_no_run_says_so(make_config, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(LmadaptError, match=r"holds no run \(no config.yaml\); start the run without --resume"):
        train(make_config(tmp_path / "run"), resume=True, progress=False)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------------------ the public API

def test_lmadapt_train_can_be_called_twice_in_one_process(make_config, tmp_path):
    """In a fresh interpreter, as a notebook or a sweep would: ``import lmadapt; lmadapt.train(...)`` twice."""
    configs = [make_config(tmp_path / name, max_steps=2, save_every=0) for name in ("a", "b")]
    script = textwrap.dedent(f"""
        import json, lmadapt
        for cfg in json.loads({json.dumps(json.dumps(configs))}):
            result = lmadapt.train(cfg, progress=False)
            print(result.loop.steps, result.adapter_dir)
        print(callable(lmadapt.train), lmadapt.train.__module__)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [f"2 {tmp_path / 'a' / 'adapter'}", f"2 {tmp_path / 'b' / 'adapter'}",
                                        "True lmadapt.recipes.finetune"]


def test_no_public_name_is_also_a_submodule():
    """``lmadapt.X`` would turn from the function into the module once ``lmadapt.X`` the module is imported."""
    import importlib.util
    import pkgutil

    import lmadapt

    submodules = {m.name for m in pkgutil.iter_modules(lmadapt.__path__)}
    assert submodules >= {"api", "cli", "recipes", "training"}  # the walk sees the package
    assert not set(lmadapt.__all__) & submodules
    assert all(importlib.util.find_spec(f"lmadapt.{name}") is None for name in lmadapt.__all__ if name != "__version__")
