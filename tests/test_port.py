"""PortLLM (arXiv:2410.10870): a LoRA trained on base v1, attached to v2 (v1 with perturbed weights) untrained.

The fingerprint check refuses v2 unless overridden, and the override is recorded; the ported adapter loads
in PEFT and lmadapt on v2 (without --force) and gives v2 + s B A; merging it (METHODS §13 test 3) equals
attaching it; other module shapes and non-LoRA adapters are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from lmadapt.adapters.format import (
    adapter_metadata,
    read_adapter_info,
    read_adapter_tensors,
    save_adapter,
)
from lmadapt.api import load
from lmadapt.errors import AdapterError
from lmadapt.methods import build_method
from lmadapt.models.fingerprint import fingerprint
from lmadapt.testing import tiny_llama, tiny_tokenizer
from lmadapt.updates.port import port_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 17, 99, 200, 3, 64]])


def save_model(model: nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def v2_model() -> nn.Module:
    """Version 2 of tiny_llama(seed=0): every weight moved a little, as continued pretraining would."""
    model = tiny_llama(seed=0)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.005)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("port")
    v1 = save_model(tiny_llama(seed=0), root / "v1")
    v2 = save_model(v2_model(), root / "v2")
    model = tiny_llama(seed=0)
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "rslora": True, "init": "random",
                           "target_modules": ["q_proj", "v_proj", "down_proj"]})
    torch.manual_seed(1)
    method.apply(model)
    adapter = save_adapter(model, method, root / "adapter", base_model=str(v1),
                           base_fingerprint=fingerprint(tiny_llama(seed=0)))
    return {"v1": v1, "v2": v2, "adapter": adapter}


def patched_v2(adapter: Path) -> nn.Module:
    """v2 + s B A by hand, from the adapter's tensors (s = alpha / sqrt(r): rsLoRA)."""
    tensors, model = read_adapter_tensors(adapter), v2_model()
    s = 8 / 4**0.5
    with torch.no_grad():
        for name, module in model.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key in tensors:
                module.weight += s * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
    return model


def test_other_base_is_refused_with_what_the_flag_does(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AdapterError) as err:
        port_adapter(setup["adapter"], setup["v2"], tmp_path / "out")
    message = str(err.value)
    assert fingerprint(tiny_llama(seed=0)) in message and fingerprint(v2_model()) in message
    assert "--allow-other-base (allow_other_base=True) attaches the adapter" in message
    assert "records the override in the output" in message
    assert not (tmp_path / "out").exists()


def test_ported_adapter_records_the_override_and_loads_in_peft_and_lmadapt(setup: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    rep = port_adapter(setup["adapter"], setup["v2"], tmp_path / "out", allow_other_base=True)
    info = read_adapter_info(tmp_path / "out")
    assert info.base_model == str(setup["v2"]) and info.base_fingerprint == fingerprint(v2_model())
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(setup["v2"]) and config["peft_type"] == "LORA"
    ported = json.loads(adapter_metadata(tmp_path / "out")["lmadapt"])["ported_from"]
    assert ported["base_model"] == str(setup["v1"]) and ported["base_fingerprint"] == fingerprint(tiny_llama(seed=0))
    assert ported["override"] is True and ported["when"] and ported == rep.ported_from

    want = patched_v2(setup["adapter"])(IDS).logits
    peft_model = PeftModel.from_pretrained(v2_model(), tmp_path / "out").eval()
    torch.testing.assert_close(peft_model(IDS).logits, want, atol=1e-5, rtol=0)
    model, _, _ = load(str(setup["v2"]), tmp_path / "out")  # no force: the record names v2 now
    torch.testing.assert_close(model(IDS).logits, want, atol=1e-5, rtol=0)
    with pytest.raises(AdapterError, match="fingerprint"):
        load(str(setup["v1"]), tmp_path / "out")  # ... and no longer v1


def test_merged_patch_equals_the_attached_adapter(setup: dict[str, Path], tmp_path: Path) -> None:
    """METHODS §13 test 3: applying the LoRA patch as a merge equals attaching the adapter."""
    port_adapter(setup["adapter"], setup["v2"], tmp_path / "merged", allow_other_base=True, merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    attached, _, _ = load(str(setup["v2"]), setup["adapter"], force=True)
    torch.testing.assert_close(merged(IDS).logits, attached(IDS).logits, atol=1e-5, rtol=0)
    by_hand = patched_v2(setup["adapter"])
    for name, p in by_hand.named_parameters():
        torch.testing.assert_close(merged.get_parameter(name), p, atol=1e-6, rtol=0)
    provenance = json.loads((tmp_path / "merged" / "lmadapt_merge.json").read_text())
    assert provenance["ported_from"]["override"] is True
    assert provenance["ported_from"]["base_fingerprint"] == fingerprint(tiny_llama(seed=0))
    assert provenance["base_fingerprint"] == fingerprint(v2_model())


def test_same_base_needs_no_override(setup: dict[str, Path], tmp_path: Path) -> None:
    rep = port_adapter(setup["adapter"], setup["v1"], tmp_path / "out")
    assert rep.ported_from["override"] is False


def test_other_shapes_and_other_methods_are_refused_by_name(setup: dict[str, Path], tmp_path: Path) -> None:
    wide = save_model(tiny_llama(seed=0, intermediate_size=96), tmp_path / "wide")
    with pytest.raises(AdapterError) as err:
        port_adapter(setup["adapter"], wide, tmp_path / "out", allow_other_base=True)
    message = str(err.value)
    assert "(2 module(s))" in message
    assert "model.layers.0.mlp.down_proj: the adapter is for a [64, 128] weight, the model's is [64, 96]" in message
    assert not (tmp_path / "out").exists()

    model = tiny_llama(seed=0)
    method = build_method({"name": "ia3"})
    method.apply(model)
    save_adapter(model, method, tmp_path / "ia3", base_model="tiny", base_fingerprint=fingerprint(tiny_llama()))
    with pytest.raises(AdapterError, match=r"an adapter of method 'ia3' cannot be ported.*allora, dora, lora"):
        port_adapter(tmp_path / "ia3", setup["v2"], tmp_path / "out", allow_other_base=True)


def test_cli(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmadapt.cli import main

    argv = ["port", str(setup["adapter"]), "--model", str(setup["v2"]), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "--allow-other-base" in capsys.readouterr().err
    assert main([*argv, "--allow-other-base"]) == 0
    assert "fingerprint check overridden: trained on" in capsys.readouterr().out
