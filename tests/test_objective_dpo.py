"""Objective ``dpo`` (DPO and SimPO): the losses against hand computations on set logits, the chunked
log-probabilities and their gradient against the whole-tensor formula (fp64 and bf16), log 2 at init, the reference
is the adapters-off model, validation reports pair loss, reward accuracy and margin, and LoRA training through
``lmadapt.train`` raises the reward accuracy (and resumes exactly). The ``preference`` data format:
tests/test_preference_data.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import interrupted_at as ctrl_c_at
from conftest import write_jsonl
from safetensors.torch import load_file
from torch import nn

from lmadapt.config import ConfigError
from lmadapt.data import Batcher, DataConfig, load_splits
from lmadapt.errors import LmadaptError
from lmadapt.methods import build_method
from lmadapt.objectives.base import build_objective
from lmadapt.objectives.preference import DPO, DPOConfig, response_logps, token_logps
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama, tiny_tokenizer
from lmadapt.training.config import TrainConfig
from lmadapt.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
LOG2 = math.log(2)


# ------------------------------------------------------------------------------------------------ helpers

def pair_rows(n: int, chosen: str = " yes", rejected: str = " no") -> list[dict]:
    return [{"prompt": f"Question {i}: is it fine?", "chosen": chosen, "rejected": rejected} for i in range(n)]


def pair_batch(rows: list[dict], tmp_path: Path, **data) -> dict:
    """One collated micro-batch of all ``rows`` (padded, in file order is not promised: pairs are)."""
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, rows)
    tok = tiny_tokenizer()
    train_set, _, _ = load_splits(DataConfig(train=[str(path)], **data), tok)
    batcher = Batcher(train_set, batch_size=len(rows), max_length=1024, packing=False, group_by_length=False,
                      pad_id=tok.pad_token_id, seed=0)
    return batcher.collate(batcher.batches(0)[0])


def swapped(batch: dict) -> dict:
    """The same pairs with chosen and rejected exchanged (rows are chosen first, then rejected)."""
    n = batch["pairs"]
    return {k: torch.cat([v[n:], v[:n]]) if torch.is_tensor(v) and v.dim() == 2 else v for k, v in batch.items()}


def lora_model(seed: int = 0) -> nn.Module:
    model = tiny_llama(seed=seed)
    build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}).apply(model)
    return model


def perturb_lora(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


class FixedLogits(nn.Module):
    """A 'model' whose logits are given: (B, L, V), whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.logits)


def log_softmax_by_hand(row: list[float], k: int) -> float:
    return row[k] - math.log(sum(math.exp(x) for x in row))


# Two pairs' toy: sequences [prompt, a, b] over a vocabulary of 4; the response is tokens 1 and 2 (a 2-token
# response), except the second pair's rejected sequence, whose response is only its last token.
IDS = torch.tensor([[0, 1, 2], [0, 3, 1], [0, 2, 2], [0, 3, 3]])  # chosen 1, chosen 2, rejected 1, rejected 2
LABELS = torch.tensor([[-100, 1, 2], [-100, 3, 1], [-100, 2, 2], [-100, -100, 3]])
TOY = {"input_ids": IDS, "labels": LABELS, "pairs": 2}
POLICY = torch.tensor([[[0.5, 1.0, -0.2, 0.1], [0.3, -1.0, 2.0, 0.0], [0, 0, 0, 0]],
                       [[1.0, 0.0, 0.5, 1.5], [0.2, 0.8, -0.5, 0.0], [0, 0, 0, 0]],
                       [[-0.3, 0.4, 0.9, 0.0], [1.1, 0.0, 0.2, -0.7], [0, 0, 0, 0]],
                       [[0.0, 0.0, 0.0, 0.0], [0.6, -0.4, 0.1, 3.0], [0, 0, 0, 0]]])
