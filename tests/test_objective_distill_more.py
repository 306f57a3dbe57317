"""Objective ``distill``: reverse KL, Mix-CPT's logit swap and SALT's switch to the plain loss at a step.

Each against a direct formula: the reverse KL by hand on set logits and its chunked gradient against autograd of
the textbook expression; the swap on hand-made logits and the loss as KL to the swapped distribution; SALT's
loss equal to distill's before the switch and to causal_lm's (bit for bit, no teacher forward) after it. Then
LoRA and full training through ``lmadapt.train`` (fp32, bf16) and an exact resume across the switch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import interrupted_at as ctrl_c_at
from safetensors.torch import load_file
from torch import nn

from lmadapt.config import ConfigError
from lmadapt.methods import build_method
from lmadapt.models.tree import adapters_disabled
from lmadapt.objectives.base import build_objective
from lmadapt.objectives.causal_lm import causal_lm_loss
from lmadapt.objectives.distill import (
    Distill,
    DistillConfig,
    _DistillSums,
    distillation_loss,
    swap_gold_to_top_,
)
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(prompt_len: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of 10 tokens; the first ``prompt_len`` carry no loss, the second row has 2 padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _direct(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float, reverse: bool) -> torch.Tensor:
    """sum over rows with y != -100 of KL(p_t^T || p_s^T) (forward) or KL(p_s^T || p_t^T) (reverse), by autograd ops."""
    keep = y != -100
    log_ps, log_pt = F.log_softmax(s[keep] / T, -1), F.log_softmax(t[keep] / T, -1)
    if reverse:
        return (log_ps.exp() * (log_ps - log_pt)).sum()
    return (log_pt.exp() * (log_pt - log_ps)).sum()


# ------------------------------------------------------------------------------------------------ reverse KL

def test_reverse_kl_of_set_logits_by_hand():
    """At T = 2: row 1 p_s = (3/4, 1/4), p_t = (1/2, 1/2); row 2 p_s = (1/2, 1/4, 1/4), p_t = (1/8, 1/8, 3/4)."""
    ln = math.log
    s = torch.tensor([[2 * ln(3), 0.0, -1e4], [2 * ln(2), 0.0, 0.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0, -1e4], [0.0, 0.0, 2 * ln(6)], [0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 2, -100])  # the last row carries no loss; -1e4 is a token neither side gives mass
    reverse = (3 / 4 * ln(3 / 2) + 1 / 4 * ln(1 / 2)) + (1 / 2 * ln(4) + 1 / 4 * ln(2) + 1 / 4 * ln(1 / 3))
    forward = (1 / 2 * ln(2 / 3) + 1 / 2 * ln(2)) + (1 / 8 * ln(1 / 4) + 1 / 8 * ln(1 / 2) + 3 / 4 * ln(3))
    kl, ce = _DistillSums.apply(s, t, y, 2.0, 2, True)
    assert kl.item() == pytest.approx(reverse, rel=1e-12)
    kl_forward, _ = _DistillSums.apply(s, t, y, 2.0, 2, False)
    assert kl_forward.item() == pytest.approx(forward, rel=1e-12) and abs(forward - reverse) > 1e-2
    # CE at T = 1: softmax(row 1) = (9/10, 1/10, 0), gold 0; softmax(row 2) = (4/6, 1/6, 1/6), gold 2
    assert ce.item() == pytest.approx(ln(10 / 9) + ln(6), rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, 0.0)])
def test_reverse_kl_gradient_matches_autograd_of_the_formula(T, weights):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(7, 11, generator=g, dtype=torch.float64) * 3
    t = torch.randn(7, 11, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([1, -100, 3, 4, 0, -100, 10])
    w_kl, w_ce = weights
    s1 = s.clone().requires_grad_()
    kl, ce = _DistillSums.apply(s1, t, y, T, 3, True)  # chunks of 3, 3, 1 rows
    (w_kl * kl + w_ce * ce).backward()
    s2 = s.clone().requires_grad_()
    keep = y != -100
    reference = w_kl * _direct(s2, t, y, T, True) + w_ce * F.cross_entropy(s2[keep], y[keep], reduction="sum")
    reference.backward()
    assert (w_kl * kl + w_ce * ce).item() == pytest.approx(reference.item(), rel=1e-10)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(s1.grad[~keep], torch.zeros_like(s1.grad[~keep]))


def test_reverse_kl_in_bf16_keeps_the_gradient_in_the_logits_dtype_and_matches_fp32():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(6, 50, generator=g).bfloat16()
    t = torch.randn(6, 50, generator=g).bfloat16()
    y = torch.randint(0, 50, (6,), generator=g)
    s16, s32 = s.clone().requires_grad_(), s.float().requires_grad_()
    kl16, _ = _DistillSums.apply(s16, t, y, 1.5, 4, True)
    kl16.backward()
    kl32 = _direct(s32, t.float(), y, 1.5, True)
    kl32.backward()
    assert kl16.dtype == torch.float32 and kl16.item() == pytest.approx(kl32.item(), rel=1e-5)
    assert s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s16.grad.float(), s32.grad, rtol=2e-2, atol=2e-3)


def _reference(student, teacher_logits_fn, batch, T, w_kd, w_lm, reverse):
    """KL * T^2 and CE from full forwards, in float64, the textbook way."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    s = student(**inputs, use_cache=False).logits[:, :-1].double()
    with torch.no_grad():
        t = teacher_logits_fn(inputs)[:, :-1].double()
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    kl = _direct(s.flatten(0, 1), t.flatten(0, 1), targets.flatten(), T, reverse)
    ce = F.cross_entropy(s[keep], targets[keep], reduction="sum")
    return w_kd * T ** 2 * kl + w_lm * ce


