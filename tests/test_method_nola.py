"""NOLA against its formula: seeded bases, the regenerating autograd Function, the saved file and the real loop.

"NOLA: Compressing LoRA using Linear Combination of Random Basis", arXiv:2310.02556. Tolerances follow the
dtype (fp32 ~1e-5, bf16 ~1e-2), not the method.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

from lmadapt.adapters.format import WEIGHTS_NAME, load_adapter, save_adapter
from lmadapt.errors import AdapterError
from lmadapt.methods import (  # importing nola registers it (until methods/__init__ does)
    build_method,
    nola,
)
from lmadapt.methods.nola import (
    NolaConfig,
    NolaLinear,
    basis_chunks,
    module_seed,
    random_basis,
)
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama
from lmadapt.training.loop import Trainer

ATOL = 1e-5
K, L = 24, 40  # basis counts that are no layer width of the tiny Llama (32, 64, 128), so shapes tell them apart
SPEC = {"name": "nola", "r": 4, "alpha": 8, "num_basis_a": K, "num_basis_b": L, "target_modules": ["all-linear"]}


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=ids()).logits


def applied(**overrides: object) -> tuple[nn.Module, nola.Nola]:
    method = build_method({**SPEC, **overrides})
    model = tiny_llama()
    method.apply(model)
    return model, method


def trained(**overrides: object) -> tuple[nn.Module, nola.Nola]:
    """Random b (so both a and b get gradients) and two AdamW steps: both coefficient vectors move."""
    model, method = applied(init="random", **overrides)
    opt = torch.optim.AdamW([p for g in method.parameter_groups(model) for p in g.params], lr=1e-2)
    model.train()
    for _ in range(2):
        model(input_ids=ids(1), labels=ids(1)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, method


def layer(form: str = "code", init: str = "random", **cfg: object) -> tuple[nn.Linear, NolaLinear]:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    config = NolaConfig(r=3, alpha=6.0, num_basis_a=7, num_basis_b=9, form=form, init=init, **cfg)
    return base, NolaLinear(base, config, seed=1234)


def explicit(lay: NolaLinear, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = A0 + sum a_i A_i, B = sum b_j B_j from the stacked bases, by plain autograd."""
    basis_a = random_basis(lay.seed, "A", a.numel(), lay.r, lay.in_features).to(a.dtype)
    basis_b = random_basis(lay.seed, "B", b.numel(), lay.out_features, lay.r).to(b.dtype)
    big_a = torch.einsum("i,ird->rd", a, basis_a)
    if lay.nola_A0 is not None:
        big_a = big_a + lay.nola_A0.to(a.dtype)
    return big_a, torch.einsum("j,jor->or", b, basis_b)


# --- the bases ----------------------------------------------------------------------------------------
def test_same_seed_same_basis_and_its_distribution() -> None:
    one, again = random_basis(7, "A", 64, 4, 32), random_basis(7, "A", 64, 4, 32)
    assert torch.equal(one, again)
    assert not torch.equal(one, random_basis(8, "A", 64, 4, 32))
    assert not torch.equal(one, random_basis(7, "B", 64, 4, 32))
    bound = 1 / math.sqrt(64)  # U(-1, 1) / sqrt(k)
    assert one.abs().max() <= bound and one.abs().max() > 0.99 * bound
    assert one.mean().abs() < 0.02 * bound and one.var().item() == pytest.approx(bound**2 / 3, rel=0.05)


def test_the_chunk_size_does_not_change_the_basis(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = random_basis(3, "B", 10, 5, 6)
    monkeypatch.setattr(nola, "CHUNK_ELEMENTS", 2 * 30)  # two matrices per chunk
    assert [c.shape[0] for c in basis_chunks(3, "B", 10, 5, 6)] == [2] * 5
    assert torch.equal(random_basis(3, "B", 10, 5, 6), whole)


def test_module_seed_is_a_stable_hash_of_the_config_seed_and_the_name() -> None:
    name = "model.layers.0.self_attn.q_proj"
    digest = hashlib.sha256(f"5:{name}".encode()).digest()
    assert module_seed(5, name) == int.from_bytes(digest[:8], "big") >> 1
    assert module_seed(5, name) != module_seed(6, name) != module_seed(5, name.replace("q_", "k_"))
    model, _ = applied(seed=5)
    assert model.model.layers[0].self_attn.q_proj.seed == module_seed(5, name)


def test_a0_is_kaiming_uniform_from_the_seed_and_absent_in_the_paper_form() -> None:
    _, lay = layer()
    _, again = layer()
    assert torch.equal(lay.nola_A0, again.nola_A0)
    assert 0 < lay.nola_A0.abs().max() <= 1 / math.sqrt(6)  # kaiming_uniform(a=sqrt(5)): bound 1/sqrt(d_in)
    _, paper = layer(form="paper", init="default")
    assert paper.nola_A0 is None and torch.count_nonzero(paper.nola_b) == 0
    assert paper.nola_a.std().item() > 0  # a ~ N(0, 1/d_in): random, so b gets a gradient and a does once b moves


def test_default_init_is_zero_coefficients_and_identity() -> None:
    base, lay = layer(init="default")
    assert torch.count_nonzero(lay.nola_a) == 0 and torch.count_nonzero(lay.nola_b) == 0
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(lay(x), base(x))
    model, _ = applied()
    close(logits(model), logits(tiny_llama()), atol=1e-6)


# --- the forward and its gradients --------------------------------------------------------------------
@pytest.mark.parametrize("form", ["code", "paper"])
def test_forward_and_coefficient_gradients_match_the_explicit_formula(form: str) -> None:
    base, lay = layer(form=form)
    x = torch.randn(3, 4, 6)
    a, b = lay.nola_a.detach().clone().requires_grad_(), lay.nola_b.detach().clone().requires_grad_()
    big_a, big_b = explicit(lay, a, b)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ big_a.T @ big_b.T)  # s = alpha / r = 6 / 3
    got = lay(x)
    close(got, expected)
    weights = torch.randn_like(expected)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    close(lay.nola_a.grad, a.grad)
    close(lay.nola_b.grad, b.grad)
    assert a.grad.abs().min() > 0 and b.grad.abs().min() > 0  # every coefficient is checked, none trivially 0
    with torch.no_grad():
        close(lay.delta_weight(), 2.0 * big_b @ big_a)


