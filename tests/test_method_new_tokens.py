"""The new_tokens method (vocabulary expansion, arXiv:2406.11477; METHODS.md 17a): the contract of
tests/test_methods.py and tests/test_method_matrix.py for a method that changes the vocabulary, on a tiny Llama
with a byte-level BPE trained here (tests/test_vocab_expand.py) and German text that yields new tokens.

Old ids keep their outputs at init; only the new rows (and LoRA) train, with their own learning rate; the adapter
(PEFT's TrainableTokens form, with the tokenizer) reloads, merges, and loads in plain transformers and in PEFT with
the same logits and greedy text; an interrupted run resumes to the same weights; bad input is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import ctrl_c_at, same_weights
from test_vocab_expand import ENGLISH, GERMAN
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmadapt
from lmadapt.adapters.format import save_adapter
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods import build_method
from lmadapt.methods.lora_layer import LoraLinear
from lmadapt.methods.new_tokens_layer import TokenRowsEmbedding, TokenRowsHead
from lmadapt.models.tree import adapters_disabled
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_bpe_tokenizer, tiny_llama
from lmadapt.training.config import TrainConfig
from lmadapt.training.optim import build_optimizer
from lmadapt.vocab.bpe import VocabError
from lmadapt.vocab.expansion import RECORD_FILE, expand_model, save_expansion

pytestmark = pytest.mark.usefixtures("one_thread")

N_NEW = 12  # 420 old tokens + 12 = 432, a multiple of 8: PEFT's plain resize gives the same shapes
LORA = {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
EXACT = 1e-6  # fp32 logits of the same weights through a differently shaped matmul


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe_tokenizer(ENGLISH, vocab_size=420)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "de.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in GERMAN), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_dirs(tok, tmp_path_factory) -> dict[bool, Path]:
    """tied -> a tiny Llama with the BPE tokenizer, saved as a transformers folder."""
    dirs = {}
    for tied in (False, True):
        path = tmp_path_factory.mktemp(f"base-tied{int(tied)}")
        base(tok, tied).save_pretrained(path)
        tok.save_pretrained(path)
        dirs[tied] = path
    return dirs


def base(tok, tied: bool = False):
    return tiny_llama(vocab_size=len(tok), tie_word_embeddings=tied)


def prepared(tok, corpus, tied=False, **cfg):
    """(model, method, extended tokenizer): a fresh base, prepared and applied as lmadapt train does."""
    method = build_method({"name": "new_tokens", "corpus": [str(corpus)], "n": N_NEW, **cfg})
    model = base(tok, tied)
    new = method.prepare(model, tok)
    method.apply(model)
    return model, method, new


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits


def run_config(base_dir: Path, corpus: Path, out: Path, method: dict | None = None, **train_fields) -> dict:
    return {
        "model": {"name_or_path": str(base_dir)},
        "data": {"train": [str(corpus)], "max_length": 48, "validation_fraction": 0.0},
        "method": {"name": "new_tokens", "corpus": [str(corpus)], "n": N_NEW, "lr_scale": 4.0, **(method or {})},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 3, "tensorboard": False, "schedule": "constant",
                  "threads": 1, **train_fields},
        "output_dir": str(out),
    }


# --- expansion and identity at init ------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_old_ids_keep_their_outputs_and_new_rows_start_from_the_merge_rule(tok, corpus, tied):
    model, method, new = prepared(tok, corpus, tied, lora=LORA)
    assert len(new) == len(tok) + N_NEW and method.span == (len(tok), len(tok) + N_NEW)
    assert model.get_input_embeddings().weight.shape == (len(tok) + N_NEW, 64)
    text = ENGLISH[0]
    assert new(text)["input_ids"] == tok(text)["input_ids"]  # old-only text: no new merge fires
    ids = ids_of(tok, text)
    out = logits(model, ids)
    assert out.shape[-1] == len(tok) + N_NEW
    torch.testing.assert_close(out[..., :len(tok)], logits(base(tok, tied), ids), atol=EXACT, rtol=0)
    # merge init (lmadapt.vocab.init): e_t = (e_l + e_r) / 2 for a token whose parts are old tokens
    emb = base(tok, tied).get_input_embeddings().weight
    first = method.expansion.new_tokens[0]
    parts = tok.convert_tokens_to_ids([first.left, first.right])
    rows = model.get_input_embeddings().new_rows
    torch.testing.assert_close(rows[0], (emb[parts[0]] + emb[parts[1]]) / 2, atol=1e-7, rtol=0)
    assert method.config.old_tokens == len(tok) and method.config.rows == len(tok) + N_NEW


def test_only_the_new_rows_and_lora_train_with_their_own_learning_rate(tok, corpus):
    """Real optimizer (lmadapt's factory) with weight decay: old rows would decay if the optimizer held them."""
    model, method, new = prepared(tok, corpus, lora={**LORA, "init": "random"}, lr_scale=4.0, weight_decay=0.0)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, TokenRowsEmbedding) and isinstance(head, TokenRowsHead)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert trainable == {"model.embed_tokens.new_rows", "lm_head.new_rows"} | {
        f"{n}.lora_{ab}" for n in lora for ab in "AB"}
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, method, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["new_rows"]["lr"] == pytest.approx(4e-2) and groups["new_rows"]["weight_decay"] == 0.0
    assert groups["lora"]["lr"] == pytest.approx(1e-2) and groups["lora"]["weight_decay"] == 0.1
    assert [tuple(p.shape) for p in groups["new_rows"]["params"]] == [(N_NEW, 64), (N_NEW, 64)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = ids_of(new, " ".join(GERMAN[:3]))
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every trained tensor moved, nothing else did, bit for bit
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])


