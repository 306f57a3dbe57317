"""Errors meant for people: each says what was wrong, where, and what to do."""

from __future__ import annotations


class LmadaptError(Exception):
    """Base class of every error lmadapt raises on purpose (bad input, bad config, refused action)."""


class ConfigError(LmadaptError):
    """One or more problems in a configuration; all of them are listed in the message."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s) in the configuration{where}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DataError(LmadaptError):
    """Malformed training or evaluation data; every problem names file, line and field."""

    SKIP_HINT = "Fix the rows, or set data.skip_bad_rows=true to skip them and train on the rest."

    def __init__(self, problems: list[str], total: int | None = None, hint: str | None = SKIP_HINT) -> None:
        self.problems = list(problems)
        shown = self.problems[:20]
        n = total if total is not None else len(self.problems)
        lines = [f"{n} malformed row(s) in the data:"] + [f"  - {p}" for p in shown]
        if n > len(shown):
            lines.append(f"  ... and {n - len(shown)} more")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class ModelError(LmadaptError):
    """A model could not be found or loaded."""


class AdapterError(LmadaptError):
    """An adapter could not be saved, loaded or applied."""
