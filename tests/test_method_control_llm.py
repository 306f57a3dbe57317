"""Control LLM: which blocks expand (the formula at L = 32, n = 8 and on the tiny model), lerp/dlerp and both
divergence losses against hand computation, the base model and a zero loss at init (fp32, bf16), the trainable set,
the loss the method adds against its formula, training through lmadapt.train, save/load, exact resume, cached
generation (greedy and beam) against uncached decoding, and merging: exact where one branch is picked, refused
otherwise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import interrupted_at
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lmadapt.adapters.format import WEIGHTS_NAME, load_adapter, save_adapter
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods import StepContext, build_method
from lmadapt.methods.control_llm import ControlLlm
from lmadapt.methods.control_llm_layer import (
    ControlBlock,
    cosine_divergence,
    expanded_indices,
    lerp,
    mse_divergence,
)
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.recipes.finetune import train
from lmadapt.reporting import read_metrics
from lmadapt.testing import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5  # fp32 after a few matmuls
BF16_LOGITS_ATOL = 5e-2  # tiny Llama logits (|z| < 1) after two bf16 blocks
BOTH = {"layers": [0, 1]}  # both blocks of the tiny Llama


def ids(seed: int = 0, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=ids() if x is None else x).logits


def expanded(model_kw: dict | None = None, **cfg: object) -> tuple[nn.Module, ControlLlm]:
    method = build_method({"name": "control_llm", **cfg})
    model = tiny_llama(**(model_kw or {}))
    method.apply(model)
    return model, method


def blocks(model: nn.Module) -> list[ControlBlock]:
    return [b for _, b in modules_of_type(model, ControlBlock)]


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Move every copy away from its frozen block (as training would)."""
    g = torch.Generator().manual_seed(seed)
    for b in blocks(model):
        for p in b.control_expanded.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# --- which blocks -----------------------------------------------------------------------------------------------
def test_expanded_blocks_follow_the_formula() -> None:
    assert expanded_indices(32, 8) == [i for i in range(32) if (i + 1) % (32 // 8) == 0] == list(range(3, 32, 4))
    for L in range(1, 41):
        for n in range(1, L + 1):
            got = expanded_indices(L, n)
            assert len(got) == n and got == sorted(set(got)) and got[-1] == L - 1
            if L % n == 0:
                assert got == [i for i in range(L) if (i + 1) % (L // n) == 0]
    assert expanded_indices(30, 8) == [2, 6, 10, 14, 17, 21, 25, 29]  # not divisible: spread, ends on the last
    model, method = expanded({"num_hidden_layers": 32, "hidden_size": 16, "intermediate_size": 32})
    assert method.indices == list(range(3, 32, 4))  # default n = 32 // 4 = 8
    assert [n for n, _ in modules_of_type(model, ControlBlock)] == [f"model.layers.{i}" for i in range(3, 32, 4)]
    assert expanded()[1].indices == [1]  # the tiny Llama: L = 2, n = max(1, 2 // 4) = 1
    assert expanded(layers=[-2])[1].indices == [0]


@pytest.mark.parametrize(("cfg", "message"), [
    ({"layers": [0], "num_expanded_layers": 1}, "give one of them"),
    ({"num_expanded_layers": 3}, r"method\.num_expanded_layers: 3 is more than the model's 2 transformer blocks"),
    ({"layers": [2]}, r"method\.layers: index 2 is out of range"),
    ({"divergence_weight": -0.5}, "divergence_weight: must be >= 0, or -1"),
    ({"merge_method": "slerp"}, "merge_method"),
])
def test_bad_configs_are_refused_before_the_model_changes(cfg: dict, message: str) -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError, match=message):
        build_method({"name": "control_llm", **cfg}).apply(model)
    assert not blocks(model)


# --- the formulas on tiny tensors -------------------------------------------------------------------------------
def test_lerp_dlerp_and_the_two_divergences_against_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    b[0, 0] = a[0, 0]  # equal: 0 divergence
    b[0, 1] = -2 * a[0, 1]  # opposite: cos = -1, relu gap 2 > 1, smooth L1's linear part
    w = torch.sigmoid(torch.tensor([0.3]))
    torch.testing.assert_close(lerp(a, b, w), (1 - w) * a + w * b, atol=1e-6, rtol=0)
    torch.testing.assert_close(mse_divergence(a, b), torch.tensor(
        [[sum((b[i, t, j] - a[i, t, j]) ** 2 for j in range(4)) / 4 for t in range(3)] for i in range(2)]))
    for margin in (0.0, 0.1):
        want = torch.zeros(2, 3)
        for i in range(2):
            for t in range(3):
                cos = float(a[i, t] @ b[i, t]) / math.sqrt(float(a[i, t] @ a[i, t]) * float(b[i, t] @ b[i, t]))
                gap = max(0.0, 1 - margin - cos)
                want[i, t] = 0.5 * gap ** 2 if gap < 1 else gap - 0.5
        got = cosine_divergence(a, b, margin)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert got[0, 0] == 0 and got[0, 1] == pytest.approx(2 - margin - 0.5, abs=1e-6)

    block = ControlBlock(tiny_llama().model.layers[0], 0, 2, "dlerp", 0.7)
    with torch.no_grad():
        block.control_gate.weight.copy_(torch.randn(1, 128, generator=g) * 0.1)
    h_pre, h_exp = torch.randn(2, 3, 64, generator=g), torch.randn(2, 3, 64, generator=g)
    wd = block.control_gate.weight[0].detach()
    w = block.weight(h_pre, h_exp)
    assert w.shape == (2, 3, 1)
    for i in range(2):
        for t in range(3):
            z = sum(float(wd[j]) * float(h_pre[i, t, j]) + float(wd[64 + j]) * float(h_exp[i, t, j])
                    for j in range(64)) + 0.7
            assert float(w[i, t, 0].detach()) == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-6)


# --- at init -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [{}, {"merge_method": "dlerp"}, {"merge_method": "dlerp", "dlerp_weight_init": "kaiming"},
                                 {"gate_init": 2.0, **BOTH}])
