"""Tables of evaluation results (text or markdown): one model's, or before/after."""

from __future__ import annotations

from typing import Any

_COUNTS = {"n", "correct", "tokens"}  # counts, not metrics: left out of compare_table


def compare_table(rows: list[tuple[str, dict[str, Any], dict[str, Any]]], *, markdown: bool = False) -> str:
    """A before/after table: one line per (evaluation, metric) with the base value, the adapted one and
    the change. Aligned plain text for a terminal, or a Markdown table with ``markdown=True``.

    ``rows`` are ``(name, base_result, adapted_result)``; the metrics are the numbers in the results
    (and in one level of nested dicts, e.g. ``per_class_accuracy[sport]``), counts such as ``n`` left out.
    """
    header = ("eval", "metric", "base", "adapted", "change")
    lines = []
    for name, before, after in rows:
        flat_before, flat_after = _metrics(before), _metrics(after)
        for key in list(flat_after) + [k for k in flat_before if k not in flat_after]:
            b, a = flat_before.get(key), flat_after.get(key)
            change = _number(a - b, signed=True) if a is not None and b is not None else "-"
            lines.append((name, key, _number(b), _number(a), change))
    return text_table(header, lines, markdown)


def result_table(rows: list[tuple[str, dict[str, Any]]], *, markdown: bool = False) -> str:
    """One line per (evaluation, metric) with its value: the metrics of :func:`compare_table` and the counts
    (``n``, ``correct``, ``tokens``); ``rows`` are ``(name, result)``."""
    lines = [(name, key, _number(value)) for name, result in rows
             for key, value in _metrics(result, counts=True).items()]
    return text_table(("eval", "metric", "value"), lines, markdown)


def text_table(header: tuple[str, ...], lines: list[tuple[str, ...]], markdown: bool = False) -> str:
    """Aligned plain text (the first two columns left-aligned, numbers right-aligned), or Markdown."""
    if markdown:
        rule = "| " + " | ".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + " |"
        out = ["| " + " | ".join(header) + " |", rule]
        return "\n".join(out + ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines])
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines])


def _metrics(result: dict[str, Any], counts: bool = False) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in result.items():
        if _is_number(value) and (counts or key not in _COUNTS):
            out[key] = value if key in _COUNTS else float(value)
        elif isinstance(value, dict) and value and all(_is_number(v) for v in value.values()):
            out.update({f"{key}[{str(k).strip()}]": float(v) for k, v in value.items()})
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not signed:
        return str(value)
    sign = "+" if signed else ""
    return f"{value:{sign}.4f}" if abs(value) < 1000 else f"{value:{sign}.1f}"
