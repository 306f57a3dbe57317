"""The one run orchestrator: a run folder, the loop, and what every recipe shares.

:class:`Run` does the steps in the order that protects the user's data: the output folder is checked first
(or, on ``--resume``, that the config differs from the run's own only where it may, that the run is not
finished, and that it holds a checkpoint: :mod:`lmadapt.training.resume`), the inputs are loaded and
validated by the caller next, and nothing is written until :meth:`Run.create` is called after that. Then
the one loop trains (:meth:`Run.fit`: precision and device resolved once, here), and :meth:`Run.finish`
writes the report and the loss plot. Under torchrun only rank 0 writes. With ``train.distributed: fsdp``
(a recipe that saves through :func:`lmadapt.training.fsdp.gathered` says ``shardable``) :meth:`Run.fit`
shards the model before the loop builds its optimizer.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from lmadapt.config import to_dict
from lmadapt.data import Batcher
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.fsutil import atomic_write_json, atomic_write_text, check_output_dir
from lmadapt.hardware import resolve_precision
from lmadapt.methods import Method
from lmadapt.models.loading import resolve_device
from lmadapt.objectives.base import Objective
from lmadapt.reporting import plot_loss, read_metrics
from lmadapt.training.config import TrainConfig
from lmadapt.training.distributed import Distributed, device_for, from_environment
from lmadapt.training.fsdp import fsdp_problems, shard
from lmadapt.training.loop import LoopResult, Trainer, to_device
from lmadapt.training.memory import gradient_checkpointing
from lmadapt.training.resume import check_resume


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
    """One training run in ``path``; see the module docstring for the order of the steps.

    ``config`` is the run's whole config (a dataclass with a ``train`` section), recorded as ``config.yaml``
    by :meth:`create`; on resume it is compared with the run's own. Without it (recipes that do not record
    one here) a resume checks only that a checkpoint exists. ``shardable``: the recipe saves and evaluates in a
    way a sharded model allows (``lmadapt train``); others refuse ``train.distributed: fsdp``.
    """

    path: Path
    train: TrainConfig
    device_spec: str = "auto"
    overwrite: bool = False
    resume: bool = False
    dist: Distributed = field(default_factory=Distributed)
    config: Any = None
    shardable: bool = False
    device: torch.device = field(init=False)
    _resumed_record: dict[str, Any] | None = field(init=False, default=None, repr=False)
    _resumed_changes: list[str] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.device = resolve_device(device_for(self.dist, self.device_spec))
        self.train = dataclasses.replace(self.train, precision=resolve_precision(self.train.precision, self.device))
        if self.config is not None:  # config.yaml records the resolved precision
            self.config = dataclasses.replace(self.config, train=self.train)
        if self.train.distributed == "fsdp" and self.dist.enabled and not self.shardable:
            raise ConfigError([("train.distributed: fsdp: this recipe writes and evaluates a whole model from "
                                "rank 0, which a sharded model cannot give; only lmadapt train trains sharded. Set "
                                "train.distributed: ddp")])
        if self.resume and self.overwrite:
            raise LmadaptError("--resume continues the run in its folder and --overwrite replaces that folder. "
                               "Choose one.")
        if self.resume:
            self._resumed_record, self._resumed_changes = check_resume(
                self.path, None if self.config is None else to_dict(self.config),
                save_every=self.train.save_every, max_steps=self.train.max_steps, defaults=self._defaults())
        else:
            check_output_dir(self.path, self.overwrite)
        set_seed(self.train.seed)

    def _defaults(self) -> dict[str, Any] | None:
        """The defaults of the config's type (for settings a run's older config.yaml lacks), if it has them."""
        try:
            return None if self.config is None else to_dict(type(self.config)())
        except TypeError:  # a config type with required fields
            return None

    @classmethod
    def from_environment(cls, path: str | Path, train: TrainConfig, device_spec: str = "auto", *,
                         overwrite: bool = False, resume: bool = False, config: Any = None,
                         shardable: bool = False) -> Run:
        """A run in this process's place under torchrun (or a single process without it)."""
        return cls(Path(path), train, device_spec, overwrite, resume, from_environment(device_spec), config,
                   shardable)

    @property
    def sharded(self) -> bool:
        """Whether :meth:`fit` shards the model (``train.distributed: fsdp`` and more than one process)."""
        return self.train.distributed == "fsdp" and self.dist.enabled

    def check_sharding(self, method: Method, *, evals: bool) -> None:
        """Refuse, before anything is written, what a sharded run cannot train (all problems at once);
        nothing to check when :attr:`sharded` is False. ``evals``: the run has ``evals:``."""
        problems = fsdp_problems(self.train, method, evals=evals) if self.sharded else []
        if problems:
            raise ConfigError(problems)

    # --- steps --------------------------------------------------------------------------------
    def create(self, config: Any = None) -> None:
        """Make the run folder and record ``config`` (default: the run's) in it (rank 0; a resumed run keeps its
        folder, and its config.yaml until the checkpoint is restored). Call only after every input has been
        validated."""
        config = self.config if config is None else config
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

    def apply_method(self, model: nn.Module, method: Method, train_batcher: Any) -> None:
        """``method.calibrate`` on the first ``method.calibration_batches`` training batches of epoch 0 (whole
        global batches, so every process sees the same), then ``method.apply``: the one place a run does both."""
        if method.calibration_batches:
            plan = train_batcher.batches(0)[: method.calibration_batches]
            with torch.no_grad():
                method.calibrate(model, [to_device(train_batcher.collate(b), self.device) for b in plan])
        method.apply(model)

    def fit(self, model: nn.Module, method: Method, objective: Objective, train_batcher: Any,
            val_batcher: Any | None, *, base_model: str | None, base_fingerprint: str | None,
            progress: bool = True, step_evals: Callable[[int], dict[str, float]] | None = None) -> LoopResult:
        """Train in the one loop, continuing from the newest checkpoint when resuming (``step_evals``: the
        evaluations during training, :class:`~lmadapt.training.loop.Trainer`). A :attr:`sharded` run shards
        ``model`` first (it stays sharded: save it inside :func:`lmadapt.training.fsdp.gathered`)."""
        if self.sharded:
            self.check_sharding(method, evals=step_evals is not None)
            shard(model, self.train.precision, self.device)
        trainer = Trainer(model, method, self.train, train_batcher, val_batcher, self.path, base_model=base_model,
                          base_fingerprint=base_fingerprint, device=self.device, objective=objective,
                          dist=self.dist, step_evals=step_evals)
        if self.resume:
            where = trainer.resume()
            if self.dist.is_main:
                drop_metrics_after(self.path / "metrics.jsonl", trainer.state["step"])
                if self._resumed_record is not None:  # the allowed changes: config.yaml stays true
                    atomic_write_text(self.path / "config.yaml", yaml.safe_dump(self._resumed_record, sort_keys=False))
            if self._resumed_changes:
                say(f"changed on resume: {'; '.join(self._resumed_changes)}", self.dist)
            say(f"resuming from {where} (step {trainer.state['step']} of {trainer.total_steps})", self.dist)
        if trainer.state["threads"]:  # a resumed run's count is its first one
            say(f"{trainer.state['threads']} CPU thread(s) (train.threads; 0 = the cores idle now)", self.dist)
        with gradient_checkpointing(model, self.train.gradient_checkpointing):
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


def loss_summary(result: LoopResult) -> str:
    """The line a run ends with: its final training loss (the last step's) and validation loss."""
    def show(loss: float | None) -> str:
        return "n/a" if loss is None else f"{loss:.4f}"
    val = "no validation set" if result.val_loss is None else f"validation loss {show(result.val_loss)}"
    return f"after {result.steps} steps: final train loss {show(result.final_loss)}, {val}"