REFERENCE = torch.tensor([[[0.1, 0.2, 0.0, 0.3], [0.0, 0.5, 0.4, -0.2], [0, 0, 0, 0]],
                          [[0.4, -0.3, 0.2, 0.9], [0.0, 0.1, 0.0, 0.3], [0, 0, 0, 0]],
                          [[0.2, 0.2, 0.6, -0.1], [0.7, 0.3, 0.0, 0.0], [0, 0, 0, 0]],
                          [[0.5, 0.0, 0.1, 0.0], [0.2, 0.0, 0.4, 0.8], [0, 0, 0, 0]]])


def toy_logps(logits: torch.Tensor) -> tuple[list[float], list[int]]:
    """Per sequence: the summed response log-probability and the response length, by hand."""
    sums, counts = [], []
    for b in range(4):
        total, n = 0.0, 0
        for t in range(2):  # position t predicts token t + 1
            target = int(LABELS[b, t + 1])
            if target != -100:
                total += log_softmax_by_hand(logits[b, t].tolist(), target)
                n += 1
        sums.append(total)
        counts.append(n)
    return sums, counts


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------------------ the losses

def test_dpo_loss_is_the_hand_computation_on_a_two_token_toy():
    beta = 0.7
    objective = DPO(DPOConfig(beta=beta), reference=FixedLogits(REFERENCE))
    out = objective.loss(FixedLogits(POLICY), TOY)
    pi, _ = toy_logps(POLICY)
    ref, _ = toy_logps(REFERENCE)
    deltas = [(pi[k] - ref[k]) - (pi[k + 2] - ref[k + 2]) for k in range(2)]
    assert out.count == 2
    assert out.loss.item() == pytest.approx(sum(-log_sigmoid(beta * d) for d in deltas), rel=1e-6)
    assert out.metrics["rewards/chosen"] == pytest.approx(sum(beta * (pi[k] - ref[k]) for k in range(2)), rel=1e-6)
    assert out.metrics["rewards/rejected"] == pytest.approx(sum(beta * (pi[k] - ref[k]) for k in (2, 3)), rel=1e-6)
    assert out.metrics["rewards/margin"] == pytest.approx(beta * sum(deltas), rel=1e-6)
    assert out.metrics["rewards/accuracy"] == sum(d > 0 for d in deltas)
    assert 0 < out.metrics["rewards/accuracy"] < 2  # the toy has one pair of each kind


def test_label_smoothing_is_the_conservative_dpo_formula():
    beta, eps = 0.7, 0.2
    out = DPO(DPOConfig(beta=beta, label_smoothing=eps), reference=FixedLogits(REFERENCE)).loss(FixedLogits(POLICY),
                                                                                                TOY)
    pi, _ = toy_logps(POLICY)
    ref, _ = toy_logps(REFERENCE)
    z = [beta * ((pi[k] - ref[k]) - (pi[k + 2] - ref[k + 2])) for k in range(2)]
    expected = sum(-(1 - eps) * log_sigmoid(v) - eps * log_sigmoid(-v) for v in z)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_is_the_length_normalised_hand_formula_without_a_reference(eps):
    beta, gamma = 2.0, 0.5
    objective = build_objective({"name": "dpo", "loss": "simpo", "label_smoothing": eps})
    assert (objective.beta, objective.gamma) == (beta, gamma)  # the documented defaults
    objective.setup(FixedLogits(POLICY), None, CPU)  # no reference is needed, nor loaded
    out = objective.loss(FixedLogits(POLICY), TOY)
    pi, n = toy_logps(POLICY)
    assert n == [2, 2, 2, 1]
    z = [beta * pi[k] / n[k] - beta * pi[k + 2] / n[k + 2] - gamma for k in range(2)]
    assert out.loss.item() == pytest.approx(sum(-(1 - eps) * log_sigmoid(v) - eps * log_sigmoid(-v) for v in z),
                                            rel=1e-6)
    assert out.metrics["rewards/chosen"] == pytest.approx(sum(beta * pi[k] / n[k] for k in range(2)), rel=1e-6)
    assert out.metrics["rewards/margin"] == pytest.approx(sum(v + gamma for v in z), abs=1e-5)


