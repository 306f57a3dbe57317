"""BA-LoRA: the three NLG regularisers against their formulas by hand, the schedules at chosen steps, the
response-token selection, the frozen base being the original model, and the method through the real loop
(identical to PiSSA with every lambda at 0, different with them on, bf16)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmadapt.errors import ConfigError
from lmadapt.methods import StepContext, balora, build_method  # noqa: F401  (balora: registration)
from lmadapt.methods.balora import (
    BaLoraConfig,
    consistency_loss,
    consistency_weight,
    diversity_loss,
    focus_weight,
    regularizer_weights,
    response_logits,
    svd_loss,
)
from lmadapt.methods.lora_layer import LoraLinear
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.objectives.causal_lm import causal_lm_loss, forward_inputs
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama

ATOL = 1e-5  # fp32
TARGETS = ["q_proj", "v_proj", "down_proj"]
NO_REGULARISERS = {"lambda_consistency": 0.0, "lambda_diversity": 0.0, "lambda_svd": 0.0}


def batch(prompt: int = 5, pad: int = 3, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows; labels -100 on the first ``prompt`` tokens, and on the last ``pad`` tokens of row 1."""
    ids = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :prompt] = -100
    if pad:
        labels[1, -pad:] = -100
    return {"input_ids": ids, "labels": labels}


def applied(**cfg) -> tuple[torch.nn.Module, object]:
    model = tiny_llama()
    method = build_method({"name": "balora", "r": 4, "alpha": 8, "target_modules": TARGETS, **cfg})
    method.apply(model)
    return model, method


def loop_context(model: torch.nn.Module, mb: dict, step: int = 0, max_steps: int = 10) -> StepContext:
    """A StepContext as Trainer._step builds it: the causal LM outputs and the adapters-off base logits."""
    _, _, outputs = causal_lm_loss(model, mb)
    positions = outputs.logit_positions

    @torch.no_grad()
    def base() -> torch.Tensor:
        extra = {} if positions is None else {"logits_to_keep": positions}
        with adapters_disabled(model):
            return model(**forward_inputs(mb, True), use_cache=False, **extra).logits

    return StepContext(model, mb, step, max_steps, outputs, _base_logits=base)


