"""Per-example predictions as JSONL: one line per evaluated row, for error analysis and metrics over runs.

Each line is ``{"id", "prediction", "gold", "score", "correct", ...}``: ``id`` is the row's ``id`` field, or
where it was read (``file:line``); what the other keys hold depends on the task (docs/evaluation.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmadapt.errors import LmadaptError
from lmadapt.fsutil import atomic_write_text


def write_predictions(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSONL through a temporary file and a rename (a crash leaves no half file)."""
    path = Path(path)
    if path.is_dir():
        raise LmadaptError(f"predictions: {path} is a folder; give a file name such as {path / 'predictions.jsonl'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def base_predictions_path(path: str | Path) -> Path:
    """Where the base model's predictions go beside the adapted model's: ``out.jsonl`` -> ``out.base.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.base{path.suffix or '.jsonl'}")


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a predictions file written by :func:`write_predictions`."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
