"""SpIEL: the sparse-delta layer against the dense formula, the budget, bit-exact merge/unmerge, METHODS.md §7's
six checks on toy layers with planted gradients (drop by |value|, growth, Adam counter-correction, k_m distinct
indices after every reselection; both criteria), the real loop in fp32 and bf16, and exact resume after a kill
that falls after a regrow and inside a selection phase."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import interrupted_at as killed_at
from safetensors.torch import load_file
from torch import nn

from lmadapt.adapters.format import WEIGHTS_NAME, load_adapter, save_adapter
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods import StepContext, build_method
from lmadapt.methods.lora import PEFT_PREFIX
from lmadapt.methods.sparse_delta import ag_swap
from lmadapt.methods.spiel import Spiel, SpielConfig, SpielLinear
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5  # fp32 after a few matmuls


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=ids()).logits


def layers(model: nn.Module) -> list[tuple[str, SpielLinear]]:
    return list(modules_of_type(model, SpielLinear))


def spiel_model(**cfg: object) -> tuple[nn.Module, Spiel]:
    method = build_method({"name": "spiel", **cfg})
    model = tiny_llama()
    method.apply(model)
    return model, method


# --- the layer and the budget --------------------------------------------------------------------------
def test_forward_and_gradients_equal_the_dense_formula() -> None:
    torch.manual_seed(0)
    base = nn.Linear(10, 6).requires_grad_(False)
    layer = SpielLinear(base, 7, SpielConfig(init="random"), torch.Generator().manual_seed(3))
    idx, val = layer.spiel_indices, layer.spiel_values
    assert layer.weight is base.weight and idx.dtype == torch.int32 and val.dtype == torch.float32
    dense = torch.zeros(6, 10, requires_grad=True)  # the reference: a dense delta with the same entries
    for i, v in zip(idx.tolist(), val.tolist()):
        dense.data[i // 10, i % 10] = v
    torch.testing.assert_close(layer.delta_weight(), dense.detach(), atol=0, rtol=0)
    x = torch.randn(3, 4, 10, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w = torch.randn(3, 4, 6)
    (layer(x) * w).sum().backward()
    ref = x_ref @ (base.weight + dense).T + base.bias
    (ref * w).sum().backward()
    torch.testing.assert_close(layer(x), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(val.grad, dense.grad.view(-1)[idx.long()], atol=ATOL, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=ATOL, rtol=0)
    assert base.weight.grad is None  # W0 stays frozen


def test_budget_is_density_of_all_parameters_shared_by_size_and_identity_at_init() -> None:
    total = sum(p.numel() for p in tiny_llama().parameters())
    model, _ = spiel_model(density=0.02)
    found = layers(model)
    assert len(found) == 14  # all-linear: 7 projections x 2 blocks, not lm_head
    sizes = {n: m.weight.numel() for n, m in found}
    budget = int(0.02 * total)
    for name, m in found:
        assert m.k == int(budget * sizes[name] / sum(sizes.values()))
        assert torch.unique(m.spiel_indices).numel() == m.k and int(m.spiel_indices.max()) < sizes[name]
        assert torch.count_nonzero(m.spiel_values) == 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.spiel_values" for n, _ in found}
    assert torch.equal(logits(model), logits(tiny_llama()))  # values = 0: exactly the base model
    again, _ = spiel_model(density=0.02)  # the seed fixes the initial indices
    assert all(torch.equal(a.spiel_indices, b.spiel_indices) for (_, a), (_, b) in zip(found, layers(again)))


def test_config_and_budget_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="selection_accumulation_steps"):
        build_method({"name": "spiel", "reselection_steps": 4, "selection_accumulation_steps": 4})
    with pytest.raises(ConfigError, match="density"):
        build_method({"name": "spiel", "density": 0.0})
    with pytest.raises(LmadaptError, match="lower density"):
        spiel_model(density=0.9, target_modules=["q_proj"])
    with pytest.raises(LmadaptError, match="gets no entries"):
        spiel_model(density=1e-5)


def test_merge_then_unmerge_is_bit_exact_and_adapters_disabled_gives_the_base() -> None:
    model, method = spiel_model(density=0.05, init="random")
    w0 = {n: m.weight.detach().clone() for n, m in layers(model)}
    adapted, base = logits(model), logits(tiny_llama())
    assert (adapted - base).abs().max() > 1e-4
    method.merge(model)
    for n, m in layers(model):
        expected = w0[n].clone()
        expected.view(-1).scatter_add_(0, m.spiel_indices.long(), m.spiel_values.detach())
        assert torch.equal(m.weight, expected)
    torch.testing.assert_close(logits(model), adapted, atol=ATOL, rtol=0)
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model), base, atol=ATOL, rtol=0)
    method.merge(model)  # a no-op
    method.unmerge(model)
    assert all(torch.equal(m.weight, w0[n]) for n, m in layers(model))  # restored bit for bit
    torch.testing.assert_close(logits(model), adapted, atol=ATOL, rtol=0)


def test_saved_adapter_is_indices_and_values_and_reloads(tmp_path: Path) -> None:
    model, method = spiel_model(density=0.05, init="random")
    model(input_ids=ids(1), labels=ids(1)).loss.backward()  # step 0 is in a phase: candidates now exist
    save_adapter(model, method, tmp_path / "own", base_model="tiny", base_fingerprint=None)
    assert any(k.endswith(".spiel_ag_sum") for k in load_file(tmp_path / "own" / WEIGHTS_NAME))  # checkpoints
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None, export=True)
    saved = load_file(tmp_path / "a" / WEIGHTS_NAME)
    assert {k.rsplit(".", 1)[1] for k in saved} == {"spiel_indices", "spiel_values"}  # no selection statistics
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh), logits(model), atol=0, rtol=0)
    key = f"{PEFT_PREFIX}{layers(model)[0][0]}.spiel_indices"
    broken = {**saved, key: torch.zeros_like(saved[key])}  # every entry at position 0
    with pytest.raises(ValueError, match="distinct"):
        method.load_adapter_state(spiel_model(density=0.05)[0], broken)


# --- METHODS.md's selection checks on a toy layer ------------------------------------------------------------
D_OUT, D_IN = 8, 16  # one 8 x 16 layer, no bias: 128 weights, density 0.125 -> k = 16


def toy(**cfg: object) -> tuple[nn.Module, Spiel, SpielLinear, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False))
    method = build_method({"name": "spiel", "density": 0.125, "reselection_steps": 10,
                           "selection_accumulation_steps": 2, "initial_reselection_rate": 0.5, **cfg})
    method.apply(model)
    opt = torch.optim.AdamW(method.parameter_groups(model)[0].params, lr=1e-2, betas=(0.9, 0.99))
    return model, method, model[0], opt


def planted(positions: list[int], seed: int, big: float = 5.0) -> torch.Tensor:
    """A dL/dW (d_out x d_in) with |g| ~ 1e-3 everywhere and +-big (by position) at ``positions``."""
    g = torch.randn(D_OUT * D_IN, generator=torch.Generator().manual_seed(seed)) * 1e-3
    g[positions] = torch.tensor([big * (1 + i / 10) * (-1) ** i for i in range(len(positions))])
    return g.view(D_OUT, D_IN)


def run_step(model: nn.Module, method: Spiel, opt: torch.optim.Optimizer, step: int, grad: torch.Tensor,
             max_steps: int = 24, micro: int = 1) -> torch.Tensor:
    """One optimizer step whose dL/dW is ``grad`` (x = I makes y[i, o] = W[o, i]); returns the values as the
    reselection sees them (after the optimizer step)."""
    opt.zero_grad(set_to_none=True)
    for _ in range(micro):
        (model(torch.eye(D_IN)) * grad.T / micro).sum().backward()
    opt.step()
    seen = model[0].spiel_values.detach().clone()
    method.on_step_end(StepContext(model, {}, step, max_steps, optimizer=opt))
    return seen


def positions_of(layer: SpielLinear) -> set[int]:
    return set(layer.spiel_indices.tolist())


def test_first_selection_replaces_everything_by_the_planted_indices() -> None:
    model, method, layer, opt = toy()
    start = positions_of(layer)
    plant = [p for p in range(0, 128, 3) if p not in start][:16]
    for step in range(2):  # the first phase: steps 0 and 1, p = 1 after step 1
        run_step(model, method, opt, step, planted(plant, seed=step))
    assert positions_of(layer) == set(plant)
    assert layer.spiel_indices.numel() == 16 and torch.count_nonzero(layer.spiel_values) == 0


@pytest.mark.parametrize("age", ["step", "phase"])
def test_drop_smallest_values_grow_planted_and_adam_state_follows_the_formula(age: str) -> None:
    model, method, layer, opt = toy(grown_state_age=age)
    for step in range(10):  # first selection after step 1, then training on random gradients
        run_step(model, method, opt, step, planted([], seed=100 + step))
    active = positions_of(layer)
    plant = [p for p in range(1, 128, 5) if p not in active][:6]
    g = planted(plant, seed=7)
    before_idx = layer.spiel_indices.clone()
    run_step(model, method, opt, 10, g, micro=2)  # the phase: steps 10, 11 (two micro-batches each)
    values = run_step(model, method, opt, 11, g)
    p = 0.5 * (1 - 12 / 24)  # linear policy after 12 of 24 steps
    n = int(p * 16)
    assert n == 4
    changed = (layer.spiel_indices != before_idx).nonzero().squeeze(1)
    assert set(changed.tolist()) == set(torch.argsort(values.abs())[:n].tolist())  # dropped: smallest |value|
    strongest = sorted(plant, key=lambda q: -abs(float(g.view(-1)[q])))[:n]
    assert set(layer.spiel_indices[changed].tolist()) == set(strongest)  # grown: the largest |sum g|
    assert torch.count_nonzero(layer.spiel_values[changed]) == 0
    kept = torch.ones(16, dtype=torch.bool)
    kept[changed] = False
    assert torch.equal(layer.spiel_values[kept], values[kept])
    state = opt.state[layer.spiel_values]
    t = float(state["step"])
    a = t if age == "step" else 2.0  # the optimizer's 12 steps, or the phase's 2
    mean_g = g.view(-1)[layer.spiel_indices[changed].long()]  # the same gradient both phase steps
    torch.testing.assert_close(state["exp_avg"][changed], mean_g * (1 - 0.9**a), rtol=1e-6, atol=0)
    torch.testing.assert_close(state["exp_avg_sq"][changed], mean_g**2 * (1 - 0.99**a), rtol=1e-6, atol=0)
    assert layer.ag_indices is None  # the candidates are dropped with the phase


def test_a_regrown_outgoing_entry_stays_and_short_candidates_keep_the_budget() -> None:
    indices = torch.tensor([10, 11, 12, 13], dtype=torch.int32)
    values = torch.tensor([0.1, -0.4, 0.2, 0.3])
    cand = torch.tensor([10, 50, 11, 13])  # 10 is dropped and regrown, 11 and 13 stay active
    pos, best = ag_swap(indices, values, cand, torch.tensor([9.0, 5.0, 8.0, 7.0]), n=2)
    assert pos.tolist() == [2] and cand[best].tolist() == [50]  # 10 kept as it was; 12 makes room for 50


@pytest.mark.parametrize("source", ["active", "dense"])
def test_ma_grows_by_the_sm3_row_column_products(source: str) -> None:
    model, method, layer, opt = toy(selection="ma", ma_gradient=source)
    rows, cols = torch.zeros(D_OUT), torch.zeros(D_IN)
    for step in range(2):
        g = planted([], seed=step) + torch.outer(torch.arange(D_OUT) + 1.0, torch.ones(D_IN)) * 1e-2
        idx = layer.spiel_indices.long().tolist()
        run_step(model, method, opt, step, g)
        if source == "dense":  # every entry, once per backward
            u = torch.minimum(rows[:, None], cols[None, :]) + g**2
            rows, cols = torch.maximum(rows, u.amax(1)), torch.maximum(cols, u.amax(0))
        else:  # the active entries' gradients, one at a time (the reference's scatter-max)
            new_rows, new_cols = rows.clone(), cols.clone()
            for i in idx:
                r, c = divmod(i, D_IN)
                u = min(rows[r], cols[c]) + g[r, c] ** 2
                new_rows[r], new_cols[c] = max(new_rows[r], u), max(new_cols[c], u)
            rows, cols = new_rows, new_cols
        torch.testing.assert_close(layer.spiel_sm3_rows, rows, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.spiel_sm3_cols, cols, rtol=1e-6, atol=0)
    score = torch.outer(rows, cols).view(-1)
    score[idx] = -math.inf  # p = 1: all 16 replaced by the best inactive ones
    assert positions_of(layer) == set(torch.topk(score, 16).indices.tolist())
    state = opt.state[layer.spiel_values]
    assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0


@pytest.mark.parametrize("cfg", [{}, {"selection": "ma"}, {"selection": "ma", "ma_gradient": "dense"},
                                 {"reselection_policy": "cosine", "initial_reselection_rate": 1.0}])
def test_budget_stays_k_distinct_indices_after_every_reselection(cfg: dict) -> None:
    model, method, layer, opt = toy(reselection_steps=3, selection_accumulation_steps=1, **cfg)
    changes = 0
    for step in range(24):
        before = layer.spiel_indices.clone()
        run_step(model, method, opt, step, planted([], seed=step) * 1e3)
        changes += int((layer.spiel_indices != before).sum())
        assert layer.spiel_indices.numel() == 16 and torch.unique(layer.spiel_indices).numel() == 16
        assert int(layer.spiel_indices.min()) >= 0 and int(layer.spiel_indices.max()) < D_OUT * D_IN
    assert changes > 16  # more than the first selection moved


# --- the real loop ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def make_config(tiny_model_dir, tmp_path_factory):
    from conftest import make_rows, write_jsonl

    data = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(data, make_rows(48))

    def make(output_dir: Path, method: dict, model: dict | None = None, **train_fields) -> dict:
        return {
            "model": {"name_or_path": str(tiny_model_dir), **(model or {})},
            "data": {"train": [str(data)], "max_length": 128, "validation_fraction": 0.125},
            "method": {"name": "spiel", "density": 0.05, "target_modules": ["q_proj", "v_proj", "down_proj"],
                       "reselection_steps": 3, "selection_accumulation_steps": 2, **method},
            "train": {"lr": 5e-3, "batch_size": 4, "tensorboard": False, "schedule": "constant", "threads": 1,
                      **train_fields},
            "output_dir": str(output_dir),
        }
    return make


def start_indices(cfg: dict) -> dict[str, torch.Tensor]:
    model, _ = spiel_model(**{k: v for k, v in cfg["method"].items() if k != "name"})
    return {f"{PEFT_PREFIX}{n}.spiel_indices": m.spiel_indices for n, m in layers(model)}


@pytest.mark.parametrize(("precision", "dtype", "selection"), [
    ("fp32", "fp32", "ag"), ("bf16", "fp32", "ag"), ("bf16", "bf16", "ma"), ("fp32", "fp32", "ma")])
def test_the_loop_trains_and_regrows(make_config, tmp_path, precision, dtype, selection) -> None:
    cfg = make_config(tmp_path / "run", {"selection": selection}, {"dtype": dtype}, precision=precision,
                      max_steps=5)
    result = train(cfg, progress=False)
    assert result.report["steps"] == 5 and math.isfinite(result.report["final_train_loss"])
    saved = load_file(str(result.adapter_dir / WEIGHTS_NAME))
    for key, start in start_indices(cfg).items():
        idx = saved[key]
        assert idx.numel() == start.numel() and torch.unique(idx).numel() == idx.numel()
        assert not torch.equal(idx, start), f"{key}: no reselection happened"
        assert torch.count_nonzero(saved[key.replace("indices", "values")]) > 0


@pytest.mark.parametrize("kill", [3, 5])
@pytest.mark.parametrize("method", [{"selection": "ag"}, {"selection": "ma", "ma_gradient": "dense"}])
def test_resume_after_a_regrow_is_exact(make_config, tmp_path, method, kill) -> None:
    """Phases are steps {0, 1}, {3, 4}, {6}; regrowth after steps 1 and 4. A kill at 3 resumes from the checkpoint
    after 2 steps (after the first regrow, between phases); a kill at 5 from the one after 4 steps (inside the
    second phase, whose statistics the checkpoint must carry)."""
    fields = {"max_steps": 7, "save_every": 2, "grad_accum": 2, "precision": "fp32"}
    whole = train(make_config(tmp_path / "whole", method, **fields), progress=False)
    with killed_at(kill), pytest.raises(KeyboardInterrupt):
        train(make_config(tmp_path / "cut", method, **fields), progress=False)
    if kill == 5:
        ckpt = load_file(str(tmp_path / "cut" / "checkpoints" / "step-0000004" / "adapter" / WEIGHTS_NAME))
        scratch = "spiel_ag_sum" if method["selection"] == "ag" else "spiel_sm3_rows"
        assert any(k.endswith(scratch) for k in ckpt), "the checkpoint should hold the phase's statistics"
    resumed = train(make_config(tmp_path / "cut", method, **fields), resume=True, progress=False)
    a = load_file(str(whole.adapter_dir / WEIGHTS_NAME))
    b = load_file(str(resumed.adapter_dir / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights and indices
    start = start_indices(make_config(tmp_path / "x", method))
    assert all(not torch.equal(a[k], v) for k, v in start.items())  # the indices did move