def test_the_base_model_at_init(cfg: dict, dtype: torch.dtype) -> None:
    base = tiny_llama().to(dtype)
    method = build_method({"name": "control_llm", **cfg})
    model = tiny_llama().to(dtype)
    method.apply(model)
    assert method.identity_at_init
    assert all(p.dtype == torch.float32 for b in blocks(model) for p in b.control_expanded.parameters())
    atol = 0.0 if dtype == torch.float32 else BF16_LOGITS_ATOL  # fp32: bit for bit (lerp of equal values)
    torch.testing.assert_close(logits(model).float(), logits(base).float(), atol=atol, rtol=0)


@pytest.mark.parametrize("divergence", ["mse", "cosine"])
def test_the_divergence_is_exactly_zero_at_init(divergence: str) -> None:
    model, method = expanded(divergence=divergence, merge_method="dlerp", dlerp_weight_init="kaiming", **BOTH)
    model.train()
    batch = {"input_ids": ids(), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    model(input_ids=batch["input_ids"])
    loss = method.extra_loss(StepContext(model, batch, step=0, max_steps=1))
    assert loss is not None and loss.item() == 0.0


def test_apply_draws_nothing_from_the_global_random_stream() -> None:
    model = tiny_llama()
    before = torch.get_rng_state()
    build_method({"name": "control_llm", "merge_method": "dlerp", "dlerp_weight_init": "kaiming", **BOTH}).apply(model)
    assert torch.equal(torch.get_rng_state(), before)
    weights = [b.control_gate.weight.detach() for b in blocks(model)]
    bound = 128 ** -0.5  # U(-1/sqrt(2d), 1/sqrt(2d)), d = 64
    assert all(0.5 * bound < float(w.abs().max()) <= bound for w in weights) and not torch.equal(*weights)
    again = tiny_llama()
    build_method({"name": "control_llm", "merge_method": "dlerp", "dlerp_weight_init": "kaiming", **BOTH}).apply(again)
    assert all(torch.equal(a.control_gate.weight, b.control_gate.weight) for a, b in zip(blocks(model), blocks(again)))


def test_only_the_copies_and_the_gates_train_each_in_one_group() -> None:
    base = tiny_llama().state_dict()
    for merge_method, train_gate, gates in [("lerp", False, set()), ("lerp", True, {"control_factor"}),
                                            ("dlerp", False, {"control_gate.weight"}),
                                            ("dlerp", True, {"control_gate.weight", "control_gate.bias"})]:
        model, method = expanded(merge_method=merge_method, train_gate=train_gate, **BOTH)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        copies = {f"model.layers.{i}.control_expanded.{k}" for i in (0, 1) for k in tiny_llama().model.layers[0].state_dict()}
        assert trainable == copies | {f"model.layers.{i}.{g}" for i in (0, 1) for g in gates}
        groups = method.parameter_groups(model)
        grouped = [p for g in groups for p in g.params]
        assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
        assert {g.name for g in groups} == {"control_expanded", "control_expanded_no_decay"} | (
            {"control_gate"} if gates else set())
        assert all(g.weight_decay == 0.0 for g in groups if g.name != "control_expanded")
        state = model.state_dict()  # the base keys and tensors are all still there
        assert all(torch.equal(state[k], v) for k, v in base.items())


def test_causal_mask_removal_reaches_both_branches() -> None:
    """models/unmask.py hooks each block's self_attn (the frozen branch's): the copy's attention shares its hooks."""
    from lmadapt.models.unmask import remove_unmasking, unmask_layers

    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    base, (model, _) = tiny_llama(), expanded(**BOTH)
    for m in (base, model):
        unmask_layers(m, [0, 1])
    with torch.no_grad():
        unmasked = base(input_ids=ids(), attention_mask=mask).logits
        assert torch.equal(model(input_ids=ids(), attention_mask=mask).logits, unmasked)
        assert (unmasked - tiny_llama()(input_ids=ids(), attention_mask=mask).logits).abs().max() > 0.1
        remove_unmasking(model)
        assert torch.equal(model(input_ids=ids(), attention_mask=mask).logits,
                           tiny_llama()(input_ids=ids(), attention_mask=mask).logits)


# --- the loss the method adds -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("cfg", "dynamic"), [({"divergence": "mse", "divergence_weight": 2.0}, False),
                                              ({"divergence": "cosine", "cosine_margin": 0.001, "merge_method": "dlerp",
                                                "divergence_weight": -1, "dlerp_weight_init": "kaiming"}, True)])
