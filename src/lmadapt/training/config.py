"""The ``train:`` section of a run config: optimisation, schedule, precision, checkpoints, logging."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lmadapt.config import option
from lmadapt.training.schedules import Schedule


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
    schedule: Literal["constant", "linear", "cosine", "wsd", "infinite", "inverse_sqrt"] = option(
        "cosine", "Learning-rate schedule after warm-up (lmadapt.training.schedules). infinite: cosine cooldown "
                  "from the peak to const_ratio x peak over cooldown_steps, then constant; inverse_sqrt: peak x "
                  "sqrt(warmup / step). Neither depends on max_steps (unless anneal), so --resume may extend the run.")
    warmup_steps: int = option(0, "Linear warm-up steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = option(0.0, "Warm-up as a fraction of the total steps.")
    min_lr_ratio: float = option(0.0, "Final learning rate as a fraction of the peak (linear, cosine, wsd; the "
                                      "end of the annealing with anneal: true, where it must be > 0).")
    decay_ratio: float = option(0.1, "wsd: fraction of the steps spent in the final decay; infinite and "
                                     "inverse_sqrt with anneal: true: the fraction spent annealing.")
    const_ratio: float = option(0.5, "infinite: the constant learning rate after the cooldown, as a fraction of "
                                     "the peak (arXiv:2403.08763 uses about 0.5).")
    cooldown_steps: int = option(0, "infinite: steps of the cosine cooldown after the warm-up (overrides "
                                    "cooldown_ratio when > 0).")
    cooldown_ratio: float = option(0.0, "infinite: the cooldown as a fraction of the total steps (then the "
                                        "schedule depends on max_steps, and --resume cannot extend the run).")
    anneal: bool = option(False, "infinite, inverse_sqrt: end with an exponential decay to min_lr_ratio x peak "
                                 "over the last decay_ratio of the steps (before a checkpoint meant for use). The "
                                 "decay depends on max_steps: extend the run with anneal false, and switch it on "
                                 "with the last extension.")
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
        True, "On a CPU, train sdpa models whose activations are bf16/fp16 with lmadapt's matmul attention "
              "(lmadapt.training.attention): 1.5-1.8x faster forward+backward than torch's fused bf16 kernel, "
              "at the cost of keeping the attention probabilities for the backward pass. fp32 activations always "
              "use sdpa (its fp32 kernel is the faster one). false: the model's own attention.")
    gradient_checkpointing: bool = option(
        False, "Recompute each decoder block's activations in the backward pass instead of keeping them "
               "(lmadapt.training.memory): less activation memory for about a third more compute; the same "
               "gradients. Transformers models only (not VAS value models).")
    distributed: Literal["ddp", "fsdp"] = option(
        "ddp", "How the processes of a torchrun launch share the work (docs/distributed.md; one process: ignored). "
               "ddp: each holds the whole model and the gradients are summed over them; fsdp: FSDP2 (torch's "
               "fully_shard) shards every parameter, its gradient and AdamW's moments over them, one transformer "
               "block at a time, for models whose training state does not fit one device (lmadapt train only).")
    threads: int = option(0, "CPU threads (0: auto, the cores idle when the run starts, or OMP_NUM_THREADS "
                             "when it is set). A resumed run keeps its first count, so it stays bit-exact.")
    lae_momentum: float | None = option(
        None, "LAE (arXiv:2303.10070; docs/lae.md): keep an offline copy of the trained adapter parameters as "
              "an exponential moving average, off <- m * off + (1 - m) * online after every optimizer step, and "
              "write it as adapter_offline/ beside adapter/ (ensemble the two with --ensemble-adapter). null: "
              "off; 0: the offline copy equals the online one; 1: it never moves. The official code uses 0.9999.")
    lae_warmup_steps: int = option(
        0, "LAE: for the first N optimizer steps the offline copy is set equal to the online one; the average "
           "starts after (the official code starts its offline copy from the online module after the first task).")
    lae_offline_init: str | None = option(
        None, "LAE: start the offline copy from this adapter folder (e.g. the previous task's adapter_offline/, "
              "with init_adapter the previous task's adapter/) instead of the online weights at the start.")

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
        problems += self._schedule_problems()
        if self.lae_momentum is not None and not 0 <= self.lae_momentum <= 1:
            problems.append(f"lae_momentum: must be in [0, 1] (null: no LAE), got {self.lae_momentum}")
        if self.lae_warmup_steps < 0:
            problems.append(f"lae_warmup_steps: must be >= 0, got {self.lae_warmup_steps}")
        if self.lae_momentum is None and (self.lae_warmup_steps or self.lae_offline_init):
            problems.append("lae_warmup_steps and lae_offline_init set the LAE offline copy, which is off: set "
                            "lae_momentum too (e.g. 0.9999), or drop them")
        return problems

    def _schedule_problems(self) -> list[str]:
        """The infinite schedules' settings: ratios in range, a cooldown to cool down over, a floor to anneal to."""
        problems = []
        for name in ("min_lr_ratio", "decay_ratio", "const_ratio", "cooldown_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.cooldown_steps < 0:
            problems.append(f"cooldown_steps: must be >= 0, got {self.cooldown_steps}")
        infinite = self.schedule in ("infinite", "inverse_sqrt")
        if self.anneal and not infinite:
            problems.append(f"anneal: only for schedule infinite or inverse_sqrt (schedule {self.schedule} has its "
                            f"own decay, or none); drop anneal, or choose one of them")
        if self.anneal and infinite and not 0 < self.min_lr_ratio < self._anneal_from():
            problems.append(f"min_lr_ratio: annealing decays exponentially to min_lr_ratio x peak, so it must be > 0 "
                            f"and below the rate it decays from ({self._anneal_from():g} x peak), got "
                            f"{self.min_lr_ratio} (arXiv:2403.08763 anneals from 0.5 x peak to 0.1 x peak)")
        if self.schedule != "infinite" and (self.cooldown_steps or self.cooldown_ratio or self.const_ratio != 0.5):
            set_ = [n for n in ("cooldown_steps", "cooldown_ratio") if getattr(self, n)]
            set_ += ["const_ratio"] * (self.const_ratio != 0.5)
            problems.append(f"{', '.join(set_)}: only used by schedule infinite, not {self.schedule}; drop them, or "
                            f"set schedule infinite")
        elif self.schedule == "infinite" and self.const_ratio < 1 and not (self.cooldown_steps or self.cooldown_ratio):
            problems.append(f"cooldown_steps: schedule infinite cools down from the peak to const_ratio x peak "
                            f"({self.const_ratio}) over cooldown_steps (or cooldown_ratio x max_steps); set one, "
                            f"e.g. cooldown_steps equal to a tenth of the steps, or const_ratio 1 for none")
        return problems

    def _anneal_from(self) -> float:
        """The rate annealing starts from, as a fraction of the peak: at its first step when max_steps is
        known, else the constant phase's (infinite) or the peak (inverse_sqrt)."""
        if self.max_steps > 0:
            schedule = Schedule.of(dataclasses.asdict(self), self.max_steps)
            if schedule.anneal_start is not None:
                return schedule.factor(schedule.anneal_start)
        return self.const_ratio if self.schedule == "infinite" else 1.0

