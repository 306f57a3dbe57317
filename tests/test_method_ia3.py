"""(IA)^3: the layer against its formula, the tiny Llama against PEFT's IA3 with the same vectors (biases
included), merge/unmerge exact with zero scales, the adapter folder both ways with PEFT, bf16, and the real loop."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from lmadapt.adapters.format import WEIGHTS_NAME, load_adapter, save_adapter
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods import build_method
from lmadapt.methods.ia3 import IA3, MIN_SCALE, IA3Config, IA3Linear
from lmadapt.methods.lora import PEFT_PREFIX
from lmadapt.models.tree import adapters_disabled, modules_of_type
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama

ATOL = 1e-5  # fp32 logits after a few matmuls
EXACT = 1e-6
DIVIDED = 2.4e-7  # relative: (w l) / l in fp32 is two roundings of 2^-24 each from w
BF16_LAYER_RTOL = 1e-2  # one linear layer in bf16 (eps 2^-8), relative to the output's largest value
BF16_LOGITS_ATOL = 5e-2  # tiny Llama logits (|z| < 1) after two bf16 blocks
TARGETS = ["k_proj", "v_proj", "down_proj"]  # PEFT's IA3 defaults for Llama; down_proj is feed-forward
# the first down_proj is feed-forward, the second is not: PEFT must get this back from our saved config
MIXED = {"feedforward_modules": [r"re:model\.layers\.0\.mlp\.down_proj"]}
CASES = [{}, {"exclude_modules": ["re:model.layers.1.self_attn.k_proj"]}, MIXED,
         {"target_modules": ["all-linear"]}]


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=ids()).logits


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def base(bias: bool = False) -> nn.Module:
    """The tiny Llama; with ``bias``, every projection has a bias of small random values (Llama inits them to 0)."""
    model = tiny_llama(attention_bias=bias, mlp_bias=bias)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def ia3_model(bias: bool = False, **cfg: object) -> tuple[nn.Module, IA3]:
    method = build_method({"name": "ia3", **cfg})
    model = base(bias)
    method.apply(model)
    return model, method


def randomize(model: nn.Module, seed: int = 1, zeros: bool = False) -> dict[str, torch.Tensor]:
    """Scales 1 + N(0, 0.3^2) (zeros: the first three of each vector 0, 1e-7 and -3e-5, all below MIN_SCALE);
    returns them under PEFT's keys."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for name, m in modules_of_type(model, IA3Linear):
            v = 1 + 0.3 * torch.randn(m.ia3_l.shape, generator=g)
            if zeros:
                v.view(-1)[:3] = torch.tensor([0.0, 1e-7, -3e-5])
            m.ia3_l.copy_(v)
            state[f"{PEFT_PREFIX}{name}.ia3_l"] = v
    return state


def peft_model(bias: bool = False, **cfg: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base(bias), PeftIA3Config(**cfg)).eval()


# --- the layer against its formula -----------------------------------------------------------------
def test_layer_scales_the_output_or_the_input_as_the_formula_says() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    w, b = lin.weight.detach(), lin.bias.detach()
    x = torch.randn(3, 4, 6)
    out, ff = IA3Linear(lin, feedforward=False, init="random"), IA3Linear(lin, feedforward=True, init="random")
    assert out.weight is lin.weight and out.bias is lin.bias  # same Parameters, same state-dict keys
    assert set(dict(out.named_parameters())) == {"weight", "bias", "ia3_l"}
    assert out.ia3_l.shape == (5, 1) and ff.ia3_l.shape == (1, 6)  # PEFT's shapes
    lo, lf = out.ia3_l.detach().flatten(), ff.ia3_l.detach().flatten()
    with torch.no_grad():
        close(out(x), lo * (x @ w.T + b))  # keys/values: the whole output, bias included
        close(ff(x), (lf * x) @ w.T + b)  # feed-forward: the input, so not the bias
        close(out(x), x @ (lo[:, None] * w).T + lo * b)  # the merged form: rows of W and b
        close(ff(x), x @ (w * lf[None, :]).T + b)  # columns of W


