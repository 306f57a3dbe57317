"""PiSSA, OLoRA and CorDA: the same start, residual and forward as PEFT on the same weights; the exported adapter is
a plain LoRA of the unmodified base that PEFT and lmadapt load; the own form reloads exactly; CorDA's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.corda import preprocess_corda
from safetensors.torch import load_file

from lmadapt.adapters.format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_adapter,
    read_adapter_info,
    save_adapter,
)
from lmadapt.errors import LmadaptError
from lmadapt.methods import build_method
from lmadapt.methods.corda import context_factors
from lmadapt.methods.lora_layer import LoraLinear
from lmadapt.methods.pissa import principal_factors
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.testing import tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")  # PEFT's notes about PiSSA/CorDA conversions

TARGETS = ["q_proj", "v_proj", "down_proj"]
ATOL = 1e-5


def ids(seed: int = 0, rows: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (rows, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=ids()).logits


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def ours(name: str, **cfg) -> tuple[torch.nn.Module, object]:
    model = tiny_llama()
    method = build_method({"name": name, "r": 4, "alpha": 8, "target_modules": TARGETS, **cfg})
    if method.calibration_batches:
        method.calibrate(model, [{"input_ids": ids(seed, rows=4)} for seed in range(method.calibration_batches)])
    method.apply(model)
    return model, method


def peft_model(init: str, **extra) -> torch.nn.Module:
    cfg = PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **extra)
    model = tiny_llama()
    if init == "corda":
        def run_model() -> None:  # PEFT's hook expects one sample per call
            for seed in range(2):  # the two batches of 4 rows ours() calibrates on
                for row in ids(seed, rows=4):
                    model(input_ids=row[None])
        preprocess_corda(model, cfg, run_model=run_model)
    return get_peft_model(model, cfg)


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable factor, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def same_as_peft(model: torch.nn.Module, peft: torch.nn.Module, factor_atol: float = ATOL) -> None:
    """Our factors and residual weights equal PEFT's; after the same change to the factors, so do the logits.
    ``factor_atol``: CorDA's factors pass through C'^-1, which magnifies fp32 summation-order differences."""
    theirs = dict(peft.named_parameters())
    for name, layer in modules_of_type(model, LoraLinear):
        key = f"base_model.model.{name}"
        close(layer.lora_A, theirs[f"{key}.lora_A.default.weight"], factor_atol)
        close(layer.lora_B, theirs[f"{key}.lora_B.default.weight"], factor_atol)
        close(layer.weight, theirs[f"{key}.base_layer.weight"])
    close(logits(model), logits(peft))
    for name, layer in modules_of_type(model, LoraLinear):  # the same trained factors in both
        key = f"base_model.model.{name}"
        with torch.no_grad():
            layer.lora_A.add_(0.1)
            layer.lora_B.sub_(0.1)
            theirs[f"{key}.lora_A.default.weight"].add_(0.1)
            theirs[f"{key}.lora_B.default.weight"].sub_(0.1)
    assert (logits(model) - logits(tiny_llama())).abs().max() > 1e-3
    close(logits(model), logits(peft))


@pytest.mark.parametrize(("name", "init"), [("pissa", "pissa"), ("olora", "olora")])
def test_start_residual_and_forward_match_peft(name: str, init: str) -> None:
    model, _ = ours(name)
    same_as_peft(model, peft_model(init))


def test_corda_matches_peft_on_the_same_calibration_samples() -> None:
    model, _ = ours("corda", calibration_batches=2)
    peft = peft_model("corda", corda_config=PeftCordaConfig(corda_method="ipm"))
    same_as_peft(model, peft, factor_atol=1e-4)


def test_corda_kpm_matches_peft_and_takes_the_trailing_components() -> None:
    model, _ = ours("corda", calibration_batches=2, mode="kpm")
    peft = peft_model("corda", corda_config=PeftCordaConfig(corda_method="kpm"))
    same_as_peft(model, peft, factor_atol=1e-4)
    w, cov = torch.randn(16, 12), torch.eye(12)
    a_last, b_last = context_factors(w, cov, 3, 1.0, "kpm")
    sv = torch.linalg.svdvals(w)
    close(torch.linalg.svdvals(b_last @ a_last)[:3], sv[-3:], atol=1e-4)  # s = 1: B0 A0 holds them


def test_fast_pissa_is_seeded_and_close_to_the_exact_components() -> None:
    u, _, vh = torch.linalg.svd(torch.randn(48, 32), full_matrices=False)
    w = u @ torch.diag(torch.cat([torch.tensor([40.0, 30, 20, 10]), 0.01 * torch.rand(28)])) @ vh  # a clear gap
    a, b = principal_factors(w, 4, 2.0, niter=4, seed=3)
    a2, b2 = principal_factors(w, 4, 2.0, niter=4, seed=3)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    state = torch.get_rng_state()
    principal_factors(w, 4, 2.0, niter=2, seed=5)
    assert torch.equal(state, torch.get_rng_state()), "the randomized SVD must not move the global RNG"
    ea, eb = principal_factors(w, 4, 2.0)
    close(b @ a, eb @ ea, atol=1e-3)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    close(2.0 * eb @ ea, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-4)


def test_corda_with_identity_covariance_is_pissa() -> None:
    w = torch.randn(20, 16)
    a, b = context_factors(w, torch.eye(16), 4, 2.0, "ipm")
    pa, pb = principal_factors(w, 4, 2.0)
    close(b @ a, pb @ pa)


def test_corda_refuses_bad_covariance_and_missing_calibration() -> None:
    model = tiny_llama()
    method = build_method({"name": "corda", "r": 4, "target_modules": ["q_proj"]})
    method.apply(model)  # no calibrate(): nothing to start from
    with pytest.raises(LmadaptError, match="without calibration"):
        method.parameter_groups(model)
    with pytest.raises(LmadaptError, match="NaN or Inf"):
        context_factors(torch.randn(8, 8), torch.full((8, 8), float("nan")), 2, 1.0, "ipm", "q_proj")


def train_a_little(model: torch.nn.Module, method) -> None:
    model.train()
    opt = torch.optim.AdamW([p for g in method.parameter_groups(model) for p in g.params], lr=1e-2)
    for _ in range(2):
        batch = ids(1)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("name", ["pissa", "olora", "corda"])
def test_switched_off_is_the_base_model_after_training(name: str) -> None:
    model, method = ours(name)
    train_a_little(model, method)
    with adapters_disabled(model):
        close(logits(model), logits(tiny_llama()))
    method.merge(model)
    with adapters_disabled(model):
        close(logits(model), logits(tiny_llama()))


@pytest.mark.parametrize("name", ["pissa", "olora", "corda"])
def test_exported_adapter_is_a_plain_lora_of_the_unmodified_base(name: str, tmp_path: Path) -> None:
    model, method = ours(name, rslora=name == "olora")
    train_a_little(model, method)
    expected = logits(model)
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None, export=True)
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["init_lora_weights"] is True
    assert read_adapter_info(tmp_path / "a").method["name"] == "lora"
    assert all(".init_lora_" not in k for k in load_file(tmp_path / "a" / WEIGHTS_NAME))

    plain = tiny_llama()
    assert load_adapter(plain, tmp_path / "a").name == "lora"
    close(logits(plain), expected)
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    close(logits(peft), expected)


@pytest.mark.parametrize("name", ["pissa", "corda"])
def test_own_form_reloads_exactly_on_the_unmodified_base(name: str, tmp_path: Path) -> None:
    model, method = ours(name)
    train_a_little(model, method)
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None)
    fresh = tiny_llama()
    loaded = load_adapter(fresh, tmp_path / "a")  # corda: no calibration here, the saved start is used
    assert loaded.name == name
    assert torch.equal(logits(fresh), logits(model))
    with adapters_disabled(fresh):
        close(logits(fresh), logits(tiny_llama()))


def test_lmadapt_loads_peft_converted_pissa(tmp_path: Path) -> None:
    """PEFT's own conversion (path_initial_model_for_weight_conversion) gives a plain LoRA lmadapt reads."""
    peft = peft_model("pissa")
    peft.peft_config["default"].init_lora_weights = True  # PEFT's documented recipe: save the start first
    peft.save_pretrained(tmp_path / "init")
    peft.peft_config["default"].init_lora_weights = "pissa"
    perturb(peft)
    expected = logits(peft)
    peft.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model = tiny_llama()
    assert load_adapter(model, tmp_path / "converted").name == "lora"
    close(logits(model), expected)


def test_perturb_moves_only_factors() -> None:
    """The helper above changes trainable factors only (so PEFT's residual stays what PiSSA made)."""
    peft = peft_model("olora")
    before = {n: p.clone() for n, p in peft.named_parameters() if not p.requires_grad}
    perturb(peft)
    assert all(torch.equal(p, before[n]) for n, p in peft.named_parameters() if not p.requires_grad)


def test_unload_without_merge_gives_back_the_base_weights() -> None:
    model, method = ours("pissa")
    train_a_little(model, method)
    method.unload(model)
    for (n, p), (_, q) in zip(model.state_dict().items(), tiny_llama().state_dict().items()):
        close(p, q, atol=1e-6)
