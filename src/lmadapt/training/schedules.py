"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state.

Each schedule warms up linearly over ``warmup`` steps (step k of the warm-up runs at (k+1)/warmup of the
peak, so no step is wasted at 0), then, with progress = (step - warmup) / (total - warmup) as in
transformers' schedulers:
- constant: stays at the peak;
- linear: decays linearly to ``min_ratio`` x peak at ``total`` steps;
- cosine: follows half a cosine down to ``min_ratio`` x peak;
- wsd (warmup-stable-decay): stays at the peak, then decays linearly to ``min_ratio`` x peak over the
  last ``decay_ratio`` of the steps ("MiniCPM", Hu et al., arXiv:2404.06395).
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float = 0.0,
              decay_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
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
