"""Merging (lmadapt.updates.merging): each formula against hand-made tensors (trim, sign election, disjoint mean,
DARE's drop and rescale) and against PEFT's merge_utils; adapters turned into their updates with different
ranks, rsLoRA and DoRA, checked against the dense result computed by hand (the cases PEFT's add_weighted_adapter
gets wrong: peft #3761, #3737); the SVD re-compression; the merged adapter in lmadapt and PEFT against the dense
merged model; full models tensor by tensor; refusals; the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmadapt.adapters.format import WEIGHTS_NAME, read_adapter_info, save_adapter
from lmadapt.api import load
from lmadapt.api import merge as fold
from lmadapt.cli import main
from lmadapt.errors import AdapterError, LmadaptError
from lmadapt.methods import build_method
from lmadapt.methods.dora import DoraLinear
from lmadapt.methods.lora import PEFT_PREFIX
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.shards import read_tensor, tensor_index
from lmadapt.models.tree import modules_of_type
from lmadapt.testing import tiny_llama, tiny_tokenizer
from lmadapt.updates.merge_adapters import svd_factors
from lmadapt.updates.merging import (
    dare,
    dare_generator,
    dare_ties,
    disjoint_mean,
    drop_and_rescale,
    elect_sign,
    linear,
    merge_adapters,
    merge_models,
    merge_spec,
    task_arithmetic,
    ties,
    trim,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5  # fp32 logits of the tiny model
T = torch.tensor


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------ formulas

def test_trim_keeps_the_largest_magnitudes():
    tau = T([0.5, -3.0, 1.0, -0.1, 2.0, 0.0])
    assert trim(tau, 0.5).tolist() == [0.0, -3.0, 1.0, 0.0, 2.0, 0.0]  # k = int(0.5 * 6) = 3
    assert trim(tau, 1.0) is tau
    assert trim(tau, 0.1).tolist() == [0.0] * 6  # k = int(0.6) = 0
    assert trim(tau.reshape(2, 3), 0.34).tolist() == [[0.0, -3.0, 0.0], [0.0, 2.0, 0.0]]  # shape kept


def test_ties_elects_the_sign_of_the_sum_and_averages_the_agreeing_entries():
    taus = [T([1.0, -2.0, 3.0, 0.0]), T([3.0, 1.0, -1.0, 2.0]), T([-1.0, -2.0, 0.0, 4.0])]
    # sums 3, -3, 2, 6: signs +, -, +, +; agreeing: {1, 3}, {-2, -2}, {3} (0 agrees with nothing), {2, 4}
    assert elect_sign(torch.stack(taus)).tolist() == [1.0, -1.0, 1.0, 1.0]
    assert ties(taus, [1, 1, 1], 1.0).tolist() == [2.0, -2.0, 3.0, 3.0]
    # weights 2, 1, 1: weighted sums 4, -5, 5, 6; entry 0 = (2*1 + 1*3) / (2 + 1), entry 2 = 2*3 / 2
    close(ties(taus, [2, 1, 1], 1.0), T([5 / 3, -2.0, 3.0, 3.0]))
    # density 0.5 trims each to its 2 largest: [0,-2,3,0], [3,0,0,2], [0,-2,0,4]
    assert ties(taus, [1, 1, 1], 0.5).tolist() == [3.0, -2.0, 3.0, 3.0]
    assert disjoint_mean([T([1.0]), T([-1.0])], [1, 1]).tolist() == [1.0]  # a tie elects +
    assert disjoint_mean([T([0.0]), T([0.0])], [1, 1]).tolist() == [0.0]  # nobody agrees: 0
    # a negative weight flips the input's vote; the divisor is |w|, so the elected sign stays
    assert disjoint_mean([T([2.0]), T([4.0])], [1, -1]).tolist() == [-4.0]


def test_ties_with_equal_weights_is_peft_ties():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(12, 7, generator=g) for _ in range(3)]
    theirs = merge_utils.ties(taus, torch.ones(3), density=0.4)
    close(ties(taus, [1, 1, 1], 0.4), theirs)


def test_linear_and_task_arithmetic():
    taus = [T([1.0, 2.0]), T([3.0, -4.0])]
    close(linear(taus, [1, 3]), T([2.5, -2.5]))
    close(task_arithmetic(taus, [1, -0.5]), T([-0.5, 4.0]))
    close(task_arithmetic(taus, [1, 1]), merge_utils.task_arithmetic(taus, torch.ones(2)))
    with pytest.raises(ValueError, match="task_arithmetic"):
        linear(taus, [1, -1])


def test_dare_drops_at_the_rate_rescales_the_rest_and_is_reproducible():
    tau = torch.randn(200, 50, generator=torch.Generator().manual_seed(0))
    out = drop_and_rescale(tau, 0.3, dare_generator(7, "w", 0))
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.02
    close(out[kept], tau[kept] / 0.7)
    assert torch.equal(out, drop_and_rescale(tau, 0.3, dare_generator(7, "w", 0)))  # same seed, same drops
    assert not torch.equal(out, drop_and_rescale(tau, 0.3, dare_generator(8, "w", 0)))
    assert not torch.equal(out, drop_and_rescale(tau, 0.3, dare_generator(7, "v", 0)))  # per tensor
    assert not torch.equal(out, drop_and_rescale(tau, 0.3, dare_generator(7, "w", 1)))  # per input
    assert torch.equal(drop_and_rescale(tau, 0.0, dare_generator(7, "w", 0)), tau)  # p = 0: tau itself
    # its expectation is tau: the mean over many seeds converges (std of one entry: |tau| sqrt(p / (1 - p)))
    small = tau[:4, :5]
    mean = torch.stack([drop_and_rescale(small, 0.5, dare_generator(s, "w", 0)) for s in range(4000)]).mean(0)
    assert ((mean - small).abs() <= 5 * small.abs() / math.sqrt(4000) + 1e-6).all()


def test_dare_and_dare_ties_are_drop_then_merge():
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(6, 5, generator=g) for _ in range(2)]
    dropped = [drop_and_rescale(t, 0.4, dare_generator(3, "m", i)) for i, t in enumerate(taus)]
    close(dare(taus, [1, 2], 0.4, 3, "m"), dropped[0] + 2 * dropped[1])
    close(dare_ties(taus, [1, 1], 0.4, 3, "m"), merge_utils.disjoint_merge(
        torch.stack(dropped), merge_utils.calculate_majority_sign_mask(torch.stack(dropped))))


def test_merge_spec_reports_every_problem_by_flag():
    names = {"combine": "--combine", "weights": "--weights", "density": "--density", "drop_rate": "--drop-rate"}
    with pytest.raises(LmadaptError) as err:
        merge_spec("ties", 2, weights=[1, 2, 3], drop_rate=0.5, names=names)
    text = str(err.value)
    assert "--weights: 3 weight(s) for 2 input(s)" in text and "ties needs --density" in text
    assert "--drop-rate is DARE's" in text
    with pytest.raises(LmadaptError, match="dare needs drop_rate"):
        merge_spec("dare", 2)
    with pytest.raises(LmadaptError, match=r"drop_rate is a probability in \[0, 1\); got 1"):
        merge_spec("dare_ties", 2, drop_rate=1.0)
    with pytest.raises(LmadaptError, match="combine must be one of"):
        merge_spec("slerp", 2)
    spec = merge_spec("dare", 2, drop_rate=0.2, seed=5, scale=0.5)
    assert spec.record() == {"combine": "dare", "weights": [1.0, 1.0], "scale": 0.5, "drop_rate": 0.2, "seed": 5}


# ------------------------------------------------------------------------------------------------ svd

def test_svd_at_full_rank_is_exact_and_truncation_loses_the_dropped_singular_values():
    delta = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    s = torch.linalg.svdvals(delta.double())
    (a, b), err = svd_factors(delta, 6)
    close(b @ a, delta, atol=1e-5)
    assert err < 1e-3  # sqrt of float rounding
    (a, b), err = svd_factors(delta, 2)
    dropped = math.sqrt(float((s[2:] ** 2).sum() / (s ** 2).sum()))
    assert err == pytest.approx(dropped, rel=1e-5)
    assert float((delta - b @ a).norm() / delta.norm()) == pytest.approx(dropped, rel=1e-4)
    (a, b), _ = svd_factors(delta, 10)  # more than min(d_out, d_in): zero-padded to the asked rank
    assert (a.shape, b.shape) == ((10, 6), (8, 10)) and not a[6:].any() and not b[:, 6:].any()
    close(b @ a, delta, atol=1e-5)


# ------------------------------------------------------------------------------------------------ adapters

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_adapter(path: Path, base: Path, seed: int, base_seed: int = 0, **cfg) -> Path:
    """A LoRA-family adapter with random B (and, for DoRA, m moved off its start), saved as training would."""
    model = tiny_llama(seed=base_seed)
    fp = fingerprint(model)
    method = build_method({"init": "random", **cfg})
    torch.manual_seed(seed)
    method.apply(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)  # updates large enough to change the logits visibly
        for _, layer in modules_of_type(model, DoraLinear):
            layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    save_adapter(model, method, path, base_model=str(base), base_fingerprint=fp,
                 extra={"chat_template": {"name": "chatml", "template": "{{ messages }}"}, "system_prompt": None})
    return path


def hand_delta(adapter: Path, module: str, w0: torch.Tensor) -> torch.Tensor:
    """Delta W of one module straight from the files: s B A, or DoRA's m (W0 + s B A) / ||.||_row - W0."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    state = load_file(str(adapter / WEIGHTS_NAME))
    key = f"{PEFT_PREFIX}{module}"
    if f"{key}.lora_A.weight" not in state:
        return torch.zeros_like(w0)
    update = s * state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]
    if not cfg.get("use_dora"):
        return update
    adapted = w0 + update
    return state[f"{key}.lora_magnitude_vector"][:, None] * adapted / adapted.norm(dim=1, keepdim=True) - w0


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    index = tensor_index(folder)
    return {n: read_tensor(index, n) for n in index}


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(seed))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids()).logits


