"""LaMDA / LaMDA++ (arXiv:2406.12832) against its formulas: the spectral start by hand from the SVD, identity at
init, the base back when switched off, A never moving, B's columns freezing exactly under AdamW with weight
decay, the trainable count, merge/unload, the own form reloaded (also on a base whose SVD came out differently),
the export as a plain LoRA that lmadapt and PEFT load on the unmodified base, the LaMDA++ rank rule by hand, and
an exact resume through the real loop in fp32 and bf16."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from conftest import interrupted_at as ctrl_c_at
from safetensors.torch import load_file
from torch import nn

import lmadapt.methods.lamda  # noqa: F401  (registration, until methods/__init__ imports it)
from lmadapt.adapters.format import load_adapter, save_adapter
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods import StepContext, build_method
from lmadapt.methods.lamda import Lamda, LamdaLinear, spectrum_ranks
from lmadapt.models.tree import adapters_disabled
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama

ATOL = 1e-5  # fp32 logits after a few matmuls
EXACT = 1e-6
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    return model(input_ids=ids(seed)).logits


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def skewed_llama() -> nn.Module:
    """The tiny Llama with layer 0's q_proj made nearly rank 2, so LaMDA++ gives it a smaller rank."""
    model = tiny_llama()
    w = model.model.layers[0].self_attn.q_proj.weight
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        w.copy_(torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g) * 0.05 + 1e-4 * w)
    return model


def applied(base=tiny_llama, **cfg) -> tuple[nn.Module, Lamda]:
    method = build_method({"name": "lamda", "r": 4, "alpha": 8, **cfg})
    model = base()
    method.apply(model)
    return model, method


def layers(model: nn.Module) -> list[tuple[str, LamdaLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LamdaLinear)]


