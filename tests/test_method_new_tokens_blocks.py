"""new_tokens with ``train_blocks``: the paper's "2x2 LS" (arXiv:2406.11477, METHODS.md 17a: train the embeddings,
the LM head and the first two plus last two transformer blocks; freeze the others).

On a 5-block tiny Llama, ``train_blocks: [0, 1, -2, -1]`` trains blocks 0, 1, 3 and 4 fully and leaves block 2
frozen (LoRA, when given, goes only there, as PEFT keeps LoRA out of ``modules_to_save``). The adapter holds the
blocks' tensors under PEFT's ``modules_to_save`` keys; it reloads, merges into a plain transformers model and loads
in PEFT with the same logits; bad indices are refused with the option, the block count and the index named.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_method_new_tokens import EXACT, LORA, N_NEW, ids_of, logits, run_config
from test_resume import ctrl_c_at, same_weights
from test_vocab_expand import GERMAN, byte_level_bpe
from transformers import AutoModelForCausalLM

import lmadapt
from lmadapt.adapters.format import save_adapter
from lmadapt.errors import AdapterError, ConfigError, LmadaptError
from lmadapt.methods import build_method
from lmadapt.methods.lora_layer import LoraLinear
from lmadapt.models.tree import transformer_blocks
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama
from lmadapt.training.config import TrainConfig
from lmadapt.training.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = 5
TWO_BY_TWO = [0, 1, -2, -1]  # blocks 0, 1, 3, 4 of 5
TRAINED = [f"model.layers.{i}" for i in (0, 1, 3, 4)]


@pytest.fixture(scope="module")
def tok():
    return byte_level_bpe()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "de.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in GERMAN), encoding="utf-8")
    return path


def base(tok, tied: bool = False):
    return tiny_llama(vocab_size=len(tok), tie_word_embeddings=tied, num_hidden_layers=BLOCKS)


@pytest.fixture(scope="module")
def base_dirs(tok, tmp_path_factory) -> dict[bool, Path]:
    dirs = {}
    for tied in (False, True):
        path = tmp_path_factory.mktemp(f"base5-tied{int(tied)}")
        base(tok, tied).save_pretrained(path)
        tok.save_pretrained(path)
        dirs[tied] = path
    return dirs


def prepared(tok, corpus, tied=False, **cfg):
    method = build_method({"name": "new_tokens", "corpus": [str(corpus)], "n": N_NEW, **cfg})
    model = base(tok, tied)
    new = method.prepare(model, tok)
    method.apply(model)
    return model, method, new


def block_params(model, blocks) -> set[str]:
    return {f"{b}.{n}" for b in blocks for n, _ in model.get_submodule(b).named_parameters()}


# --- what trains ---------------------------------------------------------------------------------------
def test_two_by_two_trains_the_rows_and_the_first_and_last_two_blocks_and_nothing_else(tok, corpus):
    """Real optimizer steps with weight decay: every trained tensor moves, block 2 and the old weights stay bit for
    bit; the blocks train at train.lr, their norms without weight decay."""
    model, method, new = prepared(tok, corpus, train_blocks=TWO_BY_TWO, train_old_rows=True, lr_scale=3.0)
    assert method.blocks == TRAINED and method.peft_type == "LORA" and method.trains_base_weights
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    rows = {f"{m}.{r}" for m in ("model.embed_tokens", "lm_head") for r in ("new_rows", "old_rows")}
    assert trainable == rows | block_params(model, TRAINED)
    opt = build_optimizer(model, method, TrainConfig(lr=1e-2, weight_decay=0.1))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["blocks"]["lr"] == pytest.approx(1e-2) and groups["blocks"]["weight_decay"] == 0.1
    assert groups["blocks_no_decay"]["lr"] == pytest.approx(1e-2) and groups["blocks_no_decay"]["weight_decay"] == 0.0
    assert groups["new_rows"]["lr"] == pytest.approx(3e-2) and groups["old_rows"]["lr"] == pytest.approx(1e-2)
    per_block = 7 + 2  # q, k, v, o, gate, up, down; two RMSNorm weights
    assert (len(groups["blocks"]["params"]), len(groups["blocks_no_decay"]["params"])) == (7 * 4, 2 * 4)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable) == 4 + per_block * 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = ids_of(new, " ".join(GERMAN[:3]))
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable


def test_lora_goes_only_into_the_blocks_that_do_not_train_fully(tok, corpus):
    model, method, _ = prepared(tok, corpus, train_blocks=TWO_BY_TWO, lora={**LORA, "target_modules": "all-linear"})
    lora = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert lora == [f"model.layers.2.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.embed_tokens.new_rows", "lm_head.new_rows"} | block_params(model, TRAINED) | {
        f"{n}.lora_{ab}" for n in lora for ab in "AB"}
    # PEFT gets the LoRA modules by exact name (it would also skip modules_to_save itself)
    config = method.adapter_config()
    assert config["modules_to_save"] == TRAINED
    assert config["target_modules"] == "^(" + "|".join(n.replace(".", r"\.") for n in lora) + ")$"


def test_switching_the_adapters_off_is_refused_when_blocks_train_in_place(tok, corpus):
    """The base model's outputs are gone once blocks train in place: self-distillation from ``base`` or an
    anti-expert must not silently use the trained blocks. Without train_blocks the rows switch off as before."""
    from lmadapt.errors import LmadaptError
    from lmadapt.models.tree import adapters_disabled

    model, _, new = prepared(tok, corpus, train_blocks=[-1], lora=LORA)
    with pytest.raises(LmadaptError, match=r"train their base weights in place \(model\.layers\.4"):
        with adapters_disabled(model):
            pass
    model, _, new = prepared(tok, corpus, lora=LORA)
    with adapters_disabled(model):
        model(input_ids=ids_of(new, GERMAN[0]))


# --- the adapter through lmadapt, transformers and PEFT --------------------------------------------------
@pytest.mark.parametrize(("tied", "lora"), [(False, False), (True, False), (False, True), (True, True)])
def test_trained_blocks_reload_merge_and_load_in_transformers_and_peft(tok, corpus, base_dirs, tmp_path, tied, lora):
    from peft import PeftModel

    spec = {"train_blocks": TWO_BY_TWO, "train_old_rows": True, **({"lora": LORA} if lora else {})}
    result = train(run_config(base_dirs[tied], corpus, tmp_path / "run", spec, precision="bf16"), progress=False)
    adapter = result.adapter_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == TRAINED
    layer2 = [rf"model\.layers\.2\.self_attn\.{m}_proj" for m in "qv"]  # LoRA's modules, by exact name
    assert config["target_modules"] == (f"^({'|'.join(layer2)})$" if lora else "dummy-target-modules")
    saved = load_file(adapter / "adapter_model.safetensors")
    fresh = base(tok, tied)
    blocks = {f"base_model.model.{k}": v for k, v in fresh.state_dict().items()
              if k.startswith(tuple(f"{b}." for b in TRAINED))}
    assert {k for k in saved if "layers" in k and "lora_" not in k} == set(blocks)
    assert all(saved[k].dtype == torch.float32 for k in blocks)  # fp32 master weights under bf16 autocast
    assert all(not torch.equal(saved[k], v) for k, v in blocks.items() if v.ndim == 2)  # every matrix trained
    assert not any(k.startswith(tuple(f"base_model.model.{b}." for b in TRAINED)) for k in saved if "lora_" in k)

    model, tokenizer, method = lmadapt.load(None, adapter)
    ids = ids_of(tokenizer, "Die Kinder spielen in der Sonne, weil die Zukunft schön ist.")
    assert ids.max() >= len(tok)
    unmerged = logits(model, ids)
    for key in blocks:  # the blocks hold the saved tensors, block 2 the base's
        torch.testing.assert_close(model.get_parameter(key.removeprefix("base_model.model.")), saved[key],
                                   atol=0, rtol=0)
    frozen = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(model.get_submodule("model.layers.2.mlp.down_proj").weight, fresh.get_parameter(frozen))
    method.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=EXACT, rtol=0)
    method.unmerge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=EXACT, rtol=0)

    plain = AutoModelForCausalLM.from_pretrained(lmadapt.merge(None, adapter, tmp_path / "merged")).eval()
    assert plain.config.vocab_size == len(tokenizer) and plain.config.tie_word_embeddings == tied
    for key in blocks:
        assert torch.equal(plain.get_parameter(key.removeprefix("base_model.model.")), saved[key])
    assert torch.equal(plain.get_parameter(frozen), fresh.get_parameter(frozen))
    torch.testing.assert_close(logits(plain, ids), unmerged, atol=EXACT, rtol=0)

    peft_base = AutoModelForCausalLM.from_pretrained(base_dirs[tied])
    peft_base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    peft_model = PeftModel.from_pretrained(peft_base, adapter).eval()
    torch.testing.assert_close(logits(peft_model, ids), unmerged, atol=EXACT, rtol=0)
    with peft_model.disable_adapter():  # PEFT's view of the same file: without it, the base
        assert (logits(peft_model, ids) - unmerged).abs().max() > 1e-3


def test_an_interrupted_run_with_trained_blocks_resumes_to_the_same_weights(tok, corpus, base_dirs, tmp_path):
    make = lambda out: run_config(base_dirs[False], corpus, out, {"train_blocks": TWO_BY_TWO, "lora": LORA},
                                  max_steps=5, save_every=2, precision="fp32")
    whole = train(make(tmp_path / "whole"), progress=False)
    with ctrl_c_at(3), pytest.raises(KeyboardInterrupt):
        train(make(tmp_path / "cut"), progress=False)
    resumed = train(make(tmp_path / "cut"), resume=True, progress=False)
    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert any("layers.0" in k for k in a) and same_weights(a, b)


# --- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("blocks", "messages"), [
    ([0, 5, -6], [(r"index 5 is out of range: the model has 5 transformer blocks \(model.layers.0 to "
                   r"model.layers.4\); give 0 to 4, or -5 to -1"), "index -6 is out of range"]),
    ([1, 4, -1, -4], ["1 and -4 both name block 1", "4 and -1 both name block 4"]),
])
def test_bad_block_indices_are_refused_naming_the_option_the_block_count_and_the_index(tok, corpus, blocks,
                                                                                        messages):
    method = build_method({"name": "new_tokens", "corpus": [str(corpus)], "n": N_NEW, "train_blocks": blocks})
    model = base(tok)
    method.prepare(model, tok)
    with pytest.raises(ConfigError) as err:
        method.apply(model)
    assert len(err.value.problems) == len(messages)
    for problem, message in zip(err.value.problems, messages):
        assert problem.startswith("method.train_blocks: ")
        assert re.search(message, problem), problem
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen or swapped
    assert type(model.get_input_embeddings()).__name__ == "Embedding"


@pytest.mark.parametrize(("spec", "message"), [
    ({"train_blocks": [1, 1]}, "method.train_blocks: 1 given more than once"),
    ({"train_blocks": [0, "last"]}, r"method.train_blocks\[1\]: expected int, got str 'last'"),
])
def test_repeated_or_non_integer_blocks_are_refused_in_the_config(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_method({"name": "new_tokens", "corpus": ["de.txt"], **spec})


def test_lora_only_inside_the_trained_blocks_is_refused(tok, corpus):
    method = build_method({"name": "new_tokens", "corpus": [str(corpus)], "n": N_NEW, "train_blocks": TWO_BY_TWO,
                           "lora": {**LORA, "target_modules": [r"re:model\.layers\.[01]\.self_attn\.q_proj"]}})
    model = base(tok)
    method.prepare(model, tok)
    with pytest.raises(LmadaptError, match=r"select only modules inside train_blocks \(model.layers.0, "
                                           r"model.layers.1, model.layers.3, model.layers.4\)"):
        method.apply(model)
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen or swapped


def test_an_adapter_missing_a_block_tensor_is_refused_before_anything_is_written(tok, corpus, tmp_path):
    model, method, new = prepared(tok, corpus, train_blocks=[-1])
    changed = "model.layers.4.mlp.down_proj.weight"
    with torch.no_grad():
        model.get_input_embeddings().new_rows.add_(1.0)
        model.get_parameter(changed).add_(1.0)
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None, tokenizer=new)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    state = load_file(weights)
    del state["base_model.model.model.layers.4.mlp.up_proj.weight"]
    save_file(state, weights, metadata=metadata)
    fresh = base(tok)
    with pytest.raises(AdapterError, match=r"1 adapter tensor\(s\) missing, e.g. "
                                           r"base_model.model.model.layers.4.mlp.up_proj.weight"):
        lmadapt.load_adapter(fresh, tmp_path / "a")
    assert torch.all(fresh.get_input_embeddings().new_rows == 0)  # the resized rows, not the saved ones
    assert torch.equal(fresh.get_parameter(changed), base(tok).get_parameter(changed))


def test_the_block_finder_is_the_one_freeze_uses(tok):
    """transformer_blocks (models.tree) finds the blocks in index order, past 9 (not 'layers.10' before '2')."""
    model = tiny_llama(vocab_size=len(tok), num_hidden_layers=11)
    assert transformer_blocks(model) == [f"model.layers.{i}" for i in range(11)]
    freeze = build_method({"name": "freeze", "last_n_layers": 2})
    freeze.apply(model)
    assert {n.split(".")[2] for n in freeze.names} == {"9", "10"}
