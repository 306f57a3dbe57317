"""Tables of evaluation results (text or markdown): one model's, or before/after; a run's target and retention
rows (the forgetting figures of continual pretraining, arXiv:2403.08763)."""

from __future__ import annotations

from typing import Any

_COUNTS = {"n", "correct", "tokens"}  # counts, not metrics: left out of compare_table
LOWER_IS_BETTER = frozenset({"perplexity", "nll", "loss", "mse", "mae", "dpo_loss"})
"""Metrics that improve as they fall; every other metric (accuracy, F1, ...) improves as it rises."""


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


def headline_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers a result is judged by: its top-level metrics, counts left out, and ``nll`` left out beside
    ``perplexity`` (its logarithm). What the role rows, the ``evals.png`` panels and the benchmark compare."""
    out = {k: float(v) for k, v in result.items() if _is_number(v) and k not in _COUNTS}
    if "perplexity" in out:
        out.pop("nll", None)
    return out


def logged_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Every metric of a result as :func:`compare_table` shows it (one level of nested dicts, no counts): what a
    run writes to ``metrics.jsonl`` as ``eval/<name>/<metric>``."""
    return _metrics(result)


def role_rows(entries: list[tuple[str, str, dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (evaluation, headline metric) of ``entries`` = ``(name, role, before, after)``: ``role``,
    ``eval``, ``metric``, ``before``, ``after``, ``change`` (after - before), for perplexity also
    ``relative_change`` (after / before - 1), and ``verdict``: ``better``, ``unchanged``, or when the metric got
    worse ``worse`` for a target and ``forgetting`` for a retention set. Target rows come first."""
    rows = []
    for name, role, before, after in entries:
        b, a = headline_metrics(before), headline_metrics(after)
        for metric in (k for k in a if k in b):
            change = a[metric] - b[metric]
            row = {"role": role, "eval": name, "metric": metric, "before": b[metric], "after": a[metric],
                   "change": change}
            if metric == "perplexity" and b[metric]:
                row["relative_change"] = a[metric] / b[metric] - 1
            worse = change > 0 if metric in LOWER_IS_BETTER else change < 0
            row["verdict"] = ("unchanged" if change == 0 else "forgetting" if worse and role == "retention"
                              else "worse" if worse else "better")
            rows.append(row)
    return sorted(rows, key=lambda r: r["role"] != "target")


def role_summary(rows: list[dict[str, Any]]) -> str:
    """:func:`role_rows` as lines, e.g. ``retention: en_heldout perplexity 64.40 -> 71.10 (+10.4%, forgetting)``."""
    def show(v: float) -> str:
        return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"

    def change(r: dict[str, Any]) -> str:
        return f"{r['relative_change']:+.1%}" if "relative_change" in r else f"{r['change']:+.4f}"
    width = max((len(r["role"]) for r in rows), default=0) + 1
    return "\n".join(f"{r['role'] + ':':<{width}} {r['eval']} {r['metric']} {show(r['before'])} -> "
                     f"{show(r['after'])} ({change(r)}, {r['verdict']})" for r in rows)


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
