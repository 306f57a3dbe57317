"""Objectives: what the loop minimises. Each is one file behind :class:`lmadapt.objectives.base.Objective`,
registered by name; importing this package registers the built-in ones (causal_lm, classify, compat_kd, distill,
dpo in ``preference``, tag, value)."""

from lmadapt.objectives import (  # noqa: F401  (registration)
    causal_lm,
    classify,
    compat_kd,
    distill,
    preference,
    tag,
    value,
)
