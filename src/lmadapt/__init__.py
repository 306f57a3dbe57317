"""lmadapt: adapt pretrained language models to new tasks, domains and languages.

The public API (see :mod:`lmadapt.api`): ``train``, ``load``, ``merge``, ``inspect``, ``evaluate``,
``generate``, and decoding-time steering ``steered_generate`` / ``proxy_logprobs`` (see
:mod:`lmadapt.steering`). Imports are lazy so that ``import lmadapt`` stays cheap.
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
    "steered_generate": "lmadapt.steering",
    "proxy_logprobs": "lmadapt.steering",
    "load_adapter": "lmadapt.adapters",
    "save_adapter": "lmadapt.adapters",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmadapt' has no attribute {name!r}")
