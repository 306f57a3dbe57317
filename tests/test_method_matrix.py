"""Every registered method through the real loop: with every objective (causal LM, distillation, the VAS value
loss), each in fp32 and bf16, its saved adapter reproducing the trained model, and a run resumed after a kill ending
with the same weights as one never interrupted.

The method configs are the contract rows of tests/test_methods.py (small, default-init), on q/v projections.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from conftest import interrupted_at as killed_at
from safetensors.torch import load_file
from test_methods import CONFIGS  # the contract table: one small config per method
from test_vas import toy_samples

from lmadapt.adapters.format import load_adapter
from lmadapt.decoding.value_model import ValueModel
from lmadapt.errors import LmadaptError
from lmadapt.methods import available_methods, method_class
from lmadapt.recipes.finetune import train
from lmadapt.recipes.vas_train import fit_value_model
from lmadapt.testing import tiny_llama
from lmadapt.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# a method that changes the vocabulary (new_tokens) widens the logits: tests/test_method_new_tokens.py checks it
METHODS = [m for m in available_methods() if not method_class(m).changes_tokenizer]
ADAPTER_METHODS = [m for m in METHODS if not method_class(m).trains_base_weights]


def method_spec(name: str) -> dict:
    spec = {"name": name, **CONFIGS[name][0]}
    if "target_modules" in {f for f in method_class(name).config_class.__dataclass_fields__}:
        spec.setdefault("target_modules", ["q_proj", "v_proj"])
    return spec


@pytest.fixture(scope="module")
def make_config(tiny_model_dir, tmp_path_factory):
    from conftest import make_rows, write_jsonl

    data = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(data, make_rows(48))

    def make(output_dir: Path, method: str, objective: dict | None = None, **train_fields) -> dict:
        cfg = {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": [str(data)], "max_length": 128, "validation_fraction": 0.125},
            "method": method_spec(method),
            "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 4, "tensorboard": False, "schedule": "constant",
                      "threads": 2, **train_fields},
            "output_dir": str(output_dir),
        }
        if objective is not None:
            cfg["objective"] = objective
        return cfg
    return make


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_with_the_causal_lm_objective(make_config, tmp_path, name, precision, tiny_model_dir):
    result = train(make_config(tmp_path / "run", name, precision=precision), progress=False)
    assert result.report["steps"] == 4 and math.isfinite(result.report["final_train_loss"])
    fresh = tiny_llama()
    load_adapter(fresh, result.adapter_dir, force=True)  # the exported form where the method has one
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - tiny_llama()(input_ids=ids).logits).abs().max() > 0, \
            f"{name}: the saved adapter changes nothing"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_with_distillation(make_config, tmp_path, name, precision, tiny_model_dir):
    teacher = "base" if name in ADAPTER_METHODS else str(tiny_model_dir)  # weight methods: the frozen copy
    cfg = make_config(tmp_path / "run", name, {"name": "distill", "teacher": teacher, "lm_weight": 0.5},
                      precision=precision)
    result = train(cfg, progress=False)
    assert result.report["steps"] == 4 and math.isfinite(result.report["final_train_loss"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_a_value_model(tmp_path, name, precision, tokenizer):
    vm = ValueModel(tiny_llama(), tokenizer)
    before = {k: v.clone() for k, v in vm.backbone.state_dict().items()}
    samples = toy_samples(tokenizer, 16, seed=2)
    spec = method_spec(name)
    fit = functools.partial(fit_value_model, vm, samples, [float(i % 3) for i in range(16)], run_dir=tmp_path / "run",
                            train=TrainConfig(lr=1e-2, batch_size=8, max_steps=2, tensorboard=False,
                                              precision=precision), method=spec)
    if not method_class(name).mergeable:  # value models are saved merged: refused before any training, with why
        with pytest.raises(LmadaptError, match=f"method '{name}' cannot be merged into the backbone"):
            fit()
        assert all(torch.equal(v, before[k]) for k, v in vm.backbone.state_dict().items())
        return
    result = fit()
    assert math.isfinite(result.final_loss)
    after = vm.backbone.state_dict()
    assert list(after) == list(before)  # merged and unloaded: a plain backbone again
    assert any(not torch.equal(after[k], before[k]) for k in before), f"{name}: training left the backbone as it was"


@pytest.mark.parametrize("name", METHODS)
def test_every_method_resumes_exactly(make_config, tmp_path, name):
    fields = {"max_steps": 6, "save_every": 2, "precision": "fp32"}
    whole = train(make_config(tmp_path / "whole", name, **fields), progress=False)
    with killed_at(5), pytest.raises(KeyboardInterrupt):
        train(make_config(tmp_path / "cut", name, **fields), progress=False)
    resumed = train(make_config(tmp_path / "cut", name, **fields), resume=True, progress=False)
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}: resume is not exact"
