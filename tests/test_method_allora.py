"""ALLoRA against its formula: LoRA with scale 1 and no dropout, whose optimizer step of each row theta (of A and
of B) is scaled by c(theta_old) = 1 / sqrt(||theta_old||^2 + 1/eta^2); PEFT loads its files as a plain LoRA; the
real loop (gradient accumulation, clipping, fp32 and bf16) rescales every step and resumes exactly.

Tolerances follow the dtype (fp32 here, the adapter's parameters are fp32 in every precision)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest
import torch
from conftest import interrupted_at as ctrl_c_at
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from lmadapt.adapters.format import load_adapter, read_adapter_info, save_adapter
from lmadapt.errors import ConfigError
from lmadapt.methods import StepContext, allora, build_method
from lmadapt.methods.allora import Allora, step_scale
from lmadapt.methods.lora import LoraLinear
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.tree import modules_of_type
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama

ATOL = 1e-5  # fp32 logits after a few matmuls
STEP_ATOL, STEP_RTOL = 1e-7, 1e-6  # fp32 parameters after one step, against the formula in float64


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=ids()).logits


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def close_step(a: torch.Tensor, b: torch.Tensor) -> None:
    """fp32 parameters against float64 values: fp32 rounding relative to their size."""
    torch.testing.assert_close(a.double(), b, atol=STEP_ATOL, rtol=STEP_RTOL)


def applied(**cfg: object) -> tuple[nn.Module, Allora]:
    method = build_method({"name": "allora", "r": 4, "eta": 2.0, **cfg})
    model = tiny_llama()
    torch.manual_seed(1)
    method.apply(model)
    return model, method


def c_by_hand(theta: torch.Tensor, eta: float, granularity: str) -> torch.Tensor:
    """1 / sqrt(||theta||^2 + 1/eta^2) in float64, per row (rows, 1) or per matrix."""
    t = theta.double()
    sq = t.square().sum(dim=1, keepdim=True) if granularity == "row" else t.square().sum()
    return 1.0 / torch.sqrt(sq + 1.0 / eta**2)


def hooked_step(model: nn.Module, method: Allora, optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step between the method's hooks, as the loop makes it."""
    ctx = StepContext(model, {}, step=0, max_steps=1, optimizer=optimizer)
    method.before_optimizer_step(ctx)
    optimizer.step()
    method.after_optimizer_step(ctx)


