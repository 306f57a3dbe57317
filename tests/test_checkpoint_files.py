"""Checkpoint folders on disk: what a killed writer or a killed deletion leaves is never listed as complete,
and the next save cleans it up."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmadapt.recipes.finetune import train
from lmadapt.training import checkpoint
from lmadapt.training.checkpoint import checkpoint_dirs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_debris_of_killed_writes_is_not_listed_and_is_removed_at_the_next_save(run_config, tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    root.mkdir(parents=True)
    # a save killed before its rename, and a deletion killed after its rename (see checkpoint._remove)
    (root / ".step-0000002.tmp-4242" / "adapter").mkdir(parents=True)
    (root / ".step-0000002.tmp-4242" / "trainer_state.json").write_text("{}")
    (root / ".step-0000001.deleting-4242").mkdir()
    (root / ".step-0000001.deleting-4242" / "trainer_state.json").write_text("{}")
    # a folder without its state file (never complete) is not listed either
    (root / "step-0000009").mkdir()
    assert checkpoint_dirs(run_dir) == []
    run_config["train"].update({"max_steps": 4, "save_every": 2})
    run_config["output_dir"] = str(tmp_path / "fresh")
    shutil.copytree(root, tmp_path / "fresh" / "checkpoints")
    run_config["overwrite"] = True
    train(run_config, progress=False)
    left = sorted(p.name for p in (tmp_path / "fresh" / "checkpoints").iterdir())
    assert left == ["step-0000002"]  # the debris is gone; the step-4 end of the run is not a checkpoint


def test_a_deletion_killed_midway_never_leaves_a_complete_looking_folder(run_config, tmp_path, monkeypatch):
    run_config["train"].update({"max_steps": 5, "save_every": 1, "keep_last": 1})
    real = shutil.rmtree

    def killed_rmtree(path, *args, **kwargs):
        """Delete the first file of an old checkpoint, then 'die': what a kill in the middle of a deletion leaves."""
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else []
        if files and any(f.name == "trainer_state.json" for f in files):
            files[0].unlink()
            raise KeyboardInterrupt("killed while deleting")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        train(run_config, progress=False)
    run_dir = tmp_path / "run"
    listed = checkpoint_dirs(run_dir)
    wanted = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.safetensors",
              "rng.safetensors", "trainer_state.json"]
    assert listed and all((p / f).is_file() for p in listed for f in wanted)
    assert all(p.name.startswith("step-") for p in listed)
