"""DoRA against PEFT 0.21.2 (same weights -> same logits and gradients, each loads the other's files) and
against its formula by hand (the gradient with and without a detached norm, merge and unmerge)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

import lmadapt.methods.dora  # noqa: F401  (registration, until methods/__init__ imports it)
from lmadapt.adapters.format import (
    WEIGHTS_NAME,
    load_adapter,
    read_adapter_info,
    save_adapter,
)
from lmadapt.errors import AdapterError
from lmadapt.methods import build_method, method_for_peft, method_spec
from lmadapt.methods.dora import Dora, DoraConfig, DoraLinear
from lmadapt.methods.lora import PEFT_PREFIX
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama
from lmadapt.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5  # fp32 logits after a few matmuls
EXACT = 1e-6
TARGETS = ["q_proj", "v_proj", "down_proj"]


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def close_grad(a: torch.Tensor, b: torch.Tensor) -> None:
    """Gradients reach ~10 here: fp32's relative precision counts too (torch's fp32 default, rtol 1.3e-6)."""
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1.3e-6)


def ours(dropout: float = 0.0, **cfg: object) -> tuple[nn.Module, Dora]:
    """A tiny Llama with DoRA on TARGETS: random B (init "random") and m moved off its start, so nothing is zero."""
    method = build_method({"name": "dora", "r": 4, "alpha": 8, "dropout": dropout, "init": "random",
                           "target_modules": TARGETS, **cfg})
    model = tiny_llama()
    method.apply(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in modules_of_type(model, DoraLinear):
            layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    return model, method


def peft_twin(state: dict[str, torch.Tensor], dropout: float = 0.0) -> nn.Module:
    """PEFT's DoRA on a fresh tiny Llama holding the tensors ``state`` (keys as in the saved file)."""
    model = get_peft_model(tiny_llama(), PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                                                        target_modules=TARGETS))
    result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys
    return model


def peft_layer(model: nn.Module, name: str) -> nn.Module:
    return model.base_model.model.get_submodule(name)


# --- same weights, same numbers as PEFT ---------------------------------------------------------------
def test_forward_matches_peft_in_eval() -> None:
    model, method = ours()
    twin = peft_twin(method.adapter_state(model)).eval()
    with torch.no_grad():
        got, want = model(input_ids=ids()).logits, twin(input_ids=ids()).logits
        assert (want - tiny_llama()(input_ids=ids()).logits).abs().max() > 1e-2  # the adapter changes the logits
    close(got, want)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_forward_and_gradients_match_peft(dropout: float) -> None:
    """In train mode (dropout masks drawn in the same order from the same seed) the logits and every
    gradient of A, B and m agree: PEFT detaches the norm, as ``detach_norm`` does by default."""
    model, method = ours(dropout=dropout)
    twin = peft_twin(method.adapter_state(model), dropout=dropout)
    model.train()
    twin.train()
    weights = torch.randn(2, 12, 260, generator=torch.Generator().manual_seed(2))
    outputs = []
    for m in (model, twin):
        torch.manual_seed(3)
        logits = m(input_ids=ids()).logits
        (logits * weights).sum().backward()
        outputs.append(logits.detach())
    close(*outputs)
    if dropout:  # the masks really drop something: an eval forward differs
        with torch.no_grad():
            assert (model.eval()(input_ids=ids()).logits - outputs[0]).abs().max() > 1e-3
    for name, layer in modules_of_type(model, DoraLinear):
        theirs = peft_layer(twin, name)
        close_grad(layer.lora_A.grad, theirs.lora_A["default"].weight.grad)
        close_grad(layer.lora_B.grad, theirs.lora_B["default"].weight.grad)
        close_grad(layer.magnitude.grad, theirs.lora_magnitude_vector["default"].weight.grad)


# --- the formula by hand --------------------------------------------------------------------------------
def _layer(detach_norm: bool) -> tuple[nn.Linear, DoraLinear]:
    torch.manual_seed(0)
    base = nn.Linear(6, 5).requires_grad_(False)  # frozen, as Dora.apply leaves it
    layer = DoraLinear(base, DoraConfig(r=3, alpha=6.0, init="random", detach_norm=detach_norm))
    with torch.no_grad():
        layer.magnitude.mul_(torch.rand(5) + 0.5)
    return base, layer


