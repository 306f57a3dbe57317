"""MiSS (Bone's successor): the forward against its weight form written out by hand, the three modes against
PEFT's MissLinear with the same weights, exact merge/unmerge, the adapter folder both ways with PEFT, bf16, and
the real training loop."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import MissConfig as PeftMissConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import lmadapt.methods.miss  # noqa: F401  (registration, until methods/__init__ imports it)
from lmadapt.adapters.format import WEIGHTS_NAME, load_adapter, save_adapter
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods import build_method
from lmadapt.methods.lora import PEFT_PREFIX
from lmadapt.methods.miss import Miss, MissConfig, MissLinear
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama

ATOL = 1e-5  # fp32 after a few matmuls
EXACT = 1e-6
BF16_LAYER_RTOL = 1e-2  # one linear layer in bf16 (eps 2^-8), relative to the output's largest value
BF16_LOGITS_ATOL = 5e-2  # tiny Llama logits (|z| < 1) after two bf16 blocks
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ["default", "mini", "bat"]
PEFT_INIT = {"default": True, "mini": "mini", "bat": "bat"}
SPEC = {"r": 4, "mini_r": 8, "target_modules": ALL}  # tiny Llama: d_in 64/128, d_out 64/32/128


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=ids()).logits


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def miss_model(mode: str, **cfg: object) -> tuple[nn.Module, Miss]:
    method = build_method({"name": "miss", **SPEC, "mode": mode, **cfg})
    model = tiny_llama()
    method.apply(model)
    return model, method


def randomize(model: nn.Module, seed: int = 1, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Small random miss_blocks (bat: I + B stays well conditioned); returns them under PEFT's keys."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for name, m in modules_of_type(model, MissLinear):
            m.miss_block.copy_(torch.randn(m.miss_block.shape, generator=g) * std)
            state[f"{PEFT_PREFIX}{name}.miss_block"] = m.miss_block.detach().clone()
    return state


def peft_model(mode: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny_llama(), PeftMissConfig(r=4, mini_r=8, init_weights=PEFT_INIT[mode],
                                                           target_modules=ALL)).eval()


# --- the layer against its formula -----------------------------------------------------------------
def hand_delta(d: torch.Tensor, d_out: int, d_in: int, mini_r: int | None = None) -> torch.Tensor:
    """Delta W[o, j] = D[j mod r, o] (mini: D[j mod r, o mod mini_r]), element by element."""
    r = d.shape[0]
    delta = torch.empty(d_out, d_in)
    for o in range(d_out):
        for j in range(d_in):
            delta[o, j] = d[j % r, o % mini_r if mini_r else o]
    return delta


@pytest.mark.parametrize(("d_in", "mode", "mini_r"), [(12, "default", None), (10, "default", None),
                                                     (10, "mini", 3)])
def test_summed_chunks_equal_the_weight_form(d_in: int, mode: str, mini_r: int | None) -> None:
    torch.manual_seed(0)
    base = nn.Linear(d_in, 6)
    layer = MissLinear(base, MissConfig(r=4, mode=mode, mini_r=mini_r or 1, init="random"))
    assert layer.weight is base.weight and layer.bias is base.bias  # same Parameters, same keys
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "miss_block"}
    d = layer.miss_block.detach()
    assert d.shape == ((4, 6) if mode == "default" else (4, mini_r))
    x = torch.randn(3, 5, d_in)
    padded = F.pad(x, (0, -d_in % 4))
    shards = sum(padded[..., k: k + 4] for k in range(0, padded.shape[-1], 4))  # the r-chunks, summed
    tiled = d if mode == "default" else d.repeat(1, 6 // mini_r)
    delta = hand_delta(d, 6, d_in, mini_r)
    with torch.no_grad():
        close(layer(x), x @ base.weight.T + base.bias + shards @ tiled)
        close(layer(x), x @ (base.weight + delta).T + base.bias)
        close(layer.delta_weight(), delta, atol=0)


def test_bat_builds_each_block_as_w_times_i_plus_b_plus_b() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 12)
    w0 = base.weight.detach().clone()
    layer = MissLinear(base, MissConfig(r=4, mode="bat", init="random"))
    b = layer.miss_block.detach()
    assert b.shape == (3, 4, 4)  # one r x r matrix per row-block j of the 12 output rows
    expected = torch.empty_like(w0)
    for j in range(3):
        for i in range(2):
            block = w0[4 * j: 4 * j + 4, 4 * i: 4 * i + 4]
            expected[4 * j: 4 * j + 4, 4 * i: 4 * i + 4] = block @ (torch.eye(4) + b[j]) + b[j]
    x = torch.randn(5, 8)
    with torch.no_grad():
        close(layer(x), x @ expected.T + base.bias)
        layer.merge()
        close(layer.weight, expected)
        close(layer(x), x @ expected.T + base.bias)
        layer.unmerge()
    close(layer.weight, w0, atol=EXACT)


def test_dropout_drops_only_the_shard_input_in_training() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = MissLinear(base, MissConfig(r=4, dropout=0.5, init="random"))
    x = torch.randn(16, 8)
    d = layer.miss_block.detach()
    plain = (x @ base.weight.T + base.bias).detach()
    with torch.no_grad():
        layer.eval()
        close(layer(x), plain + (x[:, :4] + x[:, 4:]) @ d)
        layer.train()
        torch.manual_seed(7)
        got = layer(x)
        torch.manual_seed(7)
        h = F.dropout(x, 0.5, training=True)
        close(got, plain + (h[:, :4] + h[:, 4:]) @ d)
        layer.merge()
        layer.adapter_enabled = False  # taking the merged update back out must use x itself, not a dropped x
        close(layer(x), plain)


# --- against PEFT, same weights ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_forward_and_merge_equal_peft_with_the_same_weights(mode: str) -> None:
    ours, method = miss_model(mode)
    state = randomize(ours)
    peft = peft_model(mode)
    loaded = peft.load_state_dict({k.replace(".miss_block", ".miss_block.default"): v for k, v in state.items()},
                                  strict=False)
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "miss_block" in k]
    expected = logits(peft)
    assert (expected - logits(tiny_llama())).abs().max() > 0.1  # the adapter matters here
    close(logits(ours), expected)
    method.merge(ours)
    peft.merge_adapter()
    for name, m in modules_of_type(ours, MissLinear):
        close(m.weight, peft.get_submodule(f"base_model.model.{name}").get_base_layer().weight, atol=EXACT)


@pytest.mark.parametrize("mode", MODES)
def test_peft_loads_our_folder_and_we_load_peft_s(mode: str, tmp_path: Path) -> None:
    ours, method = miss_model(mode)
    randomize(ours)
    expected = logits(ours)
    save_adapter(ours, method, tmp_path / "ours", base_model="tiny", base_fingerprint=None)
    saved = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.miss_block" in saved and len(saved) == 14
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    assert theirs.peft_config["default"].init_weights == PEFT_INIT[mode]
    close(logits(theirs), expected)

    peft = peft_model(mode)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for _, p in sorted((n, p) for n, p in peft.named_parameters() if "miss_block" in n):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft.save_pretrained(tmp_path / "peft")
    fresh = tiny_llama()
    reloaded = load_adapter(fresh, tmp_path / "peft")
    assert reloaded.name == "miss" and reloaded.config.mode == mode
    close(logits(fresh), logits(peft))


@pytest.mark.parametrize("mode", MODES)
def test_merged_equals_unmerged_equals_reloaded_and_unmerge_restores_w0(mode: str, tmp_path: Path) -> None:
    ours, method = miss_model(mode)
    randomize(ours)
    unmerged = logits(ours)
    save_adapter(ours, method, tmp_path / "a", base_model="tiny", base_fingerprint=None)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "a")
    close(logits(fresh), unmerged)
    w0 = {k: v.clone() for k, v in ours.state_dict().items() if "miss_block" not in k}
    method.merge(ours)
    assert all(not torch.equal(m.weight, w0[f"{n}.weight"]) for n, m in modules_of_type(ours, MissLinear))
    close(logits(ours), unmerged)
    method.merge(ours)  # a no-op
    close(logits(ours), unmerged)
    method.unmerge(ours)
    close(logits(ours), unmerged)
    after = ours.state_dict()
    for key, value in w0.items():
        close(after[key], value, atol=EXACT)


@pytest.mark.parametrize("mode", MODES)
def test_adapters_disabled_gives_base_logits_merged_or_not(mode: str) -> None:
    ours, method = miss_model(mode)
    randomize(ours)
    base, adapted = logits(tiny_llama()), logits(ours)
    with adapters_disabled(ours):
        close(logits(ours), base, atol=EXACT)
    method.merge(ours)
    with adapters_disabled(ours):  # the merged update is taken back out (bat: through (I + B)^-1)
        close(logits(ours), base)
    close(logits(ours), adapted)


@pytest.mark.parametrize(("mode", "per_layer"), [("default", lambda m: 4 * m.out_features),
                                                 ("mini", lambda m: 4 * 8),
                                                 ("bat", lambda m: m.out_features * 4)])
def test_trainable_counts_and_identity_at_init(mode: str, per_layer) -> None:
    ours, method = miss_model(mode)
    layers = [m for _, m in modules_of_type(ours, MissLinear)]
    assert len(layers) == 14
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(per_layer(m) for m in layers)
    assert [p for g in method.parameter_groups(ours) for p in g.params] == [m.miss_block for m in layers]
    close(logits(ours), logits(tiny_llama()), atol=0)


# --- bf16 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_bf16_is_fp32_within_bf16_tolerance(mode: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 128)
    layer = MissLinear(base, MissConfig(r=4, mode=mode, mini_r=8, init="random"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = layer(x)
        assert (ref - base(x)).abs().max() > 0.5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = layer(x)
        assert auto.dtype == torch.bfloat16
        close(auto.float(), ref, atol=BF16_LAYER_RTOL * float(ref.abs().max()))

    ours, _ = miss_model(mode)
    randomize(ours)
    ref = logits(ours)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        close(logits(ours).float(), ref, atol=BF16_LOGITS_ATOL)
    ours.to(torch.bfloat16)  # a bf16-stored base; miss_block kept in fp32 as training keeps it
    for _, m in modules_of_type(ours, MissLinear):
        m.miss_block.data = m.miss_block.data.float()
    got = logits(ours)
    assert got.dtype == torch.bfloat16
    close(got.float(), ref, atol=BF16_LOGITS_ATOL)
    ours(input_ids=ids()).logits.float().square().mean().backward()
    assert all(m.miss_block.grad.dtype == torch.float32 and m.miss_block.grad.abs().sum() > 0
               for _, m in modules_of_type(ours, MissLinear))


# --- config, errors, PEFT's config ----------------------------------------------------------------------
def test_adapter_config_is_peft_s_miss_config() -> None:
    for mode in MODES:
        _, method = miss_model(mode)
        cfg = method.adapter_config()
        assert set(cfg) <= set(PeftMissConfig().to_dict())
        peft = PeftMissConfig(**{k: v for k, v in cfg.items() if k != "peft_type"})
        assert peft.init_weights == PEFT_INIT[mode] and peft.r == 4 and peft.mini_r == 8
        assert Miss.config_from_peft(cfg) == {**SPEC, "mode": mode, "dropout": 0.0, "init": "zero",
                                              "target_modules": sorted(ALL), "exclude_modules": []}
    _, method = miss_model("default", init="random")
    assert method.adapter_config()["init_weights"] is False  # PEFT's random init of the default mode
    assert Miss.config_from_peft({"init_weights": False, "target_modules": ["q_proj"]})["init"] == "random"
    bat = Miss.config_from_peft({"init_weights": "bat", "miss_dropout": 0.1, "target_modules": ".*q_proj"})
    assert bat["dropout"] == 0.0 and bat["target_modules"] == ["re:.*q_proj"]  # PEFT's string is a regex


@pytest.mark.parametrize(("peft", "match"), [
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"init_weights": "pissa"}, "init_weights 'pissa' is not one of PEFT's MiSS modes"),
    ({"target_modules": None}, "target_modules is empty"),
])
def test_config_from_peft_refuses_what_lmadapt_cannot_honour(peft: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Miss.config_from_peft({"peft_type": "MISS", "r": 4, "target_modules": ["q_proj"], **peft})


@pytest.mark.parametrize(("cfg", "needles"), [
    ({"mode": "bat", "r": 6}, ["model.layers.0.self_attn.q_proj (and 3 more)",
                               "in_features 64 and out_features 64", "r=4 or 8 would work (any divisor of 64)",
                               "model.layers.0.self_attn.k_proj (and 3 more)", "any divisor of 32",
                               "r=4 or 8 works for all of them (any divisor of 32)"]),
    ({"mode": "mini", "mini_r": 3}, ["model.layers.0.self_attn.q_proj", "out_features 64, which mini_r=3",
                                     "mini_r=2 or 4 would work", "mini_r=2 or 4 works for all of them"]),
    ({"r": 100}, ["r=100 is larger than in_features 64; choose r <= 64", "choose r <= 64, or exclude"]),
])
def test_shapes_the_mode_cannot_use_are_named_with_a_fix(cfg: dict, needles: list[str]) -> None:
    method = build_method({"name": "miss", **SPEC, **cfg})
    with pytest.raises(LmadaptError) as err:
        method.apply(tiny_llama())
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_config_check_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        build_method({"name": "miss", "r": 0, "mini_r": 0, "mode": "bat", "dropout": 0.1, "target_modules": []})
    for needle in ("r: must be >= 1", "mini_r: must be >= 1", "mode 'bat'", "target_modules"):
        assert needle in str(err.value)


def test_load_adapter_state_refuses_wrong_keys_and_shapes() -> None:
    ours, method = miss_model("default")
    state = method.adapter_state(ours)
    with pytest.raises(KeyError, match="1 adapter tensor"):
        method.load_adapter_state(ours, dict(list(state.items())[1:]))
    key = next(iter(state))
    with pytest.raises(ValueError, match=r"saved shape \(8, 64\) != model's \(4, 64\).*mode or mini_r"):
        method.load_adapter_state(ours, {**state, key: torch.zeros(8, 64)})


# --- the real loop ---------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("mode", "precision"), [("default", "bf16"), ("bat", "fp32"), ("bat", "bf16")])
def test_trains_through_the_loop_and_the_adapter_reloads(run_config, tmp_path: Path, tiny_model_dir,
                                                         mode: str, precision: str) -> None:
    import lmadapt

    run_config["method"] = {"name": "miss", "r": 4, "mode": mode, "target_modules": ["q_proj", "v_proj"]}
    run_config["train"].update({"max_steps": 4, "precision": precision, "lr": 2e-3})
    result = train(run_config, progress=False)
    saved = load_file(result.adapter_dir / WEIGHTS_NAME)
    assert len(saved) == 4 and all(torch.count_nonzero(v) > 0 for v in saved.values())
    model, _, _ = lmadapt.load(str(tiny_model_dir), adapter=result.adapter_dir)
    method = build_method(run_config["method"])
    fresh = tiny_llama()
    method.apply(fresh)
    method.load_adapter_state(fresh, saved)
    close(logits(model.float()), logits(fresh))
