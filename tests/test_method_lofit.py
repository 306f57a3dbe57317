"""LoFiT: the head-output layer against z' = (1 + A) * z + v written out per head, identity at A = v = 0, the
head ranking, the trainable set of each step, the L1 term, the step switch through the real loop (its lr, its
heads, the saved adapter), exact resume across and after the switch, merge where o_proj has a bias (and the
refusal where it has none), and bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import interrupted_at as killed_at
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from lmadapt.adapters.format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_adapter,
    save_adapter,
)
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods import StepContext, build_method
from lmadapt.methods.lofit import Lofit, LofitOProj, rank_heads
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama

ATOL = 1e-5  # fp32 after a few matmuls
EXACT = 1e-6
BF16_LAYER_RTOL = 1e-2  # one linear layer in bf16 (eps 2^-8), relative to the output's largest value
BF16_LOGITS_ATOL = 5e-2  # tiny Llama logits (|z| < 1) after two bf16 blocks
HEADS, D = 4, 16  # tiny Llama: 2 layers of 4 query heads of 16 (2 KV heads: GQA does not matter here)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=ids()).logits


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def lofit(model_kw: dict | None = None, **cfg: object) -> tuple[nn.Module, Lofit]:
    method = build_method({"name": "lofit", **cfg})
    model = tiny_llama(**(model_kw or {}))
    method.apply(model)
    return model, method


def layers(model: nn.Module) -> list[LofitOProj]:
    return [m for _, m in modules_of_type(model, LofitOProj)]


# --- the layer against its formula ---------------------------------------------------------------------------
def test_layer_scales_and_offsets_each_head_output_before_o_proj() -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 5, bias=True)  # 3 heads of 4
    layer = LofitOProj(base, 3, 4)
    assert layer.weight is base.weight and layer.bias is base.bias  # same Parameters, same keys
    x = torch.randn(2, 7, 12)
    w, b = base.weight.detach(), base.bias.detach()
    a = torch.randn(3, 4) * 0.3
    layer.set_scales(a)
    expected = b + sum(((1 + a[h]) * x[..., 4 * h: 4 * h + 4]) @ w[:, 4 * h: 4 * h + 4].T for h in range(3))
    with torch.no_grad():
        close(layer(x), expected)
    v = torch.randn(2, 4)
    layer.set_offsets([0, 2], v)  # heads 0 and 2 get v[0] and v[1]; head 1 none; A back to 0
    assert layer.lofit_A is None and set(dict(layer.named_parameters())) == {"weight", "bias", "lofit_v"}
    shifted = x.clone()
    shifted[..., 0:4] += v[0]
    shifted[..., 8:12] += v[1]
    with torch.no_grad():
        close(layer(x), shifted @ w.T + b)
        close(layer.offset(), w[:, 0:4] @ v[0] + w[:, 8:12] @ v[1])


def test_a_and_v_zero_is_the_base_model_and_the_code_s_init_is_not() -> None:
    base = logits(tiny_llama())
    model, method = lofit(a_init="zeros")
    assert method.identity_at_init
    close(logits(model), base, atol=0)
    model, method = lofit(heads=["L0H1", "L1H2"], v_init="zeros")
    assert method.identity_at_init
    close(logits(model), base, atol=0)
    model, method = lofit()  # A ~ N(0, 1e-3) as the official code: close to, but not, the base model
    assert not method.identity_at_init
    assert 0 < (logits(model) - base).abs().max() < 1e-2
    a = torch.cat([m.lofit_A.detach().flatten() for m in layers(model)])
    assert 0.8e-3 < float(a.std()) < 1.2e-3 and abs(float(a.mean())) < 2e-4


def test_adapters_disabled_gives_base_logits_in_both_steps() -> None:
    base = logits(tiny_llama())
    for cfg in ({"init_std": 0.1}, {"heads": ["L0H0", "L1H3"], "init_std": 0.1}):
        model, _ = lofit(**cfg)
        adapted = logits(model)
        assert (adapted - base).abs().max() > 1e-3
        with adapters_disabled(model):
            close(logits(model), base, atol=EXACT)
        close(logits(model), adapted, atol=0)


# --- what trains in each step ------------------------------------------------------------------------------
def test_step_1_trains_a_on_every_head_with_an_l1_term() -> None:
    model, method = lofit(l1_lambda=0.01, init_std=0.1)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"model.layers.{i}.self_attn.o_proj.lofit_A" for i in range(2)}
    assert sum(p.numel() for p in trainable.values()) == 2 * HEADS * D
    [group] = method.parameter_groups(model)
    assert group.name == "lofit_A" and group.lr_scale == 1.0
    ctx = StepContext(model, {}, step=0, max_steps=4)
    l1 = method.extra_loss(ctx)
    close(l1, 0.01 * sum(p.detach().abs().sum() for p in trainable.values()), atol=0)
    l1.backward()
    for p in trainable.values():
        close(p.grad, 0.01 * torch.sign(p.detach()), atol=0)
    assert build_method({"name": "lofit", "l1_lambda": 0.0}).extra_loss(ctx) is None


def test_step_2_trains_only_the_selected_heads_v_k_times_d_head() -> None:
    model, method = lofit(heads=["L1H3", "L0H1", "L1H0"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n: tuple(p.shape) for n, p in trainable.items()} == {
        "model.layers.0.self_attn.o_proj.lofit_v": (1, D), "model.layers.1.self_attn.o_proj.lofit_v": (2, D)}
    assert sum(p.numel() for p in trainable.values()) == 3 * D
    assert [m.heads for m in layers(model)] == [[1], [0, 3]]
    assert all(m.lofit_A is None for m in layers(model))
    [group] = method.parameter_groups(model)
    assert group.name == "lofit_v" and group.lr_scale == 2.0 and len(group.params) == 2
    assert method.extra_loss(StepContext(model, {}, step=0, max_steps=4)) is None
    model(input_ids=ids()).logits.square().mean().backward()  # v reaches the loss through W_h v
    assert all(p.grad.abs().sum() > 0 for p in trainable.values())
    state = method.adapter_state(model)
    assert set(state) == set(trainable) and sum(t.numel() for t in state.values()) == 3 * D


def test_heads_are_ranked_by_the_norm_of_a_with_ties_broken_by_index() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.0], [0.9, 0.1, 0.5, 0.7]])
    assert rank_heads(scores, 5) == [(0, 1), (1, 0), (1, 3), (0, 0), (0, 2)]
    assert rank_heads(scores, 5) == rank_heads(scores.clone(), 5)
    assert rank_heads(torch.zeros(2, 4), 3) == [(0, 0), (0, 1), (0, 2)]

    model, method = lofit(top_k=3)
    a = [torch.zeros(HEADS, D), torch.zeros(HEADS, D)]
    a[0][2, 0], a[1][1, 5], a[1][3] = 3.0, -4.0, 1.0  # norms: L0H2 3, L1H1 4, L1H3 sqrt(16) = 4
    with torch.no_grad():
        for m, t in zip(layers(model), a):
            m.lofit_A.copy_(t)
    close(method.head_scores(model), torch.stack([t.norm(dim=-1) for t in a]), atol=0)
    assert method.select_heads(model) == ["L1H1", "L1H3", "L0H2"]
    assert method.stage == 2 and method.config.heads == ["L1H1", "L1H3", "L0H2"]
    assert [m.heads for m in layers(model)] == [[2], [1, 3]]


@pytest.mark.parametrize(("cfg", "k"), [({}, 1), ({"top_ratio": 0.5}, 4), ({"top_k": 3}, 3), ({"top_k": 8}, 8)])
def test_k_defaults_to_a_tenth_of_all_heads_floored(cfg: dict, k: int) -> None:
    model, method = lofit(**cfg)  # 8 heads: floor(0.8) = 0, so at least 1
    assert len(method.select_heads(model)) == k
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == k * D


def test_step_1_length_and_the_schedule_that_leaves_no_step_2() -> None:
    assert build_method({"name": "lofit"}).stage1_end(6) == 3
    assert build_method({"name": "lofit", "stage1_fraction": 0.5}).stage1_end(5) == 2
    assert build_method({"name": "lofit", "stage1_steps": 4}).stage1_end(10) == 4
    model, method = lofit(stage1_steps=4)
    with pytest.raises(LmadaptError, match="takes 4 of the run's 4 steps, leaving none for step 2"):
        method.extra_loss(StepContext(model, {}, step=0, max_steps=4))


# --- through the loop ------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_run_does_both_steps(run_config, monkeypatch, precision: str) -> None:
    scores, stepped = [], []
    select = Lofit.select_heads

    def recording(self, model):
        scores.append(self.head_scores(model))
        return select(self, model)

    def after_step(self, ctx):  # the group that each optimizer step just updated, at the lr it used
        stepped.extend((g["name"], g["lr"]) for g in ctx.optimizer.param_groups)

    monkeypatch.setattr(Lofit, "select_heads", recording)
    monkeypatch.setattr(Lofit, "after_optimizer_step", after_step)
    run_config["method"] = {"name": "lofit", "top_k": 3, "stage1_steps": 2}
    run_config["train"].update({"max_steps": 4, "precision": precision})
    result = train(run_config, progress=False)
    assert stepped == [("lofit_A", 5e-3)] * 2 + [("lofit_v", 1e-2)] * 2  # step 2 at stage2_lr_scale x train.lr
    [at_switch] = scores
    heads = [f"L{lay}H{h}" for lay, h in rank_heads(at_switch, 3)]
    config = json.loads((result.adapter_dir / CONFIG_NAME).read_text())
    assert config["lofit_stage"] == 2 and config["lofit_heads"] == heads
    assert config["lmadapt"]["method"]["heads"] == heads
    saved = load_file(result.adapter_dir / WEIGHTS_NAME)
    assert all(k.endswith(".lofit_v") for k in saved) and sum(t.numel() for t in saved.values()) == 3 * D
    assert all(t.dtype == torch.float32 and torch.count_nonzero(t) == t.numel() for t in saved.values())
    fresh = tiny_llama()
    method = load_adapter(fresh, result.adapter_dir, force=True)
    assert method.stage == 2 and method.config.heads == heads
    assert all(torch.equal(p, saved[k]) for k, p in method.adapter_state(fresh).items())
    assert (logits(fresh) - logits(tiny_llama())).abs().max() > 1e-4


@pytest.mark.usefixtures("one_thread")
def test_a_run_killed_before_or_after_the_switch_resumes_exactly(run_config, tmp_path: Path) -> None:
    run_config["method"] = {"name": "lofit", "top_k": 3, "stage1_steps": 3}
    run_config["train"].update({"max_steps": 6, "save_every": 2})
    whole = train({**run_config, "output_dir": str(tmp_path / "whole")}, progress=False)
    expected = load_file(whole.adapter_dir / WEIGHTS_NAME)
    heads = json.loads((whole.adapter_dir / CONFIG_NAME).read_text())["lofit_heads"]
    for kill in (3, 5):  # newest checkpoint: step 2 (step 1, A) or step 4 (step 2, v, after the switch at 3)
        cfg = {**run_config, "output_dir": str(tmp_path / f"cut{kill}")}
        with killed_at(kill), pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
        state = json.loads((tmp_path / f"cut{kill}/checkpoints/step-000000{kill - 1}/trainer_state.json").read_text())
        assert state["method_state"]["stage"] == (1 if kill == 3 else 2)
        resumed = train(cfg, resume=True, progress=False)
        got = load_file(resumed.adapter_dir / WEIGHTS_NAME)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), kill
        assert json.loads((resumed.adapter_dir / CONFIG_NAME).read_text())["lofit_heads"] == heads


# --- merging -----------------------------------------------------------------------------------------------
def test_v_merges_into_an_o_proj_bias_exactly(tmp_path: Path) -> None:
    biased = {"attention_bias": True}
    model, method = lofit(biased, heads=["L0H2", "L1H0", "L1H3"], init_std=0.1)
    base, unmerged = logits(tiny_llama(**biased)), logits(model)
    assert (unmerged - base).abs().max() > 1e-3
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None)
    fresh = tiny_llama(**biased)
    load_adapter(fresh, tmp_path / "a")
    close(logits(fresh), unmerged, atol=0)

    b0 = {n: m.bias.detach().clone() for n, m in modules_of_type(model, LofitOProj)}
    method.merge(model)
    for n, m in modules_of_type(model, LofitOProj):
        close(m.bias, b0[n] + m.offset(), atol=0)  # b + sum_h o_proj.weight[:, head h] @ v_h
    close(logits(model), unmerged, atol=0)
    method.merge(model)  # a no-op
    close(logits(model), unmerged, atol=0)
    with adapters_disabled(model):
        close(logits(model), base)
    method.unmerge(model)
    assert all(torch.allclose(m.bias, b0[n], rtol=0, atol=EXACT) for n, m in modules_of_type(model, LofitOProj))
    close(logits(model), unmerged)

    method.merge(model)
    method.unload(model)
    assert not layers(model) and list(model.state_dict()) == list(tiny_llama(**biased).state_dict())
    model.save_pretrained(tmp_path / "merged")
    close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()), unmerged)


def test_a_merges_into_the_weight_columns_of_a_bias_free_o_proj() -> None:
    model, method = lofit(init_std=0.1)
    base, unmerged = logits(tiny_llama()), logits(model)
    w0 = {n: m.weight.detach().clone() for n, m in modules_of_type(model, LofitOProj)}
    method.merge(model)
    for n, m in modules_of_type(model, LofitOProj):
        close(m.weight, w0[n] * (1 + m.lofit_A.detach()).reshape(-1), atol=0)
    close(logits(model), unmerged)
    with adapters_disabled(model):
        close(logits(model), base)
    method.unmerge(model)
    for n, m in modules_of_type(model, LofitOProj):
        close(m.weight, w0[n], atol=EXACT)


def test_v_cannot_merge_into_a_bias_free_o_proj_and_nothing_changes() -> None:
    model, method = lofit(heads=["L0H2", "L1H1"], init_std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model)
    with pytest.raises(LmadaptError, match=r"cannot merge into model\.layers\.0\.self_attn\.o_proj \(and 1 more\)"
                                           r".*needs a bias on o_proj"):
        method.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    close(logits(model), expected, atol=0)
    assert not Lofit.mergeable  # `lmadapt merge` refuses it before loading anything


# --- bf16 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [1, 2])
def test_bf16_is_fp32_within_bf16_tolerance_and_grads_stay_fp32(step: int) -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    layer = LofitOProj(base, 4, 16)
    if step == 1:
        layer.set_scales(torch.randn(4, 16) * 0.5)
    else:
        layer.set_offsets([1, 3], torch.randn(2, 16))
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = layer(x)
        assert (ref - base(x)).abs().max() > 0.1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = layer(x)
        assert auto.dtype == torch.bfloat16
        close(auto.float(), ref, atol=BF16_LAYER_RTOL * float(ref.abs().max()))

    heads = {} if step == 1 else {"heads": ["L0H1", "L1H2"]}
    model, _ = lofit(init_std=0.05, **heads)
    ref = logits(model)
    model.to(torch.bfloat16)  # a bf16-stored base; the LoFiT parameters kept in fp32 as training keeps them
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    got = logits(model)
    assert got.dtype == torch.bfloat16
    close(got.float(), ref, atol=BF16_LOGITS_ATOL)
    model(input_ids=ids()).logits.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


# --- config and errors -------------------------------------------------------------------------------------
def test_config_check_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        build_method({"name": "lofit", "top_k": 0, "top_ratio": 1.5, "heads": ["3.5"], "stage1_steps": 0,
                      "stage1_fraction": 1.0, "l1_lambda": -1, "stage2_lr_scale": 0, "init_std": 0,
                      "output_projections": []})
    for needle in ("top_k: must be >= 1", "top_ratio", "'3.5' is not 'L<layer>H<head>'", "stage1_steps",
                   "stage1_fraction", "l1_lambda", "stage2_lr_scale", "init_std", "output_projections"):
        assert needle in str(err.value), needle


@pytest.mark.parametrize(("cfg", "match"), [
    ({"heads": ["L2H0", "L0H4"]}, r"heads L2H0, L0H4 do not exist: the model has 2 adapted layers \(L0..L1\) of 4"),
    ({"top_k": 9}, "top_k=9 is more than the model's 8 heads"),
    ({"output_projections": ["down_proj"]}, r"4 heads x 16 = 64 values; model\.layers\.0\.mlp\.down_proj \(in_"),
])
def test_apply_names_what_does_not_fit_the_model(cfg: dict, match: str) -> None:
    method, model = build_method({"name": "lofit", **cfg}), tiny_llama()
    with pytest.raises(LmadaptError, match=match):
        method.apply(model)
    assert not layers(model)  # refused before any module was swapped


def test_a_step_1_state_does_not_load_into_step_2() -> None:
    model, method = lofit()
    state = method.adapter_state(model)
    assert set(state) == {f"model.layers.{i}.self_attn.o_proj.lofit_A" for i in range(2)}
    other, method2 = lofit(heads=["L0H0"])
    with pytest.raises(KeyError, match=r"lofit is in step 2"):
        method2.load_adapter_state(other, state)
