"""The slow tier: the real SmolLM2-135M-Instruct (converted once into the user cache). Run: pytest -m slow.

Pins a short loss curve so that a silent change in training shows up, and checks merge and PEFT
interop on the real architecture (tied embeddings, GQA).
"""

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

# Losses of the first 6 steps of the run below (fp32, 1 thread), measured when this test was written.
PINNED = [4.1001, 2.8413, 0.6959, 1.5984, 1.3502, 0.9394]


@pytest.fixture(scope="module")
def bbc_run(tmp_path_factory):
    from lmadapt.recipes.demo_data import bbc_news
    from lmadapt.recipes.finetune import train

    tmp = tmp_path_factory.mktemp("smol")
    train_rows, _, _ = bbc_news(seed=0)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                            for r in train_rows[:24]))
    torch.set_num_threads(1)
    cfg = {"model": {"name_or_path": "smollm2-135m-instruct"},
           "data": {"train": [str(data)], "use_chat_template": True, "max_length": 512},
           "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]},
           "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 6, "schedule": "constant", "tensorboard": False},
           "output_dir": str(tmp / "run")}
    return train(cfg, progress=False)


def test_short_loss_curve_is_pinned(bbc_run):
    losses = [r["loss"] for r in bbc_run.loop.history if "loss" in r]
    assert losses == pytest.approx(PINNED, rel=2e-3, abs=2e-3), losses


def test_merged_model_loads_in_plain_transformers_with_equal_logits(bbc_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmadapt.api import load, merge

    out = merge("smollm2-135m-instruct", bbc_run.adapter_dir, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    model, tok, _ = load("smollm2-135m-instruct", adapter=bbc_run.adapter_dir)
    ids = tok(["The capital of France is", "Markets fell sharply"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, model(**ids).logits, atol=2e-4, rtol=1e-4)


def test_peft_loads_the_real_adapter_with_equal_logits(bbc_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmadapt.api import load
    from lmadapt.models.builtins import resolve_model_path

    model, tok, _ = load("smollm2-135m-instruct", adapter=bbc_run.adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    peft_model = PeftModel.from_pretrained(base, Path(bbc_run.adapter_dir)).eval()
    ids = tok(["Chancellor unveils budget"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**ids).logits, model(**ids).logits, atol=1e-5, rtol=1e-5)