def test_the_divergence_term_is_the_masked_mean_over_tokens_then_blocks(cfg: dict, dynamic: bool) -> None:
    model, method = expanded(**cfg, **BOTH)
    perturb(model, 0.2)
    seen: dict[tuple[int, str], torch.Tensor] = {}
    for b in blocks(model):
        for kind, module in (("pre", b.frozen_block), ("exp", b.control_expanded)):
            module.register_forward_hook(lambda m, a, out, k=(b.control_index, kind): seen.__setitem__(k, out.detach()))
    mask = torch.ones(2, 12)
    mask[1, 7:] = 0  # right padding: its positions must not count
    model.train()
    model(input_ids=ids(), attention_mask=mask.long())
    loss = method.extra_loss(StepContext(model, {"input_ids": ids(), "attention_mask": mask.long()}, 0, 1))
    per_block = []
    for b in blocks(model):
        p, e = seen[(b.control_index, "pre")], seen[(b.control_index, "exp")]
        d = mse_divergence(p, e) if cfg["divergence"] == "mse" else cosine_divergence(p, e, cfg["cosine_margin"])
        if dynamic:  # alpha = each token's own w
            gw, gb = b.control_gate.weight.detach(), b.control_gate.bias.detach()
            alpha = torch.sigmoid(torch.cat([p, e], -1) @ gw[0] + gb)
        else:
            alpha = cfg["divergence_weight"]
        per_block.append((alpha * d * mask).sum() / mask.sum())
    assert loss.item() > 0
    torch.testing.assert_close(loss.detach(), sum(per_block) / 2, atol=1e-7, rtol=1e-5)
    assert method.extra_loss(StepContext(model, {}, 0, 1)) is None  # read once per forward
    loss.backward()  # the copies (and, dynamic, the gates) get its gradient
    assert all(p.grad is not None for b in blocks(model) for p in b.control_expanded.parameters())


