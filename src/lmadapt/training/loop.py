"""The one training loop. Every method and objective goes through it; they change it only via their hooks.

Read top to bottom: build the optimizer from the method's (and the objective's) groups, then for each
optimizer step collect ``grad_accum`` micro-batches (their order is a pure function of seed, epoch and
position, so a resumed run sees the same data; under torchrun each rank takes its rows of each), ask the
objective how many units carry loss in the whole step (summed over the ranks), run each micro-batch's loss
and the method's extra loss, sum the gradients over the ranks (under FSDP, :mod:`lmadapt.training.fsdp`, the
backward passes reduce-scatter them, and every rank runs every micro-batch), clip, step, let the method react, log,
validate, evaluate (the run's ``evals:`` with ``every``, through ``step_evals``), checkpoint. Nothing here assumes
a causal shift: counting and the loss are the objective's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmadapt.errors import LmadaptError
from lmadapt.hardware import choose_threads, resolve_precision, warn_if_slow
from lmadapt.methods import Method, StepContext
from lmadapt.models.tree import adapters_disabled
from lmadapt.objectives.base import Objective, build_objective
from lmadapt.objectives.causal_lm import forward_inputs
from lmadapt.reporting import MetricsLog
from lmadapt.training.attention import training_attention
from lmadapt.training.checkpoint import (
    checkpoint_dirs,
    load_checkpoint,
    save_checkpoint,
)
from lmadapt.training.config import TrainConfig
from lmadapt.training.distributed import Distributed
from lmadapt.training.fsdp import clip_gradients, gathered, is_sharded
from lmadapt.training.lae import OfflineCopy
from lmadapt.training.optim import build_optimizer
from lmadapt.training.precision import autocast, needs_autocast
from lmadapt.training.resume import interrupt_message
from lmadapt.training.schedules import Schedule


class NonFiniteLoss(LmadaptError):
    """The loss or gradient became NaN/inf and the policy is to stop."""


@dataclass
class LoopResult:
    steps: int
    tokens: int  # loss-bearing tokens
    input_tokens: int  # every real token processed
    seconds: float
    final_loss: float | None
    val_loss: float | None
    skipped_steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    offline: dict[str, torch.Tensor] | None = None  # LAE's offline copy (train.lae_momentum), by parameter name


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    """Runs optimizer steps for one method and one objective over one batcher; see the module docstring.

    ``train_batcher`` plans global micro-batches (``batch_size * world_size`` rows under torchrun); each rank
    collates its own rows of every one of them. ``step_evals(step)``, when given, is called on every rank after
    each optimizer step but the last (which the run evaluates after training) and returns the metrics to log
    at that step (``{}``: none due); see :meth:`evaluate_during_training`.
    """

    def __init__(self, model: nn.Module, method: Method, cfg: TrainConfig, train_batcher: Any,
                 val_batcher: Any | None, run_dir: Path, *, base_model: str | None,
                 base_fingerprint: str | None, device: torch.device, objective: Objective | None = None,
                 dist: Distributed | None = None,
                 step_evals: Callable[[int], dict[str, float]] | None = None) -> None:
        cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
        warn_if_slow(cfg.precision, device, "train.precision")
        self.model, self.method, self.cfg = model, method, cfg
        self.objective = objective if objective is not None else build_objective(None)
        self.dist = dist or Distributed()
        self.train_batcher, self.val_batcher = train_batcher, val_batcher
        self.step_evals = step_evals
        self.run_dir, self.device = Path(run_dir), device
        self.base_model, self.base_fingerprint = base_model, base_fingerprint
        # A mask that only marks right padding changes nothing that carries loss, unless some position may
        # attend to a later one: only when the objective and the method both keep causal attention.
        self.drop_padding_mask = self.objective.causal_attention and method.causal_attention
        self.sharded = is_sharded(model)  # FSDP (lmadapt.training.fsdp): every rank runs every forward and backward
        self.step_metrics: dict[str, float] = {}  # the last step's objective metrics per unit, for the log
        self.val_metrics: dict[str, float] = {}  # the last validation's record: val_loss and the objective's own
        self.optimizer = self._build_optimizer()
        self.lae = OfflineCopy.for_run(model, method, cfg, self.objective)  # None unless train.lae_momentum
        self.steps_per_epoch = max(1, len(train_batcher) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.schedule = Schedule.of(dataclasses.asdict(cfg), self.total_steps)  # the lr factor of each step
        self.warmup = self.schedule.warmup
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.use_autocast = needs_autocast(model, cfg.precision)
        # tokens: loss-bearing ("useful") units; input_tokens: every real (non-padding) token processed
        self.state: dict[str, Any] = {"step": 0, "micro": 0, "tokens": 0, "input_tokens": 0, "skipped": 0,
                                      "elapsed": 0.0,
                                      "threads": choose_threads(cfg.threads) if device.type == "cpu" else 0}
        self._plans: dict[int, list] = {}

    def _build_optimizer(self, previous: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
        return build_optimizer(self.model, self.method, self.cfg, previous=previous, objective=self.objective)

    # --- data ----------------------------------------------------------------------------------
    def _micro_batch(self, index: int) -> tuple[dict[str, Any] | None, int]:
        """This rank's rows of global micro-batch ``index``, collated, and their weight 1; (None, 0) when it has
        none (under torchrun a last, short batch may have fewer rows than processes: such a rank still joins the
        gradient sum). Under FSDP such a rank gets the micro-batch's first row with weight 0 instead: a stand-in
        that runs the forward and backward, whose parameter gathers are collective, and carries no loss."""
        epoch, pos = divmod(index, len(self.train_batcher))
        if epoch not in self._plans:
            self._plans = {epoch: self.train_batcher.batches(epoch)}
        rows = self.dist.shard(self._plans[epoch][pos])
        if not rows and self.sharded:
            return self.train_batcher.collate(self._plans[epoch][pos][:1]), 0
        return (self.train_batcher.collate(rows), 1) if rows else (None, 0)

    # --- resume --------------------------------------------------------------------------------
    def resume(self) -> Path | None:
        """Continue from the newest complete checkpoint in the run folder, if any.

        The method's own state is restored first (it may re-establish a trainable set that ``on_step_end``
        changed), then its tensors and the objective's, then the optimizer is rebuilt from the groups as they
        are now and its state restored: so a resume after such a change is exact.
        """
        found = checkpoint_dirs(self.run_dir)
        if not found:
            return None
        saved = load_checkpoint(found[-1], model=self.model, method=self.method, objective=self.objective,
                                rebuild_optimizer=self._build_optimizer, offline=self.lae)
        self.optimizer = saved.pop("optimizer")
        self.state.update({k: saved[k] for k in self.state if k in saved})
        return found[-1]

    # --- one step ------------------------------------------------------------------------------
    def _step(self) -> tuple[float | None, float]:
        """One optimizer step; returns (mean loss, grad norm) or (None, nan) when skipped."""
        cfg, model, objective = self.cfg, self.model, self.objective
        objective.begin_step(self.state["step"], self.total_steps)
        fetched = [self._micro_batch(self.state["micro"] + i) for i in range(cfg.grad_accum)]
        micro = [mb for mb, _ in fetched if mb is not None]
        weights = [w for mb, w in fetched if mb is not None]  # 0: an FSDP stand-in, which runs but carries no loss
        counts = [objective.count(mb) * w for mb, w in zip(micro, weights)]
        n_step, n_inputs = self.dist.sum(
            [sum(counts), sum(int(mb.get("num_tokens", mb["input_ids"].numel())) * w
                              for mb, w in zip(micro, weights))], self.device)
        n_step = max(1.0, n_step)
        self.state["input_tokens"] += int(n_inputs)
        self.optimizer.zero_grad(set_to_none=True)
        total, bad, contexts, sums = 0.0, None, [], {}
        for i, mb in enumerate(micro):
            mb = to_device(mb, self.device)
            with autocast(self.device, cfg.precision, self.use_autocast):
                out = objective.loss(model, mb, drop_padding_mask=self.drop_padding_mask)
                for key, value in out.metrics.items():
                    sums[key] = sums.get(key, 0.0) + value * weights[i]
                ctx = StepContext(model, mb, self.state["step"], self.total_steps, out.outputs, self.optimizer,
                                  micro_index=i, _base_logits=lambda mb=mb, o=out.outputs: self._base_logits(mb, o))
                loss = out.loss / n_step
                extra = self.method.extra_loss(ctx)
                if extra is not None:
                    loss = loss + extra * (out.count / n_step)
                if not weights[i]:
                    loss = loss * 0.0
            ctx.outputs = None  # step-level hooks see every micro-batch's inputs, not its activations
            if weights[i]:
                contexts.append(ctx)
            if not torch.isfinite(loss):
                bad = f"loss is {loss.item()}"
                if not self.sharded:  # under FSDP every backward runs: its reduce-scatters are collective
                    break
            self.scaler.scale(loss).backward()
            total += loss.item()
        # the objective's metrics (detached sums) per loss-bearing unit of this process's micro-batches
        self.step_metrics = {f"{objective.name}/{k}": v / max(1, sum(counts)) for k, v in sums.items()}
        self.step_metrics.update({f"{self.method.name}/{k}": v for k, v in self.method.metrics().items()})
        if self.dist.any(bad is not None, self.device):
            return self._non_finite(bad or "loss is not finite on another process")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if not self.sharded:  # FSDP summed them in the backward passes (reduce-scatter)
            self.dist.sum_gradients(params)
        total = self.dist.sum([total], self.device)[0]
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = (clip_gradients(params, max_norm) if self.sharded
                     else float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            return self._non_finite(f"gradient norm is {grad_norm}")
        factor = self.schedule.factor(self.state["step"])
        for g in self.optimizer.param_groups:
            g["lr"] = cfg.lr * factor * g["lr_scale"]
        step_ctx = StepContext(model, contexts[-1].batch if contexts else {}, self.state["step"], self.total_steps,
                               None, self.optimizer, micro_index=max(0, len(contexts) - 1), micro_batches=contexts)
        self.method.before_optimizer_step(step_ctx)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_optimizer_step(step_ctx)
        self.state["tokens"] += int(n_step)
        rebuilt = self.method.on_step_end(step_ctx)
        if rebuilt:
            self.optimizer = self._build_optimizer(previous=self.optimizer)
        if self.lae is not None:  # LAE: the offline copy accumulates the step
            self.lae.update(self.state["step"] + 1, retrack=rebuilt)
        return total, grad_norm

    def _non_finite(self, what: str) -> tuple[None, float]:
        step = self.state["step"] + 1
        if self.cfg.nan_policy == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.state["skipped"] += 1
            return None, float("nan")
        last = checkpoint_dirs(self.run_dir)
        keep = f"the last good checkpoint is {last[-1]}" if last else \
            "no checkpoint was written yet (set train.save_every to keep some)"
        raise NonFiniteLoss(f"training stopped at step {step}: the {what}. Nothing after step {step - 1} was "
                            f"saved; {keep}. Lower train.lr, use train.precision=fp32, resume with "
                            f"--resume, or set train.nan_policy=skip to skip such steps.")

    @torch.no_grad()
    def _base_logits(self, batch: dict[str, Any], outputs: Any) -> torch.Tensor:
        """Frozen-base logits at the same positions as ``outputs.logits``."""
        positions = getattr(outputs, "logit_positions", None)
        extra = {} if positions is None else {"logits_to_keep": positions}
        with adapters_disabled(self.model):
            return self.model(**forward_inputs(batch, self.drop_padding_mask), use_cache=False, **extra).logits

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation loss per loss-bearing unit (over every rank's rows). :attr:`val_metrics` gets what to log:
        ``val_loss`` and what the objective's ``validation_metrics`` name (``val_ppl``, ``val_<metric>`` per unit)."""
        if self.val_batcher is None:
            return None
        self.model.eval()
        total, units = 0.0, 0
        keys = [k for k in self.objective.validation_metrics if k != "ppl"]
        sums = dict.fromkeys(keys, 0.0)
        plan = self.val_batcher.batches(0)
        if self.cfg.eval_batches:
            plan = plan[: self.cfg.eval_batches]
        for indices in plan:
            rows = self.dist.shard(indices)
            if not rows and not self.sharded:
                continue
            mb = to_device(self.val_batcher.collate(rows or indices[:1]), self.device)  # FSDP: a stand-in row
            with autocast(self.device, self.cfg.precision, self.use_autocast):
                out = self.objective.loss(self.model, mb, drop_padding_mask=self.drop_padding_mask)
            if not rows:
                continue
            total, units = total + float(out.loss), units + out.count
            for key in keys:
                sums[key] += out.metrics[key]
        total, units, *values = self.dist.sum([total, units, *sums.values()], self.device)
        self.model.train()
        loss = total / max(1, units)
        self.val_metrics = {"val_loss": loss}
        if "ppl" in self.objective.validation_metrics:
            self.val_metrics["val_ppl"] = math.exp(min(loss, 50))
        self.val_metrics.update({f"val_{k}": v / max(1, units) for k, v in zip(keys, values)})
        return loss

    def evaluate_during_training(self, step: int) -> dict[str, float]:
        """``step_evals(step)`` with every random stream training draws from (torch's on the CPU and the device,
        Python's, NumPy's) as it was before, and the model back in train mode: a run with evaluations during
        training takes the same steps as one without, and resumes as exactly."""
        python_state, numpy_state = random.getstate(), np.random.get_state()
        devices = [] if self.device.type == "cpu" else [self.device]
        try:
            with torch.random.fork_rng(devices=devices, device_type=self.device.type):
                return self.step_evals(step) if self.step_evals is not None else {}
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            self.model.train()

    # --- the loop ------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> LoopResult:
        """Train to ``total_steps`` (from wherever the state is), with this run's thread count and,
        on CPU, lmadapt's training attention; both are put back afterwards."""
        threads_before = torch.get_num_threads()
        if self.state["threads"]:
            torch.set_num_threads(self.state["threads"])
        attention = (training_attention(self.model, self.device) if self.cfg.cpu_attention
                     else contextlib.nullcontext())
        try:
            with attention:
                return self._run(progress)
        finally:
            torch.set_num_threads(threads_before)

    def _run(self, progress: bool) -> LoopResult:
        cfg, state = self.cfg, self.state
        main = self.dist.is_main
        log = MetricsLog(self.run_dir, tensorboard=cfg.tensorboard) if main else None
        bar = tqdm(total=self.total_steps, initial=state["step"], disable=not (progress and main), unit="step",
                   dynamic_ncols=True, desc="training")
        self.model.train()
        history: list[dict[str, Any]] = []
        last_loss = val_loss = None
        t_start = time.perf_counter() - state["elapsed"]
        tokens_start, inputs_start = state["tokens"], state["input_tokens"]
        t_resume = time.perf_counter()
        try:
            while state["step"] < self.total_steps:
                loss, grad_norm = self._step()
                state["step"] += 1
                state["micro"] += cfg.grad_accum
                state["elapsed"] = time.perf_counter() - t_start
                since = max(1e-9, time.perf_counter() - t_resume)
                speed = (state["tokens"] - tokens_start) / since
                input_speed = (state["input_tokens"] - inputs_start) / since
                lr = self.optimizer.param_groups[0]["lr"]
                if loss is not None:
                    last_loss = loss
                record = {"step": state["step"], "epoch": state["micro"] / len(self.train_batcher),
                          "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state["tokens"],
                          "input_tokens": state["input_tokens"], "tokens_per_s": round(input_speed, 1),
                          "useful_tokens_per_s": round(speed, 1), "elapsed_s": round(state["elapsed"], 2)}
                if loss is None:  # a skipped step has no loss to report
                    del record["loss"]
                    record["skipped"] = True
                else:
                    record.update(self.step_metrics)
                if (state["step"] % cfg.log_every == 0 or loss is None) and log is not None:
                    log.log(record)
                    history.append(record)
                bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "skip", lr=f"{lr:.2e}",
                                tok_s=f"{input_speed:.0f}")
                bar.update(1)
                at_end = state["step"] == self.total_steps
                if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or at_end:
                    val_loss = self.validate()
                    if val_loss is not None and log is not None:
                        rec = {"step": state["step"], **self.val_metrics}
                        log.log(rec)
                        history.append(rec)
                if self.step_evals is not None and not at_end:  # the last step's: the run's "after" evaluation
                    t_eval = time.perf_counter()
                    rec = self.evaluate_during_training(state["step"])
                    if rec and log is not None:
                        log.log({"step": state["step"], **rec})
                        history.append({"step": state["step"], **rec})
                    paused = time.perf_counter() - t_eval  # not training time: left out of elapsed and tokens/s
                    t_start, t_resume = t_start + paused, t_resume + paused
                if cfg.save_every and state["step"] % cfg.save_every == 0 and not at_end:
                    with gathered(self.model, self.optimizer):  # FSDP: whole tensors on rank 0 while it writes
                        self.dist.main_first(lambda: save_checkpoint(
                            self.run_dir, state["step"], model=self.model, method=self.method,
                            objective=self.objective, optimizer=self.optimizer, trainer_state=dict(state),
                            base_model=self.base_model, base_fingerprint=self.base_fingerprint,
                            keep_last=cfg.keep_last, lae_offline=None if self.lae is None else self.lae.state_dict()))
        except KeyboardInterrupt:  # Ctrl-C: say what --resume would continue from, then stop as asked
            bar.close()
            if main:
                print(interrupt_message(self.run_dir, state["step"], cfg.save_every), file=sys.stderr, flush=True)
            raise
        finally:
            bar.close()
            if log is not None:
                log.close()
            self.model.eval()
        return LoopResult(state["step"], state["tokens"], state["input_tokens"], state["elapsed"], last_loss,
                          val_loss, state["skipped"], history, None if self.lae is None else self.lae.state_dict())
