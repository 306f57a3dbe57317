"""The method contract, checked for every registered method, and LoRA's numbers against its formula.

Each registered method needs a row in CONFIGS: a small default-init config on the tiny Llama (identity
at init where the method defines one) and the overrides that make it non-identity before any training.
Tolerances follow the dtype (fp32 here), not the method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from lmadapt.adapters.format import WEIGHTS_NAME, load_adapter, save_adapter
from lmadapt.errors import LmadaptError
from lmadapt.methods import (
    Method,
    ParamGroup,
    available_methods,
    build_method,
    method_class,
)
from lmadapt.methods.lora import PEFT_PREFIX, LoraConfig, LoraLinear
from lmadapt.models.tree import adapters_disabled
from lmadapt.testing import tiny_llama, tiny_lora_adapters

ATOL = 1e-5  # fp32 logits after a few matmuls
EXACT = 1e-6

# name -> (default-init config, overrides that make it non-identity at init)
CONFIGS: dict[str, tuple[dict, dict]] = {
    "lora": ({"r": 4, "alpha": 8}, {"init": "random"}),
    "balora": ({"r": 4, "alpha": 8}, {}),
    "lamda": ({"r": 4, "alpha": 8}, {"init": "random"}),
    "miss": ({"r": 4}, {"init": "random"}),
    "bottleneck": ({"bottleneck_size": 8}, {"init": "bert"}),
    "control_llm": ({"merge_method": "dlerp", "layers": [0, 1]}, {}),  # an exact copy: no non-identity init
    "allora": ({"r": 4, "eta": 2.0}, {"init": "random"}),
    "pissa": ({"r": 4, "alpha": 8}, {}),
    "olora": ({"r": 4, "alpha": 8}, {}),
    "corda": ({"r": 4, "alpha": 8}, {}),
    "nola": ({"r": 4, "alpha": 8, "num_basis_a": 24, "num_basis_b": 40}, {"init": "random"}),
    "dora": ({"r": 4, "alpha": 8}, {"init": "random"}),
    "spiel": ({"density": 0.05, "reselection_steps": 3, "selection_accumulation_steps": 2}, {"init": "random"}),
    "lofit": ({"a_init": "zeros"}, {"a_init": "normal", "init_std": 0.05}),
    "ia3": ({"target_modules": ["k_proj", "v_proj", "down_proj"]}, {"init": "random"}),
    "prompt_tuning": ({"num_virtual_tokens": 4}, {}),
    "meteora": ({"experts": tiny_lora_adapters(), "gate_loss": "balance"}, {}),  # 2 random LoRAs; k = 2
    "full": ({}, {}),
    "freeze": ({"last_n_layers": 1, "norms": True}, {}),
}

# name -> predicate on a parameter's name: the parameters the method (and only it) trains
TRAINS = {
    "lora": lambda n: n.endswith((".lora_A", ".lora_B")),
    "balora": lambda n: n.endswith((".lora_A", ".lora_B")) and ".residual." not in n,
    "lamda": lambda n: n.endswith((".lamda_B", ".lamda_S")),
    "miss": lambda n: n.endswith(".miss_block"),
    "bottleneck": lambda n: n.endswith((".adapter_down", ".adapter_up", ".adapter_scaling")),
    "control_llm": lambda n: ".control_expanded." in n or n.endswith(".control_gate.weight"),
    "allora": lambda n: n.endswith((".lora_A", ".lora_B")),
    "pissa": lambda n: n.endswith((".lora_A", ".lora_B")) and ".residual." not in n,
    "olora": lambda n: n.endswith((".lora_A", ".lora_B")) and ".residual." not in n,
    "corda": lambda n: n.endswith((".lora_A", ".lora_B")) and ".residual." not in n,
    "nola": lambda n: n.endswith((".nola_a", ".nola_b")),
    "dora": lambda n: n.endswith((".lora_A", ".lora_B", ".magnitude")),
    "spiel": lambda n: n.endswith(".spiel_values"),
    "lofit": lambda n: n.endswith(".lofit_A"),  # step 1 (the contract never reaches the switch)
    "ia3": lambda n: n.endswith(".ia3_l"),
    "prompt_tuning": lambda n: n.endswith(".prompt_embeddings"),
    "meteora": lambda n: n.endswith(".meteora_gate"),
    "full": lambda n: True,
    "freeze": lambda n: n.startswith("model.layers.1.") or "norm" in n,
}

# a method that changes the vocabulary (new_tokens) widens the logits: tests/test_method_new_tokens.py checks it
METHODS = [m for m in available_methods() if not method_class(m).changes_tokenizer]
MERGEABLE = [m for m in METHODS if method_class(m).mergeable]
# merge folds an adapter into the base weights (lora) vs. the trained tensors are the base weights (full, freeze)
WEIGHT_METHODS = [m for m in METHODS if method_class(m).trains_base_weights]
MERGEABLE_ADAPTERS = [m for m in MERGEABLE if m not in WEIGHT_METHODS]


def ids(seed: int = 0, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    return model(input_ids=ids(seed)).logits


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def applied(name: str, random_init: bool = False) -> tuple[nn.Module, Method]:
    """A fresh tiny Llama (fp32, seed 0) with method ``name`` applied."""
    cfg, perturb = CONFIGS[name]
    method = build_method({"name": name, **cfg, **(perturb if random_init else {})})
    model = tiny_llama()
    if method.calibration_batches:  # as lmadapt train does: the first training batches, before apply()
        method.calibrate(model, [{"input_ids": ids(seed)} for seed in range(method.calibration_batches)])
    method.apply(model)
    return model, method


def optimizer(groups: list[ParamGroup], lr: float = 1e-2) -> torch.optim.Optimizer:
    return torch.optim.AdamW([
        {"params": g.params, "lr": lr * g.lr_scale,
         "weight_decay": 0.01 if g.weight_decay is None else g.weight_decay}
        for g in groups
    ])


def train_step(model: nn.Module, method: Method) -> None:
    """One AdamW step (lr 1e-2) on the language-modelling loss."""
    model.train()
    opt = optimizer(method.parameter_groups(model))
    batch = ids(1)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def trained(name: str) -> tuple[nn.Module, Method]:
    """Method ``name`` applied (non-identity init where it has one) and trained for one step."""
    model, method = applied(name, random_init=True)
    train_step(model, method)
    return model, method


def base_fingerprint() -> str:
    from lmadapt.models.fingerprint import fingerprint

    return fingerprint(tiny_llama())


def test_every_registered_method_has_a_contract_row() -> None:
    assert set(METHODS) == set(CONFIGS) == set(TRAINS)


# --- the contract ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_identity_at_init(name: str) -> None:
    model, method = applied(name)
    if not method.identity_at_init:
        pytest.skip(f"{name} does not claim identity at init")
    close(logits(model), logits(tiny_llama()), atol=EXACT)


@pytest.mark.parametrize("name", METHODS)
def test_one_step_changes_the_outputs(name: str) -> None:
    model, method = applied(name)
    before = logits(model)
    train_step(model, method)
    assert (logits(model) - before).abs().max() > 1e-4


@pytest.mark.parametrize("name", METHODS)
def test_apply_keeps_base_state_dict(name: str) -> None:
    """Base keys stay; base tensors stay too, unless the method rewrites them (PiSSA-style residuals), and then
    switching its adapters off must still give the base model's outputs."""
    base = tiny_llama().state_dict()
    model, method = applied(name, random_init=True)
    state = model.state_dict()
    for key, value in base.items():
        assert key in state, f"{name}: base key {key} disappeared"
        assert method.rewrites_base_weights or torch.equal(state[key], value), f"{name}: base tensor {key} changed"
    if method.rewrites_base_weights:
        assert any(not torch.equal(state[k], v) for k, v in base.items()), "rewrites_base_weights, but did not"
        with adapters_disabled(model):
            close(logits(model), logits(tiny_llama()))