def _by_hand(layer: DoraLinear, x: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    w = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    norm = w.norm(dim=1, keepdim=True)
    return x @ ((layer.magnitude.unsqueeze(1) / (norm.detach() if detach_norm else norm)) * w).T + layer.bias


@pytest.mark.parametrize("detach_norm", [True, False])
def test_gradient_is_the_formulas(detach_norm: bool) -> None:
    x = torch.randn(4, 7, 6)
    grads = {}
    for how in ("layer", "hand"):
        _, layer = _layer(detach_norm)
        y = layer(x) if how == "layer" else _by_hand(layer, x, detach_norm)
        (y * torch.linspace(-1, 1, 5)).sum().backward()
        grads[how] = (y.detach(), layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad)
    for got, want in zip(grads["layer"], grads["hand"]):
        close(got, want)


def test_detaching_the_norm_changes_the_gradient_of_a_and_b_only() -> None:
    x = torch.randn(4, 6)
    grads = []
    for detach in (True, False):
        _, layer = _layer(detach)
        layer(x).pow(2).sum().backward()
        grads.append((layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad))
    (a1, b1, m1), (a2, b2, m2) = grads
    assert (a1 - a2).abs().max() > 1e-3 and (b1 - b2).abs().max() > 1e-3
    close(m1, m2)  # the norm does not depend on m


def test_magnitude_starts_at_the_row_norms_and_the_layer_is_the_base_at_init() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = DoraLinear(base, DoraConfig(r=3, alpha=6.0))
    assert torch.count_nonzero(layer.lora_B) == 0
    close(layer.magnitude, base.weight.norm(dim=1), atol=EXACT)
    x = torch.randn(3, 6)
    with torch.no_grad():
        close(layer(x), base(x), atol=EXACT)
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "lora_A", "lora_B", "magnitude"}
    assert layer.weight is base.weight and layer.bias is base.bias  # same Parameters, same keys


def test_merge_is_the_formula_and_unmerge_restores_w0() -> None:
    _, layer = _layer(True)
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = _by_hand(layer, x, True)
        w = w0 + layer.scaling * layer.lora_B @ layer.lora_A
        layer.merge()
        close(layer.weight, layer.magnitude.unsqueeze(1) * w / w.norm(dim=1, keepdim=True), atol=EXACT)
        close(layer(x), expected)
        layer.adapter_enabled = False  # merged and switched off: still the base layer
        close(layer(x), x @ w0.T + layer.bias)
        layer.adapter_enabled = True
        layer.unmerge()
    close(layer.weight, w0, atol=EXACT)


def test_merged_weights_equal_peft_merge_and_unload() -> None:
    model, method = ours()
    twin = peft_twin(method.adapter_state(model)).merge_and_unload()
    method.merge(model)
    method.unload(model)
    theirs = twin.state_dict()
    for key, value in model.state_dict().items():
        close(value, theirs[key], atol=EXACT)


def test_adapters_disabled_gives_the_base_merged_or_not() -> None:
    model, method = ours()
    with torch.no_grad():
        base, adapted = tiny_llama()(input_ids=ids()).logits, model(input_ids=ids()).logits
        for merge in (False, True):
            if merge:
                method.merge(model)
            with adapters_disabled(model):
                close(model(input_ids=ids()).logits, base)
            close(model(input_ids=ids()).logits, adapted)


def test_the_cached_scale_follows_the_parameters() -> None:
    """Outside autograd g is cached; an optimizer step (and a dtype change) must not leave it stale."""
    model, method = ours()
    with torch.no_grad():
        model(input_ids=ids())  # fills the cache
    opt = torch.optim.SGD([p for g in method.parameter_groups(model) for p in g.params], lr=0.5)
    model(input_ids=ids(), labels=ids()).loss.backward()
    opt.step()
    with torch.no_grad():
        cached = model(input_ids=ids()).logits
    close(cached, model(input_ids=ids()).logits.detach(), atol=EXACT)  # with grad: no cache
    model.double()
    with torch.no_grad():
        close(model(input_ids=ids()).logits.float(), cached)


# --- files: PEFT reads ours, we read PEFT's ---------------------------------------------------------------
def test_peft_loads_our_folder_and_gives_our_logits(tmp_path: Path) -> None:
    model, method = ours()
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None)
    saved = load_file(tmp_path / "a" / WEIGHTS_NAME)
    assert len(saved) == 3 * 3 * 2  # A, B, m x 3 targets x 2 blocks
    assert f"{PEFT_PREFIX}model.layers.0.mlp.down_proj.lora_magnitude_vector" in saved
    twin = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    with torch.no_grad():
        close(twin(input_ids=ids()).logits, model(input_ids=ids()).logits)


def test_we_load_peft_folder_and_give_peft_logits(tmp_path: Path) -> None:
    donor, method = ours()
    twin = peft_twin(method.adapter_state(donor)).eval()
    twin.save_pretrained(tmp_path / "p")
    info = read_adapter_info(tmp_path / "p")
    assert info.source == "peft" and info.method["name"] == "dora"
    model = tiny_llama()
    loaded = load_adapter(model, tmp_path / "p")
    assert loaded.name == "dora" and loaded.config.detach_norm
    with torch.no_grad():
        close(model(input_ids=ids()).logits, twin(input_ids=ids()).logits)


