"""Rewards given by import path: ``package.module:function`` or ``path/to/file.py:function``.

A reward scores completions: ``reward(prompts: list[str], completions: list[str]) -> list[float]``,
one finite float per pair. VAS value models are trained on them (:mod:`lmadapt.recipes.vas_train`); classifiers
trained with lmadapt will plug in the same way.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmadapt.errors import LmadaptError


@dataclass
class Reward:
    """A reward loaded from ``spec``: ``reward(prompts, completions) -> list[float]``, one finite float per pair.

    ``prompts`` are the prompts as written (not chat-rendered), ``completions`` the decoded new text without
    special tokens. Outputs are checked: a wrong length or a non-finite value raises, naming the spec.
    """

    spec: str
    fn: Callable[[list[str], list[str]], Sequence[float]]

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.spec.rsplit(":", 1)[-1])

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        try:
            out = self.fn(list(prompts), list(completions))
        except Exception as exc:
            raise LmadaptError(f"reward {self.spec}: failed on {len(prompts)} completion(s): "
                               f"{type(exc).__name__}: {exc}") from exc
        try:
            values = [float(v) for v in out] if not isinstance(out, (str, bytes)) else None
        except (TypeError, ValueError):
            values = None
        if values is None:
            raise LmadaptError(f"reward {self.spec}: returned {type(out).__name__} {str(out)[:60]!r}; it must "
                               f"return a list of floats, one per (prompt, completion) pair")
        if len(values) != len(prompts):
            raise LmadaptError(f"reward {self.spec}: returned {len(values)} value(s) for {len(prompts)} "
                               f"completions; it must return one float per (prompt, completion) pair")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise LmadaptError(f"reward {self.spec}: returned {values[bad[0]]} (not finite) for completion "
                               f"{completions[bad[0]][:80]!r}; {len(bad)} such value(s)")
        return values


def load_reward(spec: str) -> Reward:
    """Import ``package.module:function`` or ``path/to/file.py:function`` (relative to the working folder)."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise LmadaptError(f"reward {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(spec, Path(where).expanduser())
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            if exc.name and (where == exc.name or where.startswith(exc.name + ".")):
                raise LmadaptError(f"reward {spec!r}: module {where!r} not found; install it, add its folder "
                                   f"to PYTHONPATH, or give a file path (path/to/file.py:{attr})") from None
            raise LmadaptError(f"reward {spec!r}: importing {where!r} failed: it needs module {exc.name!r}, "
                               f"which is not installed") from None
        except Exception as exc:
            raise LmadaptError(f"reward {spec!r}: importing {where!r} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise LmadaptError(f"reward {spec!r}: {where} has no attribute {attr!r}. "
                               f"Callables there: {', '.join(names) or '(none)'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LmadaptError(f"reward {spec!r}: {attr} is a {type(obj).__name__}, not a callable "
                           f"(prompts: list[str], completions: list[str]) -> list[float]")
    return Reward(spec, obj)


def _import_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise LmadaptError(f"reward {spec!r}: file {path} not found")
    name = f"lmadapt_reward_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    try:
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as exc:
        raise LmadaptError(f"reward {spec!r}: running {path} failed: {type(exc).__name__}: {exc}") from exc
    sys.modules[name] = module
    return module
