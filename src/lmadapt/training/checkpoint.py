"""Training checkpoints: trainable state, optimizer, RNG and data position, written atomically, no pickles.

A checkpoint folder ``checkpoints/step-0000100`` holds the adapter (same format as the final one),
``optimizer.safetensors`` (AdamW moments and step counts, keyed by parameter position),
``rng.safetensors`` (torch CPU/CUDA generator states), ``objective.safetensors`` (heads the objective
trains, when it has any), ``lae_offline.safetensors`` (LAE's offline copy, with ``train.lae_momentum``) and
``trainer_state.json`` (step, data position, counters, Python's RNG state, the
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmadapt.adapters.format import WEIGHTS_NAME, read_adapter_tensors, save_adapter
from lmadapt.errors import LmadaptError
from lmadapt.fsutil import atomic_dir
from lmadapt.jsonfile import JsonFileError, read_json_object
from lmadapt.methods import Method
from lmadapt.objectives.base import Objective
from lmadapt.training.fsdp import gathered, reshard_optimizer_state

if TYPE_CHECKING:
    from lmadapt.training.lae import OfflineCopy

STATE_NAME = "trainer_state.json"
LAE_NAME = "lae_offline.safetensors"


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
                    objective: Objective | None = None, lae_offline: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``; ``lae_offline``: LAE's
    offline copy (:meth:`lmadapt.training.lae.OfflineCopy.state_dict`), when the run keeps one."""
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
        if lae_offline is not None:
            save_file(lae_offline, str(tmp / LAE_NAME))
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


class CheckpointError(LmadaptError):
    """A checkpoint that cannot be resumed from: one of its files is damaged, or it does not fit this run."""


@dataclass
class Checkpoint:
    """Every file of a checkpoint folder, read and checked, none of it applied yet (see :func:`read_checkpoint`)."""

    path: Path
    state: dict[str, Any]  # trainer_state.json
    adapter: dict[str, torch.Tensor]  # adapter/adapter_model.safetensors
    optimizer: dict[str, torch.Tensor]  # optimizer.safetensors: "<parameter position>.<state name>"
    rng: dict[str, torch.Tensor]  # rng.safetensors
    objective: dict[str, torch.Tensor] | None  # objective.safetensors, when the objective trains a head
    lae_offline: dict[str, torch.Tensor] | None = None  # lae_offline.safetensors, when the run keeps LAE's copy


