"""Evaluation: the task configs, example files, the tasks themselves and before/after reports.

:func:`lmadapt.evaluation.run.evaluate` runs one :class:`~lmadapt.evaluation.config.EvalConfig`.
"""