def test_the_gradient_of_the_dpo_loss_matches_autograd_of_the_formula():
    """d loss / d policy logits, against torch autograd of the formula written with log_softmax."""
    beta = 0.5
    policy = FixedLogits(POLICY)
    DPO(DPOConfig(beta=beta), reference=FixedLogits(REFERENCE)).loss(policy, TOY).loss.backward()
    x = POLICY.clone().requires_grad_(True)
    pi = x[:, :2].log_softmax(-1).gather(-1, LABELS[:, 1:].clamp_min(0)[..., None])[..., 0]
    pi = (pi * (LABELS[:, 1:] != -100)).sum(-1)
    with torch.no_grad():
        r = REFERENCE[:, :2].log_softmax(-1).gather(-1, LABELS[:, 1:].clamp_min(0)[..., None])[..., 0]
        r = (r * (LABELS[:, 1:] != -100)).sum(-1)
    (-torch.nn.functional.logsigmoid(beta * ((pi[:2] - r[:2]) - (pi[2:] - r[2:])))).sum().backward()
    torch.testing.assert_close(policy.logits.grad, x.grad)


# ------------------------------------------------------------------------------------------------ chunked log-probs

def whole_tensor_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The formula as computed before chunking: one log-sum-exp over the whole fp32 copy of the logits."""
    picked = logits.gather(-1, targets.clamp_min(0)[..., None])[..., 0].float()
    return torch.where(targets != -100, picked - torch.logsumexp(logits.float(), -1), 0.0)


def random_problem(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    """Logits (with a gradient), targets with ignored positions (a whole row among them), per-position weights."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    targets[0, :2] = -100
    targets[-1] = -100
    return logits, targets, torch.randn(shape[:-1], generator=g, dtype=torch.float64)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_log_probs_and_their_gradient_equal_the_whole_tensor_formula_in_fp64(chunk):
    logits, targets, weights = random_problem((5, 4, 11), torch.float64)
    out = token_logps(logits, targets, chunk)
    (out * weights).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = torch.where(targets != -100, ref_logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0],
                      0.0)
    (ref * weights).sum().backward()
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-12, atol=1e-12)
    assert not logits.grad[-1].any() and not logits.grad[0, :2].any()  # ignored positions get no gradient


def test_with_bf16_logits_values_and_gradient_match_the_fp32_whole_tensor_formula():
    logits, targets, weights = random_problem((6, 5, 37), torch.bfloat16, seed=1)
    out = token_logps(logits, targets, 4)
    (out * weights.float()).sum().backward()
    old_logits = logits.detach().clone().requires_grad_(True)
    old = whole_tensor_logps(old_logits, targets)
    (old * weights.float()).sum().backward()
    assert out.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, old, rtol=1e-6, atol=1e-6)  # the same fp32 arithmetic, chunk by chunk
    exact = logits.detach().double().requires_grad_(True)  # the same bf16 values, differentiated in fp64
    ref = exact.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    (torch.where(targets != -100, ref, 0.0) * weights).sum().backward()
    # the chunked gradient is rounded to bf16 once (unit roundoff 2^-8); the whole-tensor one twice (its gather and
    # log-sum-exp paths are each cast to bf16, then added in bf16)
    torch.testing.assert_close(logits.grad.double(), exact.grad, rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(old_logits.grad.double(), exact.grad, rtol=2 ** -7, atol=1e-6)


def saved_for_backward(fn) -> list[torch.Tensor]:
    """The tensors autograd keeps from ``fn()`` for the backward pass."""
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        fn()
    return kept


def test_the_backward_keeps_the_logits_and_one_log_sum_exp_per_position_not_an_fp32_copy():
    logits, targets, _ = random_problem((4, 8, 1000), torch.bfloat16)
    n, v = 4 * 8, 1000
    kept = saved_for_backward(lambda: token_logps(logits, targets, 5).sum())
    big = [t for t in kept if t.numel() >= n * v]
    assert big and all(t.data_ptr() == logits.data_ptr() and t.dtype == torch.bfloat16 for t in big)
    assert sum(t.numel() * t.element_size() for t in kept if t.numel() < n * v) <= n * (8 + 4)  # targets, lse
    old = saved_for_backward(lambda: whole_tensor_logps(logits, targets).sum())
    assert any(t.numel() == n * v and t.dtype == torch.float32 for t in old)  # what chunking avoids


def test_the_dpo_loss_and_its_gradient_do_not_depend_on_the_chunk_size(tmp_path):
    batch = pair_batch(pair_rows(2) + pair_rows(2, " sure, gladly", " go away"), tmp_path)
    losses, grads = [], []
    for chunk in (1, 5, 4096):
        model = lora_model()
        perturb_lora(model)
        objective = build_objective({"name": "dpo", "beta": 0.5, "chunk_size": chunk})
        objective.setup(model, tiny_tokenizer(), CPU)
        out = objective.loss(model, batch)
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[2], rel=1e-6) and losses[1] == pytest.approx(losses[2], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[2], rtol=1e-5, atol=1e-7)
    assert grads[2].abs().max() > 0


