"""What an adapter folder carries besides the method's tensors, and how loading puts it back.

- A method that changes the tokenizer (``Method.prepare`` adds a token and resizes the embeddings): the
  folder carries the tokenizer, and ``lmadapt.load`` replays ``prepare`` with it, so the loaded model gives
  the trained model's logits (fp32, atol 1e-5) on text that uses the new token.
- An objective that trains a head: the head is stored under ``lmadapt_objective.<key>`` and comes back
  bit for bit (``Objective.attach`` creates it on load); PEFT still loads the LoRA file and ignores the head.
- Saving reads the method's tensors through ``lmadapt.training.distributed.gathered_state`` (the FSDP seam).

The probe method and the probe objective are registered for this module's tests only.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from torch import nn

import lmadapt
import lmadapt.adapters.format as adapter_format
from lmadapt.adapters.format import (
    OBJECTIVE_PREFIX,
    WEIGHTS_NAME,
    load_adapter,
    load_adapter_contents,
    read_adapter_info,
    read_adapter_tensors,
    save_adapter,
)
from lmadapt.data.tokens import IGNORE
from lmadapt.errors import AdapterError
from lmadapt.methods import Method, ParamGroup, build_method
from lmadapt.methods.registry import METHODS
from lmadapt.objectives.base import OBJECTIVES, LossOutput, Objective
from lmadapt.objectives.causal_lm import causal_lm_loss, count_targets
from lmadapt.testing import tiny_llama, tiny_tokenizer

from conftest import make_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5  # fp32 logits
NEW_TOKEN = "<probe>"
BASE_VOCAB = 260  # tiny_tokenizer: 256 bytes + 4 special tokens


# --- a method that changes the vocabulary ------------------------------------------------------------------
@dataclass
class ProbeVocabConfig:
    """No settings: the probe adds one token and trains the input and output embeddings."""


class ProbeVocab(Method):
    """Adds ``<probe>`` to the tokenizer and a row for it to both embedding matrices, and trains those two
    matrices. ``prepare`` is idempotent: given the tokenizer the adapter saved (which has the token), it only
    resizes the model."""

    name = "probe_vocab"
    config_class = ProbeVocabConfig
    changes_tokenizer = True
    trains_base_weights = True
    applied_to: ClassVar[list[nn.Module]] = []  # the models apply() saw, newest last (the test reads the trained one)

    def prepare(self, model: nn.Module, tokenizer: Any) -> Any:
        tokenizer.add_tokens([NEW_TOKEN])
        if model.get_input_embeddings().num_embeddings != len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return tokenizer

    def apply(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        for p in self._weights(model).values():
            p.requires_grad_(True)
        ProbeVocab.applied_to.append(model)

    def _weights(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {"embed_tokens.weight": model.get_input_embeddings().weight,
                "lm_head.weight": model.get_output_embeddings().weight}

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        return [ParamGroup("embeddings", list(self._weights(model).values()))]

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self._weights(model).items()}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, p in self._weights(model).items():
                if state[key].shape != p.shape:
                    raise ValueError(f"{key}: saved shape {tuple(state[key].shape)} != model's {tuple(p.shape)}")
                p.copy_(state[key])


# --- an objective that trains a head -----------------------------------------------------------------------
@dataclass
class ProbeHeadConfig:
    """No settings: next-token loss plus a squared error that pulls a linear head on the embeddings to 1."""


class ProbeHead(Objective):
    """Causal LM loss + sum over target positions of (head(embedding) - 1)^2; the head is ``model.probe_head``,
    created by :meth:`attach` (from setup, and on load)."""

    name = "probe_head"
    config_class = ProbeHeadConfig
    attached_to: ClassVar[list[tuple[nn.Module, dict[str, torch.Tensor]]]] = []  # (model, the head's initial state)

    def attach(self, model: nn.Module) -> None:
        emb = model.get_input_embeddings().weight
        model.probe_head = nn.Linear(emb.shape[1], 1).to(device=emb.device, dtype=torch.float32)
        ProbeHead.attached_to.append((model, {k: v.clone() for k, v in model.probe_head.state_dict().items()}))

    def setup(self, model: nn.Module, tokenizer: Any, device: torch.device) -> None:
        self.attach(model)
        model.probe_head.requires_grad_(True)

    def count(self, batch: dict[str, Any]) -> int:
        return count_targets(batch["labels"])

    def loss(self, model: nn.Module, batch: dict[str, Any], *, drop_padding_mask: bool = False) -> LossOutput:
        loss, n, outputs = causal_lm_loss(model, batch, drop_padding_mask=drop_padding_mask)
        emb = model.get_input_embeddings()(batch["input_ids"]).detach().float()
        head = model.probe_head(emb).squeeze(-1)[:, :-1]
        targets = batch["labels"][:, 1:] != IGNORE
        return LossOutput(loss + ((head - 1.0) ** 2)[targets].sum(), n, outputs)

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        return [ParamGroup("probe_head", list(model.probe_head.parameters()), weight_decay=0.0)]

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"probe_head.{k}": v.detach() for k, v in model.probe_head.state_dict().items()}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        model.probe_head.load_state_dict({k.removeprefix("probe_head."): v for k, v in state.items()})


@pytest.fixture
def probes():
    METHODS.register(ProbeVocab)
    OBJECTIVES.register(ProbeHead)
    ProbeVocab.applied_to.clear()
    ProbeHead.attached_to.clear()
    yield
    METHODS.unregister(ProbeVocab.name)
    OBJECTIVES.unregister(ProbeHead.name)


@torch.no_grad()
def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=input_ids).logits


def train_two_steps(run_config: dict, tmp_path: Path, **sections: Any) -> Path:
    """``lmadapt.train`` for 2 steps with ``sections`` replaced; rows whose completion ends in the new token."""
    rows = [{**r, "completion": f"{r['completion']} {NEW_TOKEN}"} for r in make_rows(16)]
    write_jsonl(tmp_path / "probe.jsonl", rows)
    cfg = {**run_config, **sections, "data": {**run_config["data"], "train": [str(tmp_path / "probe.jsonl")]},
           "train": {**run_config["train"], "max_steps": 2, "lr": 1e-2}}
    return lmadapt.train(cfg, progress=False).adapter_dir


# --- the tokenizer ------------------------------------------------------------------------------------------
def test_a_tokenizer_changing_adapter_loads_with_its_tokenizer(probes, run_config, tiny_model_dir, tmp_path):
    adapter = train_two_steps(run_config, tmp_path, method={"name": "probe_vocab"})
    trained = ProbeVocab.applied_to[-1]
    assert read_adapter_info(adapter).has_tokenizer

    model, tokenizer, method = lmadapt.load(str(tiny_model_dir), adapter=adapter)
    assert method.name == "probe_vocab" and len(tokenizer) == BASE_VOCAB + 1
    assert Path(tokenizer.name_or_path) == adapter  # the folder's tokenizer, not the base's given to prepare()
    assert lmadapt.inspect(adapter)["tokenizer"] is True
    new_id = tokenizer.convert_tokens_to_ids(NEW_TOKEN)
    assert new_id == BASE_VOCAB
    ids = torch.tensor([tokenizer(f"Text: goal team\nTopic: sport {NEW_TOKEN} x").input_ids])
    assert new_id in ids[0].tolist()
    expected = logits(trained, ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)
    assert expected.shape[-1] == BASE_VOCAB + 1
    # training moved the new token's row away from where a fresh resize puts it: the file carried it
    fresh = tiny_llama()
    ProbeVocab(ProbeVocabConfig()).prepare(fresh, tiny_tokenizer())
    assert (logits(fresh, ids) - expected).abs().max() > 1e-3

    _, base_tokenizer, _ = lmadapt.load(str(tiny_model_dir))
    assert len(base_tokenizer) == BASE_VOCAB  # the base folder is unchanged


def test_a_tokenizer_changing_adapter_without_its_tokenizer_is_refused(probes, tmp_path):
    model, method = tiny_llama(), build_method({"name": "probe_vocab"})
    tokenizer = method.prepare(model, tiny_tokenizer())
    method.apply(model)
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None, tokenizer=tokenizer)
    assert (tmp_path / "a" / "tokenizer_config.json").is_file()

    bare = tmp_path / "bare"
    shutil.copytree(tmp_path / "a", bare)
    for name in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(AdapterError, match=r"changes the tokenizer.*tokenizer=") as err:
        load_adapter(tiny_llama(), bare)
    assert str(bare) in str(err.value)

    loaded = load_adapter_contents(fresh := tiny_llama(), bare, tokenizer=tokenizer)  # given explicitly: loads
    assert loaded.tokenizer is tokenizer
    ids = torch.tensor([[1, 2, BASE_VOCAB, 3]])
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=ATOL, rtol=0)


# --- objective heads -----------------------------------------------------------------------------------------
def test_an_objective_head_round_trips_bit_exactly(probes, run_config, tiny_model_dir, tmp_path):
    adapter = train_two_steps(run_config, tmp_path, objective={"name": "probe_head"})
    trained, initial = ProbeHead.attached_to[-1]
    head = {k: v.detach().clone() for k, v in trained.probe_head.state_dict().items()}
    assert not torch.equal(head["weight"], initial["weight"])  # it trained

    with safe_open(str(adapter / WEIGHTS_NAME), framework="pt") as fh:
        keys = set(fh.keys())
    assert {f"{OBJECTIVE_PREFIX}probe_head.weight", f"{OBJECTIVE_PREFIX}probe_head.bias"} <= keys
    assert not any(OBJECTIVE_PREFIX in k for k in read_adapter_tensors(adapter))
    assert read_adapter_info(adapter).objective == lmadapt.inspect(adapter)["objective"] == {"name": "probe_head"}

    model, _, method = lmadapt.load(str(tiny_model_dir), adapter=adapter)
    assert method.name == "lora"
    for key, value in head.items():
        assert torch.equal(model.probe_head.state_dict()[key], value), key
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(model, ids), logits(trained, ids), atol=ATOL, rtol=0)

    # PEFT loads the same file: its LoRA keys are unchanged, the head's keys are ignored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation warnings inside PEFT
        peft_model = PeftModel.from_pretrained(tiny_llama(), adapter).eval()
    assert not any("probe_head" in n for n, _ in peft_model.named_parameters())
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), atol=ATOL, rtol=0)


def lora_with_head(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A LoRA adapter saved with a randomly set probe head (no training), and the model it came from."""
    model, method = tiny_llama(), build_method({"name": "lora", "r": 4, "init": "random"})
    objective = ProbeHead(ProbeHeadConfig())
    torch.manual_seed(3)
    method.apply(model)
    objective.setup(model, None, torch.device("cpu"))
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None, objective=objective)
    return tmp_path / "a", model