def test_train_old_rows_puts_the_old_rows_in_their_own_group(tok, corpus, tmp_path):
    model, method, new = prepared(tok, corpus, True, train_old_rows=True, lr_scale=2.0)
    groups = {g.name: g for g in method.parameter_groups(model)}
    assert [tuple(p.shape) for p in groups["old_rows"].params] == [(len(tok), 64)]  # tied: one matrix
    assert groups["old_rows"].lr_scale == 1.0 and groups["new_rows"].lr_scale == 2.0
    opt = build_optimizer(model, method, TrainConfig(lr=1e-2, weight_decay=0.05))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["new_rows"]["lr"] == pytest.approx(2e-2) and by_name["old_rows"]["lr"] == pytest.approx(1e-2)
    assert by_name["new_rows"]["weight_decay"] == 0.05  # weight_decay null: the run's
    ids = ids_of(new, GERMAN[0])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    emb = model.get_input_embeddings()
    assert not torch.equal(emb.old_rows, emb.weight[:len(tok)])  # the old rows moved, in their own parameter
    expected = logits(model, ids)
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None, tokenizer=new)
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    rows = (len(tok) + N_NEW, 64)  # tied TRAINABLE_TOKENS: PEFT keeps the head's copy too
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        f"base_model.model.{m}.trainable_tokens_delta": rows for m in ("model.embed_tokens", "lm_head")}
    fresh = base(tok, True)
    lmadapt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, ids), expected, atol=EXACT, rtol=0)
    method.merge(model)
    torch.testing.assert_close(logits(model, ids), expected, atol=EXACT, rtol=0)


