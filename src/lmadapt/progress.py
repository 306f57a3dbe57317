"""Progress of long evaluations and generations: a tqdm bar on a terminal, a status line elsewhere.

When stderr is not a terminal (a log file, CI, ``nohup``, a pipe), a bar's carriage returns make an
unreadable log, so one line is written every :data:`STATUS_EVERY_S` seconds instead, and a last one
when the work ends (if any was written)::

    eval classification: 120/250 examples, 41 s

``enabled=False`` shows nothing; ``True`` and ``None`` (auto) both show the bar or the lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

STATUS_EVERY_S = 30.0
"""Seconds between two status lines when stderr is not a terminal."""


def _now() -> float:
    return time.monotonic()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """``done`` of ``total`` units of work, shown on stderr as the module docstring describes.

    Use as a context manager, calling :meth:`update` as work is done.
    """

    def __init__(self, total: int, desc: str, unit: str, enabled: bool | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.bar: Any = None
        self.stream: TextIO | None = None
        if enabled is False or total <= 0:
            return
        if _is_terminal(sys.stderr):
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
        else:
            self.stream = sys.stderr
            self.start = self.last = _now()
            self.shown = -1  # ``done`` at the last status line; -1: none written yet

    def update(self, n: int = 1) -> None:
        """Record ``n`` more units done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.stream is not None:
            now = _now()
            if now - self.last >= STATUS_EVERY_S:
                self._status(now)

    def close(self) -> None:
        """Remove the bar, or write the final status line when earlier ones were written."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.stream is not None and 0 <= self.shown != self.done:
            self._status(_now())
        self.stream = None

    def _status(self, now: float) -> None:
        assert self.stream is not None
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}, {now - self.start:.0f} s", file=self.stream,
              flush=True)
        self.last, self.shown = now, self.done

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Sequence[T], desc: str, unit: str, enabled: bool | None = None,
          size: Callable[[T], int] | None = None) -> Iterator[T]:
    """Iterate over ``items``, counting each one done after its turn (``size(item)`` units, default 1)."""
    total = sum(size(item) for item in items) if size else len(items)
    with Progress(total, desc, unit, enabled) as progress:
        for item in items:
            yield item
            progress.update(size(item) if size else 1)