def test_reverse_distillation_loss_and_gradients_on_tiny_models():
    teacher = tiny_llama(seed=2, initializer_range=0.2)
    batch = _batch(prompt_len=1)
    results = []
    for chunk in (4, 10_000):
        student = tiny_llama(seed=1)
        loss, _, _ = distillation_loss(teacher, temperature=2.0, distill_weight=0.8, lm_weight=0.4, chunk_size=chunk,
                                       direction="reverse")(student, batch)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in student.parameters()]))
    student = tiny_llama(seed=1)
    reference = _reference(student, lambda inputs: teacher(**inputs, use_cache=False).logits, batch, 2.0, 0.8, 0.4,
                           reverse=True)
    reference.backward()
    forward, _, _ = distillation_loss(teacher, temperature=2.0, distill_weight=0.8, lm_weight=0.4)(student, batch)
    assert abs(forward.item() - reference.item()) > 1e-3  # the direction is really switched
    for value, grads in results:
        assert value == pytest.approx(reference.item(), rel=1e-5)
        for g, p in zip(grads, student.parameters()):
            torch.testing.assert_close(g, p.grad.float(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="direction must be one of"):
        distillation_loss(teacher, direction="backward")


# ------------------------------------------------------------------------------------------------ logit swap

def test_logit_swap_on_hand_made_logits():
    z = torch.tensor([[1.0, 5.0, 2.0, 0.0],    # gold 0, top 1: swapped
                      [3.0, 1.0, 2.0, 0.0],    # gold 0 is the top already: unchanged
                      [0.0, -1.0, 1.0, 4.0],   # gold 2, top 3: swapped
                      [2.0, 7.0, 1.0, 0.0],    # ignored row: unchanged
                      [2.0, 2.0, 1.0, 0.0]])   # gold 1 ties with the top: unchanged
    y = torch.tensor([0, 0, 2, -100, 1])
    out = swap_gold_to_top_(z.clone(), y)
    assert torch.equal(out, torch.tensor([[5.0, 1.0, 2.0, 0.0],
                                          [3.0, 1.0, 2.0, 0.0],
                                          [0.0, -1.0, 4.0, 1.0],
                                          [2.0, 7.0, 1.0, 0.0],
                                          [2.0, 2.0, 1.0, 0.0]]))
    same = z.clone()
    assert swap_gold_to_top_(same, y) is same  # in place, no copy


def test_logit_swap_puts_the_gold_token_on_top_and_leaves_the_rest():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(40, 30, generator=g)
    y = torch.randint(0, 30, (40,), generator=g)
    y[::7] = -100
    y[1] = int(z[1].argmax())  # a row whose gold is already the top
    out = swap_gold_to_top_(z.clone(), y)
    for i in range(40):
        if y[i] == -100 or y[i] == z[i].argmax():
            assert torch.equal(out[i], z[i])
            continue
        gold, top = int(y[i]), int(z[i].argmax())
        assert out[i, gold] == z[i, top] and out[i, top] == z[i, gold] and int(out[i].argmax()) == gold
        others = torch.ones(30, dtype=torch.bool)
        others[[gold, top]] = False
        assert torch.equal(out[i, others], z[i, others])
    assert torch.equal(out.sort(-1).values, z.sort(-1).values)  # each row's values are kept, only moved


def _lora(seed: int = 0) -> nn.Module:
    model = tiny_llama(seed=seed)
    build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}).apply(model)
    with torch.no_grad():  # a trained-looking LoRA, so the student is not its base
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=g)
    return model