def test_peft_files_are_told_apart_by_use_dora() -> None:
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    assert method_for_peft({**cfg, "use_dora": True}) is Dora
    assert method_for_peft(cfg).name == "lora"
    assert Dora.config_from_peft({**cfg, "use_dora": True})["target_modules"] == ["q_proj"]
    with pytest.raises(ValueError, match="rank_pattern"):
        Dora.config_from_peft({**cfg, "use_dora": True, "rank_pattern": {"q_proj": 8}})


def test_loading_refuses_missing_keys_and_wrong_shapes_and_takes_a_suffixed_magnitude() -> None:
    model, method = ours()
    state = method.adapter_state(model)
    key = f"{PEFT_PREFIX}model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    fresh, again = tiny_llama(), build_method(method_spec(method))
    again.apply(fresh)
    with pytest.raises(KeyError, match="1 adapter tensor"):
        again.load_adapter_state(fresh, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="saved shape"):
        again.load_adapter_state(fresh, {**state, key: torch.ones(3)})
    again.load_adapter_state(fresh, {**{k: v for k, v in state.items() if k != key}, f"{key}.weight": state[key]})
    with torch.no_grad():
        close(fresh(input_ids=ids()).logits, model(input_ids=ids()).logits)


def test_dora_does_not_share_a_model() -> None:
    model, _ = ours()
    with pytest.raises(AdapterError, match="fresh base model"):
        build_method({"name": "dora", "target_modules": ["k_proj"]}).apply(model)


def test_lora_plus_ratio_puts_b_in_its_own_group_and_m_trains() -> None:
    model, method = ours(lr_ratio_b=16)
    groups = {g.name: g for g in method.parameter_groups(model)}
    assert set(groups) == {"lora_A", "lora_B", "magnitude"} and groups["lora_B"].lr_scale == 16
    layers = [m for _, m in modules_of_type(model, DoraLinear)]
    assert [p.shape for p in groups["magnitude"].params] == [(m.out_features,) for m in layers]  # q 64, v 32, down 64


# --- bf16 ---------------------------------------------------------------------------------------------------
def test_bf16_stored_and_autocast_forward_are_close_to_fp32() -> None:
    model, method = ours()
    state = method.adapter_state(model)
    with torch.no_grad():
        reference = model(input_ids=ids()).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(input_ids=ids()).logits.float()
        stored = tiny_llama().to(torch.bfloat16)
        again = build_method(method_spec(method))
        again.apply(stored)
        again.load_adapter_state(stored, state)
        bf16 = stored(input_ids=ids()).logits.float()
        base_error = (tiny_llama().to(torch.bfloat16)(input_ids=ids()).logits.float()
                      - tiny_llama()(input_ids=ids()).logits).abs().max()
    assert all(p.dtype == torch.float32 for n, p in stored.named_parameters() if p.requires_grad)
    # bf16's own error on these logits (the base model's, ~4e-3) sets the scale; DoRA changes them by > 1e-2
    for got in (autocast, bf16):
        assert (got - reference).abs().max() <= 2 * base_error


# --- the real loop --------------------------------------------------------------------------------------------
def _loop_config(run_config: dict, precision: str) -> dict:
    run_config["method"] = {"name": "dora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    run_config["train"].update({"precision": precision, "save_every": 2, "max_steps": 4})
    return run_config


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trains_through_the_loop(run_config: dict, tmp_path: Path, precision: str) -> None:
    result = train(_loop_config(run_config, precision), progress=False)
    saved = load_file(str(result.adapter_dir / WEIGHTS_NAME))
    start = tiny_llama().model.layers[0].self_attn.q_proj.weight.norm(dim=1)
    magnitude = saved[f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    assert magnitude.dtype == torch.float32 and (magnitude - start).abs().max() > 1e-4  # m trained
    model = tiny_llama()
    load_adapter(model, result.adapter_dir)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids()).logits).all()


def test_resume_is_exact(run_config: dict, tmp_path: Path) -> None:
    """fp32: bf16 runs on CPU are not bit-reproducible even for plain LoRA (two identical runs differ)."""
    cfg = _loop_config(run_config, "fp32")
    final = load_file(str(train({**cfg, "output_dir": str(tmp_path / "whole")}, progress=False).adapter_dir
                          / WEIGHTS_NAME))
    killed = {**cfg, "output_dir": str(tmp_path / "killed")}
    original = Trainer._step

    def interrupt_at_3(self: Trainer) -> None:
        if self.state["step"] == 3:
            raise KeyboardInterrupt
        return original(self)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(Trainer, "_step", interrupt_at_3)
        train(killed, progress=False)
    resumed = load_file(str(train(killed, resume=True, progress=False).adapter_dir / WEIGHTS_NAME))
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)
