"""lmadapt: adapt pretrained language models to new tasks, domains and languages.

The public API (see :mod:`lmadapt.api`): ``train``, ``preview`` (a dry run of ``train``), ``load``, ``merge``,
``inspect``, ``evaluate``, ``generate``, ``steer`` (generation from model paths, optionally steered), and
decoding-time steering of loaded models ``steered_generate`` / ``proxy_logprobs`` (see
:mod:`lmadapt.decoding.steering`). Imports are lazy so that ``import lmadapt`` stays cheap.
"""

from __future__ import annotations

import os
from typing import Any

# Nothing is ever fetched from the Hugging Face Hub: every transformers call passes local_files_only=True,
# and this is set (unless the user set it) before any lmadapt module imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

_EXPORTS = {
    "train": "lmadapt.recipes.finetune",
    "load_run_config": "lmadapt.recipes.finetune",
    "RunConfig": "lmadapt.recipes.finetune",
    "load": "lmadapt.api",
    "merge": "lmadapt.api",
    "inspect": "lmadapt.api",
    "preview": "lmadapt.api",
    "steer": "lmadapt.api",
    "load_ensemble": "lmadapt.api",
    "make_recovery_data": "lmadapt.api",
    "evaluate": "lmadapt.evaluation.run",
    "generate": "lmadapt.decoding.generation",
    "steered_generate": "lmadapt.decoding.steering",
    "proxy_logprobs": "lmadapt.decoding.steered_scoring",
    "load_adapter": "lmadapt.adapters.format",
    "save_adapter": "lmadapt.adapters.format",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmadapt' has no attribute {name!r}")