def test_identity_at_init_one_group_without_weight_decay() -> None:
    model, method = ia3_model()
    layers = dict(modules_of_type(model, IA3Linear))
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(TARGETS) and len(layers) == 6
    assert all(m.feedforward == n.endswith("down_proj") for n, m in layers.items())
    assert all(torch.equal(m.ia3_l, torch.ones_like(m.ia3_l)) for m in layers.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (32 + 32 + 128)  # k, v out; down in
    (group,) = method.parameter_groups(model)
    assert group.params == [m.ia3_l for m in layers.values()] and group.weight_decay == 0.0
    close(logits(model), logits(tiny_llama()), atol=0)


def test_defaults_pick_the_layers_peft_picks_for_llama() -> None:
    ours, _ = ia3_model()
    peft = peft_model()  # no target_modules or feedforward_modules: PEFT's table for model_type llama
    theirs = {n.removeprefix("base_model.model."): (m.is_feedforward, tuple(m.ia3_l["default"].shape))
              for n, m in peft.named_modules() if hasattr(m, "ia3_l")}
    assert theirs == {n: (m.feedforward, tuple(m.ia3_l.shape)) for n, m in modules_of_type(ours, IA3Linear)}


# --- against PEFT, same weights ---------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_merge_equal_peft_with_the_same_weights(bias: bool) -> None:
    ours, method = ia3_model(bias)
    state = randomize(ours)
    peft = peft_model(bias, target_modules=TARGETS, feedforward_modules=["down_proj"])
    loaded = peft.load_state_dict({k.replace(".ia3_l", ".ia3_l.default"): v for k, v in state.items()}, strict=False)
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "ia3_l" in k]
    expected = logits(peft)
    assert (expected - logits(base(bias))).abs().max() > 0.01  # the vectors matter here (1000 x ATOL)
    close(logits(ours), expected)
    method.merge(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.merge_adapter()
    for name, m in modules_of_type(ours, IA3Linear):
        theirs = peft.get_submodule(f"base_model.model.{name}").get_base_layer()
        close(m.weight, theirs.weight, atol=EXACT)
        if bias:
            close(m.bias, theirs.bias, atol=EXACT)


@pytest.mark.parametrize("cfg", CASES, ids=["default", "exclude", "mixed", "all-linear"])
def test_peft_loads_our_folder_and_we_load_peft_s(cfg: dict, tmp_path: Path) -> None:
    ours, method = ia3_model(**cfg)
    randomize(ours)
    expected = logits(ours)
    save_adapter(ours, method, tmp_path / "ours", base_model="tiny", base_fingerprint=None)
    saved = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    layers = dict(modules_of_type(ours, IA3Linear))
    assert saved.keys() == {f"{PEFT_PREFIX}{n}.ia3_l" for n in layers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    got = {n.removeprefix("base_model.model."): m.is_feedforward for n, m in theirs.named_modules()
           if hasattr(m, "ia3_l")}
    assert got == {n: m.feedforward for n, m in layers.items()}
    close(logits(theirs), expected)

    with torch.no_grad():  # PEFT's own adapter, saved by PEFT, read back by lmadapt
        g = torch.Generator().manual_seed(2)
        for _, p in sorted((n, p) for n, p in theirs.named_parameters() if "ia3_l" in n):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Could not find a config file in tiny": our made-up base name
        theirs.save_pretrained(tmp_path / "peft")
    assert load_file(tmp_path / "peft" / WEIGHTS_NAME).keys() == saved.keys()  # one layout, PEFT's
    fresh = base()
    reloaded = load_adapter(fresh, tmp_path / "peft")
    assert reloaded.name == "ia3"
    assert reloaded.feedforward_names == [n for n, m in layers.items() if m.feedforward]
    close(logits(fresh), logits(theirs))


@pytest.mark.parametrize("bias", [False, True])
def test_merged_equals_unmerged_equals_reloaded_even_with_zero_scales(bias: bool, tmp_path: Path) -> None:
    ours, method = ia3_model(bias)
    randomize(ours, zeros=True)
    unmerged = logits(ours)
    save_adapter(ours, method, tmp_path / "a", base_model="tiny", base_fingerprint=None)
    fresh = base(bias)
    load_adapter(fresh, tmp_path / "a")
    close(logits(fresh), unmerged)
    w0 = {k: v.clone() for k, v in ours.state_dict().items() if "ia3_l" not in k}
    method.merge(ours)
    for name, m in modules_of_type(ours, IA3Linear):
        zeroed = m.weight[:, 0] if m.feedforward else m.weight[0]
        assert not zeroed.any()  # l = 0 erased it: dividing (PEFT's unmerge) cannot bring it back
        assert m.kept_weight.shape == ((m.out_features, 3) if m.feedforward else (3, m.in_features))
    close(logits(ours), unmerged)
    method.merge(ours)  # a no-op
    close(logits(ours), unmerged)
    method.unmerge(ours)
    close(logits(ours), unmerged)
    after = ours.state_dict()
    assert after.keys() == {*w0, *(f"{n}.ia3_l" for n, _ in modules_of_type(ours, IA3Linear))}
    for key, value in w0.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=DIVIDED)
    for name, m in modules_of_type(ours, IA3Linear):  # the scales below MIN_SCALE: restored bit for bit
        kept = (lambda t: t[:, :3]) if m.feedforward else (lambda t: t[:3])
        assert torch.equal(kept(m.weight), kept(w0[f"{name}.weight"]))
        assert m.kept_weight is None


@pytest.mark.parametrize("bias", [False, True])
def test_adapters_disabled_gives_base_logits_merged_or_not(bias: bool) -> None:
    ours, method = ia3_model(bias)
    randomize(ours, zeros=True)
    plain, adapted = logits(base(bias)), logits(ours)
    assert (plain - adapted).abs().max() > 0.01
    with adapters_disabled(ours):
        close(logits(ours), plain, atol=EXACT)
    method.merge(ours)
    with adapters_disabled(ours):  # the base weight is rebuilt per call from the merged one and the kept slices
        close(logits(ours), plain)
    close(logits(ours), adapted)


def test_merge_refuses_non_finite_scales_and_changes_nothing() -> None:
    ours, method = ia3_model()
    w0 = {k: v.clone() for k, v in ours.state_dict().items()}
    layer = dict(modules_of_type(ours, IA3Linear))["model.layers.1.mlp.down_proj"]  # the last one merged
    with torch.no_grad():
        layer.ia3_l[0, 3] = float("nan")
    with pytest.raises(LmadaptError, match=r"ia3_l of model.layers.1.mlp.down_proj has NaN.*nothing was merged"):
        method.merge(ours)
    assert all(torch.equal(v, w0[k]) for k, v in ours.state_dict().items() if "ia3_l" not in k)
    with pytest.raises(LmadaptError, match="NaN or infinite entries, so training diverged; it was not merged"):
        layer.merge()


def test_min_scale_is_where_division_stops() -> None:
    lin = nn.Linear(4, 3, bias=True)
    layer = IA3Linear(lin, feedforward=False)
    with torch.no_grad():
        layer.ia3_l.copy_(torch.tensor([[MIN_SCALE], [MIN_SCALE * 0.99], [2.0]]))
    layer.merge()
    assert layer.kept_weight.shape == (1, 4) and layer.kept_bias.shape == (1,)  # only the one below MIN_SCALE


# --- bf16 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feedforward", [False, True])
def test_bf16_is_fp32_within_bf16_tolerance(feedforward: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 128)
    layer = IA3Linear(lin, feedforward, init="random")
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = layer(x)
        assert (ref - lin(x)).abs().max() > 0.5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = layer(x)
        assert auto.dtype == torch.bfloat16
        close(auto.float(), ref, atol=BF16_LAYER_RTOL * float(ref.abs().max()))

    ours, _ = ia3_model()
    randomize(ours)
    ref = logits(ours)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        close(logits(ours).float(), ref, atol=BF16_LOGITS_ATOL)
    ours.to(torch.bfloat16)  # a bf16-stored base; ia3_l kept in fp32 as training keeps it
    for _, m in modules_of_type(ours, IA3Linear):
        m.ia3_l.data = m.ia3_l.data.float()
    got = logits(ours)
    assert got.dtype == torch.bfloat16
    close(got.float(), ref, atol=BF16_LOGITS_ATOL)
    ours(input_ids=ids()).logits.float().square().mean().backward()
    assert all(m.ia3_l.grad.dtype == torch.float32 and m.ia3_l.grad.abs().sum() > 0
               for _, m in modules_of_type(ours, IA3Linear))


# --- config, errors, PEFT's config ----------------------------------------------------------------------
def test_adapter_config_is_peft_s_ia3_config_and_reads_back() -> None:
    _, method = ia3_model()
    cfg = method.adapter_config()
    assert set(cfg) <= set(PeftIA3Config().to_dict())
    peft = PeftIA3Config(**{k: v for k, v in cfg.items() if k != "peft_type"})  # PEFT's subset check passes
    assert peft.feedforward_modules == {"down_proj"} and peft.init_ia3_weights is True
    assert IA3.config_from_peft(cfg) == {"target_modules": sorted(TARGETS), "feedforward_modules": ["down_proj"],
                                         "exclude_modules": [], "init": "ones"}
    _, method = ia3_model(init="random")
    assert method.adapter_config()["init_ia3_weights"] is False
    assert IA3.config_from_peft({**cfg, "init_ia3_weights": False})["init"] == "random"
    regex = IA3.config_from_peft({"target_modules": ".*_proj", "feedforward_modules": ".*down_proj",
                                  "exclude_modules": ".*q_proj"})
    assert regex == {"target_modules": ["re:.*_proj"], "feedforward_modules": ["re:.*down_proj"],
                     "exclude_modules": ["re:.*q_proj"], "init": "ones"}  # PEFT's strings are regexes


def test_feedforward_outside_the_target_list_is_written_as_a_regex() -> None:
    # PEFT requires feedforward_modules to be a subset of a target list; 'mlp.down_proj' is not, by name
    _, method = ia3_model(feedforward_modules=["mlp.down_proj"])
    cfg = method.adapter_config()
    assert cfg["target_modules"] == sorted(TARGETS)
    assert cfg["feedforward_modules"] == r"^(model\.layers\.0\.mlp\.down_proj|model\.layers\.1\.mlp\.down_proj)$"
    PeftIA3Config(**{k: v for k, v in cfg.items() if k != "peft_type"})
    _, mixed = ia3_model(**MIXED)
    assert mixed.adapter_config()["feedforward_modules"] == r"^(model\.layers\.0\.mlp\.down_proj)$"
    again = build_method({"name": "ia3", **IA3.config_from_peft(mixed.adapter_config())})
    again.apply(base())
    assert again.feedforward_names == mixed.feedforward_names == ["model.layers.0.mlp.down_proj"]


@pytest.mark.parametrize(("peft", "match"), [
    ({"fan_in_fan_out": True}, "fan_in_fan_out, which lmadapt's ia3 does not support"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": None}, "target_modules is empty"),
    ({"feedforward_modules": None}, "feedforward_modules is missing"),
])
def test_config_from_peft_refuses_what_lmadapt_cannot_honour(peft: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IA3.config_from_peft({"peft_type": "IA3", "target_modules": TARGETS, "feedforward_modules": ["down_proj"],
                              **peft})


def test_feedforward_modules_must_be_targets() -> None:
    method = build_method({"name": "ia3", "target_modules": ["q_proj", "v_proj"]})  # down_proj still feed-forward
    with pytest.raises(LmadaptError, match=r"feedforward_modules 'down_proj' select\(s\) none of the 4 adapted"):
        method.apply(tiny_llama())
    ok = build_method({"name": "ia3", "target_modules": ["q_proj", "v_proj"], "feedforward_modules": []})
    model = tiny_llama()
    ok.apply(model)
    assert not any(m.feedforward for _, m in modules_of_type(model, IA3Linear))
    with pytest.raises(ConfigError, match="target_modules: name at least one module"):
        build_method({"name": "ia3", "target_modules": []})
    assert IA3Config().feedforward_modules == ["down_proj"]


def test_load_adapter_state_refuses_wrong_keys_and_shapes() -> None:
    ours, method = ia3_model()
    state = method.adapter_state(ours)
    with pytest.raises(KeyError, match="1 adapter tensor"):
        method.load_adapter_state(ours, dict(list(state.items())[1:]))
    other, other_method = ia3_model(feedforward_modules=[])  # down_proj scales its output: (64, 1), not (1, 128)
    with pytest.raises(ValueError, match=r"mlp.down_proj.ia3_l: saved shape \(64, 1\) != model's \(1, 128\).*feedforward"):
        method.load_adapter_state(ours, other_method.adapter_state(other))


# --- the real loop ---------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trains_through_the_loop_and_the_adapter_reloads(run_config, tmp_path: Path, tiny_model_dir,
                                                         precision: str) -> None:
    import lmadapt

    run_config["method"] = {"name": "ia3"}
    run_config["train"].update({"max_steps": 4, "precision": precision, "lr": 1e-2})
    result = train(run_config, progress=False)
    saved = load_file(result.adapter_dir / WEIGHTS_NAME)
    assert len(saved) == 6 and all((v - 1).abs().max() > 1e-3 for v in saved.values())  # every vector moved
    assert all(v.dtype == torch.float32 for v in saved.values())
    model, _, _ = lmadapt.load(str(tiny_model_dir), adapter=result.adapter_dir)
    method = build_method(run_config["method"])
    fresh = tiny_llama()
    method.apply(fresh)
    method.load_adapter_state(fresh, saved)
    close(logits(model.float()), logits(fresh))
