"""The adapter folder: PEFT interop both ways (with the real ``peft`` package), and the safety rules."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

import lmadapt.adapters.format as adapters
from lmadapt.adapters.format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_metadata,
    load_adapter,
    read_adapter_info,
    save_adapter,
    write_record,
)
from lmadapt.errors import AdapterError, LmadaptError
from lmadapt.methods import Method, build_method
from lmadapt.methods.lora import LoraLinear
from lmadapt.models.fingerprint import fingerprint
from lmadapt.testing import tiny_llama

ATOL = 1e-5  # fp32


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=ids()).logits


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def lora_model(**cfg: object) -> tuple[nn.Module, Method]:
    """A tiny Llama with a non-identity lmadapt LoRA (B random too)."""
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "init": "random", **cfg})
    model = tiny_llama()
    torch.manual_seed(1)
    method.apply(model)
    return model, method


def save(model: nn.Module, method: Method, path: Path, **kw: object) -> Path:
    kw.setdefault("base_fingerprint", fingerprint(tiny_llama()))
    return save_adapter(model, method, path, base_model="tiny-llama", **kw)


# --- lmadapt -> PEFT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    {},
    {"target_modules": [r"re:.*layers\.1\..*_proj"]},
    {"target_modules": ["all-linear"]},
    {"target_modules": ["q_proj", "v_proj"], "rslora": True, "alpha": 16},
    {"target_modules": ["all-linear"], "exclude_modules": ["mlp.down_proj"], "dropout": 0.1},
], ids=["default", "regex", "all-linear", "rslora", "exclude"])
def test_peft_loads_an_lmadapt_adapter(cfg: dict, tmp_path: Path) -> None:
    model, method = lora_model(**cfg)
    expected = logits(model)
    assert (expected - logits(tiny_llama())).abs().max() > 1e-3
    save(model, method, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation warnings inside PEFT
        peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if hasattr(m, "lora_A") and len(m.lora_A))
    assert adapted == sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear))
    close(logits(peft_model), expected)


def test_peft_reads_our_config_without_complaint(tmp_path: Path) -> None:
    model, method = lora_model(target_modules=["q_proj"])
    save(model, method, tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = PeftConfig.from_pretrained(str(tmp_path / "a"))
    assert cfg.peft_type == "LORA" and cfg.r == 4 and cfg.lora_alpha == 8
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]
    assert "lmadapt" not in json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    info = read_adapter_info(tmp_path / "a")  # the record lives in the safetensors header
    assert info.source == "lmadapt" and info.method["r"] == 4


# --- PEFT -> lmadapt ---------------------------------------------------------------------------------
def peft_adapter(path: Path, **cfg: object) -> torch.Tensor:
    """Save a non-identity PEFT LoRA of the tiny Llama into ``path``; return its logits."""
    torch.manual_seed(2)
    config = PeftLoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **cfg})
    peft_model = get_peft_model(tiny_llama(), config).eval()
    peft_model.save_pretrained(str(path))
    assert (path / WEIGHTS_NAME).is_file() and not (path / "adapter_model.bin").exists()
    return logits(peft_model)


@pytest.mark.parametrize("cfg", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.o_proj", "mlp.down_proj"], "use_rslora": True},
    {"target_modules": "all-linear", "exclude_modules": ["gate_proj"]},
    {"target_modules": r".*layers\.0\.self_attn\.(k|v)_proj"},
], ids=["list", "dotted-rslora", "all-linear-exclude", "regex"])
def test_lmadapt_loads_a_peft_adapter(cfg: dict, tmp_path: Path) -> None:
    expected = peft_adapter(tmp_path / "p", **cfg)
    assert (expected - logits(tiny_llama())).abs().max() > 1e-3
    info = read_adapter_info(tmp_path / "p")
    assert info.source == "peft" and info.base_fingerprint is None
    model = tiny_llama()
    method = load_adapter(model, tmp_path / "p")
    assert method.name == "lora"
    close(logits(model), expected)


@pytest.mark.filterwarnings("ignore")  # PEFT's own warnings about the odd configs built here
@pytest.mark.parametrize(("cfg", "feature"), [
    ({"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}}, "rank_pattern"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj"], "lora_bias": True}, "lora_bias"),
])
def test_unsupported_peft_features_are_refused(cfg: dict, feature: str, tmp_path: Path) -> None:
    peft_adapter(tmp_path / "p", **cfg)
    with pytest.raises(AdapterError, match=feature) as err:
        load_adapter(tiny_llama(), tmp_path / "p")
    assert CONFIG_NAME in str(err.value)


def test_peft_features_that_would_silently_change_outputs_are_refused(tmp_path: Path) -> None:
    """Same tensor names as LoRA, other outputs: activated LoRA applies them to some tokens only, layer
    replication grows the model, and an unconverted PiSSA/OLoRA adapter expects PEFT's rewritten base weights."""
    peft_adapter(tmp_path / "p", target_modules=["q_proj"])
    cfg_file = tmp_path / "p" / CONFIG_NAME
    cfg = json.loads(cfg_file.read_text())
    for key, value in [("alora_invocation_tokens", [1, 2]), ("layer_replication", [[0, 2], [1, 2]]),
                       ("init_lora_weights", "pissa"), ("init_lora_weights", "olora")]:
        cfg_file.write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(AdapterError, match=key):
            read_adapter_info(tmp_path / "p")


