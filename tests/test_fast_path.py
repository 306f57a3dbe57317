"""The fast training path computes the same loss and gradients as the plain one.

Fast: frozen base stored in bf16 (so the loop needs no autocast), LoRA factors cast to bf16 with the
add fused into one ``addmm``, vocabulary logits only where labels carry loss. Plain (the reference): PEFT's LoRA on
an fp32 model, full logits, ``F.cross_entropy``. Tolerances are bf16's (8 mantissa bits).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from lmadapt.methods import build_method
from lmadapt.objectives.causal_lm import causal_inputs, causal_lm_loss
from lmadapt.testing import tiny_llama
from lmadapt.training.precision import autocast, needs_autocast

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of 40-64 tokens; loss on each row's last 5 real tokens (an SFT answer)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [64, 57, 49, 40]
    ids = torch.full((len(lengths), 64), 259)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(0, 256, (n,), generator=g)
        labels[b, n - 5:n] = ids[b, n - 5:n]
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "position_ids": torch.arange(64).expand(len(lengths), 64)}


def _plain_peft(base: torch.nn.Module, state: dict[str, torch.Tensor], batch: dict) -> tuple[float, dict]:
    model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.load_state_dict({k.replace(".weight", ".default.weight"): v for k, v in state.items()}, strict=False)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)
    loss.backward()
    grads = {n.replace(".default", "").removeprefix("base_model.model."): p.grad
             for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def _lmadapt(base: torch.nn.Module, state: dict[str, torch.Tensor], batch: dict, mode: str) -> tuple[float, dict]:
    model = copy.deepcopy(base)
    if mode == "bf16-fast":
        model.to(torch.bfloat16)  # what train() does for bf16 training of a frozen base (model.dtype auto)
    method = build_method({"name": "lora", "r": 8, "alpha": 16, "target_modules": TARGETS})
    method.apply(model)
    method.load_adapter_state(model, state)
    model.train()
    precision = "fp32" if mode == "fp32" else "bf16"
    use_autocast = needs_autocast(model, precision)
    assert use_autocast == (mode == "bf16-autocast")  # bf16 storage + self-casting LoRA: no autocast needed
    with autocast(torch.device("cpu"), precision, use_autocast):
        loss_sum, n, outputs = causal_lm_loss(model, batch)
    assert outputs.logit_positions is not None  # the target-positions path was taken
    (loss_sum / n).backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return (loss_sum / n).item(), grads


@pytest.mark.parametrize("mode", ["fp32", "bf16-autocast", "bf16-fast"])
def test_fast_path_matches_peft_fp32_loss_and_gradients(mode: str) -> None:
    base = tiny_llama(seed=3)
    donor = build_method({"name": "lora", "r": 8, "alpha": 16, "target_modules": TARGETS, "init": "random"})
    scratch = copy.deepcopy(base)
    donor.apply(scratch)
    state = donor.adapter_state(scratch)  # B != 0, so the adapter changes the outputs and gets gradients
    batch = _batch()
    ref_loss, ref_grads = _plain_peft(base, state, batch)
    loss, grads = _lmadapt(base, state, batch, mode)
    fast = mode != "fp32"
    assert {k.removesuffix(".weight") for k in ref_grads} == set(grads)
    rtol = 2e-2 if fast else 1e-5
    assert loss == pytest.approx(ref_loss, rel=rtol)
    for name, ref in ref_grads.items():
        got = grads[name.removesuffix(".weight")]
        rel = ((got - ref).norm() / ref.norm()).item()
        cosine = F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
        assert rel < (3e-2 if fast else 1e-4), (name, rel)
        assert cosine > (0.9995 if fast else 0.999999), (name, cosine)


def test_only_a_right_padding_mask_is_dropped() -> None:
    ids = torch.zeros(2, 4, dtype=torch.long)
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    gap = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0]])
    assert "attention_mask" not in causal_inputs({"input_ids": ids, "attention_mask": right})
    for kept in (left, gap):
        assert causal_inputs({"input_ids": ids, "attention_mask": kept})["attention_mask"] is kept
