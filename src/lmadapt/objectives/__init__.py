"""Objectives: what the loop minimises (causal LM, distillation, the VAS value loss)."""
