"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state.

Each schedule warms up linearly over ``warmup`` steps (step k of the warm-up runs at (k+1)/warmup of the
peak, so no step is wasted at 0), then, with progress = (step - warmup) / (total - warmup) as in
transformers' schedulers:
- constant: stays at the peak;
- linear: decays linearly to ``min_ratio`` x peak at ``total`` steps;
- cosine: follows half a cosine down to ``min_ratio`` x peak;
- wsd (warmup-stable-decay): stays at the peak, then decays linearly to ``min_ratio`` x peak over the
  last ``decay_ratio`` of the steps ("MiniCPM", Hu et al., arXiv:2404.06395).

The infinite schedules ("Simple and Scalable Strategies to Continually Pre-train Large Language Models",
Ibrahim et al., arXiv:2403.08763, section 7) have no end built in: the learning rate of a step does not
depend on ``total`` unless ``anneal`` is set, so a run can be extended later (``--resume`` with a larger
``max_steps``) without re-warming:
- infinite: after the warm-up, a cosine cooldown over ``cooldown`` steps from the peak to ``const_ratio`` x
  peak, eta(t) = eta_const + (eta_max - eta_const) * 0.5 * (1 + cos(pi * (t - T_w) / T_cd)), then constant;
- inverse_sqrt: after the warm-up, peak * sqrt(warmup / t) with t = step + 1 (the warm-up is t / warmup, so
  both are 1 at t = warmup; a warm-up of 0 counts as 1);
- anneal (either of them): over the last ``decay_ratio`` of the steps, from the value v_a at the step T_a
  where annealing starts, an exponential decay v_a * (min_ratio / v_a) ^ ((t - T_a) / (total - T_a)) that
  reaches ``min_ratio`` x peak at ``total`` (as linear and cosine reach it there).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

SCHEDULES = ("constant", "linear", "cosine", "wsd", "infinite", "inverse_sqrt")
INFINITE = ("constant", "infinite", "inverse_sqrt")
"""Schedules whose learning rate at a step does not depend on the run's total (without ``anneal``)."""
SETTINGS = ("schedule", "warmup_steps", "warmup_ratio", "min_lr_ratio", "decay_ratio", "const_ratio",
            "cooldown_steps", "cooldown_ratio", "anneal")
"""The ``train:`` keys that, with ``max_steps``, decide the learning rate of every step."""


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float = 0.0,
              decay_ratio: float = 0.1, const_ratio: float = 0.5, cooldown: int = 0,
              anneal: bool = False) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based) of ``total``."""
    start = anneal_start(total, decay_ratio, schedule) if anneal else None
    if start is not None and step >= start:
        base = _factor(start, total, warmup, schedule, min_ratio, decay_ratio, const_ratio, cooldown)
        return base * (min_ratio / base) ** ((step - start) / (total - start))
    return _factor(step, total, warmup, schedule, min_ratio, decay_ratio, const_ratio, cooldown)


def anneal_start(total: int, decay_ratio: float, schedule: str) -> int | None:
    """The first step of the annealing of ``schedule`` (None where it has none): the last
    ``max(1, round(decay_ratio * total))`` steps anneal."""
    if schedule not in ("infinite", "inverse_sqrt") or total <= 0:
        return None
    return total - max(1, round(decay_ratio * total))


def _factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float, decay_ratio: float,
            const_ratio: float, cooldown: int) -> float:
    """The schedule without annealing."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "inverse_sqrt":
        return math.sqrt(max(1, warmup) / (step + 1))
    if schedule == "infinite":
        if step >= warmup + cooldown:
            return const_ratio
        return const_ratio + (1.0 - const_ratio) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / cooldown))
    if schedule == "constant" or total <= warmup:
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, round(decay_ratio * total))
        start = total - decay_steps
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / decay_steps)
        return 1.0 - (1.0 - min_ratio) * progress
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A run's schedule with its step counts resolved: ``factor(step)`` is the loop's learning-rate multiplier."""

    name: str
    total: int
    warmup: int
    cooldown: int = 0
    min_ratio: float = 0.0
    decay_ratio: float = 0.1
    const_ratio: float = 0.5
    anneal: bool = False

    @classmethod
    def of(cls, train: Mapping[str, Any], total: int) -> Schedule:
        """The schedule a ``train:`` section (a dict as ``config.yaml`` records it; missing keys take their
        defaults) gives a run of ``total`` steps: warm-up and cooldown as steps, or as ratios of ``total``."""
        # the defaults, imported here because training/config.py imports this module
        from lmadapt.training.config import TrainConfig

        default = TrainConfig()
        get = {key: train.get(key, getattr(default, key)) for key in SETTINGS}.__getitem__
        return cls(name=get("schedule"), total=total,
                   warmup=get("warmup_steps") or round(get("warmup_ratio") * total),
                   cooldown=get("cooldown_steps") or round(get("cooldown_ratio") * total),
                   min_ratio=get("min_lr_ratio"), decay_ratio=get("decay_ratio"), const_ratio=get("const_ratio"),
                   anneal=bool(get("anneal")))

    def factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
        return lr_factor(step, total=self.total, warmup=self.warmup, schedule=self.name, min_ratio=self.min_ratio,
                         decay_ratio=self.decay_ratio, const_ratio=self.const_ratio, cooldown=self.cooldown,
                         anneal=self.anneal)

    @property
    def anneal_start(self) -> int | None:
        """The first step of the annealing phase (None without one)."""
        return anneal_start(self.total, self.decay_ratio, self.name) if self.anneal else None
