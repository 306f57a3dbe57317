"""Objectives: what the loop minimises. Each is one file behind :class:`lmadapt.objectives.base.Objective`,
registered by name; importing this package registers the built-in ones (causal_lm, compat_kd, distill, value)."""

from lmadapt.objectives import causal_lm, compat_kd, distill, value  # noqa: F401  (registration)
