"""lmadapt: adapt pretrained language models to new tasks, domains and languages.

The public API (see :mod:`lmadapt.api`): ``train``, ``load``, ``merge``, ``inspect``, ``evaluate``,
``generate``. Imports are lazy so that ``import lmadapt`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "train": "lmadapt.train",
    "load_run_config": "lmadapt.train",
    "RunConfig": "lmadapt.train",
    "load": "lmadapt.api",
    "merge": "lmadapt.api",
    "inspect": "lmadapt.api",
    "evaluate": "lmadapt.evaluation",
    "generate": "lmadapt.generation",
    "load_adapter": "lmadapt.adapters",
    "save_adapter": "lmadapt.adapters",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmadapt' has no attribute {name!r}")