# --- through the real loop -------------------------------------------------------------------------------------
def test_training_changes_the_outputs_reduces_the_loss_and_logs_the_divergence(run_config) -> None:
    run_config["method"] = {"name": "control_llm", "merge_method": "dlerp", "train_gate": True, **BOTH}
    run_config["train"].update({"max_steps": 8, "eval_every": 1})
    result = train(run_config, progress=False)
    records = read_metrics(result.run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 8 and val[-1] < val[0] - 0.1, val  # held-out loss after step 8 against after step 1
    assert steps[0]["control_llm/divergence"] == 0.0 and steps[0]["control_llm/w"] == pytest.approx(0.5)
    assert all(r["control_llm/divergence"] > 0 for r in steps[1:])
    fresh, base = tiny_llama(), tiny_llama()
    method = load_adapter(fresh, result.adapter_dir, force=True)
    assert method.indices == [0, 1]
    assert (logits(fresh) - logits(base)).abs().max() > 1e-3
    assert any(float(b.control_gate.bias.detach()) != 0.0 for b in blocks(fresh))  # train_gate: f moved
    with adapters_disabled(fresh):
        torch.testing.assert_close(logits(fresh), logits(base), atol=0, rtol=0)


def test_save_then_load_gives_identical_logits(tmp_path: Path) -> None:
    model, method = expanded(merge_method="dlerp", dlerp_weight_init="kaiming", gate_init=0.4, **BOTH)
    perturb(model)
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None)
    saved = load_file(tmp_path / "a" / WEIGHTS_NAME)
    assert {k for k in saved if "control_expanded" not in k} == {
        f"model.layers.{i}.control_gate.{p}" for i in (0, 1) for p in ("weight", "bias")}
    assert all(t.dtype == torch.float32 for t in saved.values())
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["control_llm_layers"] == [0, 1] and config["lmadapt"]["method"]["name"] == "control_llm"
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh), logits(model))
    assert (logits(fresh) - logits(tiny_llama())).abs().max() > 1e-3


def test_a_killed_run_resumes_exactly(run_config, tmp_path: Path) -> None:
    run_config["method"] = {"name": "control_llm", "merge_method": "dlerp", "train_gate": True,
                            "divergence": "cosine", "divergence_weight": -1, **BOTH}
    run_config["train"].update({"max_steps": 6, "save_every": 2})
    whole = train({**run_config, "output_dir": str(tmp_path / "whole")}, progress=False)
    cut = {**run_config, "output_dir": str(tmp_path / "cut")}
    with interrupted_at(5), pytest.raises(KeyboardInterrupt):
        train(cut, progress=False)
    resumed = train(cut, resume=True, progress=False)
    a, b = load_file(whole.adapter_dir / WEIGHTS_NAME), load_file(resumed.adapter_dir / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- generation with a KV cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("merge_method", ["lerp", "dlerp"])
def test_cached_generation_equals_uncached_greedy_decoding(merge_method: str) -> None:
    model, _ = expanded(merge_method=merge_method, dlerp_weight_init="kaiming", **BOTH)
    prompt = ids(2, (2, 9))
    base = tiny_llama().generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True), base)
    beams = {"max_new_tokens": 6, "do_sample": False, "num_beams": 3, "use_cache": True}  # reordering moves both slots
    assert torch.equal(model.generate(prompt, **beams), tiny_llama().generate(prompt, **beams))

    perturb(model)
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    seq = prompt
    for _ in range(10):
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq) and not torch.equal(cached, base)
    cache = DynamicCache(config=model.config)  # token by token against one uncached forward
    with torch.no_grad():
        steps = [model(input_ids=seq[:, :9], past_key_values=cache, use_cache=True).logits]
        steps += [model(input_ids=seq[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                  for t in range(9, seq.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), logits(model, seq), atol=ATOL, rtol=0)
    assert len(cache.layers) == 4  # two blocks + the frozen branches' own layers
    grown = DynamicCache()  # a cache that adds its layers as they are first written
    with torch.no_grad():
        model(input_ids=seq[:, :9], past_key_values=grown, use_cache=True)
        last = model(input_ids=seq[:, 9:10], past_key_values=grown, use_cache=True).logits
    torch.testing.assert_close(last, steps[1], atol=ATOL, rtol=0)
    static = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True, cache_implementation="static")
    assert torch.equal(static, cached)


def test_a_cache_filled_without_the_frozen_branch_is_refused() -> None:
    model, _ = expanded(**BOTH)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), adapters_disabled(model):
        model(input_ids=ids(), past_key_values=cache, use_cache=True)
    with torch.no_grad(), pytest.raises(LmadaptError, match="already holds tokens for block 0 but none for its frozen"):
        model(input_ids=ids()[:, :1], past_key_values=cache, use_cache=True)