def known_gradients(model: nn.Module, method: Allora) -> dict[nn.Parameter, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    grads = {}
    for g in method.parameter_groups(model):
        for p in g.params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.3
            grads[p] = p.grad.clone()
    return grads


def params(model: nn.Module, method: Allora) -> list[nn.Parameter]:
    return [p for g in method.parameter_groups(model) for p in g.params]


# --- the forward: LoRA with scale 1, no dropout ----------------------------------------------------------
def test_adapter_path_has_no_dropout_and_scale_one() -> None:
    model, _ = applied(init="random")
    layers = [m for _, m in modules_of_type(model, LoraLinear)]
    assert len(layers) == 14
    for layer in layers:
        assert layer.scaling == 1.0
        assert not any(isinstance(m, nn.Dropout) for m in layer.modules())
    model.train()  # where LoRA's dropout would act
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        close(layer(x), x @ layer.weight.T + x @ layer.lora_A.T @ layer.lora_B.T)
        close(layer(x), layer(x), atol=0)


def test_output_at_init_equals_the_base_model() -> None:
    model, method = applied()
    assert method.identity_at_init
    assert all(torch.count_nonzero(m.lora_B) == 0 and m.lora_A.abs().max() > 0
               for _, m in modules_of_type(model, LoraLinear))
    close(logits(model), logits(tiny_llama()), atol=1e-6)


# --- c(theta) --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["row", "matrix"])
@pytest.mark.parametrize("eta", [0.3, 2.0, 7.5])
def test_c_at_zero_is_eta_and_follows_the_formula(granularity: str, eta: float) -> None:
    assert torch.equal(step_scale(torch.zeros(5, 3), eta, granularity).expand(5, 1),
                       torch.full((5, 1), eta))
    theta = torch.randn(6, 9, generator=torch.Generator().manual_seed(0)) * torch.arange(6.0)[:, None]
    got = step_scale(theta, eta, granularity)
    assert got.shape == ((6, 1) if granularity == "row" else ())
    torch.testing.assert_close(got.double(), c_by_hand(theta, eta, granularity), atol=0, rtol=1e-6)


# --- one step through the hooks ----------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.3, 2.0])
def test_one_sgd_step_from_b_zero_is_minus_lr_eta_g(eta: float) -> None:
    model, method = applied(eta=eta, target_modules=["q_proj", "down_proj"])
    a0 = {id(m.lora_A): m.lora_A.detach().clone() for _, m in modules_of_type(model, LoraLinear)}
    grads = known_gradients(model, method)
    lr = 0.1
    hooked_step(model, method, torch.optim.SGD(params(model, method), lr=lr))
    for _, m in modules_of_type(model, LoraLinear):
        close_step(m.lora_B, -lr * eta * grads[m.lora_B].double())
        old = a0[id(m.lora_A)]
        close_step(m.lora_A, old.double() - lr * c_by_hand(old, eta, "row") * grads[m.lora_A].double())


def test_one_adamw_step_from_b_zero_is_eta_times_adams_step() -> None:
    """AdamW's first step (m^ = g, v^ = g^2) is -lr g / (|g| + eps); ALLoRA multiplies it by c(0) = eta for B."""
    eta, lr, eps = 2.0, 1e-2, 1e-8
    model, method = applied(eta=eta, target_modules=["v_proj"])
    grads = known_gradients(model, method)
    hooked_step(model, method, torch.optim.AdamW(params(model, method), lr=lr, eps=eps, weight_decay=0.0))
    for _, m in modules_of_type(model, LoraLinear):
        g = grads[m.lora_B].double()
        close_step(m.lora_B, -eta * lr * g / (g.abs() + eps))


def _planted_rows(norms: list[float], cols: int) -> torch.Tensor:
    """Rows of the given l2 norms."""
    rows = torch.randn(len(norms), cols, generator=torch.Generator().manual_seed(3))
    return rows / rows.norm(dim=1, keepdim=True) * torch.tensor(norms)[:, None]


@pytest.mark.parametrize("granularity", ["row", "matrix"])
def test_each_row_steps_by_its_own_c_and_larger_rows_take_smaller_steps(granularity: str) -> None:
    eta, lr = 2.0, 0.05
    model, method = applied(eta=eta, granularity=granularity, target_modules=["q_proj"], init="random")
    layer = model.model.layers[0].self_attn.q_proj
    a_norms, b_norms = [0.0, 0.5, 1.0, 4.0], [0.1 * i for i in range(layer.out_features)]
    with torch.no_grad():
        layer.lora_A.copy_(_planted_rows(a_norms, layer.in_features))
        layer.lora_B.copy_(_planted_rows(b_norms, 4))
    old = {id(p): p.detach().clone() for p in params(model, method)}
    shared_a, shared_b = torch.randn(layer.in_features), torch.randn(4)  # every row gets the same gradient
    known_gradients(model, method)
    layer.lora_A.grad, layer.lora_B.grad = shared_a.expand(4, -1).clone(), shared_b.expand(layer.out_features, -1).clone()
    hooked_step(model, method, torch.optim.SGD(params(model, method), lr=lr))
    for p in params(model, method):
        before = old[id(p)]
        expected = before.double() - lr * c_by_hand(before, eta, granularity) * p.grad.double()
        close_step(p, expected)
    step = (layer.lora_A.detach() - old[id(layer.lora_A)]).norm(dim=1) / (lr * shared_a.norm())
    if granularity == "row":
        by_norm = 1.0 / torch.sqrt(torch.tensor(a_norms).double() ** 2 + 1.0 / eta**2)
        torch.testing.assert_close(step.double(), by_norm, atol=0, rtol=1e-5)
        assert step[0] == pytest.approx(eta, rel=1e-6) and bool((step[1:] < step[:-1]).all())
    else:  # one c for the whole matrix, from its Frobenius norm
        frob = torch.tensor(sum(n * n for n in a_norms)).double()
        torch.testing.assert_close(step.double(), (1.0 / torch.sqrt(frob + 1.0 / eta**2)).expand(4), atol=0,
                                   rtol=1e-5)


def test_after_without_before_is_refused() -> None:
    model, method = applied()
    with pytest.raises(RuntimeError, match="without before_optimizer_step"):
        method.after_optimizer_step(StepContext(model, {}, 0, 1))


# --- config ------------------------------------------------------------------------------------------------
def test_eta_is_required_and_lora_knobs_are_not_options() -> None:
    with pytest.raises(ConfigError, match="method.eta: required"):
        build_method({"name": "allora", "r": 4})
    with pytest.raises(ConfigError, match=r"method.eta: must be > 0, got 0"):
        build_method({"name": "allora", "eta": 0})
    with pytest.raises(ConfigError) as exc:
        build_method({"name": "allora", "eta": 1.0, "alpha": 8, "dropout": 0.1, "granularity": "column"})
    said = str(exc.value)
    assert "method.alpha: unknown key" in said and "method.dropout: unknown key" in said
    assert "method.granularity" in said


# --- files: a plain PEFT LoRA with scale 1, reloaded by lmadapt as ALLoRA ---------------------------------
def test_peft_loads_the_folder_as_lora_and_lmadapt_loads_it_as_allora(tmp_path: Path) -> None:
    model, method = applied(init="random", eta=1.5, granularity="matrix", target_modules=["q_proj", "up_proj"])
    expected = logits(model)
    assert (expected - logits(tiny_llama())).abs().max() > 1e-3
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=fingerprint(tiny_llama()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation warnings inside PEFT
        peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    assert peft_model.peft_config["default"].lora_alpha == 4 and peft_model.peft_config["default"].lora_dropout == 0
    close(logits(peft_model), expected)

    info = read_adapter_info(tmp_path / "a")
    assert info.config["peft_type"] == "LORA" and "lmadapt" not in info.config
    assert info.source == "lmadapt" and info.method["name"] == "allora"
    fresh = tiny_llama()
    reloaded = load_adapter(fresh, tmp_path / "a")
    assert isinstance(reloaded, Allora)
    assert (reloaded.config.eta, reloaded.config.granularity) == (1.5, "matrix")
    close(logits(fresh), expected)


def test_a_peft_lora_with_alpha_r_still_loads_as_plain_lora(tmp_path: Path) -> None:
    model, method = applied(init="random", target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_llama(), _saved(model, method, tmp_path / "a"))
        peft_model.save_pretrained(str(tmp_path / "p"))  # PEFT's own file: no lmadapt record
    assert not Allora.claims_peft(read_adapter_info(tmp_path / "p").config)
    assert load_adapter(tiny_llama(), tmp_path / "p").name == "lora"


def _saved(model: nn.Module, method: Allora, path: Path) -> Path:
    return save_adapter(model, method, path, base_model="tiny", base_fingerprint=fingerprint(tiny_llama()))


# --- through the real loop -----------------------------------------------------------------------------
MAX_NORM = 1e-3  # small enough that the loop clips every step


def _loop_config(run_config: dict, out: Path, precision: str, method: dict | None = None) -> dict:
    cfg = {**run_config, "output_dir": str(out)}
    cfg["method"] = method or {"name": "allora", "r": 4, "eta": 2.0, "target_modules": ["q_proj", "v_proj"]}
    cfg["train"] = {**run_config["train"], "grad_accum": 2, "batch_size": 4, "max_steps": 6, "save_every": 2,
                    "max_grad_norm": MAX_NORM, "precision": precision, "weight_decay": 0.01}
    return cfg


@contextlib.contextmanager
def recorded_steps(records: list[dict]):
    """Record, around each optimizer step: the step, its micro-batch count, the gradient norm the optimizer sees,
    the parameters before it, after AdamW, and after ALLoRA's rescaling."""
    before_hook, after_hook = Allora.before_optimizer_step, Allora.after_optimizer_step

    def before(self, ctx):
        before_hook(self, ctx)
        grads = [p.grad for g in ctx.optimizer.param_groups for p in g["params"] if p.grad is not None]
        records.append({"step": ctx.step, "micro": len(ctx.micro_batches), "params": [p for p, _ in self._before_step],
                        "grad_norm": float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))),
                        "old": [o.clone() for _, o in self._before_step]})

    def after(self, ctx):
        records[-1]["adamw"] = [p.detach().clone() for p in records[-1]["params"]]
        after_hook(self, ctx)
        records[-1]["new"] = [p.detach().clone() for p in records[-1]["params"]]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Allora, "before_optimizer_step", before)
        mp.setattr(Allora, "after_optimizer_step", after)
        yield


def adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(run.adapter_dir / "adapter_model.safetensors"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_loop_rescales_every_step_after_accumulation_and_clipping(run_config, tmp_path, precision):
    records: list[dict] = []
    with recorded_steps(records):
        run = train(_loop_config(run_config, tmp_path / "allora", precision), progress=False)
    assert [(r["step"], r["micro"]) for r in records] == [(s, 2) for s in range(6)]
    for r in records:
        assert r["grad_norm"] <= MAX_NORM * (1 + 1e-5)  # the hooks see the clipped gradients
        for old, adamw, new in zip(r["old"], r["adamw"], r["new"], strict=True):
            assert not torch.equal(adamw, old)
            expected = old.double() + c_by_hand(old, 2.0, "row") * (adamw.double() - old.double())
            close_step(new, expected)
    b_first = [(new, adamw) for new, adamw, p in zip(records[0]["new"], records[0]["adamw"], records[0]["params"],
                                                      strict=True) if p.shape[1] == 4]
    assert b_first and all(torch.allclose(new, 2.0 * adamw, rtol=1e-6, atol=0) for new, adamw in b_first)

    # c forced to 1: exactly the plain LoRA run with scale 1 (alpha = r) and no dropout; ALLoRA differs from it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(allora, "step_scale", lambda theta, eta, granularity: torch.ones(()))
        unscaled = train(_loop_config(run_config, tmp_path / "unscaled", precision), progress=False)
    lora = train(_loop_config(run_config, tmp_path / "lora", precision,
                              {"name": "lora", "r": 4, "alpha": 4, "dropout": 0.0,
                               "target_modules": ["q_proj", "v_proj"]}), progress=False)
    plain, ours = adapter(lora), adapter(unscaled)
    assert plain.keys() == ours.keys() and all(torch.equal(plain[k], ours[k]) for k in plain)
    scaled = adapter(run)
    for k in scaled:
        assert not torch.equal(scaled[k], plain[k])
        if "lora_B" in k:  # B left zero at eta = 2 times LoRA's speed: far from the unscaled run
            assert (scaled[k] - plain[k]).norm() > 0.1 * plain[k].norm()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_exact(run_config, tmp_path, precision):
    whole = train(_loop_config(run_config, tmp_path / "whole", precision), progress=False)
    cut = _loop_config(run_config, tmp_path / "cut", precision)
    with ctrl_c_at(5), pytest.raises(KeyboardInterrupt):
        train(cut, progress=False)
    assert max(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == "step-0000004"
    resumed = train(cut, resume=True, progress=False)
    a, b = adapter(whole), adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.count_nonzero(a[k]) > 0 for k in a if "lora_B" in k)