@pytest.fixture(scope="module")
def pair(base_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two LoRA adapters of different ranks, one with rsLoRA, on partly different modules."""
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(root / "a", base_dir, 1, name="lora", r=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
    b = make_adapter(root / "b", base_dir, 2, name="lora", r=6, alpha=3.0, rslora=True,
                     target_modules=["v_proj", "down_proj"])
    return a, b


@pytest.mark.parametrize("combine, options", [("linear", {}), ("ties", {"density": 1.0}),
                                              ("task_arithmetic", {"weights": [0.5, 0.5]}),
                                              ("dare", {"drop_rate": 0.0, "weights": [0.5, 0.5]}),
                                              ("dare_ties", {"drop_rate": 0.0})])
def test_one_adapter_merged_with_itself_is_the_identity(combine, options, pair, base_dir, tmp_path):
    a = pair[1]  # rsLoRA: PEFT's add_weighted_adapter scaled it by sqrt(r) (peft #3761)
    merge_adapters([a, a], tmp_path / "m", combine=combine, to="model", progress=False, **options)
    fold(str(base_dir), a, tmp_path / "folded")
    merged, folded = weights_of(tmp_path / "m"), weights_of(tmp_path / "folded")
    assert merged.keys() == folded.keys()
    for name in merged:
        close(merged[name], folded[name])
    merge_adapters([a, a], tmp_path / "ad", combine=combine, to="adapter", progress=False, **options)
    # the adapter at the default rank (6 + 6) holds the same update
    torch.testing.assert_close(logits(load(str(base_dir), tmp_path / "ad")[0]), logits(load(str(base_dir), a)[0]),
                               atol=ATOL, rtol=0)


def test_different_ranks_and_rslora_against_the_dense_update_by_hand(pair, base_dir, tmp_path):
    a, b = pair
    report = merge_adapters([a, b], tmp_path / "m", combine="linear", weights=[1, 3], to="model", progress=False)
    base, merged = weights_of(base_dir), weights_of(tmp_path / "m")
    changed = 0
    for name, w0 in base.items():
        module = name.removesuffix(".weight")
        expected = w0 + (hand_delta(a, module, w0) + 3 * hand_delta(b, module, w0)) / 4
        close(merged[name], expected)
        changed += not torch.equal(merged[name], w0)
    assert changed == report.merged == 6  # q (a only), v (both), down (b only) in 2 layers
    assert any("only in adapter(s)" in n and "q_proj" in n for n in report.notes)
    record = json.loads((tmp_path / "m" / "lmadapt_merge.json").read_text())
    assert record["combine"] == "linear" and record["weights"] == [1.0, 3.0]
    assert [i["r"] for i in record["inputs"]] == [2, 6] and record["inputs"][1]["scaling"] == 3 / math.sqrt(6)


def test_ties_and_dare_ties_of_adapters_against_their_formula_on_the_dense_updates(pair, base_dir, tmp_path):
    a, b = pair
    base = weights_of(base_dir)
    for combine, options in (("ties", {"density": 0.3}), ("dare_ties", {"drop_rate": 0.5, "seed": 4})):
        out = tmp_path / combine
        merge_adapters([a, b], out, combine=combine, weights=[1, 2], to="model", progress=False, **options)
        merged = weights_of(out)
        for name in ("model.layers.1.self_attn.v_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
            module, w0 = name.removesuffix(".weight"), base[name]
            taus = [hand_delta(a, module, w0), hand_delta(b, module, w0)]
            if combine == "ties":
                tau = ties(taus, [1, 2], 0.3)
            else:
                tau = disjoint_mean([drop_and_rescale(t, 0.5, dare_generator(4, module, i))
                                     for i, t in enumerate(taus)], [1, 2])
            close(merged[name], w0 + tau)


def test_dora_merges_its_effective_update(base_dir, pair, tmp_path):
    d = make_adapter(tmp_path / "d", base_dir, 3, name="dora", r=4, alpha=8.0, target_modules=["v_proj", "up_proj"])
    alone = merge_adapters([d], tmp_path / "alone", combine="linear", to="model", progress=False)
    assert alone.merged == 4
    dora_logits = logits(load(str(base_dir), d)[0])  # the DoRA forward, magnitudes and all (peft #3761)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "alone")), dora_logits,
                               atol=ATOL, rtol=0)
    a = pair[0]
    merge_adapters([d, a], tmp_path / "both", combine="task_arithmetic", weights=[1, 0.5], to="model",
                   progress=False)
    base, merged = weights_of(base_dir), weights_of(tmp_path / "both")
    for name, w0 in base.items():
        module = name.removesuffix(".weight")
        close(merged[name], w0 + hand_delta(d, module, w0) + 0.5 * hand_delta(a, module, w0), atol=2e-6)
    # as an adapter: DoRA's update is not low-rank, so the truncation has an error the record gives per module
    report = merge_adapters([d], tmp_path / "ad", combine="linear", rank=2, to="adapter", progress=False)
    record = read_adapter_info(tmp_path / "ad")
    info = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert info["r"] == info["lora_alpha"] == 2 and not info["use_rslora"]
    for module, entry in report.relative_errors.items():
        w0 = base[f"{module}.weight"]
        delta = hand_delta(d, module, w0)
        s = torch.linalg.svdvals(delta.double())
        assert entry == pytest.approx(math.sqrt(float((s[2:] ** 2).sum() / (s ** 2).sum())), rel=1e-4)
    assert (record.method["name"], record.method["r"], record.method["alpha"]) == ("lora", 2, 2.0)


def test_allora_and_a_peft_adapter_merge_with_their_own_scales(pair, base_dir, tmp_path):
    allora = make_adapter(tmp_path / "allora", base_dir, 6, name="allora", eta=1.0, r=3, target_modules=["k_proj"])
    merge_adapters([allora], tmp_path / "alone", combine="linear", to="model", progress=False)
    fold(str(base_dir), allora, tmp_path / "folded")
    merged, folded = weights_of(tmp_path / "alone"), weights_of(tmp_path / "folded")
    assert (merged["model.layers.0.self_attn.k_proj.weight"] != weights_of(base_dir)[
        "model.layers.0.self_attn.k_proj.weight"]).any()
    for name in merged:  # ALLoRA's scale is 1 whatever r is
        close(merged[name], folded[name])

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=3, lora_alpha=5, use_rslora=True, init_lora_weights=False,
                                                     target_modules=["q_proj", "o_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    a = pair[0]
    report = merge_adapters([a, tmp_path / "peft"], tmp_path / "m", combine="task_arithmetic", to="model",
                            model=base_dir, progress=False)
    assert any("records no base fingerprint" in n for n in report.notes)
    base, merged = weights_of(base_dir), weights_of(tmp_path / "m")
    for name, w0 in base.items():
        module = name.removesuffix(".weight")
        close(merged[name], w0 + hand_delta(a, module, w0) + hand_delta(tmp_path / "peft", module, w0))


def test_the_merged_adapter_gives_the_dense_logits_in_lmadapt_and_in_peft(pair, base_dir, tmp_path):
    a, b = pair
    report = merge_adapters([a, b], tmp_path / "ad", combine="linear", weights=[1, 3], to="adapter", progress=False)
    assert report.rank == 8 and max(report.relative_errors.values()) < 1e-3  # 2 + 6: exact up to rounding
    merge_adapters([a, b], tmp_path / "m", combine="linear", weights=[1, 3], to="model", progress=False)
    dense = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m"))
    ours = logits(load(str(base_dir), tmp_path / "ad")[0])
    peft = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "ad"))
    torch.testing.assert_close(ours, dense, atol=ATOL, rtol=0)
    torch.testing.assert_close(peft, dense, atol=ATOL, rtol=0)
    assert (dense - logits(AutoModelForCausalLM.from_pretrained(base_dir))).abs().max() > 1e-2  # it did change
    info = read_adapter_info(tmp_path / "ad")
    cfg = info.config  # PEFT's config: a plain LoRA of scale 1
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["peft_type"]) == (8, 8, False, "LORA")
    assert info.base_fingerprint == read_adapter_info(a).base_fingerprint
    assert info.chat_template == {"name": "chatml", "template": "{{ messages }}"}


def test_dare_of_adapters_is_reproducible_from_its_seed(pair, tmp_path):
    a, b = pair
    outs = {}
    for name, seed in (("one", 1), ("again", 1), ("other", 2)):
        merge_adapters([a, b], tmp_path / name, combine="dare", drop_rate=0.5, seed=seed, to="adapter", rank=3,
                       progress=False)
        outs[name] = load_file(str(tmp_path / name / WEIGHTS_NAME))
    assert all(torch.equal(outs["one"][k], outs["again"][k]) for k in outs["one"])
    assert any(not torch.equal(outs["one"][k], outs["other"][k]) for k in outs["one"])


def test_refusals_name_the_adapter_and_what_to_do(pair, base_dir, tmp_path):
    a, _ = pair
    other = make_adapter(tmp_path / "other", base_dir, 5, base_seed=1, name="lora", r=2, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="different base models") as err:
        merge_adapters([a, other], tmp_path / "x", combine="linear", to="adapter")
    assert str(a) in str(err.value) and str(other) in str(err.value) and "--force" in str(err.value)
    assert not (tmp_path / "x").exists()
    report = merge_adapters([a, other], tmp_path / "forced", combine="linear", to="adapter", force=True,
                            progress=False)
    assert any(n.startswith("forced:") for n in report.notes)
    assert read_adapter_info(tmp_path / "forced").config["r"] == 4

    model = tiny_llama()
    ia3 = build_method({"name": "ia3"})
    ia3.apply(model)
    save_adapter(model, ia3, tmp_path / "ia3", base_model=str(base_dir), base_fingerprint=None)
    with pytest.raises(AdapterError, match="'ia3' adapter; merging combines the updates of LoRA-family") as err:
        merge_adapters([a, tmp_path / "ia3"], tmp_path / "y", combine="linear")
    assert str(tmp_path / "ia3") in str(err.value) and "--tuned" in str(err.value)

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(LmadaptError, match="already exists"):  # before any work is done
        merge_adapters([a], tmp_path / "taken", combine="linear")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"

    moved = tmp_path / "not-the-base"
    tiny_llama(seed=3).save_pretrained(moved)
    with pytest.raises(AdapterError, match="fingerprint") as err:
        merge_adapters([a], tmp_path / "z", combine="linear", model=moved)
    assert str(moved) in str(err.value)


# ------------------------------------------------------------------------------------------------ full models

@pytest.fixture(scope="module")
def tuned_models(base_dir, tmp_path_factory) -> list[Path]:
    out = []
    for seed in (1, 2):
        model = tiny_llama()
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        path = tmp_path_factory.mktemp(f"tuned{seed}")
        model.save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        out.append(path)
    return out


def test_one_tuned_model_comes_back_bit_for_bit(base_dir, tuned_models, tmp_path):
    t = tuned_models[0]
    merge_models(base_dir, [t], tmp_path / "ta", combine="task_arithmetic", progress=False)
    merge_models(base_dir, [t, t], tmp_path / "lin", combine="linear", progress=False)
    expected = weights_of(t)
    for out in ("ta", "lin"):
        got = weights_of(tmp_path / out)
        assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in got)


def test_full_model_ties_matches_peft_and_loads_in_transformers(base_dir, tuned_models, tmp_path):
    report = merge_models(base_dir, tuned_models, tmp_path / "m", combine="ties", density=0.3,
                          max_shard_bytes=100_000, progress=False)
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()  # sharded
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    base, tuned = weights_of(base_dir), [weights_of(t) for t in tuned_models]
    state = model.state_dict()
    assert report.merged == len(base)
    for name, w0 in base.items():
        taus = [t[name].double() - w0.double() for t in tuned]
        expected = w0.double() + merge_utils.ties(taus, torch.ones(2, dtype=torch.float64), density=0.3)
        close(state[name], expected.float())
    assert json.loads((tmp_path / "m" / "lmadapt_merge.json").read_text())["density"] == 0.3


def test_full_models_that_do_not_match_are_refused_by_tensor(base_dir, tmp_path):
    other = tmp_path / "bigger"
    tiny_llama(vocab_size=300).save_pretrained(other)
    with pytest.raises(LmadaptError, match="model.embed_tokens.weight: shape") as err:
        merge_models(base_dir, [other], tmp_path / "x", combine="linear")
    assert str(other) in str(err.value) and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ command line

def test_the_command_line_merges_adapters_and_models(pair, base_dir, tuned_models, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "ad"
    assert main(["merge", "--adapter", str(a), "--adapter", str(b), "--combine", "ties", "--density", "0.5",
                 "--weights", "1,2", "--to", "adapter", "--rank", "4", "--output", str(out), "--no-progress"]) == 0
    assert "merged adapter written to" in capsys.readouterr().out
    assert read_adapter_info(out).config["r"] == 4
    assert main(["merge", "--tuned", str(tuned_models[0]), "--tuned", str(tuned_models[1]), "--model",
                 str(base_dir), "--combine", "dare", "--drop-rate", "0.3", "--output", str(tmp_path / "m"),
                 "--no-progress"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m") is not None
    for argv, message in (
            (["--adapter", str(a), "--adapter", str(b)], "--combine is required"),
            (["--adapter", str(a), "--rank", "3"], "--rank set(s) how inputs are merged"),
            (["--adapter", str(a), "--tuned", str(tuned_models[0])], "Choose one"),
            (["--adapter", str(a), "--adapter", str(b), "--combine", "ties"], "ties needs --density"),
            (["--tuned", str(tuned_models[0]), "--combine", "linear"], "--tuned needs --model"),
            (["--tuned", str(tuned_models[0]), "--model", str(base_dir), "--combine", "linear", "--to", "adapter"],
             "merging full models writes a model")):
        assert main(["merge", *argv, "--output", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()