@pytest.mark.parametrize("name", METHODS)
def test_only_the_methods_parameters_train_each_in_one_group(name: str) -> None:
    model, method = applied(name)
    groups = method.parameter_groups(model)
    grouped = [p for g in groups for p in g.params]
    assert len(grouped) == len({id(p) for p in grouped}), "a parameter is in two groups (or twice in one)"
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in grouped} == set(trainable), "groups and requires_grad disagree"
    assert all(p.requires_grad for p in grouped)
    expected = {n for n, _ in model.named_parameters() if TRAINS[name](n)}
    assert set(trainable.values()) == expected
    assert expected, f"{name} trains nothing"


def test_lora_trainable_count_is_r_times_fan_in_plus_fan_out() -> None:
    model, method = applied("lora")
    r = method.config.r
    expected = sum(r * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoraLinear))
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 14  # 7 linears x 2 blocks
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_lora_plus_puts_b_in_its_own_group() -> None:
    method = build_method({"name": "lora", "r": 2, "lr_ratio_b": 16, "target_modules": ["q_proj"]})
    model = tiny_llama()
    method.apply(model)
    groups = {g.name: g for g in method.parameter_groups(model)}
    assert groups["lora_A"].lr_scale == 1.0 and groups["lora_B"].lr_scale == 16
    assert [tuple(p.shape) for p in groups["lora_B"].params] == [(64, 2), (64, 2)]