# --- lmadapt's own round trip and the safety rules ----------------------------------------------------
def test_save_writes_two_files_no_pickle_and_provenance(tmp_path: Path) -> None:
    model, method = lora_model(target_modules=["q_proj"], rslora=True)
    fp = fingerprint(tiny_llama())
    save(model, method, tmp_path / "a", base_fingerprint=fp)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left beside it
    with safe_open(str(tmp_path / "a" / WEIGHTS_NAME), framework="pt") as fh:
        assert len(list(fh.keys())) == 4
    assert json.loads(adapter_metadata(tmp_path / "a")["lmadapt"])["base_fingerprint"] == fp
    info = read_adapter_info(tmp_path / "a")
    assert (info.source, info.base_model, info.base_fingerprint) == ("lmadapt", "tiny-llama", fp)
    assert build_method(info.method).config == method.config


def test_wrong_base_model_is_refused_unless_forced(tmp_path: Path) -> None:
    model, method = lora_model(target_modules=["q_proj"])
    expected = logits(model)
    fp = fingerprint(tiny_llama())
    save(model, method, tmp_path / "a", base_fingerprint=fp)
    other = tiny_llama(seed=1)
    other.name_or_path = "other-llama"
    other_fp = fingerprint(other)
    assert other_fp != fp
    with pytest.raises(AdapterError) as err:
        load_adapter(other, tmp_path / "a")
    for part in (fp, "'tiny-llama'", other_fp, "'other-llama'"):
        assert part in str(err.value)
    assert "force" in str(err.value)
    assert not any(isinstance(m, LoraLinear) for m in other.modules())  # refused before touching it
    load_adapter(other, tmp_path / "a", force=True)
    assert any(isinstance(m, LoraLinear) for m in other.modules())
    right = tiny_llama()
    load_adapter(right, tmp_path / "a", base_fingerprint=fp)  # a caller-supplied fingerprint is trusted
    close(logits(right), expected)


def test_save_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    model, method = lora_model(target_modules=["q_proj"])
    (tmp_path / "empty").mkdir()
    save(model, method, tmp_path / "empty")  # an existing empty folder is fine
    target = tmp_path / "a"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(LmadaptError, match="overwrite"):
        save(model, method, target)
    assert (target / "notes.txt").read_text() == "mine"
    save(model, method, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]


def test_a_crash_midway_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, method = lora_model(target_modules=["q_proj"])

    def broken_save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save(model, method, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()  # a crash while overwriting keeps the old adapter
    save(model, method, tmp_path / "a")
    before = (tmp_path / "a" / WEIGHTS_NAME).read_bytes()
    monkeypatch.setattr(adapters, "save_file", broken_save_file)
    with pytest.raises(OSError):
        save(model, method, tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_pickled_adapter_is_not_read_and_says_why(tmp_path: Path) -> None:
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.bin").write_bytes(b"not a pickle; must never be unpickled")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin.*safetensors"):
        load_adapter(tiny_llama(), folder)
    with pytest.raises(AdapterError, match="not an adapter folder"):
        read_adapter_info(tmp_path)


def test_unknown_peft_type_and_bad_method_config_are_adapter_errors(tmp_path: Path) -> None:
    folder = tmp_path / "loha"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({"peft_type": "LOHA", "target_modules": ["k_proj"]}))
    (folder / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(AdapterError, match="'LOHA' is not supported"):
        read_adapter_info(folder)

    model, method = lora_model(target_modules=["q_proj"])
    save(model, method, tmp_path / "a")
    record = json.loads(adapter_metadata(tmp_path / "a")["lmadapt"])
    record["method"]["rank"] = record["method"].pop("r")
    write_record(tmp_path / "a", record)
    with pytest.raises(AdapterError, match=r"(?s)adapter_config\.json.*method\.rank: unknown key"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_mismatched_tensors_are_refused(tmp_path: Path) -> None:
    model, method = lora_model(target_modules=["q_proj"])
    save(model, method, tmp_path / "a")
    record = json.loads(adapter_metadata(tmp_path / "a")["lmadapt"])
    record["method"]["r"] = 2
    write_record(tmp_path / "a", record)
    with pytest.raises(AdapterError, match="saved shape"):
        load_adapter(tiny_llama(), tmp_path / "a")
    record["method"]["r"] = 4
    record["method"]["target_modules"] = ["q_proj", "v_proj"]
    write_record(tmp_path / "a", record)
    with pytest.raises(AdapterError, match="missing"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_full_adapter_of_a_tied_model_round_trips(tmp_path: Path) -> None:
    model = tiny_llama(tie_word_embeddings=True)
    method = build_method({"name": "full"})
    method.apply(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.1)
    expected = logits(model)
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None)
    fresh = tiny_llama(tie_word_embeddings=True)
    load_adapter(fresh, tmp_path / "a")
    assert fresh.lm_head.weight is fresh.get_input_embeddings().weight
    close(logits(fresh), expected)
