"""Model updates: carry an adaptation to a new base version, merge adapters and models, measure what an update
breaks. Diff vectors (:mod:`lmadapt.updates.diff`), portable LoRA patches (:mod:`lmadapt.updates.port`),
merging (:mod:`lmadapt.updates.merging`) and compatibility (:mod:`lmadapt.updates.compat`) live here; MeteoRA
is a method (:mod:`lmadapt.methods.meteora`) and LAE a training option (:mod:`lmadapt.training.lae`).
See docs/updates.md.
"""