def test_coefficient_gradients_match_finite_differences_in_float64() -> None:
    _, lay = layer()
    lay.double()
    x = torch.randn(3, 6, dtype=torch.float64)
    a = lay.nola_a.detach().clone().requires_grad_()
    b = lay.nola_b.detach().clone().requires_grad_()
    assert a.dtype == b.dtype == torch.float64

    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return functional_call(lay, {"nola_a": a, "nola_b": b}, (x,))

    assert torch.autograd.gradcheck(forward, (a, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_cached_bases_give_the_same_outputs_and_gradients() -> None:
    _, lay = layer()
    _, cached = layer(cache_basis=True)
    assert lay.basis_A is None and cached.basis_A.shape == (7, 3, 6) and cached.basis_B.shape == (9, 5, 3)
    x = torch.randn(4, 6)
    lay(x).square().sum().backward()
    cached(x).square().sum().backward()
    close(cached(x), lay(x))
    close(cached.nola_a.grad, lay.nola_a.grad)
    close(cached.nola_b.grad, lay.nola_b.grad)


def test_forward_and_backward_leave_the_global_rng_alone() -> None:
    model, method = applied(init="random")  # apply() draws nothing from the global RNG either
    state = torch.get_rng_state()
    model.train()
    model(input_ids=ids(), labels=ids()).loss.backward()
    model.eval()
    logits(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is not None for g in method.parameter_groups(model) for p in g.params)
    again, _ = applied(init="random")
    close(logits(again), logits(model), atol=0)  # the same config builds the same adapter


def test_bf16_with_autocast_and_with_a_bf16_base() -> None:
    model, _ = trained()
    reference = logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = logits(model)
    assert auto.dtype == torch.bfloat16
    close(auto.float(), reference, atol=5e-2)
    model.to(torch.bfloat16)
    for _, m in modules_of_type(model, NolaLinear):
        m.nola_a.data, m.nola_b.data = m.nola_a.float(), m.nola_b.float()  # as the loop keeps adapters in fp32
    stored = logits(model)
    assert stored.dtype == torch.bfloat16
    close(stored.float(), reference, atol=5e-2)
    model.train()
    model(input_ids=ids(), labels=ids()).loss.backward()
    grads = [m.nola_b.grad for _, m in modules_of_type(model, NolaLinear)]
    assert all(g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)


# --- saving, merging ----------------------------------------------------------------------------------
def test_the_file_holds_coefficients_and_seeds_only_and_reloads_exactly(tmp_path: Path) -> None:
    model, method = trained()
    expected = logits(model)
    assert (expected - logits(tiny_llama())).abs().max() > 1e-3
    save_adapter(model, method, tmp_path / "nola", base_model="tiny", base_fingerprint=None)
    saved = load_file(tmp_path / "nola" / WEIGHTS_NAME)
    widths = {d for _, m in modules_of_type(model, NolaLinear) for d in (m.in_features, m.out_features)}
    assert widths == {32, 64, 128} and len(saved) == 3 * 14
    for key, tensor in saved.items():
        assert not widths & set(tensor.shape), f"{key} has a layer-sized dimension: {tuple(tensor.shape)}"
        suffix = key.rsplit(".", 1)[1]
        assert (suffix, tuple(tensor.shape), tensor.dtype) in {
            ("nola_a", (K,), torch.float32), ("nola_b", (L,), torch.float32), ("nola_seed", (1,), torch.int64)}
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "nola")
    close(logits(fresh), expected)


def test_reload_uses_the_stored_seeds_not_the_config_seed() -> None:
    model, method = trained()
    other, other_method = applied(seed=99)  # derives other seeds
    q = "model.layers.0.self_attn.q_proj"
    assert other.get_submodule(q).seed != model.get_submodule(q).seed
    other_method.load_adapter_state(other, method.adapter_state(model))
    assert other.get_submodule(q).seed == model.get_submodule(q).seed
    close(logits(other), logits(model))


def test_a_mismatched_file_is_refused_with_a_reason(tmp_path: Path) -> None:
    model, method = trained()
    state = method.adapter_state(model)
    q = f"{nola.PEFT_PREFIX}model.layers.0.self_attn.q_proj"
    fresh, fresh_method = applied(num_basis_a=K + 1)
    with pytest.raises(ValueError, match=r"q_proj.nola_a: saved shape \(24,\) != model's \(25,\).*num_basis_a"):
        fresh_method.load_adapter_state(fresh, state)
    with pytest.raises(ValueError, match="nola_seed: expected one non-negative int64 seed"):
        method.load_adapter_state(model, {**state, f"{q}.nola_seed": torch.tensor([1.5])})
    with pytest.raises(KeyError, match="1 adapter tensor.*missing.*nola_seed"):
        method.load_adapter_state(model, {k: v for k, v in state.items() if k != f"{q}.nola_seed"})
    save_adapter(model, method, tmp_path / "nola", base_model="tiny", base_fingerprint=None)
    with pytest.raises(AdapterError, match="42 unexpected tensor.*other module names"):
        load_adapter(nn.Sequential(nn.Linear(3, 3)), tmp_path / "nola")


def test_merge_unmerge_and_adapters_disabled() -> None:
    model, method = trained()
    unmerged, base = logits(model), logits(tiny_llama())
    w0 = {n: m.weight.detach().clone() for n, m in modules_of_type(model, NolaLinear)}
    method.merge(model)
    close(logits(model), unmerged)
    for n, m in modules_of_type(model, NolaLinear):
        close(m.weight - w0[n], m.delta_weight(), atol=1e-6)  # W = W0 + s B A
    with adapters_disabled(model):  # switching off a merged adapter takes the update back out
        close(logits(model), base)
    method.unmerge(model)
    for n, m in modules_of_type(model, NolaLinear):
        close(m.weight, w0[n], atol=1e-6)
    with adapters_disabled(model):
        close(logits(model), base, atol=1e-6)  # W0 back up to fp32 rounding of W0 + dW - dW
    close(logits(model), unmerged)


def test_saved_file_is_much_smaller_than_loras_at_the_same_rank(tmp_path: Path) -> None:
    model, method = applied()
    save_adapter(model, method, tmp_path / "nola", base_model="tiny", base_fingerprint=None)
    lora = build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["all-linear"]})
    lora_model = tiny_llama()
    lora.apply(lora_model)
    save_adapter(lora_model, lora, tmp_path / "lora", base_model="tiny", base_fingerprint=None)
    nola_values = sum(t.numel() for t in method.adapter_state(model).values())
    lora_values = sum(t.numel() for t in lora.adapter_state(lora_model).values())
    assert nola_values == 14 * (K + L + 1)  # per module: k + l coefficients and one seed
    assert lora_values == 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # r (d_in + d_out), 7 linears x 2 blocks
    nola_size, lora_size = ((tmp_path / d / WEIGHTS_NAME).stat().st_size for d in ("nola", "lora"))
    assert nola_size < lora_size / 4, (nola_size, lora_size)