@pytest.mark.parametrize(("spec", "trains"), [
    ({"name": "freeze", "modules": ["lm_head", r"re:model\.layers\.0\.mlp"]},
     lambda n: n == "lm_head.weight" or n.startswith("model.layers.0.mlp.")),
    ({"name": "freeze", "last_n_layers": 2}, lambda n: n.startswith("model.layers.")),
    ({"name": "full", "freeze_embeddings": True}, lambda n: n != "model.embed_tokens.weight"),
])
def test_partial_training_options(spec: dict, trains: Callable[[str], bool]) -> None:
    method = build_method(spec)
    model = tiny_llama()
    method.apply(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if trains(n)}
    groups = method.parameter_groups(model)
    assert sum(len(g.params) for g in groups) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", MERGEABLE_ADAPTERS)
def test_merged_equals_unmerged_equals_reloaded(name: str, tmp_path: Path) -> None:
    model, method = trained(name)
    unmerged = logits(model)
    assert (unmerged - logits(tiny_llama())).abs().max() > 1e-4, "the comparison below would be vacuous"

    save_adapter(model, method, tmp_path / "adapter", base_model="tiny", base_fingerprint=base_fingerprint())
    fresh = tiny_llama()
    reloaded_method = load_adapter(fresh, tmp_path / "adapter")
    assert reloaded_method.name == name
    close(logits(fresh), unmerged)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.merge(model)
    close(logits(model), unmerged)
    method.merge(model)  # a second merge is a no-op
    close(logits(model), unmerged)
    method.unmerge(model)
    close(logits(model), unmerged)
    after = model.state_dict()
    for key, value in before.items():
        close(after[key], value, atol=EXACT)


@pytest.mark.parametrize("name", WEIGHT_METHODS)
def test_weight_methods_save_exactly_their_trained_weights_and_merge_as_a_no_op(name: str, tmp_path: Path) -> None:
    """Methods that train the base weights themselves (full, freeze) promise: the adapter file is exactly the
    trained weights under their base keys, loading writes them back bit for bit, and merge/unmerge have
    nothing to fold (every tensor and output stays bit-identical)."""
    base = tiny_llama().state_dict()
    model, method = trained(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trained_keys = {k for k in base if TRAINS[name](k)}
    assert {k for k in base if not torch.equal(state[k], base[k])} == trained_keys  # one step moved all of them

    save_adapter(model, method, tmp_path / "adapter", base_model="tiny", base_fingerprint=base_fingerprint())
    saved = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert set(saved) == trained_keys and all(torch.equal(saved[k], state[k]) for k in saved)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "adapter")
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())

    expected = logits(model)
    for step in (method.merge, method.merge, method.unmerge):
        step(model)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), step.__name__
        assert torch.equal(logits(model), expected), step.__name__


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_and_unload_leaves_a_plain_transformers_model(name: str, tmp_path: Path) -> None:
    base_keys = list(tiny_llama().state_dict())
    model, method = trained(name)
    expected = logits(model)
    method.merge(model)
    method.unload(model)
    for module_name, module in model.named_modules():
        assert "lora" not in type(module).__name__.lower(), f"{module_name} is still a {type(module).__name__}"
        if module_name.endswith("_proj"):
            assert type(module) is nn.Linear
    assert list(model.state_dict()) == base_keys
    assert all(p.device.type == "cpu" for p in model.parameters())
    close(logits(model), expected)

    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert list(reloaded.state_dict()) == base_keys
    close(logits(reloaded), expected)