# --- merging -------------------------------------------------------------------------------------------------------
def test_a_mixing_adapter_is_refused_by_merge_and_nothing_changes() -> None:
    model, method = expanded(**BOTH)
    perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LmadaptError, match=r"no single block computes.*block 0: w = 0\.5; block 1: w = 0\.5"):
        method.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model, method = expanded(merge_method="dlerp", dlerp_weight_init="kaiming")
    perturb(model)
    with pytest.raises(LmadaptError, match=r"w depends on each token"):
        method.merge(model)
    assert not ControlLlm.mergeable  # `lmadapt merge` refuses it before loading anything


@pytest.mark.parametrize(("cfg", "same_as_base"), [({"gate_init": 20.0}, False), ({"gate_init": -120.0}, True),
                                                   ({"merge_method": "dlerp", "gate_init": 20.0}, False)])
def test_merge_is_exact_where_one_branch_is_picked(cfg: dict, same_as_base: bool, tmp_path: Path) -> None:
    assert float(torch.sigmoid(torch.tensor(20.0))) == 1.0 and float(torch.sigmoid(torch.tensor(-120.0))) == 0.0
    model, method = expanded(**cfg, **BOTH)
    perturb(model)
    expected = logits(model)
    assert torch.equal(expected, logits(tiny_llama())) == same_as_base
    method.merge(model)
    assert torch.equal(logits(model), expected)
    if not same_as_base:  # the block holds the copy's weights now: it cannot switch the adapter off
        with pytest.raises(LmadaptError, match="holds the trained copy's weights since the merge"), \
                adapters_disabled(model):
            logits(model)
    method.unmerge(model)
    assert torch.equal(logits(model), expected)
    method.merge(model)
    method.unload(model)
    assert all(type(layer) is LlamaDecoderLayer for layer in model.model.layers)
    assert list(model.state_dict()) == list(tiny_llama().state_dict())
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=0, rtol=0)


def test_an_untrained_copy_merges_by_dropping_it() -> None:
    model, method = expanded(**BOTH)
    method.merge(model)
    method.unload(model)
    assert torch.equal(logits(model), logits(tiny_llama()))


def test_gradient_checkpointing_gives_the_same_adapter_and_checkpoints_both_branches(run_config, tmp_path) -> None:
    from test_gradient_checkpointing import SavedForBackward

    run_config["method"] = {"name": "control_llm", "merge_method": "dlerp", **BOTH}
    run_config["train"].update({"max_steps": 4, "grad_accum": 2})
    out = {}
    for on in (False, True):
        saved = SavedForBackward()
        with saved.hooks:
            result = train({**run_config, "output_dir": str(tmp_path / str(on)),
                            "train": {**run_config["train"], "gradient_checkpointing": on}}, progress=False)
        losses = [r["loss"] for r in result.loop.history if "loss" in r]
        out[on] = (load_file(result.adapter_dir / WEIGHTS_NAME), saved.bytes, losses)
    (plain, plain_bytes, plain_losses), (ckpt, ckpt_bytes, ckpt_losses) = out[False], out[True]
    assert plain.keys() == ckpt.keys()
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ckpt_losses), torch.tensor(plain_losses), rtol=0, atol=1e-6)
    assert ckpt_bytes < 0.35 * plain_bytes, (ckpt_bytes, plain_bytes)  # 0.6 when only the copy checkpoints
