"""train.gradient_checkpointing: the same adapter as without it, and far fewer activations kept for backward."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmadapt.decoding.value_model import ValueModel
from lmadapt.errors import ConfigError
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama, tiny_tokenizer
from lmadapt.training.memory import gradient_checkpointing


class SavedForBackward:
    """Bytes of the tensors autograd keeps for the backward pass outside any checkpointed region (a
    checkpointed block's own saved tensors go to torch.utils.checkpoint's inner hooks, not to these)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        return t


def _run(run_config: dict, name: str, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int, list[float]]:
    cfg = json.loads(json.dumps(run_config))
    cfg["output_dir"] = str(Path(run_config["output_dir"]).parent / name)
    cfg["model"]["dtype"] = "fp32"
    cfg["method"].update(target_modules=["all-linear"], dropout=0.1)  # dropout: the replay must reuse the RNG
    cfg["train"].update(precision="fp32", max_steps=6, grad_accum=2, gradient_checkpointing=checkpointing)
    saved = SavedForBackward()
    with saved.hooks:
        result = train(cfg, progress=False)
    losses = [r["loss"] for r in result.loop.history if "loss" in r]
    return load_file(str(Path(cfg["output_dir"]) / "adapter" / "adapter_model.safetensors")), saved.bytes, losses


def test_a_run_with_gradient_checkpointing_ends_with_the_same_adapter(run_config):
    plain, plain_bytes, plain_losses = _run(run_config, "plain", checkpointing=False)
    ckpt, ckpt_bytes, ckpt_losses = _run(run_config, "checkpointed", checkpointing=True)
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 7 * 2  # 2 layers x 7 linears x (A, B)
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=0, atol=1e-6)
    assert max(abs(float(plain[k].abs().max())) for k in plain if "lora_B" in k) > 1e-3  # B moved from zero
    torch.testing.assert_close(torch.tensor(ckpt_losses), torch.tensor(plain_losses), rtol=0, atol=1e-6)
    # Without checkpointing every decoder layer keeps its activations for backward; with it only the layer
    # inputs, the final norm, the head and the loss do. On the tiny model the decoder layers are most of it.
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_checkpointing_is_on_only_inside_the_context():
    model = tiny_llama()
    with gradient_checkpointing(model, True):
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    with gradient_checkpointing(model, False):
        assert not any(layer.gradient_checkpointing for layer in model.model.layers)


def test_a_value_model_is_refused_with_the_key_to_change():
    value_model = ValueModel(tiny_llama(), tiny_tokenizer())
    refused = pytest.raises(ConfigError, match=r"train.gradient_checkpointing: a ValueModel does not support it.*"
                                               r"gradient_checkpointing=false")
    with refused, gradient_checkpointing(value_model, True):
        pass
    assert not any(layer.gradient_checkpointing for layer in value_model.backbone.model.layers)