def run_steps(model: nn.Module, method: Lamda, steps: int, *, max_steps: int | None = None,
              weight_decay: float = 0.1, on_step=None) -> None:
    """``steps`` AdamW steps (lr 1e-2) driving the method's hooks in the loop's order."""
    groups = lambda: [{"params": g.params, "weight_decay": weight_decay} for g in method.parameter_groups(model)]
    opt = torch.optim.AdamW(groups(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = ids(step + 1)
        opt.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        ctx = StepContext(model, {"input_ids": batch}, step, max_steps or steps, optimizer=opt)
        method.before_optimizer_step(ctx)
        opt.step()
        method.after_optimizer_step(ctx)
        if method.on_step_end(ctx):
            state = opt.state
            opt = torch.optim.AdamW(groups(), lr=1e-2)
            for p in [q for g in opt.param_groups for q in g["params"]]:
                if p in state:
                    opt.state[p] = state[p]
        if on_step is not None:
            on_step(step + 1)
    model.eval()


def trained(base=tiny_llama, steps: int = 3, **cfg) -> tuple[nn.Module, Lamda]:
    model, method = applied(base, **cfg)
    run_steps(model, method, steps, max_steps=10)
    return model, method


# --- the layer against its formula ---------------------------------------------------------------------------
def test_spectral_start_by_hand() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=True).requires_grad_(False)  # the method freezes the base
    w0 = base.weight.detach().clone()
    layer = LamdaLinear(base, r=3, alpha=6.0, init="spectral")
    s = 6.0 / 3
    u, sigma, vh = torch.linalg.svd(w0, full_matrices=False)
    close(layer.lamda_A, vh[:3], atol=EXACT)
    close(layer.lamda_B, u[:, :3], atol=EXACT)
    close(layer.lamda_S, torch.diag(sigma[:3]) / s, atol=EXACT)
    close(layer.weight, w0 - u[:, :3] @ torch.diag(sigma[:3]) @ vh[:3], atol=EXACT)  # W_res
    assert layer.weight is base.weight and layer.bias is base.bias  # same Parameters, same keys
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lamda_B", "lamda_S"}
    with torch.no_grad():
        layer.lamda_S.add_(torch.randn(3, 3))
        layer.lamda_B.add_(torch.randn(5, 3))
        x = torch.randn(4, 7, 6)
        expected = x @ layer.weight.T + base.bias + s * x @ layer.lamda_A.T @ layer.lamda_S.T @ layer.lamda_B.T
        close(layer(x), expected)
        close(layer.delta_weight(), s * layer.lamda_B @ layer.lamda_S @ layer.lamda_A)
        layer.adapter_enabled = False
        close(layer(x), x @ w0.T + base.bias)


def test_zero_start_leaves_the_base_weight_alone() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    w0 = base.weight.detach().clone()
    layer = LamdaLinear(base, r=2, alpha=4.0, init="zero")
    assert torch.equal(layer.weight, w0) and torch.count_nonzero(layer.lamda_S) == 0
    u, _, vh = torch.linalg.svd(w0, full_matrices=False)
    close(layer.lamda_A, vh[:2], atol=EXACT)
    close(layer.lamda_B, u[:, :2], atol=EXACT)


@pytest.mark.parametrize("init", ["spectral", "zero"])
def test_identity_at_init(init: str) -> None:
    model, method = applied(init=init)
    close(logits(model), logits(tiny_llama()), atol=EXACT)
    assert method.rewrites_base_weights is (init == "spectral")
    assert Lamda.rewrites_base_weights  # the default init rewrites them
    rewritten = [n for n, m in layers(model) if not torch.equal(m.weight, tiny_llama().get_submodule(n).weight)]
    assert len(rewritten) == (14 if init == "spectral" else 0)


def test_switched_off_gives_the_original_base_merged_or_not() -> None:
    base = logits(tiny_llama())
    model, method = trained()
    adapted = logits(model)
    assert (adapted - base).abs().max() > 1e-3
    with adapters_disabled(model):
        close(logits(model), base, atol=EXACT)
    close(logits(model), adapted, atol=EXACT)
    method.merge(model)
    close(logits(model), adapted)
    with adapters_disabled(model):
        close(logits(model), base)


# --- what trains, and the gradual freezing of B ------------------------------------------------------------
def test_a_never_changes_and_the_frozen_columns_of_b_never_move_under_adamw() -> None:
    """freeze_period 2, r 4: column j freezes after step 2(j+1); B is fully frozen after step 8. AdamW with weight
    decay 0.1 would move frozen columns through its momentum and the decay; they must stay bit-identical."""
    model, method = applied(freeze_period=2)
    a0 = {n: m.lamda_A.detach().clone() for n, m in layers(model)}
    history: list[dict[str, torch.Tensor]] = [{n: m.lamda_B.detach().clone() for n, m in layers(model)}]
    s_history = [{n: m.lamda_S.detach().clone() for n, m in layers(model)}]

    def record(done: int) -> None:
        history.append({n: m.lamda_B.detach().clone() for n, m in layers(model)})
        s_history.append({n: m.lamda_S.detach().clone() for n, m in layers(model)})
        assert method.state_dict()["frozen_columns"] == {n: min(4, done // 2) for n, _ in layers(model)}

    run_steps(model, method, 10, on_step=record)
    for n, m in layers(model):
        assert torch.equal(m.lamda_A, a0[n])
        for done in range(1, 11):
            before, after = history[done - 1][n], history[done][n]
            frozen = min(4, (done - 1) // 2)  # columns frozen during step `done`
            assert torch.equal(after[:, :frozen], before[:, :frozen]), (n, done)
            assert (after[:, frozen:] != before[:, frozen:]).all(), (n, done)  # every trained entry moved
            assert (s_history[done][n] != s_history[done - 1][n]).all()
    assert all(not m.lamda_B.requires_grad for _, m in layers(model))


def test_frozen_columns_get_no_gradient_so_clipping_sees_only_what_trains() -> None:
    model, _ = applied()
    for _, m in layers(model):
        m.freeze_columns(3)
    model.train()
    batch = ids(1)
    model(input_ids=batch, labels=batch).loss.backward()
    for _, m in layers(model):
        assert torch.count_nonzero(m.lamda_B.grad[:, :3]) == 0
        assert torch.count_nonzero(m.lamda_B.grad[:, 3]) == m.out_features and m.lamda_A.grad is None


def test_trainable_count_is_r_squared_plus_the_unfrozen_b_columns() -> None:
    """freeze_period 1, r 4: during step `done`, done - 1 columns are frozen, so the step moves exactly
    r^2 + d_out (r - done + 1) entries per module; after step 4 only the r x r cores train."""
    model, method = applied(freeze_period=1)
    r = 4
    d_out = [m.out_features for _, m in layers(model)]
    count = lambda: sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count() == sum(r * r + d * r for d in d_out)

    def snapshot() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (m.lamda_B.detach().clone(), m.lamda_S.detach().clone()) for n, m in layers(model)}
    before, moved = [snapshot()], []

    def count_moved(done: int) -> None:
        now = snapshot()
        moved.append(sum(int((now[n][0] != before[-1][n][0]).sum() + (now[n][1] != before[-1][n][1]).sum())
                         for n in now))
        before.append(now)

    run_steps(model, method, 6, on_step=count_moved)
    assert moved == [sum(r * r + d * max(0, r - done + 1) for d in d_out) for done in range(1, 7)]
    assert count() == 14 * r * r
    groups = method.parameter_groups(model)
    assert [p for g in groups for p in g.params] == [m.lamda_S for _, m in layers(model)]


@pytest.mark.parametrize(("eta", "max_steps", "expected"), [
    (0.3, 10, [1, 2, 4, 4, 4]),  # B fully frozen after round(0.3 * 10) = 3 steps, r = 4: 4 * done // 3
    (0.5, 16, [0, 1, 1, 2, 2, 3, 3, 4, 4]),  # 8 steps to freeze all: one column every 2
])
def test_freeze_eta_spreads_the_columns_over_eta_times_the_run(eta: float, max_steps: int, expected: list) -> None:
    method = build_method({"name": "lamda", "r": 4, "freeze_eta": eta})
    assert [method._frozen_after(done, 4, max_steps) for done in range(1, len(expected) + 1)] == expected
    never = build_method({"name": "lamda", "r": 4, "freeze_period": 0})
    assert never._frozen_after(1000, 4, 10) == 0


# --- merging, saving, loading ----------------------------------------------------------------------------------
def test_merged_equals_unmerged_equals_reloaded_and_unload(tmp_path: Path) -> None:
    model, method = trained()
    unmerged = logits(model)
    save_adapter(model, method, tmp_path / "own", base_model="tiny", base_fingerprint=None)
    saved = load_file(tmp_path / "own" / "adapter_model.safetensors")
    assert len(saved) == 4 * 14 and "base_model.model.model.layers.0.self_attn.q_proj.lamda_B0S0" in saved
    fresh = tiny_llama()
    assert load_adapter(fresh, tmp_path / "own").name == "lamda"
    assert torch.equal(logits(fresh), unmerged)  # the same SVD here: nothing re-based, bit for bit

    method.merge(model)
    close(logits(model), unmerged)
    method.unload(model)
    assert not layers(model) and list(model.state_dict()) == list(tiny_llama().state_dict())
    close(logits(model), unmerged)  # the base plus the learned change

    other = load_adapter(tiny_llama(), tmp_path / "own")
    unloaded = tiny_llama()
    load_adapter(unloaded, tmp_path / "own")
    other.unload(unloaded)  # not merged: the base comes back
    close(logits(unloaded), logits(tiny_llama()))


def test_loading_rebases_when_this_machines_svd_differs(tmp_path: Path) -> None:
    """Stand in for an SVD that differs from the saving machine's: a fresh model whose start (A, B0 S0, W_res) is
    another valid decomposition of the same W0. Loading must still give the trained model's outputs."""
    model, method = trained()
    expected = logits(model)
    save_adapter(model, method, tmp_path / "own", base_model="tiny", base_fingerprint=None)
    state = load_file(tmp_path / "own" / "adapter_model.safetensors")
    fresh, again = applied()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, m in layers(fresh):
            w0 = m.weight.float() + m.scaling * m.lamda_B0S0 @ m.lamda_A
            m.lamda_A.add_(1e-2 * torch.randn(m.lamda_A.shape, generator=g))
            m.lamda_B0S0.add_(1e-2 * torch.randn(m.lamda_B0S0.shape, generator=g))
            m.weight.copy_(w0 - m.scaling * m.lamda_B0S0 @ m.lamda_A)
    with adapters_disabled(fresh):
        close(logits(fresh), logits(tiny_llama()))  # still a valid start of the same base
    again.load_adapter_state(fresh, state)
    close(logits(fresh), expected)
    with adapters_disabled(fresh):
        close(logits(fresh), logits(tiny_llama()))


def test_load_refuses_wrong_keys_and_ranks() -> None:
    model, method = trained()
    state = method.adapter_state(model)
    fresh, other = applied()
    with pytest.raises(KeyError, match="1 adapter tensor.*missing"):
        other.load_adapter_state(fresh, {k: v for k, v in list(state.items())[1:]})
    narrow, wide = applied(r=2)
    with pytest.raises(ValueError, match=r"saved rank 4 != r=2"):
        wide.load_adapter_state(narrow, state)
    other.load_adapter_state(fresh, state)  # the tensors are copied, never shared with the source model
    close(logits(fresh), logits(model), atol=0)
    shared = {m.lamda_S.data_ptr() for _, m in layers(model)} & {m.lamda_S.data_ptr() for _, m in layers(fresh)}
    assert not shared


@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
def test_export_is_a_plain_lora_of_the_unmodified_base(allocation: str, tmp_path: Path) -> None:
    """s (B S - B0 S0) A as lora_A = A, lora_B = B S - B0 S0: lmadapt's lora and PEFT load the folder on the
    *unmodified* base and give the LaMDA model's logits (LaMDA++: ranks differ and are zero-padded)."""
    from peft import PeftModel

    model, method = trained(skewed_llama, rank_allocation=allocation)
    ranks = [m.rank for _, m in layers(model)]
    assert (len(set(ranks)) > 1) is (allocation == "spectrum")
    expected = logits(model)
    plain, state = method.export(model)
    assert plain.name == "lora" and plain.config.r == max(ranks) and plain.config.alpha == 8
    scratch = skewed_llama()  # save_adapter reads adapter_state(model): the lora applied to a copy of the base
    plain.apply(scratch)
    plain.load_adapter_state(scratch, state)
    save_adapter(scratch, plain, tmp_path / "export", base_model="tiny", base_fingerprint=None)
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == 14

    ours = skewed_llama()
    assert load_adapter(ours, tmp_path / "export").name == "lora"
    close(logits(ours), expected)
    peft_model = PeftModel.from_pretrained(skewed_llama(), tmp_path / "export").eval()
    close(logits(peft_model), expected)
    assert (expected - logits(skewed_llama())).abs().max() > 1e-3  # not vacuous


def test_export_can_be_turned_off() -> None:
    model, method = applied(export=False)
    assert method.export(model) is None


# --- LaMDA++ ----------------------------------------------------------------------------------------------------
def test_spectrum_ranks_by_hand() -> None:
    """r = 2, three modules, budget 6. Scores 1 - (top-2 sum) / total:
    [4, 0, 0, 0] -> 0;  [1, 1, 1, 1] -> 0.5;  [3, 1, 1, 1, 1, 1] -> 1 - 4/8 = 0.5.
    Ideal ranks 6 * e / 1 = [0, 3, 3]; the floor of 1 takes one back from the lowest remainder (module 1, first)."""
    spectra = [torch.tensor([4.0, 0, 0, 0]), torch.tensor([1.0, 1, 1, 1]), torch.tensor([3.0, 1, 1, 1, 1, 1])]
    assert spectrum_ranks(spectra, 2) == [1, 2, 3]
    # caps: scores [1/3, 0, 0] want ranks [6, 0, 0]; module 0 holds at most 3 and the others at least 1, and the
    # one left over goes to the largest remainder below its cap (a tie: the first, module 1)
    spectra = [torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0, 0])]
    assert spectrum_ranks(spectra, 2) == [3, 2, 1]
    assert spectrum_ranks([torch.tensor([1.0, 0, 0])] * 2, 1) == [1, 1]  # no energy outside: uniform


def test_spectrum_allocation_keeps_the_uniform_budget() -> None:
    model, _ = applied(skewed_llama, rank_allocation="spectrum")
    ranks = {n: m.rank for n, m in layers(model)}
    assert sum(ranks.values()) == 4 * 14
    assert ranks["model.layers.0.self_attn.q_proj"] == 1  # nearly rank 2: almost nothing outside its top 4
    assert all(m.scaling == 8 / m.rank for _, m in layers(model))
    close(logits(model), logits(skewed_llama()), atol=EXACT)


# --- config and precision --------------------------------------------------------------------------------------
def test_config_problems_are_reported() -> None:
    with pytest.raises(ConfigError) as err:
        build_method({"name": "lamda", "r": 0, "alpha": 0, "freeze_eta": 0, "freeze_period": -1})
    for text in ("r: must be >= 1", "alpha: must be > 0", "freeze_eta: must be > 0", "freeze_period: must be >= 0"):
        assert text in str(err.value)
    with pytest.raises(LmadaptError, match=r"k_proj is 32 x 64, narrower than r=40"):
        applied(r=40)


@pytest.mark.parametrize("mode", ["autocast", "bf16-base"])
def test_bf16_matches_fp32_within_bf16_precision(mode: str) -> None:
    model, _ = trained()
    model.zero_grad(set_to_none=True)
    expected = logits(model)
    if mode == "bf16-base":  # a base stored in bf16; the adapter's fp32 factors cast themselves
        model.to(torch.bfloat16)
        for _, m in layers(model):
            for name in ("lamda_A", "lamda_B", "lamda_S", "lamda_B0S0"):
                getattr(m, name).data = getattr(m, name).data.float()
        ctx = contextlib.nullcontext()
    else:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    with ctx:
        got = logits(model)
        model.train()
        batch = ids(3)
        model(input_ids=batch, labels=batch).loss.backward()
        model.eval()
    assert got.dtype == torch.bfloat16
    close(got.float(), expected, atol=0.02 * expected.abs().max().item())  # a few bf16 roundings (2^-8) deep
    grads = [m.lamda_S.grad for _, m in layers(model)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# --- the real loop ---------------------------------------------------------------------------------------------
def _loop_config(run_config: dict, out: Path, precision: str) -> dict:
    """6 steps; r 4 with freeze_eta 0.5: columns frozen after steps 1, 2, 3 = 1, 2, 4 (B leaves the optimizer
    after step 3); checkpoints at steps 2 and 4."""
    cfg = {**run_config, "output_dir": str(out)}
    cfg["method"] = {"name": "lamda", "r": 4, "alpha": 8, "freeze_eta": 0.5, "target_modules": ["q_proj", "v_proj"]}
    cfg["train"] = {**run_config["train"], "grad_accum": 2, "batch_size": 4, "max_steps": 6, "save_every": 2,
                    "precision": precision, "weight_decay": 0.1}
    return cfg


def _checkpoint(run: Path, step: int) -> tuple[dict[str, torch.Tensor], dict]:
    folder = run / "checkpoints" / f"step-{step:07d}"
    state = json.loads((folder / "trainer_state.json").read_text())
    return load_file(str(folder / "adapter" / "adapter_model.safetensors")), state["method_state"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_loop_freezes_b_and_resumes_exactly(run_config, tmp_path, precision):
    whole = train(_loop_config(run_config, tmp_path / "whole", precision), progress=False)
    at2, state2 = _checkpoint(whole.run_dir, 2)
    at4, state4 = _checkpoint(whole.run_dir, 4)
    assert set(state2["frozen_columns"].values()) == {2} and set(state4["frozen_columns"].values()) == {4}
    for key in at4:
        if key.endswith(".lamda_B"):
            assert torch.equal(at4[key][:, :2], at2[key][:, :2]) and not torch.equal(at4[key], at2[key])
        if key.endswith((".lamda_A", ".lamda_B0S0")):
            assert torch.equal(at4[key], at2[key])
        if key.endswith(".lamda_S"):
            assert not torch.equal(at4[key], at2[key])

    cut = _loop_config(run_config, tmp_path / "cut", precision)
    with ctrl_c_at(3), pytest.raises(KeyboardInterrupt):  # after the checkpoint at 2, before B leaves at 3
        train(cut, progress=False)
    assert max(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == "step-0000002"
    resumed = train(cut, resume=True, progress=False)
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())