def test_heads_that_do_not_fit_or_an_unknown_objective_are_adapter_errors(probes, tmp_path):
    adapter, model = lora_with_head(tmp_path)
    loaded = load_adapter_contents(fresh := tiny_llama(), adapter)
    assert loaded.objective is not None and loaded.objective.name == "probe_head"
    assert torch.equal(fresh.probe_head.weight, model.probe_head.weight)

    from safetensors.torch import load_file, save_file

    weights = adapter / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(weights))
    tensors[f"{OBJECTIVE_PREFIX}probe_head.weight"] = torch.zeros(1, 7)
    save_file(tensors, str(weights), metadata=meta)
    with pytest.raises(AdapterError, match=r"heads of objective 'probe_head' do not fit"):
        load_adapter(tiny_llama(), adapter)

    OBJECTIVES.unregister(ProbeHead.name)
    with pytest.raises(AdapterError, match=r"objective.*probe_head") as err:
        load_adapter(tiny_llama(), adapter)
    assert str(adapter) in str(err.value)


def test_an_objective_without_heads_adds_nothing(tmp_path):
    model, method = tiny_llama(), build_method({"name": "lora", "r": 4})
    method.apply(model)
    causal = OBJECTIVES.get("causal_lm")(OBJECTIVES.get("causal_lm").config_class())
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None, objective=causal)
    record = json.loads(adapter_format.adapter_metadata(tmp_path / "a")["lmadapt"])
    assert "objective" not in record
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", WEIGHTS_NAME]


# --- the FSDP seam -------------------------------------------------------------------------------------------
def test_saving_reads_tensors_through_gathered_state(probes, tmp_path, monkeypatch):
    """A sharded strategy replaces gathered_state; whatever it returns is what the file holds."""
    model, method = tiny_llama(), build_method({"name": "lora", "r": 4, "init": "random"})
    method.apply(model)
    seen = []

    def gathered(component: Any, m: nn.Module) -> dict[str, torch.Tensor]:
        seen.append(type(component).__name__)
        state = component.adapter_state(m) if hasattr(component, "adapter_state") else component.trainable_state(m)
        return {k: 2 * v for k, v in state.items()}

    monkeypatch.setattr(adapter_format, "gathered_state", gathered)
    objective = ProbeHead(ProbeHeadConfig())
    objective.setup(model, None, torch.device("cpu"))
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None, objective=objective)
    assert seen == ["Lora", "ProbeHead"]
    saved = read_adapter_tensors(tmp_path / "a")
    for key, value in method.adapter_state(model).items():
        assert torch.equal(saved[key], 2 * value), key
    heads = adapter_format.read_objective_tensors(tmp_path / "a")
    assert torch.equal(heads["probe_head.weight"], 2 * model.probe_head.weight.detach())
