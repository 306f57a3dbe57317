"""Several named LoRA adapters on one model: switching, per-row routing, merging, saving, deleting.

The reference for every adapter is the same adapter folder loaded alone onto a fresh tiny Llama (and, for
summed and per-row adapters, PEFT's own multi-adapter model). fp32 throughout, so atol 1e-5.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

from lmadapt.adapters.format import (
    adapter_metadata,
    load_adapter,
    save_adapter,
    write_record,
)
from lmadapt.adapters.pool import (
    active_adapter_names,
    active_adapters,
    adapter_names,
    adapter_per_row,
    delete_adapter,
    set_active_adapters,
)
from lmadapt.errors import AdapterError, LmadaptError
from lmadapt.methods import Method, build_method
from lmadapt.methods.lora import PEFT_PREFIX, LoraLinear
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.tree import adapters_disabled
from lmadapt.testing import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5  # fp32 logits
EXACT = 1e-6
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> method section: different ranks, scales and module sets; "b" and "a" share only q_proj
SPECS = {
    "default": {"r": 8, "alpha": 16, "target_modules": ALL},
    "a": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    "b": {"r": 2, "alpha": 16, "rslora": True, "target_modules": ["q_proj", "o_proj", "down_proj"]},
}


def ids(seed: int = 0, shape: tuple[int, int] = (3, 10)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=mask).logits


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved adapter folder per entry of SPECS, each with random non-zero B (so it changes the outputs)."""
    root = tmp_path_factory.mktemp("adapters")
    fp = fingerprint(tiny_llama())
    out = {}
    for seed, (name, spec) in enumerate(SPECS.items()):
        model = tiny_llama()
        method = build_method({"name": "lora", "init": "random", **spec})
        torch.manual_seed(10 + seed)
        method.apply(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(std=0.2)
        out[name] = save_adapter(model, method, root / name, base_model="tiny", base_fingerprint=fp)
    return out


def alone(folder: Path | None) -> nn.Module:
    """A fresh tiny Llama with only the adapter in ``folder`` (None: the base model)."""
    model = tiny_llama()
    if folder is not None:
        load_adapter(model, folder)
    return model


def pooled(folders: dict[str, Path]) -> tuple[nn.Module, dict[str, Method]]:
    """A tiny Llama holding all three adapters under their names, "default" loaded first."""
    model = tiny_llama()
    methods = {name: load_adapter(model, folders[name], name=name) for name in SPECS}
    return model, methods


def test_each_adapter_active_alone_equals_it_loaded_alone(folders: dict[str, Path]) -> None:
    model, _ = pooled(folders)
    x = ids()
    assert adapter_names(model) == ["default", "a", "b"]
    assert active_adapter_names(model) == ["default"]  # a further adapter is not switched on by loading
    close(logits(model, x), logits(alone(folders["default"]), x))
    for name in ("a", "b"):
        expected = logits(alone(folders[name]), x)
        assert (expected - logits(alone(None), x)).abs().max() > 1e-2, "the comparison would be vacuous"
        with active_adapters(model, [name]):
            close(logits(model, x), expected)
    with active_adapters(model, []):
        close(logits(model, x), logits(alone(None), x), atol=EXACT)
    assert active_adapter_names(model) == ["default"]  # restored on exit


def test_several_active_adapters_add_up_like_peft(folders: dict[str, Path]) -> None:
    model, _ = pooled(folders)
    set_active_adapters(model, ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_llama(), folders["a"], adapter_name="a")
        peft_model.load_adapter(str(folders["b"]), adapter_name="b")
    peft_model.base_model.set_adapter(["a", "b"])
    x = ids()
    close(logits(model, x), logits(peft_model.eval(), x))


def routed_batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Three right-padded rows of 10, 7 and 4 real tokens, with their attention mask."""
    lengths = [10, 7, 4]
    x, mask = ids(seed), torch.zeros(3, 10, dtype=torch.long)
    for row, n in enumerate(lengths):
        x[row, n:] = 259
        mask[row, :n] = 1
    return x, mask, lengths


@pytest.mark.parametrize("names", [["a", "b", None], ["b", None, "default"], ["a", "a", "b"]])
def test_each_row_equals_its_adapter_alone(folders: dict[str, Path], names: list[str | None]) -> None:
    model, _ = pooled(folders)
    x, mask, lengths = routed_batch()
    with adapter_per_row(model, names):
        got = logits(model, x, mask)
    for row, (name, n) in enumerate(zip(names, lengths)):
        reference = alone(folders[name] if name else None)
        close(got[row, :n], logits(reference, x[row:row + 1, :n])[0])  # padding in other rows leaks nothing
        close(got[row], logits(reference, x[row:row + 1], mask[row:row + 1])[0])
    assert active_adapter_names(model) == ["default"]
    close(logits(model, x, mask), logits(alone(folders["default"]), x, mask))  # routing gone on exit


def test_per_row_batch_equals_peft_mixed_batch(folders: dict[str, Path]) -> None:
    model, _ = pooled(folders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_llama(), folders["default"])
        for name in ("a", "b"):
            peft_model.load_adapter(str(folders[name]), adapter_name=name)
    x, mask, _ = routed_batch()
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=x, attention_mask=mask, adapter_names=["b", "__base__", "a"]).logits
    with adapter_per_row(model, ["b", None, "a"]):
        close(logits(model, x, mask), expected)


def test_per_row_gradients_reach_only_the_rows_adapter(folders: dict[str, Path]) -> None:
    model, methods = pooled(folders)
    x = ids(5, (2, 8))
    factors = methods["default"].parameter_groups(model)[0].params
    with adapter_per_row(model, [None, "default"]):
        model(input_ids=x, labels=x).logits[1].sum().backward()
    routed = [p.grad.clone() for p in factors]
    model.zero_grad(set_to_none=True)
    model(input_ids=x[1:]).logits[0].sum().backward()  # row 1 alone, default active
    for g, p in zip(routed, factors):
        close(g, p.grad, atol=1e-4)
    assert any(g.abs().max() > 1e-3 for g in routed)


def test_generation_per_row_equals_each_adapter_alone(folders: dict[str, Path]) -> None:
    model, _ = pooled(folders)
    x, mask = ids(7, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    x[2, :2], mask[2, :2] = 259, 0  # left padding, as for generation
    names = ["b", None, "a"]
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 259, "use_cache": True}
    with adapter_per_row(model, names):
        out = model.generate(input_ids=x, attention_mask=mask, **kw)
    for row, name in enumerate(names):
        single = alone(folders[name] if name else None).generate(
            input_ids=x[row:row + 1], attention_mask=mask[row:row + 1], **kw)
        assert torch.equal(out[row], single[0])


def test_adapters_disabled_by_name(folders: dict[str, Path]) -> None:
    model, _ = pooled(folders)
    x = ids()
    set_active_adapters(model, ["default", "a"])
    with active_adapters(model, ["a"]):
        only_a = logits(model, x)
    with adapters_disabled(model, ["default"]):
        close(logits(model, x), only_a)
        with adapter_per_row(model, ["default", "a", None]):  # a disabled adapter's rows get the base model
            close(logits(model, x)[0], logits(alone(None), x)[0])
    with adapters_disabled(model):
        close(logits(model, x), logits(alone(None), x), atol=EXACT)
    with pytest.raises(LmadaptError, match="no adapter named 'c'"), adapters_disabled(model, ["c"]):
        pass


def test_merging_one_named_adapter_is_exact(folders: dict[str, Path]) -> None:
    model, methods = pooled(folders)
    x, mask, _ = routed_batch()
    cases = [["default"], ["a"], ["b"], ["a", "b"], []]

    def outputs() -> list[torch.Tensor]:
        outs = []
        for names in cases:
            with active_adapters(model, names):
                outs.append(logits(model, x, mask))
        with adapter_per_row(model, ["b", "a", None]):
            outs.append(logits(model, x, mask))
        with adapters_disabled(model):
            outs.append(logits(model, x, mask))
        return outs

    before, weights = outputs(), {k: v.clone() for k, v in model.state_dict().items()}
    methods["b"].merge(model)
    q = model.model.layers[0].self_attn.q_proj
    assert q.merged_adapters == {"b"} and not torch.equal(q.weight, weights["model.layers.0.self_attn.q_proj.weight"])
    for got, want in zip(outputs(), before):
        close(got, want)
    methods["default"].merge(model)  # two merged at once
    for got, want in zip(outputs(), before):
        close(got, want)
    methods["b"].unmerge(model)
    methods["default"].unmerge(model)
    for key, value in weights.items():
        close(model.state_dict()[key], value, atol=EXACT)


def test_a_named_adapter_saves_in_peft_layout(folders: dict[str, Path], tmp_path: Path) -> None:
    model, methods = pooled(folders)
    state = methods["b"].adapter_state(model)
    assert sorted(state) == sorted(f"{PEFT_PREFIX}model.layers.{i}.{m}.lora_{ab}.weight" for i in (0, 1)
                                   for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj") for ab in "AB")
    save_adapter(model, methods["b"], tmp_path / "b", base_model="tiny", base_fingerprint=fingerprint(tiny_llama()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "b").eval()
    x = ids()
    close(logits(peft_model, x), logits(alone(folders["b"]), x))
    close(logits(alone(tmp_path / "b"), x), logits(alone(folders["b"]), x), atol=EXACT)


def test_only_the_default_adapter_trains_unless_asked(folders: dict[str, Path]) -> None:
    model, methods = pooled(folders)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))
                         and ".extra_adapters." not in n}
    assert len(trainable) == 2 * 14
    groups = methods["default"].parameter_groups(model)
    assert {id(p) for g in groups for p in g.params} == {id(p) for p in model.parameters() if p.requires_grad}
    q = model.model.layers[0].self_attn.q_proj
    assert [p is q.lora_A for p in groups[0].params[:1]] == [True]
    assert methods["a"].parameter_groups(model)[0].params[0] is q.extra_adapters["a"].lora_A

    other = tiny_llama()
    load_adapter(other, folders["a"], name="a")  # the first adapter on a model is active, whatever its name
    load_adapter(other, folders["b"], name="b", trainable=True)
    assert active_adapter_names(other) == ["a"]
    trainable = {n for n, p in other.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in other.named_parameters() if ".extra_adapters.b.lora_" in n}
    assert len(trainable) == 2 * 6


def test_delete_adapter(folders: dict[str, Path]) -> None:
    model, methods = pooled(folders)
    x = ids()
    set_active_adapters(model, ["default", "b"])
    methods["b"].merge(model)
    delete_adapter(model, "b")  # unmerged first: its update leaves the weights
    assert adapter_names(model) == ["default", "a"] and active_adapter_names(model) == ["default"]
    close(logits(model, x), logits(alone(folders["default"]), x))
    delete_adapter(model, "default")
    assert adapter_names(model) == ["a"] and active_adapter_names(model) == []
    lora = [n.removeprefix("model.") for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert lora == [f"layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    set_active_adapters(model, "a")
    close(logits(model, x), logits(alone(folders["a"]), x))
    assert [k for k in model.state_dict() if ".lora_" not in k] == list(tiny_llama().state_dict())


def test_refusals(folders: dict[str, Path], tmp_path: Path) -> None:
    model, _ = pooled(folders)
    with pytest.raises(AdapterError, match="already holds a LoRA adapter named 'a'"):
        load_adapter(model, folders["a"], name="a")
    with pytest.raises(AdapterError, match="no adapter named 'c'"):
        set_active_adapters(model, ["a", "c"])
    record = json.loads(adapter_metadata(folders["b"])["lmadapt"])
    record["method"]["r"] = 3
    shutil.copytree(folders["b"], tmp_path / "b3")
    write_record(tmp_path / "b3", record)
    with pytest.raises(AdapterError, match="saved shape"):
        load_adapter(model, tmp_path / "b3", name="c")
    assert adapter_names(model) == ["default", "a", "b"]  # the half-loaded adapter was removed again
    with pytest.raises(LmadaptError, match="2 adapter name.*batch of 3 rows"), adapter_per_row(model, ["a", None]):
        logits(model, ids())
    full = build_method({"name": "full"})
    donor = tiny_llama()
    full.apply(donor)
    save_adapter(donor, full, tmp_path / "full", base_model="tiny", base_fingerprint=None)
    with pytest.raises(AdapterError, match="only plain LoRA adapters can share a model"):
        load_adapter(tiny_llama(), tmp_path / "full", name="full")
    x = ids()
    close(logits(model, x), logits(alone(folders["default"]), x))  # nothing above changed the model


def test_bf16_named_adapters_need_no_autocast_and_route_rows(folders: dict[str, Path]) -> None:
    from lmadapt.training.precision import needs_autocast

    model = tiny_llama().to(torch.bfloat16)
    for name in ("a", "b"):
        load_adapter(model, folders[name], name=name)
    assert not needs_autocast(model, "bf16")  # the further adapters' fp32 factors cast themselves too
    x = ids()
    with adapter_per_row(model, ["b", None, "a"]):
        got = logits(model, x)
    for row, name in enumerate(["b", None, "a"]):
        with active_adapters(model, [name] if name else []):
            want = logits(model, x[row:row + 1])[0]
        close(got[row].float(), want.float(), atol=2e-2)  # bf16: 8 mantissa bits