def test_at_init_the_loss_is_log_2_per_pair_exactly_and_the_rewards_are_zero(tmp_path):
    batch = pair_batch(pair_rows(3) + pair_rows(2, " maybe so", " never"), tmp_path)
    model = lora_model()
    objective = build_objective({"name": "dpo"})
    objective.setup(model, tiny_tokenizer(), CPU)
    out = objective.loss(model, batch)
    assert out.count == batch["pairs"] == 5
    assert out.metrics == {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margin": 0.0,
                           "rewards/accuracy": 0.0}
    assert out.loss.item() == pytest.approx(5 * LOG2, rel=1e-7)


def test_swapping_chosen_and_rejected_flips_the_margin(tmp_path):
    batch = pair_batch(pair_rows(2) + pair_rows(2, " sure, gladly", " go away"), tmp_path)
    model = lora_model()
    perturb_lora(model)
    objective = build_objective({"name": "dpo", "beta": 0.5})
    objective.setup(model, tiny_tokenizer(), CPU)
    with torch.no_grad():
        ahead, back = objective.loss(model, batch), objective.loss(model, swapped(batch))
    assert abs(ahead.metrics["rewards/margin"]) > 1e-3
    assert back.metrics["rewards/margin"] == pytest.approx(-ahead.metrics["rewards/margin"], abs=1e-5)
    assert back.metrics["rewards/chosen"] == pytest.approx(ahead.metrics["rewards/rejected"], abs=1e-5)
    assert ahead.metrics["rewards/accuracy"] + back.metrics["rewards/accuracy"] == 4  # no margin is exactly 0
    # -log σ(-z) - (-log σ(z)) = z, pair by pair
    assert (back.loss - ahead.loss).item() == pytest.approx(ahead.metrics["rewards/margin"], abs=1e-5)


# ------------------------------------------------------------------------------------------------ the reference

def test_the_reference_is_the_model_with_its_adapters_off(tmp_path):
    batch = pair_batch(pair_rows(3), tmp_path)
    model = lora_model()
    objective = build_objective({"name": "dpo"})
    objective.setup(model, tiny_tokenizer(), CPU)
    before = objective._reference_logps(model, batch, False)
    policy_before = response_logps(model, batch)[0].detach()
    perturb_lora(model)
    after = objective._reference_logps(model, batch, False)
    assert torch.equal(before, after)  # changing LoRA's B leaves the reference as it was
    assert not torch.allclose(response_logps(model, batch)[0], policy_before)  # but moves the policy
    base = response_logps(tiny_llama().train(), batch)[0].detach()  # the base model itself, no adapter modules
    torch.testing.assert_close(after, base, rtol=1e-6, atol=1e-5)
    assert all(m.adapter_enabled for m in model.modules() if hasattr(m, "adapter_enabled"))  # switched back on