# --- the real loop ------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("dtype", "precision"), [("fp32", "fp32"), ("bf16", "bf16"), ("fp32", "bf16")])
def test_training_through_the_loop_and_an_exact_resume(run_config: dict, tmp_path: Path, dtype: str,
                                                       precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32; bf16-stored base (no autocast: the layer casts A and B itself); fp32 base under bf16 autocast.
    Killed after step 5 and resumed from the step-4 checkpoint, the run ends with the same coefficients."""
    run_config["model"]["dtype"] = dtype
    # dropout only in fp32: with a bf16-stored base a resume is not bit-exact with dropout, for LoRA too (lmadapt)
    dropout = 0.1 if dtype == precision == "fp32" else 0.0
    run_config["method"] = {**SPEC, "num_basis_a": 16, "num_basis_b": 16, "dropout": dropout}
    run_config["train"].update({"precision": precision, "save_every": 2, "lr": 2e-2})
    whole = train({**run_config, "output_dir": str(tmp_path / "whole")}, progress=False)
    losses = [h["loss"] for h in whole.loop.history if "loss" in h]
    assert losses[-1] < losses[0]
    saved = load_file(str(whole.adapter_dir / WEIGHTS_NAME))
    assert any(v.abs().max() > 0 for k, v in saved.items() if k.endswith("nola_a"))  # a trains once b has moved

    killed = {**run_config, "output_dir": str(tmp_path / "killed")}
    step = Trainer._step

    def interrupted_after_5(self: Trainer) -> None:
        if self.state["step"] == 5:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "_step", interrupted_after_5)
    with pytest.raises(KeyboardInterrupt):
        train(killed, progress=False)
    monkeypatch.setattr(Trainer, "_step", step)
    resumed = train(killed, resume=True, progress=False)
    again = load_file(str(resumed.adapter_dir / WEIGHTS_NAME))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
