"""Training: the one loop and what it needs (config, optimizer, precision, schedules, checkpoints), and the
run orchestrator (:mod:`lmadapt.training.run`) that every recipe composes.
"""