# --- the saved adapter through lmadapt, transformers and PEFT ------------------------------------------
@pytest.mark.parametrize(("tied", "lora"), [(False, False), (False, True), (True, False), (True, True)])
def test_trained_adapter_reloads_merges_and_loads_in_transformers_and_peft(tok, corpus, base_dirs, tmp_path, tied,
                                                                             lora):
    from peft import PeftModel

    cfg = run_config(base_dirs[tied], corpus, tmp_path / "run", {"lora": LORA} if lora else None)
    result = train(cfg, progress=False)
    adapter = result.adapter_dir
    new = AutoTokenizer.from_pretrained(adapter)
    assert len(new) == len(tok) + N_NEW
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LORA" if lora else "TRAINABLE_TOKENS")
    keys = set(load_file(adapter / "adapter_model.safetensors"))
    rows = "token_adapter.trainable_tokens_delta" if lora else "trainable_tokens_delta"
    assert {k for k in keys if "lora_" not in k} == {
        f"base_model.model.{m}.{rows}" for m in ("model.embed_tokens", "lm_head")[: 1 if tied and lora else 2]}

    model, tokenizer, method = lmadapt.load(None, adapter)  # the base the adapter records, the tokenizer it carries
    assert len(tokenizer) == len(new)
    ids = ids_of(new, "Die Kinder spielen in der Sonne, weil die Zukunft schön ist.")
    assert ids.max() >= len(tok)  # the text uses new tokens
    unmerged = logits(model, ids)
    with adapters_disabled(model):
        assert (logits(model, ids) - unmerged).abs().max() > 1e-4  # the adapter does something
    method.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=EXACT, rtol=0)
    method.unmerge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=EXACT, rtol=0)

    merged_dir = lmadapt.merge(None, adapter, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    plain_tok = AutoTokenizer.from_pretrained(merged_dir)
    assert plain_tok.get_vocab() == new.get_vocab() and plain.config.vocab_size == len(new)
    assert plain.config.tie_word_embeddings == tied
    torch.testing.assert_close(logits(plain, ids), unmerged, atol=EXACT, rtol=0)
    prompt = ids_of(new, GERMAN[4])
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": new.pad_token_id}
    with torch.no_grad():
        ours, theirs = model.generate(prompt, **greedy), plain.generate(prompt, **greedy)
    assert torch.equal(ours, theirs)

    peft_base = AutoModelForCausalLM.from_pretrained(base_dirs[tied])
    peft_base.resize_token_embeddings(len(new), mean_resizing=False)
    peft_model = PeftModel.from_pretrained(peft_base, adapter).eval()
    torch.testing.assert_close(logits(peft_model, ids), unmerged, atol=EXACT, rtol=0)


def test_training_in_bf16_and_with_self_distillation_from_the_base(tok, corpus, base_dirs, tmp_path):
    """The matrix rows of tests/test_method_matrix.py: bf16, and distill with teacher=base (adapters off)."""
    for name, extra in (("bf16", {"precision": "bf16"}), ("distill", {})):
        cfg = run_config(base_dirs[False], corpus, tmp_path / name, {"lora": LORA}, **extra)
        if name == "distill":
            cfg["objective"] = {"name": "distill", "teacher": "base", "lm_weight": 0.5}
        result = train(cfg, progress=False)
        assert result.report["steps"] == 3 and torch.isfinite(torch.tensor(result.report["final_train_loss"]))


def test_an_interrupted_run_resumes_to_the_same_weights_unless_its_corpus_changed(tok, corpus, base_dirs, tmp_path):
    text = tmp_path / "de.jsonl"  # the tokens are learned again on resume, from this file
    text.write_bytes(corpus.read_bytes())
    make = lambda out: run_config(base_dirs[False], corpus, out, {"lora": LORA, "corpus": [str(text)]},
                                  max_steps=5, save_every=2, precision="fp32")
    whole = train(make(tmp_path / "whole"), progress=False)
    with ctrl_c_at(3), pytest.raises(KeyboardInterrupt):
        train(make(tmp_path / "cut"), progress=False)
    resumed = train(make(tmp_path / "cut"), resume=True, progress=False)
    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert same_weights(a, b)

    with ctrl_c_at(3), pytest.raises(KeyboardInterrupt):
        train(make(tmp_path / "cut2"), progress=False)
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(GERMAN[:20])), encoding="utf-8")
    with pytest.raises(LmadaptError, match="the new tokens differ from the checkpoint's"):
        train(make(tmp_path / "cut2"), resume=True, progress=False)