@pytest.mark.parametrize("reverse", [False, True])
def test_logit_swap_loss_is_the_kl_to_the_swapped_base_distribution(reverse):
    """teacher: base with logit_swap = Mix-CPT's self-distillation: KL(softmax(swapped base logits) || student)."""
    model, batch = _lora().double(), _batch(prompt_len=2)  # fp64 throughout: compared to 1e-9

    def swapped_base(inputs):
        with adapters_disabled(model):
            z = model(**inputs, use_cache=False).logits.clone()
        y = batch["labels"][:, 1:]
        for b in range(z.shape[0]):  # the swap written out, one position at a time
            for i in range(y.shape[1]):
                if y[b, i] != -100:
                    gold, top = int(y[b, i]), int(z[b, i].argmax())
                    z[b, i, gold], z[b, i, top] = z[b, i, top].item(), z[b, i, gold].item()
        return z

    direction = "reverse" if reverse else "forward"
    loss, n, _ = distillation_loss("base", temperature=1.5, lm_weight=0.0, logit_swap=True, direction=direction,
                                   chunk_size=3)(model, batch)
    expected = _reference(model, swapped_base, batch, 1.5, 1.0, 0.0, reverse=reverse)
    plain, _, _ = distillation_loss("base", temperature=1.5, direction=direction)(model, batch)
    assert n == 8 + 6 and loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert abs(loss.item() - plain.item()) > 1e-3  # the swap changed the target (tiny models: near-flat logits)


def test_logit_swap_at_init_pulls_towards_the_gold_token():
    """A fresh LoRA is its base: plain self-distillation has KL 0 and no gradient; with the swap it has both, and
    a small step along it raises the gold tokens' log-probability."""
    model, batch = tiny_llama(seed=0, initializer_range=0.2), _batch(prompt_len=2)  # peaked enough to matter
    build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}).apply(model)
    plain, _, _ = distillation_loss("base")(model, batch)
    assert plain.item() == pytest.approx(0.0, abs=1e-6)
    swapped, _, _ = distillation_loss("base", logit_swap=True)(model, batch)
    assert swapped.item() > 0.05
    ce_before = causal_lm_loss(model, batch)[0].item()
    swapped.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    assert causal_lm_loss(model, batch)[0].item() < ce_before


# ------------------------------------------------------------------------------------------------ SALT

def test_salt_distils_until_the_step_then_is_the_causal_lm_loss_without_a_teacher_forward():
    teacher = tiny_llama(seed=2, initializer_range=0.2)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    student, batch = tiny_llama(seed=1), _batch()
    objective = Distill(DistillConfig(teacher="unused", temperature=2.0, lm_weight=0.3, until_step=2,
                                      direction="reverse"), teacher=teacher)
    objective.setup(student, tiny_tokenizer(), torch.device("cpu"))
    distil = distillation_loss(teacher, temperature=2.0, lm_weight=0.3, direction="reverse")(student, batch)[0]
    plain = causal_lm_loss(student, batch)[0]
    calls.clear()
    seen = []
    for step in (0, 1, 2, 3, 50):
        objective.begin_step(step, 60)
        out = objective.loss(student, batch)
        seen.append((step, len(calls), out.loss, set(out.metrics)))
        calls.clear()
    for step, teacher_calls, loss, metrics in seen:
        if step < 2:  # steps 1 and 2 (0-based 0, 1) distil
            assert teacher_calls == 1 and metrics == {"kl", "ce"}
            assert loss.item() == pytest.approx(distil.item(), rel=1e-6)
        else:
            assert teacher_calls == 0 and metrics == set()
            assert torch.equal(loss, plain)
    assert not torch.equal(seen[0][2], plain)
    objective.begin_step(0, 60)  # it follows the step, whichever way it moves
    assert objective.distilling


