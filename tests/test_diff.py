"""Diff vectors (fine-tuning transfer, arXiv:2503.20110) and the tensor-by-tensor shard files under them.

Shards: a folder written by :class:`ShardWriter` with several shards reads back through :func:`tensor_index` /
:func:`read_tensor` tensor-equal, and transformers loads it; damaged or pickle-only folders are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmadapt.errors import ModelError
from lmadapt.fsutil import atomic_dir
from lmadapt.models.shards import (
    INDEX_FILE,
    ShardWriter,
    copy_model_files,
    read_tensor,
    tensor_index,
)
from lmadapt.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def save_model(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- shards

def test_shard_writer_round_trip_in_several_shards(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_llama(seed=3)
    src = save_model(model, tmp_path / "src")
    state = model.state_dict()
    with atomic_dir(tmp_path / "out") as tmp, ShardWriter(tmp, max_shard_bytes=200_000) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        copy_model_files(src, tmp)
    out = tmp_path / "out"
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    found = tensor_index(out)
    assert set(found) == set(state)
    assert found["model.embed_tokens.weight"].shape == (260, 64)
    assert found["model.embed_tokens.weight"].dtype == torch.float32
    for name, tensor in state.items():
        assert torch.equal(read_tensor(found, name), tensor), name
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    ids = torch.tensor([[1, 5, 9, 200]])
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert (out / "tokenizer_config.json").is_file() and (out / "config.json").is_file()


def test_one_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as writer:
        writer.add("a", torch.arange(6.0).reshape(2, 3)[:, 1])  # a strided view is written as its own values
        writer.add("b", torch.ones(2, dtype=torch.bfloat16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(read_tensor(tmp_path, "a"), torch.tensor([1.0, 4.0]))
    assert tensor_index(tmp_path)["b"].dtype == torch.bfloat16
    writer = ShardWriter(tmp_path / "unused")
    writer.add("a", torch.ones(1))
    with pytest.raises(ValueError, match="'a' was added twice"):
        writer.add("a", torch.ones(1))


def test_bad_folders_are_named(tmp_path: Path) -> None:
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"pickle.*pytorch_model\.bin, a pickle"):
        tensor_index(tmp_path / "pickle")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"empty holds no safetensors weights"):
        tensor_index(tmp_path / "empty")
    (tmp_path / "cut").mkdir()
    save_file({"w": torch.ones(100)}, str(tmp_path / "cut" / "model.safetensors"))
    data = (tmp_path / "cut" / "model.safetensors").read_bytes()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ModelError, match=r"cut/model\.safetensors is truncated"):
        tensor_index(tmp_path / "cut")
    (tmp_path / "index").mkdir()
    save_file({"w": torch.ones(1)}, str(tmp_path / "index" / "a.safetensors"))
    (tmp_path / "index" / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "a.safetensors",
                                                                            "v": "a.safetensors"}}))
    with pytest.raises(ModelError, match=r"lists 1 tensor\(s\) that its shards do not hold.*'v'"):
        tensor_index(tmp_path / "index")
    good = tmp_path / "good"
    good.mkdir()
    save_file({"w": torch.ones(1)}, str(good / "model.safetensors"))
    with pytest.raises(ModelError, match=r"good has no tensor 'nope'"):
        read_tensor(good, "nope")
    with pytest.raises(ModelError, match="is neither a folder nor a built-in model"):
        tensor_index(tmp_path / "missing")


def test_folder_fingerprint_equals_the_loaded_models(tmp_path: Path) -> None:
    from lmadapt.models.fingerprint import fingerprint
    from lmadapt.models.shards import FolderTensors

    for tied in (False, True):
        model = tiny_llama(seed=4, tie_word_embeddings=tied)
        folder = save_model(model, tmp_path / f"tied{tied}")
        lazy = FolderTensors(folder)
        assert ("lm_head.weight" in lazy) is not tied
        assert fingerprint(lazy) == fingerprint(model)


# ------------------------------------------------------------------------------------------ diff vectors

def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.01, only: str = "") -> torch.nn.Module:
    """``model`` with seeded noise added to every parameter whose name contains ``only`` (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
    return model


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base v1, its fine-tune (layer 0, the embeddings and the output layer changed), and v2 = v1 + noise."""
    root = tmp_path_factory.mktemp("versions")
    tuned = perturbed(perturbed(perturbed(tiny_llama(seed=0), 1, only="layers.0"), 2, only="embed"), 4,
                      only="lm_head")
    return {"base": save_model(tiny_llama(seed=0), root / "base"), "tuned": save_model(tuned, root / "tuned"),
            "v2": save_model(perturbed(tiny_llama(seed=0), 3, scale=0.005), root / "v2")}


def state(folder: Path) -> dict[str, torch.Tensor]:
    index = tensor_index(folder)
    return {name: read_tensor(index, name) for name in index}


def test_base_plus_diff_is_the_tuned_model_exactly(versions: dict[str, Path], tmp_path: Path) -> None:
    """METHODS §13 test 2: theta_base + (theta_ft - theta_base) returns theta_ft, tensor-equal."""
    from transformers import AutoModelForCausalLM

    from lmadapt.updates.diff import APPLY_JSON, DIFF_JSON, apply_diff, extract_diff

    ex = extract_diff(versions["base"], versions["tuned"], tmp_path / "diff", progress=False)
    assert (ex.changed, ex.unchanged) == (11, 10)  # layer 0 (9), embeddings, lm_head; the rest as it was
    assert ex.encodings == {"dense": 11, "lowrank": 0, "topk": 0}
    info = json.loads((tmp_path / "diff" / DIFF_JSON).read_text())
    assert info["tensors"]["model.layers.1.mlp.up_proj.weight"] == {"shape": [128, 64], "dtype": "float32",
                                                                    "encoding": "unchanged"}
    assert "model.layers.1.mlp.up_proj.weight" not in tensor_index(tmp_path / "diff")
    assert info["embeddings"] == {"input": "model.embed_tokens.weight", "output": "lm_head.weight", "tied": False}
    rep = apply_diff(tmp_path / "diff", versions["base"], tmp_path / "out", progress=False)
    assert rep.relation == "same_version" and (rep.applied, rep.unchanged) == (11, 10)
    tuned, out = state(versions["tuned"]), state(tmp_path / "out")
    assert out.keys() == tuned.keys()
    assert all(torch.equal(out[n], tuned[n]) for n in tuned)
    record = json.loads((tmp_path / "out" / APPLY_JSON).read_text())
    assert record["relation"] == "same_version" and record["model_fingerprint"] == info["base"]["fingerprint"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert model.config.hidden_size == 64 and (tmp_path / "out" / "tokenizer.json").is_file()


def test_bf16_exact_and_fp64_delta_exact_where_fp32_rounds(tmp_path: Path) -> None:
    """METHODS §13 test 4: arithmetic in fp32, then cast. bf16 models come back bit for bit; an fp32 weight that
    moves across many binary orders (1.0 -> 2**-30) does not with an fp32 Delta, and does with fp64."""
    from lmadapt.updates.diff import apply_diff, extract_diff

    b16 = save_model(tiny_llama(seed=0).to(torch.bfloat16), tmp_path / "b16")
    t16 = save_model(perturbed(tiny_llama(seed=0), 5).to(torch.bfloat16), tmp_path / "t16")
    extract_diff(b16, t16, tmp_path / "d16", progress=False)
    assert tensor_index(tmp_path / "d16")["model.norm.weight"].dtype == torch.float32
    apply_diff(tmp_path / "d16", b16, tmp_path / "o16", progress=False)
    want, got = state(t16), state(tmp_path / "o16")
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n]) for n in want)

    base, tuned = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        base.model.norm.weight[:2] = torch.tensor([1.0, -3.0])
        tuned.model.norm.weight[:2] = torch.tensor([2.0**-30, 2.0**-28])
    save_model(base, tmp_path / "b"), save_model(tuned, tmp_path / "t")
    for dtype, exact in (("fp32", False), ("fp64", True)):
        extract_diff(tmp_path / "b", tmp_path / "t", tmp_path / f"d{dtype}", delta_dtype=dtype, progress=False)
        apply_diff(tmp_path / f"d{dtype}", tmp_path / "b", tmp_path / f"o{dtype}", progress=False)
        got = read_tensor(tmp_path / f"o{dtype}", "model.norm.weight")
        assert torch.equal(got, tuned.model.norm.weight.detach()) is exact
        assert got.dtype == torch.float32
    assert read_tensor(tmp_path / "ofp32", "model.norm.weight")[0] == 0.0  # 1 + fl(2**-30 - 1) = 0


@pytest.mark.parametrize("alpha", [1.0, 0.5, -2.0])
def test_transfer_to_v2_is_v2_plus_alpha_delta(versions: dict[str, Path], tmp_path: Path, alpha: float) -> None:
    from lmadapt.updates.diff import apply_diff, extract_diff

    extract_diff(versions["base"], versions["tuned"], tmp_path / "diff", progress=False)
    rep = apply_diff(tmp_path / "diff", versions["v2"], tmp_path / "out", alpha=alpha, progress=False)
    assert rep.relation == "transfer" and rep.alpha == alpha
    base, tuned, v2 = (state(versions[k]) for k in ("base", "tuned", "v2"))
    out = state(tmp_path / "out")
    for name in v2:
        assert torch.equal(out[name], v2[name] + alpha * (tuned[name] - base[name])), name


def test_low_rank_and_top_k_errors_follow_their_formulas(versions: dict[str, Path], tmp_path: Path) -> None:
    from lmadapt.updates.diff import extract_diff, read_delta, read_diff_info

    base, tuned = state(versions["base"]), state(versions["tuned"])
    name = "model.layers.0.mlp.down_proj.weight"  # 64 x 128
    delta = tuned[name] - base[name]
    s = torch.linalg.svdvals(delta.double())

    extract_diff(versions["base"], versions["tuned"], tmp_path / "r5", rank=5, progress=False)
    info = read_diff_info(tmp_path / "r5")
    approx = read_delta(tmp_path / "r5", name)
    assert info["tensors"][name]["encoding"] == "lowrank" and info["tensors"][name]["rank"] == 5
    assert torch.linalg.matrix_rank(approx) == 5
    err = (delta - approx).double().norm()
    assert err.item() == pytest.approx(s[5:].pow(2).sum().sqrt().item(), rel=1e-4)  # Eckart-Young
    assert info["tensors"][name]["relative_error"] == pytest.approx((err / delta.double().norm()).item(), rel=1e-3)
    # the embeddings and the output layer keep their rows unless asked
    assert info["tensors"]["model.embed_tokens.weight"]["encoding"] == "dense"
    assert info["tensors"]["lm_head.weight"]["encoding"] == "dense"

    extract_diff(versions["base"], versions["tuned"], tmp_path / "e", energy=0.5, compress_embeddings=True,
                 progress=False)
    info = read_diff_info(tmp_path / "e")
    share = (s**2).cumsum(0) / (s**2).sum()
    assert info["tensors"][name]["rank"] == int((share < 0.5).sum()) + 1  # the smallest rank reaching 50%
    assert info["tensors"]["model.embed_tokens.weight"]["encoding"] == "lowrank"

    extract_diff(versions["base"], versions["tuned"], tmp_path / "full", rank=64, progress=False)
    assert read_diff_info(tmp_path / "full")["tensors"][name]["encoding"] == "dense"  # factors would be larger
    assert torch.equal(read_delta(tmp_path / "full", name), delta)

    extract_diff(versions["base"], versions["tuned"], tmp_path / "k", top_k_fraction=0.1, progress=False)
    sparse = read_delta(tmp_path / "k", name)
    kept = sparse != 0
    assert int(kept.sum()) == 820  # ceil(0.1 * 8192)
    assert torch.equal(sparse[kept], delta[kept])
    magnitudes = delta.abs().flatten().sort(descending=True).values
    assert delta[kept].abs().min() == magnitudes[819]
    assert (delta - sparse).norm().item() == pytest.approx(magnitudes[820:].double().pow(2).sum().sqrt().item(),
                                                           rel=1e-5)
    assert read_diff_info(tmp_path / "k")["tensors"]["model.layers.0.input_layernorm.weight"]["encoding"] == "dense"


def test_compression_options_are_checked_together(versions: dict[str, Path], tmp_path: Path) -> None:
    from lmadapt.errors import LmadaptError
    from lmadapt.updates.diff import extract_diff

    with pytest.raises(LmadaptError, match=r"Choose one.*energy is the share.*got 1.5"):
        extract_diff(versions["base"], versions["tuned"], tmp_path / "d", rank=2, energy=1.5)
    assert not (tmp_path / "d").exists()


def test_mismatched_names_and_shapes_are_refused_by_name(versions: dict[str, Path], tmp_path: Path) -> None:
    """METHODS §13 test 1: shapes and key sets are checked; unmatched keys are reported, each by name."""
    from lmadapt.errors import LmadaptError
    from lmadapt.updates.diff import APPLY_JSON, apply_diff, extract_diff

    other = save_model(tiny_llama(seed=0, intermediate_size=96, num_hidden_layers=3), tmp_path / "other")
    with pytest.raises(LmadaptError) as err:
        extract_diff(versions["base"], other, tmp_path / "bad", progress=False)
    message = str(err.value)
    assert "15 tensor(s) do not match" in message and "--allow-mismatch" in message
    assert "model.layers.0.mlp.up_proj.weight: shape [128, 64] in base" in message
    assert f"model.layers.2.self_attn.q_proj.weight: only in tuned {other}" in message
    assert not (tmp_path / "bad").exists()

    extract_diff(versions["base"], versions["tuned"], tmp_path / "diff", progress=False)
    with pytest.raises(LmadaptError) as err:
        apply_diff(tmp_path / "diff", other, tmp_path / "out", progress=False)
    message = str(err.value)
    assert "model.layers.0.mlp.gate_proj.weight: shape [128, 64] in the diff, [96, 64] in model" in message
    assert "model.layers.2.input_layernorm.weight: only in model" in message
    assert not (tmp_path / "out").exists()
    rep = apply_diff(tmp_path / "diff", other, tmp_path / "out", allow_mismatch=True, progress=False)
    skipped = {line.split(":")[0] for line in rep.skipped}
    assert "model.layers.0.mlp.gate_proj.weight" in skipped and "model.layers.2.mlp.up_proj.weight" in skipped
    assert json.loads((tmp_path / "out" / APPLY_JSON).read_text())["skipped"] == rep.skipped
    got, base, tuned, new = state(tmp_path / "out"), state(versions["base"]), state(versions["tuned"]), state(other)
    name = "model.layers.0.self_attn.q_proj.weight"  # same shape: it gets Delta
    assert torch.equal(got[name], new[name] + (tuned[name] - base[name]))
    assert torch.equal(got["model.layers.0.mlp.gate_proj.weight"], new["model.layers.0.mlp.gate_proj.weight"])


def test_only_shared_vocabulary_rows_get_delta(versions: dict[str, Path], tmp_path: Path) -> None:
    """METHODS §13: embeddings get Delta for the shared vocabulary; rows only in the new model stay."""
    from lmadapt.updates.diff import apply_diff, extract_diff

    tok = tiny_tokenizer()
    tok.add_tokens([f"<new{i}>" for i in range(6)])
    bigger = tiny_llama(vocab_size=266, seed=7)
    bigger.save_pretrained(tmp_path / "v3")
    tok.save_pretrained(tmp_path / "v3")
    extract_diff(versions["base"], versions["tuned"], tmp_path / "diff", progress=False)
    rep = apply_diff(tmp_path / "diff", tmp_path / "v3", tmp_path / "out", progress=False)
    assert rep.vocabulary["matched_by"] == "token"
    assert rep.vocabulary["tensors"]["lm_head.weight"] == {"diff_rows": 260, "model_rows": 266, "shared_rows": 260,
                                                          "moved_rows": 0, "rows_only_in_model": 6}
    base, tuned, new, got = state(versions["base"]), state(versions["tuned"]), state(tmp_path / "v3"), \
        state(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name][:260], new[name][:260] + (tuned[name] - base[name]))
        assert torch.equal(got[name][260:], new[name][260:])


def test_rows_pair_by_token_and_padding_by_position() -> None:
    from lmadapt.updates.diff_plan import _row_pairs

    old = {"a": 0, "b": 1, "c": 2}  # + one padding row (3)
    new = {"b": 0, "a": 1, "d": 2, "c": 4}  # row 3 padding, 5 padding beyond the diff
    assert _row_pairs(old, new, 4, 6) == {0: 1, 1: 0, 4: 2, 3: 3}


def test_tied_embeddings(versions: dict[str, Path], tmp_path: Path) -> None:
    from lmadapt.errors import LmadaptError
    from lmadapt.updates.diff import apply_diff, extract_diff, read_diff_info

    tied_base = save_model(tiny_llama(seed=0, tie_word_embeddings=True), tmp_path / "tb")
    tied_tuned = save_model(perturbed(tiny_llama(seed=0, tie_word_embeddings=True), 8), tmp_path / "tt")
    extract_diff(tied_base, tied_tuned, tmp_path / "tied_diff", progress=False)
    assert read_diff_info(tmp_path / "tied_diff")["embeddings"]["tied"] is True
    # a tied diff on an untied model: the output layer gets the embeddings' Delta
    rep = apply_diff(tmp_path / "tied_diff", versions["v2"], tmp_path / "out", progress=False)
    assert rep.skipped == [] and rep.applied == 21  # every tensor, and lm_head from the embeddings
    b, t, v2, got = state(tied_base), state(tied_tuned), state(versions["v2"]), state(tmp_path / "out")
    emb = "model.embed_tokens.weight"
    assert torch.equal(got["lm_head.weight"], v2["lm_head.weight"] + (t[emb] - b[emb]))
    # an untied diff whose output layer changed, on a tied model: named, as there is nowhere to put it
    extract_diff(versions["base"], versions["tuned"], tmp_path / "diff", progress=False)
    with pytest.raises(LmadaptError, match=r"lm_head\.weight: changed in the diff, but model .* ties its output"):
        apply_diff(tmp_path / "diff", tied_base, tmp_path / "out2", progress=False)
    rep = apply_diff(tmp_path / "diff", tied_base, tmp_path / "out2", allow_mismatch=True, progress=False)
    assert [line.split(":")[0] for line in rep.skipped] == ["lm_head.weight"]
    assert "lm_head.weight" not in tensor_index(tmp_path / "out2")


def test_bad_diff_folder_is_named(tmp_path: Path) -> None:
    from lmadapt.errors import LmadaptError
    from lmadapt.updates.diff import read_diff_info

    with pytest.raises(LmadaptError, match="has no diff.json"):
        read_diff_info(tmp_path)
    (tmp_path / "diff.json").write_text(json.dumps({"format": "lmadapt-diff", "tensors": {"w": {"encoding": "x"}}}))
    with pytest.raises(LmadaptError, match=r"diff\.json: tensors\.w\.encoding: expected one of dense"):
        read_diff_info(tmp_path)


def test_cli_extract_and_apply(versions: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmadapt.cli import main

    diff, out = str(tmp_path / "diff"), str(tmp_path / "out")
    assert main(["diff", "extract", str(versions["base"]), str(versions["tuned"]), "--output", diff, "--rank", "4",
                 "--no-progress"]) == 0
    assert "11 changed tensor(s) (4 dense, 7 lowrank), 10 unchanged" in capsys.readouterr().out
    assert main(["diff", "apply", diff, "--model", str(versions["v2"]), "--output", out, "--alpha", "0.5",
                 "--no-progress"]) == 0
    assert "11 tensor(s) + 0.5 * Delta" in capsys.readouterr().out
    assert main(["diff", "apply", diff, "--model", str(versions["v2"]), "--output", out]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["diff", "extract", "a", "b", "--output", "c", "--energy", "2"])
    assert "must be in (0, 1]" in capsys.readouterr().err
