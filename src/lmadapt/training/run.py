"""The one run orchestrator: a run folder, the loop, and what every recipe shares.

:class:`Run` does the steps in the order that protects the user's data: the output folder is checked first
(or, on ``--resume``, that it holds a checkpoint), the inputs are loaded and validated by the caller next, and
nothing is written until :meth:`Run.create` is called after that. Then the one loop trains
(:meth:`Run.fit`: precision and device resolved once, here), and :meth:`Run.finish` writes the report and
the loss plot. Under torchrun only rank 0 writes.

``lmadapt train`` (:func:`train`) composes it as prepare output dir -> load -> data -> method -> objective ->
trainer -> save -> evaluate -> report; the recipes (helper models, VAS value models, the demo) compose the
same steps around their own model and data.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from lmadapt.config import to_dict
from lmadapt.data import Batcher
from lmadapt.errors import LmadaptError
from lmadapt.fsutil import atomic_write_json, atomic_write_text, check_output_dir
from lmadapt.hardware import resolve_precision
from lmadapt.methods import Method
from lmadapt.models.loading import resolve_device
from lmadapt.objectives.base import Objective
from lmadapt.reporting import plot_loss, read_metrics
from lmadapt.training.checkpoint import checkpoint_dirs
from lmadapt.training.config import TrainConfig
from lmadapt.training.distributed import Distributed, device_for, from_environment
from lmadapt.training.loop import LoopResult, Trainer


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (adapter init, data order, dropout)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def say(message: str, dist: Distributed | None = None) -> None:
    """A progress line on stderr (from rank 0 only under torchrun)."""
    if dist is None or dist.is_main:
        print(message, file=sys.stderr, flush=True)


@dataclass
class Run:
    """One training run in ``path``; see the module docstring for the order of the steps."""

    path: Path
    train: TrainConfig
    device_spec: str = "auto"
    overwrite: bool = False
    resume: bool = False
    dist: Distributed = field(default_factory=Distributed)
    device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.device = resolve_device(device_for(self.dist, self.device_spec))
        self.train = dataclasses.replace(self.train, precision=resolve_precision(self.train.precision, self.device))
        if self.resume and self.overwrite:
            raise LmadaptError("--resume continues the run in its folder and --overwrite replaces that folder. "
                               "Choose one.")
        if self.resume:
            if not checkpoint_dirs(self.path):
                raise LmadaptError(f"cannot resume: {self.path} has no complete checkpoint (train.save_every "
                                   f"must be > 0 for a run to leave checkpoints)")
        else:
            check_output_dir(self.path, self.overwrite)
        set_seed(self.train.seed)

    @classmethod
    def from_environment(cls, path: str | Path, train: TrainConfig, device_spec: str = "auto", *,
                         overwrite: bool = False, resume: bool = False) -> Run:
        """A run in this process's place under torchrun (or a single process without it)."""
        return cls(Path(path), train, device_spec, overwrite, resume, from_environment(device_spec))

    # --- steps --------------------------------------------------------------------------------
    def create(self, config: Any) -> None:
        """Make the run folder and record ``config`` in it (rank 0; a resumed run keeps its folder).
        Call only after every input has been validated."""
        if not self.resume and self.dist.is_main:
            if self.path.exists() and self.overwrite:
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        self.dist.barrier()

    def batcher(self, dataset: Any, *, max_length: int, batching: str, pad_id: int | None) -> Batcher:
        """The batch planner for ``dataset``: global micro-batches of ``batch_size * world_size`` rows."""
        return make_batcher(dataset, batch_size=self.train.batch_size * self.dist.world_size, max_length=max_length,
                            batching=batching, pad_id=pad_id, seed=self.train.seed)

    def fit(self, model: nn.Module, method: Method, objective: Objective, train_batcher: Any,
            val_batcher: Any | None, *, base_model: str | None, base_fingerprint: str | None,
            progress: bool = True) -> LoopResult:
        """Train in the one loop, continuing from the newest checkpoint when resuming."""
        trainer = Trainer(model, method, self.train, train_batcher, val_batcher, self.path, base_model=base_model,
                          base_fingerprint=base_fingerprint, device=self.device, objective=objective,
                          dist=self.dist)
        if trainer.state["threads"]:
            say(f"{trainer.state['threads']} CPU thread(s) (train.threads; 0 = the cores idle now)", self.dist)
        if self.resume:
            where = trainer.resume()
            if self.dist.is_main:
                drop_metrics_after(self.path / "metrics.jsonl", trainer.state["step"])
            say(f"resuming from {where} (step {trainer.state['step']} of {trainer.total_steps})", self.dist)
        return trainer.run(progress=progress)

    def finish(self, report: dict[str, Any], *, title: str, ylabel: str | None = None) -> None:
        """Write ``report.json`` and the loss plot ``loss.png`` (rank 0)."""
        if self.dist.is_main:
            extra = {} if ylabel is None else {"ylabel": ylabel}
            plot_loss(read_metrics(self.path / "metrics.jsonl"), self.path / "loss.png", title=title, **extra)
            atomic_write_json(self.path / "report.json", report)
        self.dist.barrier()

    def once(self, path: Path, compute: Any) -> Any:
        """``compute()``'s JSON result, computed once per run folder and kept in ``path`` (a resumed run reuses
        it): e.g. the base model's evaluations before training."""
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        result = compute()
        if self.dist.is_main:
            atomic_write_json(path, result)
        return result


def make_batcher(dataset: Any, *, batch_size: int, max_length: int, batching: str, pad_id: int | None,
                 seed: int) -> Batcher:
    """The batch planner of a run (``batching``: length_grouped, packed or in order)."""
    return Batcher(dataset, batch_size=batch_size, max_length=max_length, packing=batching == "packed",
                   group_by_length=batching == "length_grouped", pad_id=pad_id, seed=seed)


def drop_metrics_after(path: Path, step: int) -> None:
    """A killed run may have logged steps past its last checkpoint; the resumed run logs them again."""
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def loop_report(result: LoopResult) -> dict[str, Any]:
    """The loop's figures as every run report gives them."""
    return {
        "steps": result.steps,
        "target_tokens": result.tokens,
        "seconds": round(result.seconds, 2),
        "target_tokens_per_s": round(result.tokens / max(result.seconds, 1e-9), 1),
        "input_tokens": result.input_tokens,
        "input_tokens_per_s": round(result.input_tokens / max(result.seconds, 1e-9), 1),
        "final_train_loss": result.final_loss,
        "final_val_loss": result.val_loss,
        "skipped_steps": result.skipped_steps,
    }
