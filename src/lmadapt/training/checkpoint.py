"""Training checkpoints: trainable state, optimizer, RNG and data position, written atomically, no pickles.

A checkpoint folder ``checkpoints/step-0000100`` holds the adapter (same format as the final one),
``optimizer.safetensors`` (AdamW moments and step counts, keyed by parameter position),
``rng.safetensors`` (torch CPU/CUDA generator states), ``objective.safetensors`` (heads the objective
trains, when it has any) and ``trainer_state.json`` (step, data position, counters, Python's RNG state, the
method's own state). Only complete folders are ever visible: each is written to a temporary folder and
renamed, and an old one is renamed away before it is deleted, so a kill never leaves a half-deleted folder
that looks complete. Temporaries that a killed writer left behind are removed at the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmadapt.adapters.format import read_adapter_tensors, save_adapter
from lmadapt.fsutil import atomic_dir
from lmadapt.methods import Method
from lmadapt.objectives.base import Objective

STATE_NAME = "trainer_state.json"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_NAME).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder so that no kill can leave it looking complete: rename it away, then delete."""
    doomed = folder.with_name(f".{folder.name}.deleting-{os.getpid()}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _clean_debris(root: Path) -> None:
    """Remove what a killed writer left: temporaries of unfinished saves and folders half deleted.
    Only the run's one writer calls this, so every hidden ``.step-*`` entry is left over."""
    if root.is_dir():
        for leftover in root.glob(".step-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().to("cpu").contiguous()
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       groups: list[dict]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    current = optimizer.state_dict()
    if len(groups) != len(current["param_groups"]) or any(
            len(g["params"]) != len(c["params"]) for g, c in zip(groups, current["param_groups"])):
        raise ValueError("the checkpoint's optimizer groups do not match this run's trainable parameters")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, method: Method,
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    base_model: str | None, base_fingerprint: str | None, keep_last: int,
                    objective: Objective | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``."""
    path = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    _clean_debris(path.parent)
    head = objective.trainable_state(model) if objective is not None else {}
    opt_tensors, opt_groups = _optimizer_tensors(optimizer)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    py_state = random.getstate()
    np_state = np.random.get_state()
    state = {**trainer_state, "step": step, "optimizer_groups": opt_groups, "method_state": method.state_dict(),
             "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
             "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    with atomic_dir(path, overwrite=True) as tmp:
        save_adapter(model, method, tmp / "adapter", base_model=base_model,
                     base_fingerprint=base_fingerprint)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        if head:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in head.items()},
                      str(tmp / "objective.safetensors"))
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1, default=_json_default) + "\n",
                                      encoding="utf-8")
    for old in checkpoint_dirs(run_dir)[:-max(1, keep_last)]:
        _remove(old)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"cannot save {type(value).__name__} in trainer_state.json")


def load_checkpoint(path: Path, *, model: torch.nn.Module, method: Method,
                    rebuild_optimizer: Callable[[], torch.optim.Optimizer],
                    objective: Objective | None = None) -> dict[str, Any]:
    """Restore the method's state, the trainable weights, the optimizer and the RNG from ``path``.

    Order matters: the method's own state first (it may re-establish a trainable set that changed during
    the run), then the tensors, then ``rebuild_optimizer()`` builds the optimizer over the groups as they
    are now and its saved state is loaded into it. Returns the trainer state, with the new optimizer under
    ``"optimizer"``.
    """
    state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    method.load_state_dict(model, state.get("method_state") or {})
    method.load_adapter_state(model, read_adapter_tensors(path / "adapter"))
    if objective is not None and (path / "objective.safetensors").is_file():
        objective.load_trainable_state(model, load_file(str(path / "objective.safetensors")))
    optimizer = rebuild_optimizer()
    _restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer_groups"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npr = state["numpy_rng"]
    np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), *npr[2:]))
    return {**state, "optimizer": optimizer}