# --- an expansion folder (lmadapt vocab expand) as the source ---------------------------------------------
@pytest.fixture(scope="module")
def vocab_dir(tok, tmp_path_factory) -> Path:
    model = base(tok)
    new, record = expand_model(model, tok, GERMAN, N_NEW, init="mean")
    return save_expansion(tmp_path_factory.mktemp("vocab") / "de", model, new, record)


def test_a_vocab_folder_gives_the_same_model_as_the_same_expansion_inline(tok, corpus, vocab_dir):
    from_folder = build_method({"name": "new_tokens", "vocab": str(vocab_dir)})
    model = base(tok)
    new = from_folder.prepare(model, tok)
    from_folder.apply(model)
    inline, _, inline_tok = prepared(tok, corpus, init="mean")
    assert new.get_vocab() == inline_tok.get_vocab()
    assert torch.equal(model.get_input_embeddings().new_rows, inline.get_input_embeddings().new_rows)
    assert torch.equal(model.get_output_embeddings().new_rows, inline.get_output_embeddings().new_rows)


def test_a_vocab_folder_of_another_base_is_refused(tok, vocab_dir):
    method = build_method({"name": "new_tokens", "vocab": str(vocab_dir)})
    other = tiny_llama(vocab_size=len(tok), seed=1)
    with pytest.raises(VocabError, match="expanded from other weights than this model's"):
        method.prepare(other, tok)


@pytest.mark.parametrize(("damage", "message"), [
    ("missing", "does not exist"),
    ("no record", f"has no {RECORD_FILE}"),
    ("garbled", "not valid JSON"),
    ("wrong fields", "not a valid vocabulary expansion record: format is 7"),
])
def test_a_missing_or_garbled_vocab_folder_is_refused(tok, vocab_dir, tmp_path, damage, message):
    import shutil

    folder = tmp_path / "de"
    if damage != "missing":
        shutil.copytree(vocab_dir, folder)
        record = folder / RECORD_FILE
        if damage == "no record":
            record.unlink()
        elif damage == "garbled":
            record.write_text("{not json", encoding="utf-8")
        else:
            record.write_text(json.dumps({**json.loads(record.read_text()), "format": 7}), encoding="utf-8")
    method = build_method({"name": "new_tokens", "vocab": str(folder)})
    with pytest.raises(VocabError, match=message):
        method.prepare(base(tok), tok)


@pytest.mark.parametrize(("spec", "message"), [
    ({"vocab": "de", "corpus": ["de.txt"]}, "method.vocab: give vocab .* not both"),
    ({}, "method.vocab: required: give vocab"),
    ({"vocab": "de", "n": 5}, "method.n: only read with corpus"),
    ({"corpus": ["de.txt"], "lora": {"r": 0}}, r"method.lora.r: must be >= 1"),
    ({"corpus": ["de.txt"], "lr_scale": 0}, "method.lr_scale: must be > 0"),
])
def test_bad_configs_are_refused_with_the_key_named(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_method({"name": "new_tokens", **spec})


def test_a_missing_corpus_apply_without_prepare_and_lora_on_the_head_are_refused(tok, corpus, tmp_path):
    method = build_method({"name": "new_tokens", "corpus": [str(tmp_path / "nope.txt")]})
    with pytest.raises(VocabError, match="method.corpus .*nope.txt: no such file"):
        method.prepare(base(tok), tok)
    with pytest.raises(LmadaptError, match=r"call method.prepare\(model, tokenizer\) before"):
        build_method({"name": "new_tokens", "corpus": ["de.txt"]}).apply(base(tok))
    method = build_method({"name": "new_tokens", "corpus": [str(corpus)], "n": N_NEW,
                           "lora": {"target_modules": ["q_proj", "lm_head"]}})
    model = base(tok)
    method.prepare(model, tok)
    with pytest.raises(LmadaptError, match=r"lora.target_modules selects the output layer \(lm_head\)"):
        method.apply(model)
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen or swapped
