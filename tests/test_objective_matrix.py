"""Every registered method with the objectives of issue 16 (preference pairs, a sequence-classification head, a token
head), each in fp32 and bf16 through the real loop, and resumed after a kill to the weights of a run never interrupted.

tests/test_method_matrix.py does the same for causal LM, distillation and the value loss. Here the data formats
differ (pairs, labelled sequences, tagged words), so each objective has its own small data set. A method that trains
the base weights has no adapters to switch off: DPO there uses the base model folder as its frozen reference.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import TOPICS, make_rows, write_jsonl
from safetensors.torch import load_file
from test_method_matrix import ADAPTER_METHODS, METHODS, killed_at, method_spec

from lmadapt.recipes.finetune import train

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = sorted(TOPICS)


def preference_rows(n: int) -> list[dict]:
    return [{"prompt": row["prompt"], "chosen": row["completion"], "rejected": " nothing"} for row in make_rows(n)]


def classification_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    return [{"text": " ".join(rng.choice(TOPICS[LABELS[i % len(LABELS)]]) for _ in range(4)),
             "label": LABELS[i % len(LABELS)]} for i in range(n)]


def tagging_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        words = [rng.choice(["the", "met", "Ann", "in", "Bo", "saw"]) for _ in range(rng.randint(3, 6))]
        rows.append({"tokens": words, "tags": ["B-NAME" if w[0].isupper() else "O" for w in words]})
    return rows


# objective -> (its data rows, the data section's extra fields, the objective section)
OBJECTIVES = {
    "dpo": (preference_rows, {}, {"name": "dpo"}),
    "classify": (classification_rows, {"format": "classification", "labels": LABELS},
                 {"name": "classify", "labels": LABELS, "unmask_last": 1}),
    "tag": (tagging_rows, {"format": "tagging"}, {"name": "tag", "unmask_layers": "all"}),
}


@pytest.fixture(scope="module")
def make_config(tiny_model_dir, tmp_path_factory):
    files = {}
    for objective, (rows, _, _) in OBJECTIVES.items():
        files[objective] = tmp_path_factory.mktemp(objective) / "train.jsonl"
        write_jsonl(files[objective], rows(24))

    def make(output_dir: Path, method: str, objective: str, **train_fields) -> dict:
        _, data_fields, section = OBJECTIVES[objective]
        section = dict(section)
        if objective == "dpo" and method not in ADAPTER_METHODS:  # no adapters to switch off: a frozen base copy
            section["reference"] = str(tiny_model_dir)
        return {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": [str(files[objective])], "max_length": 64, **data_fields},
            "method": method_spec(method),
            "objective": section,
            "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 3, "tensorboard": False, "schedule": "constant",
                      "threads": 1, **train_fields},
            "output_dir": str(output_dir),
        }
    return make


def saved(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.adapter_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_with_every_new_objective(make_config, tmp_path, name, objective, precision):
    result = train(make_config(tmp_path / "run", name, objective, precision=precision), progress=False)
    assert result.report["steps"] == 3 and math.isfinite(result.report["final_train_loss"])
    assert result.report["objective"] == objective
    tensors = saved(result)
    if objective in ("classify", "tag"):  # the head travels with the adapter, whatever the method
        assert "lmadapt_objective.score.weight" in tensors
    assert all(torch.isfinite(t).all() for t in tensors.values()), f"{name}/{objective}: non-finite weights saved"


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("name", METHODS)
def test_every_method_resumes_exactly_with_every_new_objective(make_config, tmp_path, name, objective):
    fields = {"max_steps": 4, "save_every": 2, "precision": "fp32"}
    whole = train(make_config(tmp_path / "whole", name, objective, **fields), progress=False)
    with killed_at(3), pytest.raises(KeyboardInterrupt):
        train(make_config(tmp_path / "cut", name, objective, **fields), progress=False)
    resumed = train(make_config(tmp_path / "cut", name, objective, **fields), resume=True, progress=False)
    a, b = saved(whole), saved(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}/{objective}: resume not exact"


@pytest.mark.parametrize("objective", ["classify", "tag"])
def test_head_objectives_validate_with_accuracy_and_no_perplexity(make_config, tmp_path, objective):
    """A head's loss is no next-token cross-entropy: validation reports the loss and the head's accuracy per unit
    (sequence or labelled token), each a share of the held-out units, and no val_ppl."""
    cfg = make_config(tmp_path / "run", "lora", objective, max_steps=4, eval_every=2)
    cfg["data"]["validation_fraction"] = 0.25
    result = train(cfg, progress=False)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    for r in val:
        assert "val_ppl" not in r and math.isfinite(r["val_loss"])
        assert 0.0 <= r["val_accuracy"] <= 1.0
    if objective == "classify":  # 6 held-out sequences: the accuracy is a count of them over 6
        assert all(abs(r["val_accuracy"] * 6 - round(r["val_accuracy"] * 6)) < 1e-9 for r in val)