def test_method_full_without_a_reference_is_refused_with_what_to_do():
    model = tiny_llama()
    build_method({"name": "full"}).apply(model)
    with pytest.raises(LmadaptError) as exc:
        build_objective({"name": "dpo"}).setup(model, tiny_tokenizer(), CPU)
    text = str(exc.value)
    assert "objective.reference" in text and "no adapter modules" in text and "loss: simpo" in text


def test_method_full_with_a_reference_folder_loads_it_frozen(tiny_model_dir, tmp_path):
    batch = pair_batch(pair_rows(2), tmp_path)
    model = tiny_llama().train()
    build_method({"name": "full"}).apply(model)
    objective = build_objective({"name": "dpo", "reference": str(tiny_model_dir)})
    objective.setup(model, tiny_tokenizer(), CPU)
    assert not any(p.requires_grad for p in objective.reference.parameters())
    out = objective.loss(model, batch)  # the trained model is still the saved base: log 2 per pair
    assert out.loss.item() == pytest.approx(2 * LOG2, rel=1e-6)


def test_a_reference_with_another_tokenizer_is_refused(tmp_path):
    other = tmp_path / "other"
    tiny_llama(vocab_size=300).save_pretrained(other)
    from lmadapt.testing import tiny_bpe_tokenizer
    tiny_bpe_tokenizer(["some text to train on"] * 4, vocab_size=300).save_pretrained(other)
    with pytest.raises(LmadaptError, match="objective.reference: .* different tokenizer"):
        build_objective({"name": "dpo", "reference": str(other)}).setup(tiny_llama(), tiny_tokenizer(), CPU)