def test_salt_setting_is_checked():
    with pytest.raises(ConfigError, match=r"until_step: must be >= 1"):
        build_objective({"name": "distill", "until_step": 0})
    with pytest.raises(ConfigError, match=r"direction"):
        build_objective({"name": "distill", "direction": "backwards"})
    assert build_objective({"name": "distill", "until_step": 5}).distilling


# ------------------------------------------------------------------------------------------------ the loop

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A different tiny Llama with the same tokenizer: a 'small teacher' for SALT."""
    path = tmp_path_factory.mktemp("teacher")
    tiny_llama(seed=7, initializer_range=0.1).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def _train_ce(model_dir: Path, adapter: Path | None, train_file: Path) -> float:
    """Mean next-token CE of the completion tokens of the first training rows."""
    import lmadapt

    model, tok, _ = lmadapt.load(str(model_dir), adapter=None if adapter is None else str(adapter))
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    total, n = 0.0, 0
    with torch.no_grad():
        for row in rows[:16]:
            ids = torch.tensor([tok(row["prompt"] + row["completion"])["input_ids"]])
            labels = ids.clone()
            labels[:, :len(tok(row["prompt"])["input_ids"])] = -100  # the completion carries the loss, as in training
            loss, k, _ = causal_lm_loss(model, {"input_ids": ids, "labels": labels})
            total, n = total + float(loss), n + k
    return total / n


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reverse_logit_swap_self_distillation_trains_with_lora(run_config, precision, tiny_model_dir, train_file):
    """No CE term at all: only the swapped base distribution pulls the adapted model towards the data's tokens."""
    run_config["objective"] = {"name": "distill", "teacher": "base", "direction": "reverse", "logit_swap": True,
                               "lm_weight": 0.0, "temperature": 1.0}
    run_config["train"].update({"max_steps": 6, "precision": precision, "lr": 5e-3})
    result = train(run_config, progress=False)
    steps = metrics(result.run_dir)
    assert result.report["objective"] == "distill" and len(steps) == 6
    assert all(math.isfinite(r["loss"]) and r["distill/kl"] > 0 for r in steps)
    assert _train_ce(tiny_model_dir, result.adapter_dir, train_file) < _train_ce(tiny_model_dir, None, train_file)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_salt_switches_at_exactly_the_step_through_the_loop(run_config, teacher_dir, method):
    run_config["objective"] = {"name": "distill", "teacher": str(teacher_dir), "temperature": 2.0,
                               "distill_weight": 0.5, "lm_weight": 0.5, "until_step": 3}
    if method == "full":
        run_config["method"] = {"name": "full"}
        run_config["train"]["lr"] = 1e-4
    result = train(run_config, progress=False)
    steps = metrics(result.run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert ["distill/kl" in r for r in steps] == [True] * 3 + [False] * 3


def test_salt_resumes_past_the_switch_to_the_same_weights(run_config, teacher_dir, tmp_path):
    """Interrupted after step 4 (the switch is after step 3), the resumed run does not distil again: it ends
    with the uninterrupted run's weights, bit for bit."""
    run_config["objective"] = {"name": "distill", "teacher": str(teacher_dir), "temperature": 2.0,
                               "lm_weight": 0.5, "until_step": 3}
    run_config["train"].update({"save_every": 2, "threads": 1})
    whole = train({**run_config, "output_dir": str(tmp_path / "whole")}, progress=False)
    cut = {**run_config, "output_dir": str(tmp_path / "cut")}
    with ctrl_c_at(4), pytest.raises(KeyboardInterrupt):
        train(cut, progress=False)
    resumed = train(cut, resume=True, progress=False)
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(resumed.run_dir)][-2:] == [r["loss"] for r in metrics(whole.run_dir)][-2:]
