"""Run records: metrics to ``metrics.jsonl`` (and TensorBoard when installed), the loss-curve PNG, and the
evaluation curves (target and retention sets over the steps) PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per line; mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: the JSONL file is the record
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (a torn last line from a killed run is ignored)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_loss(records: list[dict[str, Any]], path: str | Path, title: str = "",
              ylabel: str = "cross-entropy (nats/token)") -> Path | None:
    """Training loss (raw and smoothed) and validation loss against the step, as a PNG."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 20)
        ax.plot(steps, losses, color="#9ecae1" if window > 1 else "#08519c", linewidth=0.8 if window > 1 else 1.4,
                label="train loss")
        if window > 1:
            ax.plot(steps, _moving_average(list(losses), window), color="#08519c", linewidth=1.6,
                    label=f"train loss (mean of last {window} steps)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="#d94801", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "lmadapt training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_evals(records: list[dict[str, Any]], path: str | Path, roles: dict[str, str], title: str = "",
               metrics: dict[str, list[str]] | None = None) -> Path | None:
    """The run's evaluations against the step, as a PNG: one panel per metric, a line per evaluation (target
    sets solid, retention sets dashed), from the ``eval/<name>/<metric>`` records of ``metrics.jsonl`` (the
    base model at step 0, the ``every`` points, the adapted model at the last step).

    ``roles``: each evaluation's name -> ``target`` or ``retention``; ``metrics``: the metrics to draw for each
    name (default: every top-level one the records hold)."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}  # metric -> name -> points
    for r in records:
        for key, value in r.items():
            kind, _, rest = key.partition("/")
            name, _, metric = rest.rpartition("/")
            if kind != "eval" or name not in roles or not isinstance(value, (int, float)) or "[" in metric:
                continue
            if metrics is None or metric in metrics.get(name, ()):
                curves.setdefault(metric, {}).setdefault(name, []).append((r["step"], value))
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), dpi=110, squeeze=False)
    for ax, (metric, lines) in zip(axes[0], curves.items()):
        for name, points in sorted(lines.items(), key=lambda kv: (roles[kv[0]] != "target", kv[0])):
            steps, values = zip(*sorted(points))
            retention = roles[name] == "retention"
            same_role = sorted(n for n in lines if roles[n] == roles[name])
            colour = (_RETENTION if retention else _TARGET)[same_role.index(name) % len(_TARGET)]
            ax.plot(steps, values, "s--" if retention else "o-", color=colour, label=f"{name} ({roles[name]})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "lmadapt evaluations")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


_TARGET = ("#08519c", "#3182bd", "#6baed6", "#2171b5")  # blues: the domain trained for
_RETENTION = ("#d94801", "#f16913", "#a63603", "#fd8d3c")  # oranges: what should be kept


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start): no lag beyond the window."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