def test_objective_dpo_on_plain_data_says_what_it_needs(tmp_path):
    with pytest.raises(LmadaptError, match="preference pairs.*prompt, chosen and rejected"):
        build_objective({"name": "dpo"}).count({"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2, 3)})


@pytest.mark.parametrize("fields,problem", [
    ({"gamma": 1.0}, "objective.gamma: the target margin of loss simpo"),
    ({"loss": "simpo", "reference": "base"}, "objective.reference: loss simpo uses no reference model"),
    ({"label_smoothing": 0.5}, "objective.label_smoothing: must be in [0, 0.5)"),
    ({"beta": 0}, "objective.beta: must be > 0"),
])
def test_contradictory_settings_are_named(fields, problem):
    with pytest.raises(ConfigError) as exc:
        build_objective({"name": "dpo", **fields})
    assert problem in str(exc.value)


# ------------------------------------------------------------------------------------------------ validation

def test_validation_reports_pair_loss_reward_accuracy_and_margin_and_no_perplexity(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, pair_rows(3) + pair_rows(2, " sure, gladly", " go away"))
    tok = tiny_tokenizer()
    data, _, _ = load_splits(DataConfig(train=[str(path)]), tok)
    model = tiny_llama()
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    method.apply(model)
    perturb_lora(model)
    objective = build_objective({"name": "dpo", "beta": 0.5})
    objective.setup(model, tok, CPU)
    val = Batcher(data, batch_size=2, max_length=256, packing=False, group_by_length=False, pad_id=tok.pad_token_id,
                  seed=0)  # micro-batches of 2, 2 and 1 pairs
    trainer = Trainer(model, method, TrainConfig(max_steps=1, tensorboard=False), val, val, tmp_path / "run",
                      base_model=None, base_fingerprint=None, device=CPU, objective=objective)
    loss = trainer.validate()
    model.eval()
    with torch.no_grad():  # all five pairs in one batch, by the objective directly
        whole = objective.loss(model, pair_batch(pair_rows(3) + pair_rows(2, " sure, gladly", " go away"), tmp_path))
    assert set(trainer.val_metrics) == {"val_loss", "val_rewards/accuracy", "val_rewards/margin"}
    assert loss == trainer.val_metrics["val_loss"] == pytest.approx(whole.loss.item() / 5, rel=1e-5)
    assert trainer.val_metrics["val_rewards/accuracy"] == pytest.approx(whole.metrics["rewards/accuracy"] / 5)
    assert trainer.val_metrics["val_rewards/margin"] == pytest.approx(whole.metrics["rewards/margin"] / 5, rel=1e-4)
    assert 0 < trainer.val_metrics["val_rewards/accuracy"] < 1  # the perturbed LoRA gets some pairs right



# ------------------------------------------------------------------------------------------------ training

@pytest.fixture(scope="module")
def pref_file(tmp_path_factory) -> Path:
    """Chosen is always ' yes', rejected always ' no'."""
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    write_jsonl(path, pair_rows(24))
    return path


def run_config(model_dir: Path, data: Path, out: Path, **objective) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [str(data)], "max_length": 64, "validation_fraction": 0.25},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "objective": {"name": "dpo", **objective},
        "train": {"lr": 2e-2, "batch_size": 6, "max_steps": 8, "tensorboard": False, "schedule": "constant",
                  "threads": 1, "save_every": 2},
        "output_dir": str(out),
    }


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective,precision", [({}, "fp32"), ({"loss": "simpo"}, "fp32"), ({}, "bf16")])
def test_lora_training_raises_the_reward_accuracy(tiny_model_dir, pref_file, tmp_path, objective, precision):
    cfg = run_config(tiny_model_dir, pref_file, tmp_path / "run", **objective)
    cfg["train"]["precision"] = precision
    result = train(cfg, progress=False)
    steps = [r for r in metrics(result.run_dir) if "loss" in r]
    first, last = steps[0], steps[-1]
    if not objective:  # DPO: the LoRA starts as the reference, so the first step sees log 2 and no margin
        assert first["loss"] == pytest.approx(LOG2, rel=1e-6)
        assert first["dpo/rewards/accuracy"] == 0.0 and first["dpo/rewards/margin"] == 0.0
    else:  # SimPO: the untrained model has no reason to prefer ' yes'
        assert first["dpo/rewards/accuracy"] < 1.0
    assert last["dpo/rewards/accuracy"] == 1.0
    assert last["dpo/rewards/margin"] > first["dpo/rewards/margin"] + 0.1
    assert last["dpo/rewards/chosen"] > last["dpo/rewards/rejected"]
    assert last["loss"] < first["loss"] - 0.05
    assert result.report["objective"] == "dpo" and result.report["data"]["format"] == "preference"
    assert result.loop.val_loss < first["loss"] - 0.05  # held-out pairs (the same two words) moved too
    val = [r for r in metrics(result.run_dir) if "val_loss" in r]
    assert val and all("val_ppl" not in r for r in val)  # a pair loss has no perplexity
    assert val[-1]["val_loss"] == pytest.approx(result.loop.val_loss)
    assert val[-1]["val_rewards/accuracy"] == 1.0 and val[-1]["val_rewards/margin"] > 0


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_model_dir, pref_file, tmp_path):
    whole = train(run_config(tiny_model_dir, pref_file, tmp_path / "whole"), progress=False)
    cfg = run_config(tiny_model_dir, pref_file, tmp_path / "cut")
    with ctrl_c_at(5), pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    resumed = train(cfg, resume=True, progress=False)
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r for r in metrics(whole.run_dir) if "loss" in r] != []
    assert [r["dpo/rewards/margin"] for r in metrics(resumed.run_dir) if "loss" in r] == \
        [r["dpo/rewards/margin"] for r in metrics(whole.run_dir) if "loss" in r]