def test_lora_merge_then_unmerge_restores_w0() -> None:
    model, method = trained("lora")
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    method.merge(model)
    changed = [n for n, m in model.named_modules() if isinstance(m, LoraLinear) and not torch.equal(m.weight, w0[n])]
    assert len(changed) == len(w0)
    method.unmerge(model)
    for n, m in model.named_modules():
        if isinstance(m, LoraLinear):
            close(m.weight, w0[n], atol=EXACT)


def test_lora_adapters_disabled_gives_base_logits() -> None:
    model, method = trained("lora")
    base = logits(tiny_llama())
    adapted = logits(model)
    with adapters_disabled(model):
        close(logits(model), base, atol=EXACT)
    close(logits(model), adapted, atol=EXACT)  # switched back on
    method.merge(model)
    with adapters_disabled(model):  # switching off a merged adapter must still give the base model
        close(logits(model), base)
    close(logits(model), adapted)


def test_lora_applied_to_an_eval_model_is_deterministic() -> None:
    method = build_method({"name": "lora", "r": 4, "dropout": 0.5, "init": "random"})
    model = tiny_llama()  # in eval mode
    method.apply(model)
    assert not any(m.training for m in model.modules())
    close(logits(model), logits(model), atol=0)


@pytest.mark.parametrize("name", ["full", "freeze"])
def test_base_logits_are_refused_when_the_base_weights_train(name: str) -> None:
    model, _ = trained(name)
    with pytest.raises(LmadaptError, match="no adapter modules"), adapters_disabled(model):
        pass


def test_lora_adapter_state_uses_peft_keys() -> None:
    model, method = applied("lora")
    state = method.adapter_state(model)
    assert len(state) == 2 * 14
    assert all(k.startswith(PEFT_PREFIX) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight" in state


# --- LoRA against its formula ----------------------------------------------------------------------
def _lora_linear(**cfg: object) -> tuple[nn.Linear, LoraLinear]:
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=True)
    layer = LoraLinear(base, LoraConfig(**{"r": 3, "alpha": 6.0, "init": "random", **cfg}))
    return base, layer


@pytest.mark.parametrize(("rslora", "scale"), [(False, 6.0 / 3), (True, 6.0 / math.sqrt(3))])
def test_lora_linear_matches_the_formula(rslora: bool, scale: float) -> None:
    base, layer = _lora_linear(rslora=rslora)
    assert layer.scaling == pytest.approx(scale)
    x = torch.randn(4, 7, 6)
    w0, b, a, bb = base.weight, base.bias, layer.lora_A, layer.lora_B
    expected = x @ w0.T + b + scale * (x @ a.T @ bb.T)
    with torch.no_grad():
        close(layer(x), expected)
        close(layer.delta_weight(), scale * bb @ a)
    assert layer.weight is base.weight and layer.bias is base.bias  # same Parameters, same keys
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "lora_A", "lora_B"}


def test_lora_default_init_is_kaiming_a_and_zero_b() -> None:
    _, layer = _lora_linear(init="default")
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(6)  # kaiming_uniform(a=sqrt(5)) on fan_in 6
    assert 0 < layer.lora_A.abs().max() <= bound
    _, layer = _lora_linear(init="gaussian")
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.abs().max() > 0


def test_lora_dropout_only_in_train_mode() -> None:
    base, layer = _lora_linear(dropout=0.5)
    x = torch.randn(64, 6)
    s = layer.scaling
    plain = (x @ base.weight.T + base.bias).detach()
    with torch.no_grad():
        layer.eval()
        close(layer(x), plain + s * (x @ layer.lora_A.T @ layer.lora_B.T))
        layer.train()
        torch.manual_seed(123)
        got = layer(x)
        torch.manual_seed(123)
        dropped = F.dropout(x, 0.5, training=True)
        close(got, plain + s * (dropped @ layer.lora_A.T @ layer.lora_B.T))  # only the adapter path drops
        assert not torch.allclose(got, layer(x))  # a fresh mask each call
