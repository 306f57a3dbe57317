"""Bottleneck adapters (LLM-Adapters, arXiv:2304.01933): the three wirings against their formulas written out by
hand, identity at init with the mam init, fp32 adapter math under bf16, the refusal to merge (the method, the API
and the CLI), save/load reproducing a trained model exactly, and the real loop with every objective."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.activations import ACT2FN

from lmadapt.adapters.format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_adapter,
    read_adapter_info,
    save_adapter,
)
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods import build_method
from lmadapt.methods.bottleneck import (
    ACTIVATIONS,
    Bottleneck,
    BottleneckConfig,
    BottleneckLinear,
)
from lmadapt.methods.lora import PEFT_PREFIX
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.testing import tiny_llama

ATOL = 1e-5  # fp32 after a few matmuls
BF16_LOGITS_ATOL = 5e-2  # tiny Llama logits (|z| < 1) after two bf16 blocks
MLP = ["gate_proj", "up_proj", "down_proj"]
SMALL = {"bottleneck_size": 8}


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=ids()).logits


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def adapted(**cfg: object) -> tuple[nn.Module, Bottleneck]:
    method = build_method({"name": "bottleneck", **SMALL, **cfg})
    model = tiny_llama()
    method.apply(model)
    return model, method


def train_steps(model: nn.Module, method: Bottleneck, steps: int = 2) -> None:
    """A few AdamW steps (lr 1e-2) on the language-modelling loss."""
    model.train()
    opt = torch.optim.AdamW([p for g in method.parameter_groups(model) for p in g.params], lr=1e-2)
    for step in range(steps):
        batch = ids(step + 1)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


# --- the layer against its formula -----------------------------------------------------------------------
def toy(wiring: str, **cfg: object) -> tuple[nn.Linear, BottleneckLinear]:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = BottleneckLinear(base, wiring, BottleneckConfig(**{"bottleneck_size": 3, "init": "bert", **cfg}))
    with torch.no_grad():  # bert's std 0.02 would make the adapter's share too small to see
        layer.adapter_down.normal_(std=1.0)
        layer.adapter_up.normal_(std=1.0)
    return base, layer


def hand_adapter(h: torch.Tensor, down: torch.Tensor, up: torch.Tensor, act, s: float) -> torch.Tensor:
    """s * W_up act(W_down h), one output element at a time."""
    out = torch.empty(*h.shape[:-1], up.shape[0])
    for row in range(h.shape[0]):
        z = [act(sum(down[j, k] * h[row, k] for k in range(h.shape[1]))) for j in range(down.shape[0])]
        for o in range(up.shape[0]):
            out[row, o] = s * sum(up[o, j] * z[j] for j in range(down.shape[0]))
    return out


@pytest.mark.parametrize(("wiring", "shapes"), [("series_output", ((3, 5), (5, 3))),
                                                ("series_input", ((3, 6), (6, 3))),
                                                ("parallel", ((3, 6), (5, 3)))])
@pytest.mark.parametrize(("activation", "act"), [("tanh", math.tanh), ("relu", lambda v: max(v, 0.0))])
def test_each_wiring_matches_its_formula(wiring: str, shapes: tuple, activation: str, act) -> None:
    base, layer = toy(wiring, activation=activation, scaling=0.5)
    assert layer.weight is base.weight and layer.bias is base.bias  # same Parameters, same keys
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "adapter_down", "adapter_up"}
    down, up = layer.adapter_down.detach(), layer.adapter_up.detach()
    assert (tuple(down.shape), tuple(up.shape)) == shapes
    x = torch.randn(4, 6)
    w, b = base.weight.detach(), base.bias.detach()
    with torch.no_grad():
        if wiring == "series_output":
            u = x @ w.T + b
            expected = u + hand_adapter(u, down, up, act, 0.5)
        elif wiring == "series_input":
            expected = (x + hand_adapter(x, down, up, act, 0.5)) @ w.T + b
        else:
            expected = x @ w.T + b + hand_adapter(x, down, up, act, 0.5)
        got = layer(x)
        close(got, expected)
        assert (got - base(x)).abs().max() > 0.05  # the adapter matters here
        close(layer(x.view(2, 2, 6)), expected.view(2, 2, 5))  # any leading shape


def test_learned_scaling_is_a_trainable_scalar_that_multiplies_the_adapter() -> None:
    base, layer = toy("parallel", scaling="learned")
    assert layer.adapter_scaling.shape == (1,) and layer.adapter_scaling.item() == 1.0
    x = torch.randn(4, 6)
    with torch.no_grad():
        one = layer(x) - base(x)
        layer.adapter_scaling.fill_(-2.5)
        close(layer(x) - base(x), -2.5 * one)
    layer(x).sum().backward()
    assert layer.adapter_scaling.grad is not None and layer.adapter_scaling.grad.abs().item() > 0


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_are_transformers_act2fn_of_the_same_name(name: str) -> None:
    z = torch.linspace(-4, 4, 101)
    close(ACTIVATIONS[name](z), ACT2FN[name](z), atol=1e-6)  # LLM-Adapters' non_linearity names and functions


def test_dropout_drops_only_the_adapter_input_in_training() -> None:
    base, layer = toy("series_input", dropout=0.5)
    x = torch.randn(16, 6)
    down, up = layer.adapter_down.detach(), layer.adapter_up.detach()
    with torch.no_grad():
        layer.eval()
        close(layer(x), (x + torch.tanh(x @ down.T) @ up.T) @ base.weight.T + base.bias)
        layer.train()
        torch.manual_seed(7)
        got = layer(x)
        torch.manual_seed(7)
        h = F.dropout(x, 0.5, training=True)
        close(got, (x + torch.tanh(h @ down.T) @ up.T) @ base.weight.T + base.bias)  # the residual keeps x


# --- the model: wiring, identity, counts ------------------------------------------------------------------
def test_wiring_follows_placement_and_series_input_modules() -> None:
    model, _ = adapted(target_modules=MLP + ["o_proj"])
    wiring = {n.split(".", 3)[-1]: m.wiring for n, m in modules_of_type(model, BottleneckLinear)}
    assert wiring == {"self_attn.o_proj": "series_output", "mlp.gate_proj": "series_input",
                      "mlp.up_proj": "series_input", "mlp.down_proj": "series_output"}
    model, _ = adapted(placement="parallel", target_modules=["q_proj", "k_proj", "v_proj"])
    assert {m.wiring for _, m in modules_of_type(model, BottleneckLinear)} == {"parallel"}
    assert sum(1 for _ in modules_of_type(model, BottleneckLinear)) == 6
    model, _ = adapted(target_modules=MLP, series_input_modules=[], exclude_modules=["re:.*layers\\.1\\..*"])
    assert {n: m.wiring for n, m in modules_of_type(model, BottleneckLinear)} == {
        f"model.layers.0.mlp.{p}": "series_output" for p in MLP}


@pytest.mark.parametrize("cfg", [{}, {"target_modules": MLP}, {"placement": "parallel", "target_modules": MLP},
                                 {"placement": "parallel", "target_modules": ["q_proj", "k_proj", "v_proj"],
                                  "scaling": "learned", "activation": "relu"}])
def test_mam_init_is_the_base_model_exactly_and_bert_is_not(cfg: dict) -> None:
    base = logits(tiny_llama())
    model, method = adapted(**cfg)
    assert method.identity_at_init
    assert torch.equal(logits(model), base)
    for _, m in modules_of_type(model, BottleneckLinear):
        assert torch.count_nonzero(m.adapter_up) == 0
        bound = 1 / math.sqrt(m.adapter_down.shape[1])  # kaiming_uniform(a=sqrt 5) on fan-in d
        assert 0.5 * bound < m.adapter_down.abs().max() <= bound
    model, method = adapted(**cfg, init="bert", bottleneck_size=64)
    assert not method.identity_at_init
    assert (logits(model) - base).abs().max() > 1e-4
    weights = torch.cat([p.flatten() for g in method.parameter_groups(model) for p in g.params if p.numel() > 1])
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002


@pytest.mark.parametrize("scaling", [1.0, "learned"])
def test_trainable_counts_and_groups(scaling: object) -> None:
    model, method = adapted(target_modules=MLP + ["q_proj"], scaling=scaling)
    layers = [m for _, m in modules_of_type(model, BottleneckLinear)]
    # tiny Llama: gate/up (input side, d_in 64), down (output side, d_out 64), q (output side, d_out 64)
    per_layer = 8 * (64 + 64) + (scaling == "learned")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 8 * per_layer
    groups = {g.name: g for g in method.parameter_groups(model)}
    assert groups["bottleneck"].params == [m.adapter_down for m in layers] + [m.adapter_up for m in layers]
    if scaling == "learned":
        assert groups["bottleneck_scaling"].params == [m.adapter_scaling for m in layers]
        assert groups["bottleneck_scaling"].weight_decay == 0.0
    else:
        assert set(groups) == {"bottleneck"}
    assert all(p.dtype == torch.float32 for g in groups.values() for p in g.params)


def test_adapters_disabled_gives_base_logits_and_unload_leaves_the_base_model() -> None:
    model, method = adapted(placement="parallel", target_modules=MLP, init="bert")
    base = tiny_llama()
    adapted_logits = logits(model)
    with adapters_disabled(model):
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), adapted_logits)
    method.unload(model)
    assert not list(modules_of_type(model, BottleneckLinear))
    assert list(model.state_dict()) == list(base.state_dict())
    assert torch.equal(logits(model), logits(base))


# --- dtypes: the adapter in fp32, rounded once to the layer's dtype ------------------------------------------
@pytest.mark.parametrize("wiring", ["series_output", "series_input", "parallel"])
def test_adapter_math_is_fp32_and_cast_back_to_the_layer_dtype(wiring: str) -> None:
    _, layer = toy(wiring)
    layer.to(torch.bfloat16)
    layer.adapter_down.data, layer.adapter_up.data = layer.adapter_down.data.float(), layer.adapter_up.data.float()
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    w, b = layer.weight, layer.bias
    down, up = layer.adapter_down.detach(), layer.adapter_up.detach()

    def a(h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h.float() @ down.T) @ up.T  # fp32 throughout

    with torch.no_grad():
        if wiring == "series_input":
            expected = F.linear((x.float() + a(x)).to(torch.bfloat16), w, b)
        else:
            u = F.linear(x, w, b)
            expected = (u.float() + a(u if wiring == "series_output" else x)).to(torch.bfloat16)
        got = layer(x)
        assert got.dtype == torch.bfloat16
        close(got.float(), expected.float(), atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast is switched off inside the adapter
            close(layer(x).float(), expected.float(), atol=0)


def test_bf16_autocast_and_bf16_storage_match_fp32() -> None:
    model, method = adapted(target_modules=MLP, init="bert", bottleneck_size=32)
    ref = logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        close(logits(model).float(), ref, atol=BF16_LOGITS_ATOL)
    model.to(torch.bfloat16)  # a bf16-stored base; adapter parameters kept in fp32 as training keeps them
    for _, m in modules_of_type(model, BottleneckLinear):
        m.adapter_down.data, m.adapter_up.data = m.adapter_down.data.float(), m.adapter_up.data.float()
    got = logits(model)
    assert got.dtype == torch.bfloat16
    close(got.float(), ref, atol=BF16_LOGITS_ATOL)
    model(input_ids=ids()).logits.float().square().mean().backward()
    grads = [p.grad for g in method.parameter_groups(model) for p in g.params]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


# --- not mergeable --------------------------------------------------------------------------------------------
def test_merge_and_unmerge_refuse_with_the_reason() -> None:
    model, method = adapted()
    assert Bottleneck.mergeable is False
    for step in (method.merge, method.unmerge):
        with pytest.raises(LmadaptError, match="cannot be merged.*activation.*unmerged"):
            step(model)


def test_lmadapt_merge_refuses_before_loading_the_base(tmp_path: Path, capsys) -> None:
    from lmadapt.api import merge
    from lmadapt.cli import main

    model, method = adapted()
    # a base that does not exist: the refusal must come before any attempt to load it
    save_adapter(model, method, tmp_path / "a", base_model=str(tmp_path / "no-such-model"), base_fingerprint=None)
    with pytest.raises(LmadaptError, match="method 'bottleneck' cannot be merged"):
        merge(None, tmp_path / "a", tmp_path / "merged")
    assert main(["merge", "--adapter", str(tmp_path / "a"), "--output", str(tmp_path / "merged")]) == 2
    assert "method 'bottleneck' cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


# --- the adapter format ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [{"target_modules": MLP, "scaling": "learned"},
                                 {"placement": "parallel", "target_modules": ["q_proj", "v_proj"],
                                  "activation": "silu", "scaling": 2.0}])
def test_save_and_load_reproduce_the_trained_model_exactly(cfg: dict, tmp_path: Path) -> None:
    model, method = adapted(**cfg)
    train_steps(model, method)
    expected = logits(model)
    assert (expected - logits(tiny_llama())).abs().max() > 1e-3  # training moved it: the check is not vacuous
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None)
    saved = load_file(tmp_path / "a" / WEIGHTS_NAME)
    layers = dict(modules_of_type(model, BottleneckLinear))
    per_layer = 3 if cfg.get("scaling") == "learned" else 2
    assert len(saved) == per_layer * len(layers)
    name = next(iter(layers))
    assert torch.equal(saved[f"{PEFT_PREFIX}{name}.adapter_down.weight"], layers[name].adapter_down)
    info = read_adapter_info(tmp_path / "a")
    assert info.source == "lmadapt" and info.method["name"] == "bottleneck"
    assert "peft_type" not in (tmp_path / "a" / CONFIG_NAME).read_text()  # not a PEFT method
    fresh = tiny_llama()
    reloaded = load_adapter(fresh, tmp_path / "a")
    assert reloaded.name == "bottleneck" and reloaded.config == method.config
    assert torch.equal(logits(fresh), expected)


def test_load_adapter_state_refuses_wrong_keys_and_shapes() -> None:
    model, method = adapted(target_modules=["down_proj"])
    state = method.adapter_state(model)
    with pytest.raises(KeyError, match="1 adapter tensor"):
        method.load_adapter_state(model, dict(list(state.items())[1:]))
    key = f"{PEFT_PREFIX}model.layers.0.mlp.down_proj.adapter_down.weight"
    with pytest.raises(ValueError, match=r"saved shape \(4, 64\) != model's \(8, 64\).*bottleneck_size"):
        method.load_adapter_state(model, {**state, key: torch.zeros(4, 64)})


def test_config_check_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        build_method({"name": "bottleneck", "bottleneck_size": 0, "dropout": 1.0, "scaling": 0,
                      "target_modules": []})
    for needle in ("bottleneck_size: must be >= 1", "dropout: must be in [0, 1)", "scaling: must be a finite",
                   "target_modules: name at least one"):
        assert needle in str(err.value), str(err.value)
    with pytest.raises(ConfigError) as err:
        build_method({"name": "bottleneck", "activation": "tanhh", "init": "mam_adapter", "scaling": "learnt"})
    for needle in ("activation: 'tanhh' is not one of", "Did you mean 'tanh'", "init: 'mam_adapter' is not one of",
                   "scaling: expected float | 'learned'"):
        assert needle in str(err.value), str(err.value)
    assert build_method({"name": "bottleneck", "scaling": "0.5"}).config.scaling == 0.5


# --- the real loop --------------------------------------------------------------------------------------------
@pytest.fixture
def captured(monkeypatch) -> list:
    """The Trainers built during the test (to reach the model a run trained)."""
    from lmadapt.training.loop import Trainer

    made: list = []
    original = Trainer.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Trainer, "__init__", keep)
    return made


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("method", "objective", "precision"), [
    ({"target_modules": MLP, "scaling": "learned", "dropout": 0.1}, None, "fp32"),
    ({"placement": "parallel", "target_modules": ["q_proj", "v_proj"]}, None, "bf16"),
    ({"target_modules": ["down_proj"]}, {"name": "distill", "teacher": "base", "lm_weight": 0.5}, "bf16"),
])
def test_a_run_s_adapter_reproduces_the_trained_model(run_config, captured, tiny_model_dir, method: dict,
                                                      objective: dict | None, precision: str) -> None:
    import lmadapt
    from lmadapt.recipes.finetune import train

    run_config["method"] = {"name": "bottleneck", **SMALL, **method}
    if objective:
        run_config["objective"] = objective
    run_config["train"].update({"max_steps": 3, "precision": precision, "lr": 1e-2})
    result = train(run_config, progress=False)
    assert result.report["steps"] == 3 and math.isfinite(result.report["final_train_loss"])
    trained = captured[-1].model.eval()
    assert all(p.dtype == torch.float32 for _, m in modules_of_type(trained, BottleneckLinear)
               for p in (m.adapter_down, m.adapter_up))  # fp32 adapter, whatever the base dtype
    expected = logits(trained)
    assert (expected - logits(tiny_llama())).abs().max() > 1e-3
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[expected.dtype]  # the run keeps the dtype it chose
    model, _, loaded = lmadapt.load(str(tiny_model_dir), adapter=result.adapter_dir, dtype=dtype)
    assert loaded.name == "bottleneck"
    assert torch.equal(logits(model), expected)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trains_a_value_model_unmerged(tmp_path: Path, tokenizer, precision: str) -> None:
    """The value objective through the loop. lmadapt's VAS recipe saves value models merged and so refuses this
    method (tests/test_method_matrix.py's value row); the objective itself works with it unmerged."""
    from test_vas import toy_samples

    from lmadapt.decoding.value_model import ValueModel
    from lmadapt.objectives.base import build_objective
    from lmadapt.recipes.vas_train import _RewardBatcher, value_method
    from lmadapt.training.config import TrainConfig
    from lmadapt.training.run import Run

    vm = ValueModel(tiny_llama(), tokenizer)
    spec = {"name": "bottleneck", **SMALL, "placement": "parallel", "target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(LmadaptError, match="'bottleneck' cannot be merged into the backbone"):
        value_method(spec, vm)
    samples = toy_samples(tokenizer, 16, seed=2)
    batcher = _RewardBatcher(samples, [float(i % 3) for i in range(16)], batch_size=8, pad_id=0, seed=0)
    run = Run(tmp_path / "run", TrainConfig(lr=1e-2, batch_size=8, max_steps=2, tensorboard=False,
                                            precision=precision), "cpu", overwrite=True)
    run.path.mkdir(parents=True)
    method = build_method(spec)
    run.apply_method(vm, method, batcher)
    objective = build_objective({"name": "value"})
    objective.setup(vm, vm.tokenizer, run.device)
    result = run.fit(vm, method, objective, batcher, None, base_model=None, base_fingerprint=None, progress=False)
    assert result.steps == 2 and math.isfinite(result.final_loss)
    ups = [m.adapter_up for _, m in modules_of_type(vm, BottleneckLinear)]
    assert len(ups) == 4 and all(torch.count_nonzero(u) > 0 for u in ups)  # W_up left zero: trained