def rows_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits at every t whose label t + 1 is set, row by row."""
    return torch.stack([logits[b, t] for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
                        if labels[b, t + 1] != -100])


# --- the losses by hand --------------------------------------------------------------------------------
def test_consistency_is_t_squared_kl_of_the_softened_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    z_ft, z_pre, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), 2.0
    kl = [sum(math.exp(a) * (a - b) for a, b in zip(F.log_softmax(z_pre[i] / t, -1).tolist(),
                                                      F.log_softmax(z_ft[i] / t, -1).tolist(), strict=True))
          for i in range(5)]
    assert consistency_loss(z_ft, z_pre, t).item() == pytest.approx(t * t * sum(kl) / 5, rel=1e-5)
    assert consistency_loss(z_pre, z_pre, t).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(("k", "expected"), [(20, -math.log(20)), (5, -math.log(5)), (0, -math.log(260))])
def test_diversity_on_uniform_logits_is_minus_log_k(k: int, expected: float) -> None:
    assert diversity_loss(torch.full((4, 260), 0.7), k).item() == pytest.approx(expected, rel=1e-6)


def test_diversity_renormalises_over_the_top_k() -> None:
    z = torch.tensor([[3.0, 1.0, 0.0, -5.0]])
    q = torch.tensor([3.0, 1.0]).softmax(-1)
    assert diversity_loss(z, 2).item() == pytest.approx(float((q * q.log()).sum()), rel=1e-6)


def test_svd_on_diag_3_1_with_k_1() -> None:
    z = torch.diag(torch.tensor([3.0, 1.0]))
    assert svd_loss(z, k=1, norm="frobenius").item() == pytest.approx(-3 / math.sqrt(10), rel=1e-6)
    assert svd_loss(z, k=1, norm="sum").item() == pytest.approx(-3 / 4, rel=1e-6)
    assert svd_loss(z, k=5, norm="sum").item() == pytest.approx(-1.0, rel=1e-6)  # k clipped to 2
    assert svd_loss(torch.zeros(3, 4), k=1).item() == 0.0  # below the norm floor: skipped


def test_randomized_svd_on_a_large_vocabulary_matches_the_exact_one() -> None:
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(40, 3, generator=g) * torch.tensor([5.0, 2.0, 1.0])) @ torch.randn(3, 5000, generator=g)
    z.requires_grad_(True)
    rng = torch.get_rng_state()
    fast = svd_loss(z, k=2, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    s = torch.linalg.svdvals(z.detach())
    assert fast.item() == pytest.approx(float(-s[:2].sum() / z.detach().norm()), rel=1e-4)
    fast.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert svd_loss(z, k=2, seed=3).item() == fast.item()  # seeded: the same value again


# --- schedules by hand ---------------------------------------------------------------------------------
def test_cosine_consistency_weight_goes_from_lambda_to_a_tenth() -> None:
    assert consistency_weight(0.5, 0, 100) == pytest.approx(0.5)
    assert consistency_weight(0.5, 50, 100) == pytest.approx(0.05 + 0.45 * 0.5)
    assert consistency_weight(0.5, 100, 100) == pytest.approx(0.05)
    assert consistency_weight(0.5, 70, 100, "constant") == 0.5
    assert consistency_weight(0.5, 100, 100, min_ratio=0.0) == pytest.approx(0.0, abs=1e-12)


def test_two_phase_weight_is_zero_then_ramps_then_full() -> None:
    # 100 steps: 0 before step 20, (t - 20) / 5 of it over steps 20..24, full from 25
    assert [focus_weight(1.0, t, 100) for t in (0, 19, 20, 22, 24, 25, 99)] == \
        pytest.approx([0, 0, 0, 0.4, 0.8, 1.0, 1.0])
    assert [focus_weight(2.0, t, 10, 0.0, 0.0) for t in (0, 1)] == [0.0, 2.0]  # a ramp lasts at least a step
    cfg = BaLoraConfig(lambda_consistency=0.1, lambda_diversity=0.2, lambda_svd=0.4)
    assert regularizer_weights(cfg, 22, 100) == pytest.approx(
        (0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 0.22)), 0.08, 0.16))


def test_bad_values_are_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        build_method({"name": "balora", "lambda_svd": -1, "temperature": 0, "svd_k": 0, "top_k_entropy": -2,
                      "warmup_ratio": 1.5, "consistency_min_ratio": 2})
    text = str(err.value)
    for field in ("lambda_svd", "temperature", "svd_k", "top_k_entropy", "warmup_ratio", "consistency_min_ratio"):
        assert f"method.{field}" in text
    with pytest.raises(ConfigError, match="svd_norm"):
        build_method({"name": "balora", "svd_norm": "nuclear"})


# --- which tokens count ----------------------------------------------------------------------------------
@pytest.mark.parametrize("with_positions", [False, True])
def test_response_logits_are_the_rows_that_predict_a_label(with_positions: bool) -> None:
    labels = batch()["labels"]
    full = torch.randn(2, 12, 9)
    expected = rows_by_hand(full, labels)
    if with_positions:
        positions = (labels[:, 1:] != -100).any(0).nonzero().flatten()
        assert torch.equal(response_logits(full[:, positions], labels, positions), expected)
        assert torch.equal(response_logits(full, labels, positions), expected)  # full logits beside positions
    else:
        assert torch.equal(response_logits(full, labels), expected)


@pytest.mark.parametrize("with_positions", [False, True])
def test_prompt_and_padding_logits_change_no_regulariser(with_positions: bool) -> None:
    mb = batch()
    labels = mb["labels"]
    method = build_method({"name": "balora", "warmup_ratio": 0.0, "ramp_ratio": 0.0, "top_k_entropy": 4,
                           "svd_k": 2})
    g = torch.Generator().manual_seed(2)
    ft, pre = torch.randn(2, 12, 9, generator=g), torch.randn(2, 12, 9, generator=g)
    ignored = torch.ones(2, 12, dtype=torch.bool)  # t counts when labels[t + 1] is set; the last t never
    ignored[:, :-1] = labels[:, 1:] == -100
    positions = (labels[:, 1:] != -100).any(0).nonzero().flatten() if with_positions else None

    def loss(ft: torch.Tensor, pre: torch.Tensor) -> float:
        at = (lambda z: z[:, positions]) if with_positions else (lambda z: z)
        out = SimpleNamespace(logits=at(ft), logit_positions=positions)
        return method.extra_loss(StepContext(None, mb, 3, 10, out, _base_logits=lambda: at(pre))).item()

    before = loss(ft, pre)
    noise = torch.randn(2, 12, 9, generator=g) * 10 * ignored[..., None]
    assert loss(ft + noise, pre - noise) == before
    response = torch.zeros(2, 12, 9)
    response[0, 6, 3] = 5.0  # a response position: the regularisers see it
    assert loss(ft + response, pre) != before
    z_ft, z_pre = rows_by_hand(ft, labels), rows_by_hand(pre, labels)
    lam1, lam2, lam3 = regularizer_weights(method.config, 3, 10)
    by_hand = lam1 * consistency_loss(z_ft, z_pre, 2.0) + lam2 * diversity_loss(z_ft, 4) + lam3 * svd_loss(z_ft, 2)
    assert before == pytest.approx(float(by_hand), rel=1e-6)


# --- on the tiny model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [5, 1])  # 1: nearly every position counts, the loss keeps all logits
def test_consistency_is_zero_at_the_pissa_start(prompt: int) -> None:
    model, _ = applied()
    ctx = loop_context(model, batch(prompt=prompt))
    assert (ctx.outputs.logit_positions is None) == (prompt == 1)
    z_ft = response_logits(ctx.outputs.logits, ctx.batch["labels"], ctx.outputs.logit_positions)
    z_pre = response_logits(ctx.base_logits(), ctx.batch["labels"], ctx.outputs.logit_positions)
    assert z_ft.shape[0] == int((ctx.batch["labels"][:, 1:] != -100).sum())
    assert consistency_loss(z_ft, z_pre, 2.0).item() == pytest.approx(0.0, abs=1e-9)
    torch.testing.assert_close(z_ft, z_pre, atol=ATOL, rtol=0)


def test_base_logits_are_the_original_pretrained_model_after_training() -> None:
    model, method = applied()
    with torch.no_grad():
        for _, layer in modules_of_type(model, LoraLinear):
            f = layer.factors(method.adapter_name)
            f.lora_A.add_(0.05 * torch.randn_like(f.lora_A))
            f.lora_B.add_(0.05 * torch.randn_like(f.lora_B))
    mb = batch(prompt=1)
    ctx = loop_context(model, mb)
    with torch.no_grad():
        original = tiny_llama()(input_ids=mb["input_ids"]).logits
    torch.testing.assert_close(ctx.base_logits(), original, atol=ATOL, rtol=0)
    assert (ctx.outputs.logits - original).abs().max() > 1e-2  # the trained model has moved away from it
    assert method.extra_loss(ctx).item() > 0  # L_CR > 0 dominates once it has


def test_no_base_forward_when_lambda1_is_zero() -> None:
    method = build_method({"name": "balora", "lambda_consistency": 0.0, "warmup_ratio": 0.0})
    out = SimpleNamespace(logits=torch.randn(2, 12, 9), logit_positions=None)

    def refuse() -> torch.Tensor:
        raise AssertionError("base logits asked for with lambda1 = 0")

    assert torch.isfinite(method.extra_loss(StepContext(None, batch(), 5, 10, out, _base_logits=refuse)))
    silent = build_method({"name": "balora", **NO_REGULARISERS})
    assert silent.extra_loss(StepContext(None, batch(), 5, 10, out, _base_logits=refuse)) is None


def test_outputs_without_logits_train_as_pissa_with_a_warning() -> None:
    method = build_method({"name": "balora"})
    values_only = SimpleNamespace(values=torch.zeros(2, 12))
    with pytest.warns(UserWarning, match="no vocabulary logits"):
        assert method.extra_loss(StepContext(None, batch(), 0, 10, values_only)) is None


# --- through the real loop ---------------------------------------------------------------------------------
def run(run_config: dict, path, method: dict, precision: str = "fp32"):
    cfg = {**run_config, "output_dir": str(path), "method": {"r": 4, "alpha": 8, "target_modules": TARGETS, **method},
           "train": {**run_config["train"], "max_steps": 4, "precision": precision}}
    return train(cfg, progress=False)


def adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.adapter_dir / "adapter_model.safetensors"))


@pytest.mark.usefixtures("one_thread")
def test_zero_lambdas_train_exactly_as_pissa_and_nonzero_ones_differ(run_config, tmp_path) -> None:
    pissa = adapter(run(run_config, tmp_path / "pissa", {"name": "pissa"}))
    silent = adapter(run(run_config, tmp_path / "silent", {"name": "balora", **NO_REGULARISERS}))
    assert pissa.keys() == silent.keys() and all(torch.equal(pissa[k], silent[k]) for k in pissa)
    strong = {"lambda_consistency": 0.5, "lambda_diversity": 0.5, "lambda_svd": 0.5, "warmup_ratio": 0.0}
    regularised = adapter(run(run_config, tmp_path / "ba", {"name": "balora", **strong}))
    trained = [k for k in pissa if k.endswith("lora_B.weight")]
    assert trained and all(not torch.equal(pissa[k], regularised[k]) for k in trained)


@pytest.mark.usefixtures("one_thread")
def test_bf16_training_gives_a_finite_loss(run_config, tmp_path) -> None:
    result = run(run_config, tmp_path / "bf16", {"name": "balora", "warmup_ratio": 0.0}, precision="bf16")
    assert result.report["steps"] == 4 and math.isfinite(result.report["final_train_loss"])
