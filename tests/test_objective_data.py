"""An objective and its training data must fit: a format another objective owns is refused before anything runs."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

import lmadapt
from lmadapt.data.dataset import DataReport
from lmadapt.errors import ConfigError
from lmadapt.objectives.base import build_objective

PAIRS = [{"prompt": f"Question {i}?", "chosen": " yes", "rejected": " no"} for i in range(8)]
LABELLED = [{"text": f"row {i}", "label": ["a", "b"][i % 2]} for i in range(8)]


@pytest.mark.parametrize(("objective", "rows", "fmt", "message"), [
    ({"name": "causal_lm"}, PAIRS, "auto", r"'preference' rows, which objective 'dpo' trains on.*objective.name: dpo"),
    ({"name": "dpo"}, LABELLED, "auto", r"objective 'dpo' trains on data.format 'preference' rows, but the "
                                        r"training data reads as 'text'"),
    ({"name": "causal_lm"}, LABELLED, "classification", r"objective.name: classify"),
    ({"name": "classify", "labels": ["b", "a"]}, LABELLED, "classification",
     r"objective.labels \['b', 'a'\] and data.labels \['a', 'b'\] differ"),
])
def test_mismatched_objective_and_data_are_refused_before_the_run_is_written(tiny_model_dir, tmp_path, objective,
                                                                              rows, fmt, message):
    write_jsonl(tmp_path / "rows.jsonl", rows)
    data = {"train": [str(tmp_path / "rows.jsonl")], "format": fmt, "validation_fraction": 0.0, "batching": "padded"}
    if fmt == "classification":
        data["labels"] = ["a", "b"]
    cfg = {"model": {"name_or_path": str(tiny_model_dir)}, "data": data, "method": {"name": "lora", "r": 2},
           "objective": objective, "train": {"max_steps": 1, "tensorboard": False},
           "output_dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match=message):
        lmadapt.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_fitting_pairs_pass_the_check():
    assert build_objective({"name": "dpo"}).data_problems(DataReport(format="preference"), None) == []
    assert build_objective({"name": "causal_lm"}).data_problems(DataReport(format="chat"), None) == []
