"""The one training loop. Every method and objective goes through it; methods change it only via their hooks.

Read top to bottom: build the optimizer from the method's groups, then for each optimizer step
collect ``grad_accum`` micro-batches (their order is a pure function of seed, epoch and position, so a
resumed run sees the same data), add the method's extra loss, clip, step, let the method react,
log, validate, checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lmadapt.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from lmadapt.config import option
from lmadapt.errors import LmadaptError
from lmadapt.methods import Method, StepContext
from lmadapt.attention import training_attention
from lmadapt.hardware import choose_threads, resolve_precision, warn_if_slow
from lmadapt.objectives import causal_inputs, causal_lm_loss
from lmadapt.reporting import MetricsLog
from lmadapt.schedules import lr_factor
from lmadapt.tree import adapters_disabled


@dataclass
class TrainConfig:
    lr: float = option(2e-4, "Peak learning rate (AdamW).")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (methods may exempt groups).")
    betas: list[float] = option([0.9, 0.999], "AdamW betas.")
    eps: float = option(1e-8, "AdamW epsilon.")
    batch_size: int = option(8, "Sequences (or packed rows) per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this (0: no clipping).")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = option(
        "fp32", "Autocast precision of the forward/backward (weights keep model.dtype). auto: bf16 where the "
        "device runs bf16 matmuls faster than fp32 (a CUDA GPU with bf16, a CPU with AMX/AVX512-BF16; measured "
        "once), else fp32.")
    schedule: Literal["constant", "linear", "cosine", "wsd"] = option("cosine", "Learning-rate schedule after warm-up.")
    warmup_steps: int = option(0, "Linear warm-up steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = option(0.0, "Warm-up as a fraction of the total steps.")
    min_lr_ratio: float = option(0.0, "Final learning rate as a fraction of the peak.")
    decay_ratio: float = option(0.1, "wsd: fraction of the steps spent in the final decay.")
    epochs: int = option(1, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = option(0, "Optimizer steps to run (0: derive from epochs).")
    eval_every: int = option(0, "Validation loss every N steps (0: only at the end).")
    eval_batches: int = option(0, "Cap on validation batches per evaluation (0: all).")
    save_every: int = option(0, "Write a checkpoint every N steps (0: none).")
    keep_last: int = option(2, "Checkpoints to keep.")
    log_every: int = option(1, "Write a metrics line every N steps.")
    seed: int = option(0, "Seed for adapter init, data order and dropout.")
    nan_policy: Literal["stop", "skip"] = option(
        "stop", "On a NaN/inf loss or gradient: stop (keeping the last good checkpoint) or skip that step.")
    tensorboard: bool = option(True, "Also log to TensorBoard when it is installed.")
    cpu_attention: bool = option(
        True, "On a CPU, train sdpa models with lmadapt's matmul attention (lmadapt.attention): 1.5-1.8x "
              "faster than torch's fused kernel forward+backward, at the cost of keeping the attention "
              "probabilities for the backward pass. false: the model's own attention.")
    threads: int = option(0, "CPU threads (0: auto, the cores idle when the run starts, or OMP_NUM_THREADS "
                             "when it is set). A resumed run keeps its first count, so it stays bit-exact.")

    def check(self) -> list[str]:
        problems = []
        for name in ("batch_size", "grad_accum", "epochs", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr: must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas: two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        for name in ("max_steps", "eval_every", "save_every", "warmup_steps", "eval_batches", "threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        return problems


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


def check_param_groups(model: nn.Module, groups: list) -> None:
    """Every trainable parameter in exactly one group; no frozen parameter in any group."""
    seen: dict[int, str] = {}
    for g in groups:
        for p in g.params:
            if id(p) in seen:
                raise RuntimeError(f"a parameter is in optimizer groups {seen[id(p)]!r} and {g.name!r}")
            if not p.requires_grad:
                raise RuntimeError(f"optimizer group {g.name!r} holds a frozen parameter")
            seen[id(p)] = g.name
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if orphans:
        raise RuntimeError(f"trainable parameters in no optimizer group, e.g. {orphans[0]}")
    if not seen:
        raise LmadaptError("the method selected no trainable parameters")


def build_optimizer(model: nn.Module, method: Method, cfg: TrainConfig,
                    previous: torch.optim.Optimizer | None = None) -> torch.optim.AdamW:
    """AdamW over the method's groups; state of parameters kept from ``previous`` carries over."""
    groups = method.parameter_groups(model)
    check_param_groups(model, groups)
    optimizer = torch.optim.AdamW(
        [{"params": g.params, "lr": cfg.lr * g.lr_scale, "lr_scale": g.lr_scale, "name": g.name,
          "weight_decay": cfg.weight_decay if g.weight_decay is None else g.weight_decay} for g in groups],
        lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if previous is not None:
        for p, state in previous.state.items():
            if any(p is q for g in optimizer.param_groups for q in g["params"]):
                optimizer.state[p] = state
    return optimizer


_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def needs_autocast(model: nn.Module, precision: str) -> bool:
    """Whether ``precision`` needs autocast: some parameter is not yet in its dtype.

    A model stored in bf16 whose other parameters cast themselves (modules with
    ``casts_own_parameters``, like LoRA's factors) already computes in bf16; autocast would only add
    a dispatch step to every op (measured 7-12% of a SmolLM2 LoRA step on CPU). fp32 master weights
    (full fine-tuning), an fp32 head or buffers kept in fp32 on purpose keep autocast on.
    """
    if precision == "fp32":
        return False
    dtype = _PRECISION[precision]
    for module in model.modules():
        if getattr(module, "casts_own_parameters", False):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                return True
    return False


def autocast(device: torch.device, precision: str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device`` (nothing for fp32 or when not ``enabled``)."""
    if precision == "fp32" or not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_PRECISION[precision])


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    """Runs optimizer steps for one method over one batcher; see the module docstring."""

    def __init__(self, model: nn.Module, method: Method, cfg: TrainConfig, train_batcher: Any,
                 val_batcher: Any | None, run_dir: Path, *, base_model: str | None,
                 base_fingerprint: str | None, device: torch.device,
                 loss_fn: Callable = causal_lm_loss) -> None:
        cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
        warn_if_slow(cfg.precision, device, "train.precision")
        self.model, self.method, self.cfg = model, method, cfg
        self.train_batcher, self.val_batcher = train_batcher, val_batcher
        self.run_dir, self.device, self.loss_fn = Path(run_dir), device, loss_fn
        self.base_model, self.base_fingerprint = base_model, base_fingerprint
        self.optimizer = build_optimizer(model, method, cfg)
        self.steps_per_epoch = max(1, len(train_batcher) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.warmup = cfg.warmup_steps or round(cfg.warmup_ratio * self.total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.use_autocast = needs_autocast(model, cfg.precision)
        # tokens: loss-bearing ("useful") tokens; input_tokens: every real (non-padding) token processed
        self.state: dict[str, Any] = {"step": 0, "micro": 0, "tokens": 0, "input_tokens": 0, "skipped": 0,
                                      "elapsed": 0.0,
                                      "threads": choose_threads(cfg.threads) if device.type == "cpu" else 0}
        self._plans: dict[int, list] = {}

    # --- data ----------------------------------------------------------------------------------
    def _micro_batch(self, index: int) -> dict[str, Any]:
        epoch, pos = divmod(index, len(self.train_batcher))
        if epoch not in self._plans:
            self._plans = {epoch: self.train_batcher.batches(epoch)}
        return self.train_batcher.collate(self._plans[epoch][pos])

    # --- resume --------------------------------------------------------------------------------
    def resume(self) -> Path | None:
        """Continue from the newest complete checkpoint in the run folder, if any."""
        found = checkpoint_dirs(self.run_dir)
        if not found:
            return None
        saved = load_checkpoint(found[-1], model=self.model, method=self.method, optimizer=self.optimizer)
        self.state.update({k: saved[k] for k in self.state if k in saved})
        return found[-1]

    # --- one step ------------------------------------------------------------------------------
    def _step(self) -> tuple[float | None, float]:
        """One optimizer step; returns (mean loss, grad norm) or (None, nan) when skipped."""
        cfg, model = self.cfg, self.model
        micro = [self._micro_batch(self.state["micro"] + i) for i in range(cfg.grad_accum)]
        n_target = max(1, sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro))
        self.state["input_tokens"] += sum(int(mb.get("num_tokens", mb["input_ids"].numel())) for mb in micro)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        ctx = None
        for mb in micro:
            mb = _to(mb, self.device)
            with autocast(self.device, cfg.precision, self.use_autocast):
                loss_sum, n, outputs = self.loss_fn(model, mb)
                ctx = StepContext(model, mb, self.state["step"], self.total_steps, outputs, self.optimizer,
                                  _base_logits=lambda mb=mb, o=outputs: self._base_logits(mb, o))
                loss = loss_sum / n_target
                extra = self.method.extra_loss(ctx)
                if extra is not None:
                    loss = loss + extra * (n / n_target)
            if not torch.isfinite(loss):
                return self._non_finite(f"loss is {loss.item()}")
            self.scaler.scale(loss).backward()
            total += loss.item()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            return self._non_finite(f"gradient norm is {grad_norm}")
        factor = lr_factor(self.state["step"], total=self.total_steps, warmup=self.warmup,
                           schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio, decay_ratio=cfg.decay_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = cfg.lr * factor * g["lr_scale"]
        self.method.before_optimizer_step(ctx)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_optimizer_step(ctx)
        self.state["tokens"] += n_target
        if self.method.on_step_end(ctx):
            self.optimizer = build_optimizer(model, self.method, cfg, previous=self.optimizer)
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
            return self.model(**causal_inputs(batch), use_cache=False, **extra).logits

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation loss per target token."""
        if self.val_batcher is None:
            return None
        self.model.eval()
        total, tokens = 0.0, 0
        plan = self.val_batcher.batches(0)
        if self.cfg.eval_batches:
            plan = plan[: self.cfg.eval_batches]
        for indices in plan:
            mb = _to(self.val_batcher.collate(indices), self.device)
            with autocast(self.device, self.cfg.precision, self.use_autocast):
                loss_sum, n, _ = self.loss_fn(self.model, mb)
            total, tokens = total + float(loss_sum), tokens + n
        self.model.train()
        return total / max(1, tokens)

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
        log = MetricsLog(self.run_dir, tensorboard=cfg.tensorboard)
        bar = tqdm(total=self.total_steps, initial=state["step"], disable=not progress, unit="step",
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
                if state["step"] % cfg.log_every == 0 or loss is None:
                    log.log(record)
                    history.append(record)
                bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "skip", lr=f"{lr:.2e}",
                                tok_s=f"{input_speed:.0f}")
                bar.update(1)
                at_end = state["step"] == self.total_steps
                if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or at_end:
                    val_loss = self.validate()
                    if val_loss is not None:
                        rec = {"step": state["step"], "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
                        log.log(rec)
                        history.append(rec)
                if cfg.save_every and state["step"] % cfg.save_every == 0 and not at_end:
                    save_checkpoint(self.run_dir, state["step"], model=self.model, method=self.method,
                                    optimizer=self.optimizer, trainer_state=dict(state),
                                    base_model=self.base_model, base_fingerprint=self.base_fingerprint,
                                    keep_last=cfg.keep_last)
        finally:
            bar.close()
            log.close()
            self.model.eval()
        return LoopResult(state["step"], state["tokens"], state["input_tokens"], state["elapsed"], last_loss,
                          val_loss, state["skipped"], history)