_STATE_KEYS = {"step": int, "optimizer_groups": list, "python_rng": list, "numpy_rng": list}


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and check every file of checkpoint ``path`` without changing anything.

    A damaged file (truncated, not safetensors or JSON, missing entries, RNG states that do not restore)
    raises :class:`CheckpointError` naming it and saying what to do, before any state is restored.
    """
    path = Path(path)
    state = _read_state(path)
    try:
        adapter = read_adapter_tensors(path / "adapter")
    except (LmadaptError, SafetensorError, OSError) as exc:
        # the AdapterError's advice ("save the adapter again") does not apply here: give the reason beneath it
        reason = exc.__context__ if isinstance(exc.__context__, (SafetensorError, OSError)) else exc
        raise _damaged(path, f"adapter/{WEIGHTS_NAME}", str(reason).splitlines()[0]) from None
    optimizer = _read_tensors(path, "optimizer.safetensors")
    n_params = sum(len(g["params"]) for g in state["optimizer_groups"])
    for key in optimizer:
        idx, _, name = key.partition(".")
        if not (idx.isdigit() and name and int(idx) < n_params):
            raise _damaged(path, "optimizer.safetensors", f"entry {key!r} is not '<parameter position>.<state>' "
                                                          f"for one of the {n_params} parameters")
    rng = _read_tensors(path, "rng.safetensors")
    try:
        torch.Generator().set_state(rng["torch_cpu"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise _damaged(path, "rng.safetensors", f"no usable torch_cpu state ({exc})") from None
    objective = (_read_tensors(path, "objective.safetensors") if (path / "objective.safetensors").is_file()
                 else None)
    lae = _read_tensors(path, LAE_NAME) if (path / LAE_NAME).is_file() else None
    return Checkpoint(path, state, adapter, optimizer, rng, objective, lae)


def _read_state(path: Path) -> dict[str, Any]:
    """trainer_state.json, with the entries this module restores checked (the RNG states on scratch generators)."""
    try:
        state = read_json_object(path / STATE_NAME)
    except JsonFileError as exc:
        raise _damaged(path, STATE_NAME, exc.problem) from None
    for key, kind in _STATE_KEYS.items():
        if key not in state:
            raise _damaged(path, STATE_NAME, f"'{key}' is missing")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise _damaged(path, STATE_NAME, f"'{key}' should be a {kind.__name__}, got {state[key]!r:.60}")
    if not isinstance(state.get("method_state") or {}, dict):
        raise _damaged(path, STATE_NAME, "'method_state' should be an object")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in state["optimizer_groups"]):
        raise _damaged(path, STATE_NAME, "'optimizer_groups' should be a list of groups, each with 'params'")
    try:
        _set_python_numpy_rng(state, random.Random(), np.random.RandomState())
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise _damaged(path, STATE_NAME, f"the Python/NumPy random states do not restore ({exc})") from None
    return state


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / name))
    except (SafetensorError, OSError) as exc:
        raise _damaged(path, name, str(exc)) from None


def _damaged(path: Path, name: str, problem: str) -> CheckpointError:
    """The error for a damaged file ``name`` of checkpoint ``path``: what to delete, and what that resumes from."""
    names = [p.name for p in checkpoint_dirs(path.parent.parent)]
    earlier = names[:names.index(path.name)] if path.name in names else []
    todo = (f"delete {path} to resume from {earlier[-1]}, or start again without --resume" if earlier
            else f"delete {path} and start again without --resume")
    return CheckpointError(f"checkpoint {path / name} is truncated or corrupt ({problem}): {todo} "
                           f"(with --overwrite, which replaces the run folder)")


def _set_python_numpy_rng(state: dict[str, Any], py_random: Any = random, np_random: Any = np.random) -> None:
    """Restore the Python and NumPy generator states of ``state`` (by default the global ones)."""
    py = state["python_rng"]
    py_random.setstate((py[0], tuple(py[1]), py[2]))
    npr = state["numpy_rng"]
    np_random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), *npr[2:]))


def load_checkpoint(path: Path, *, model: torch.nn.Module, method: Method,
                    rebuild_optimizer: Callable[[], torch.optim.Optimizer],
                    objective: Objective | None = None, offline: OfflineCopy | None = None) -> dict[str, Any]:
    """Restore the method's state, the trainable weights, the optimizer and the RNG from ``path``.

    Every file is read and checked first (:func:`read_checkpoint`), so a damaged one is reported before
    anything changes. Then, order matters: the method's own state first (it may re-establish a trainable set
    that changed during the run), then the tensors, then ``rebuild_optimizer()`` builds the optimizer over
    the groups as they are now and its saved state is loaded into it. Returns the trainer state, with the new
    optimizer under ``"optimizer"``. A model sharded by FSDP (every process calls this) loads into whole
    tensors, each rank keeping its chunk of them and of the optimizer's state (:mod:`lmadapt.training.fsdp`).
    ``offline``: LAE's offline copy, restored last. A checkpoint written by a run with another method or
    trainable set raises :class:`CheckpointError`.
    """
    saved = read_checkpoint(path)
    if offline is not None and saved.lae_offline is None:
        raise CheckpointError(f"checkpoint {saved.path} holds no LAE offline copy ({LAE_NAME}), but this run keeps "
                              f"one (train.lae_momentum); resume with the config the run was started with "
                              f"({saved.path.parent.parent / 'config.yaml'}), or start again without --resume")
    try:
        with gathered(model, everywhere=True, write_back=True):
            method.load_state_dict(model, saved.state.get("method_state") or {})
            method.load_adapter_state(model, saved.adapter)
            if objective is not None and saved.objective is not None:
                objective.load_trainable_state(model, saved.objective)
        optimizer = rebuild_optimizer()
        _restore_optimizer(optimizer, saved.optimizer, saved.state["optimizer_groups"])
        reshard_optimizer_state(optimizer)
        if offline is not None and saved.lae_offline is not None:
            offline.load_state_dict(saved.lae_offline)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {saved.path} does not fit this run ({exc}); resume with the config "
                              f"the run was started with ({saved.path.parent.parent / 'config.yaml'}), or start "
                              f"again without --resume") from None
    torch.set_rng_state(saved.rng["torch_cpu"])
    cuda = [saved.rng[k] for k in sorted(saved.rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    _set_python_numpy_rng(saved.state)
    return {**saved.state, "optimizer": optimizer}
