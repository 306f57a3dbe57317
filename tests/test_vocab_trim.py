"""MAFT-style vocabulary trimming (METHODS.md 17c): kept text encodes to the same pieces, logits over kept ids are
unchanged, dropped text still round-trips through the byte alphabet, and the report's numbers are right."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lmadapt.testing import tiny_bpe_tokenizer, tiny_llama
from lmadapt.vocab.bpe import BPEModel, VocabError
from lmadapt.vocab.trim import plan_trim, trim, trim_model, trim_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _words(text: str) -> list[str]:
    return text.split()


EN = _words("the a quick brown fox jumps over lazy dog while people walk through green parks and talk about weather "
            "music books travel friends often quietly yesterday tomorrow garden river mountain window kitchen coffee "
            "morning evening happy small large old new city house street teacher student learns writes reads")
RU = _words("и в не на я быть он с что а по это она этот к но они мы как из у который то за свой весь год от так о "
            "для ты же все тот мочь вы человек такой его сказать только или ещё бы себя один как уже")
SP_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def _sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + "." for _ in range(n)]


EN_TRAIN, EN_HELD = _sentences(EN, 160, 0), _sentences(EN, 60, 1)
RU_TRAIN, RU_HELD = _sentences(RU, 160, 2), _sentences(RU, 10, 3)


def _byte_level() -> PreTrainedTokenizerFast:
    """A GPT-2/SmolLM2-style byte-level BPE trained on English + Russian; its four special tokens are also listed
    as extra special tokens."""
    return tiny_bpe_tokenizer(EN_TRAIN + RU_TRAIN, vocab_size=700, extra_special_tokens=True)


def _sentencepiece_style() -> PreTrainedTokenizerFast:
    """A Llama-2/Gemma-style BPE: '▁' for spaces, <0xNN> byte fallback, Replace/ByteFallback/Fuse/Strip decoder."""
    return tiny_bpe_tokenizer(EN_TRAIN + RU_TRAIN, style="metaspace", vocab_size=500 + 256,
                              special_tokens=SP_SPECIAL)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tok(request) -> PreTrainedTokenizerFast:
    return _byte_level() if request.param == "byte_level" else _sentencepiece_style()


@pytest.fixture(scope="module")
def byte_tok() -> PreTrainedTokenizerFast:
    return _byte_level()


def _model(tok: PreTrainedTokenizerFast, tied: bool, rows: int | None = None):
    return tiny_llama(vocab_size=rows or len(tok), tie_word_embeddings=tied, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _pieces(tok, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


def _kept_held(tok, plan) -> list[str]:
    """Held-out English whose original pieces are all kept (the case the trim promises to preserve)."""
    held = [s for s in EN_HELD if set(tok(s, add_special_tokens=False)["input_ids"]) <= set(plan.id_map)]
    assert len(held) >= 20, "the held-out set should mostly use kept pieces"
    return held


def test_kept_text_encodes_to_same_pieces_and_decodes_identically(tok):
    plan = plan_trim(tok, EN_TRAIN)
    new = trim_tokenizer(tok, plan)
    assert len(new) == len(plan.kept_ids) < len(tok)
    assert plan.kept_by_reason["merge_closure"] > 0  # the closure is exercised, not vacuous
    for text in _kept_held(tok, plan):
        old_ids = tok(text, add_special_tokens=False)["input_ids"]
        new_ids = new(text, add_special_tokens=False)["input_ids"]
        assert new.convert_ids_to_tokens(new_ids) == tok.convert_ids_to_tokens(old_ids)
        assert new_ids == [plan.id_map[i] for i in old_ids]
        assert new.decode(new_ids) == tok.decode(old_ids) == text


def test_without_the_merge_closure_kept_text_would_encode_differently(byte_tok):
    plan = plan_trim(byte_tok, EN_TRAIN)
    bpe = BPEModel.from_tokenizer(byte_tok)
    ranks = {m: r for r, m in enumerate(bpe.merges)}
    inv = {i: t for t, i in bpe.vocab.items()}
    kept = {inv[i] for i in plan.kept_ids if i in inv}
    for a, b in bpe.merges:  # closure property: each kept token's producing merge has kept parts
        if a + b in kept and ranks[(a, b)] == min(r for (x, y), r in ranks.items() if x + y == a + b):
            assert a in kept and b in kept
    closure = {i for i in plan.kept_ids if plan.counts.get(i, 0) == 0 and len(inv.get(i, "")) > 1
               and i not in byte_tok.all_special_ids}
    ids = [i for i in plan.kept_ids if i not in closure]
    broken = dataclasses.replace(plan, kept_ids=ids, id_map={o: n for n, o in enumerate(ids)})
    new = trim_tokenizer(byte_tok, broken)
    held = _kept_held(byte_tok, plan)
    assert any(_pieces(new, s) != _pieces(byte_tok, s) for s in held)


def test_dropped_language_still_encodes_and_decodes_identically(tok):
    plan = plan_trim(tok, EN_TRAIN)
    new = trim_tokenizer(tok, plan)
    for text in RU_HELD + ["mixed: the fox и человек 日本語 🦊"]:
        old_ids = tok(text, add_special_tokens=False)["input_ids"]
        new_ids = new(text, add_special_tokens=False)["input_ids"]
        assert new.decode(new_ids) == tok.decode(old_ids)
        assert tok.unk_token_id not in old_ids and new.unk_token_id not in new_ids
        assert len(new_ids) > len(old_ids)  # spelled in bytes now, so longer


def test_special_tokens_kept_with_remapped_ids_and_chat_template_works(tok):
    plan = plan_trim(tok, EN_TRAIN)
    new = trim_tokenizer(tok, plan)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(new, name) == getattr(tok, name)
        assert getattr(new, name + "_id") == plan.id_map[getattr(tok, name + "_id")]
    held = _kept_held(tok, plan)
    msgs = [{"role": "user", "content": held[0]}, {"role": "assistant", "content": held[1]}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert new.apply_chat_template(msgs, tokenize=False) == text
    old_ids, new_ids = tok(text)["input_ids"], new(text)["input_ids"]
    assert new.decode(new_ids) == tok.decode(old_ids) == text
    if "<|im_start|>" in tok.get_vocab():  # the markers stay single special tokens, under their new ids
        assert set(old_ids) <= set(plan.id_map) and new_ids == [plan.id_map[i] for i in old_ids]
        assert new_ids.count(new.convert_tokens_to_ids("<|im_start|>")) == 2


@pytest.mark.parametrize("tied", [False, True])
def test_logits_over_kept_ids_unchanged(tok, tied):
    model = _model(tok, tied)
    plan = plan_trim(tok, EN_TRAIN)
    text = " ".join(_kept_held(tok, plan)[:4])
    old_ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        ref = model(old_ids).logits[..., plan.kept_ids]
    small = trim_model(copy.deepcopy(model), plan)
    new_ids = torch.tensor([trim_tokenizer(tok, plan)(text)["input_ids"]])
    assert new_ids.tolist() == [[plan.id_map[i] for i in old_ids[0].tolist()]]
    with torch.no_grad():
        got = small(new_ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    emb, head = small.get_input_embeddings().weight, small.get_output_embeddings().weight
    assert (emb is head) == tied and emb.shape[0] == small.config.vocab_size == len(plan.kept_ids)
    assert small.config.eos_token_id == plan.id_map[tok.eos_token_id]
    assert small.generation_config.pad_token_id == plan.id_map[tok.pad_token_id]
    assert small.get_input_embeddings().padding_idx == plan.id_map[tok.pad_token_id]


def test_pad_to_multiple_of_zero_rows_and_list_eos(byte_tok):
    model = _model(byte_tok, tied=False)
    eos_list = [byte_tok.eos_token_id, byte_tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.eos_token_id = eos_list
    plan = plan_trim(byte_tok, EN_TRAIN)
    small = trim_model(copy.deepcopy(model), plan, pad_to_multiple_of=64)
    n = len(plan.kept_ids)
    rows = -(-n // 64) * 64
    assert small.get_input_embeddings().weight.shape[0] == small.config.vocab_size == rows > n
    assert small.get_output_embeddings().weight.shape[0] == rows
    assert small.get_input_embeddings().weight[n:].abs().sum() == 0
    assert small.generation_config.eos_token_id == [plan.id_map[i] for i in eos_list]
    ids = torch.tensor([[plan.id_map[i] for i in byte_tok(EN_TRAIN[0])["input_ids"]]])
    with torch.no_grad():
        ref = model(torch.tensor([byte_tok(EN_TRAIN[0])["input_ids"]])).logits[..., plan.kept_ids]
        torch.testing.assert_close(small(ids).logits[..., :n], ref, rtol=1e-5, atol=1e-6)


def test_trimmed_model_and_tokenizer_save_and_load_back(tok, tmp_path):
    model = _model(tok, tied=True)
    small, new, report = trim(model, tok, EN_TRAIN)
    small.save_pretrained(tmp_path)
    new.save_pretrained(tmp_path)
    model2, tok2 = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    text = tok.apply_chat_template([{"role": "user", "content": EN_HELD[1] + " " + RU_HELD[1]}], tokenize=False)
    ids = new(text)["input_ids"]
    assert tok2(text)["input_ids"] == ids and tok2.eos_token_id == new.eos_token_id
    assert tok2.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    with torch.no_grad():
        torch.testing.assert_close(model2(torch.tensor([ids])).logits, small(torch.tensor([ids])).logits,
                                   rtol=0, atol=0)
    assert report["tokens_after"] == len(tok2) == model2.config.vocab_size


@pytest.mark.parametrize("tied", [False, True])
def test_report_numbers_equal_hand_computed(byte_tok, tied):
    counts = Counter(i for s in EN_TRAIN for i in byte_tok(s, add_special_tokens=False)["input_ids"])
    plan = plan_trim(byte_tok, EN_TRAIN, min_count=3)
    kept = set(plan.id_map)
    assert {i for i, c in counts.items() if c >= 3} <= kept
    assert any(i not in kept for i, c in counts.items() if c < 3)  # the floor drops something
    model = _model(byte_tok, tied, rows=len(byte_tok) + 12)  # padding rows past the tokenizer, as real models
    rep = plan.report(model, pad_to_multiple_of=8)
    v, n, d = len(byte_tok) + 12, len(plan.kept_ids), 64
    n8 = -(-n // 8) * 8
    mats = 1 if tied else 2
    assert rep["tokens_before"] == len(byte_tok) and rep["tokens_after"] == n
    assert rep["corpus_tokens"] == sum(counts.values())
    assert rep["corpus_coverage"] == pytest.approx(sum(c for i, c in counts.items() if i in kept) / sum(counts.values()))
    assert rep["corpus_coverage"] < 1
    assert rep["embedding_params_before"] == mats * v * d and rep["embedding_params_after"] == mats * n8 * d
    assert rep["bytes_saved"] == 4 * mats * (v - n8) * d
    assert rep["model_params_before"] - rep["model_params_after"] == rep["params_saved"]
    assert sum(rep["kept_by_reason"].values()) == n
    small = trim_model(copy.deepcopy(model), plan, pad_to_multiple_of=8)
    assert sum(p.numel() for p in small.parameters()) == rep["model_params_after"]
    assert rep["merges_after"] == len(BPEModel.from_tokenizer(trim_tokenizer(byte_tok, plan)).merges)


def test_keep_tokens_and_min_count_floor(byte_tok):
    rare = "ĠкоÑĤ"  # not a token: an error that says how tokens are spelled
    with pytest.raises(VocabError, match="not tokens of this tokenizer"):
        plan_trim(byte_tok, EN_TRAIN, keep_tokens=[rare])
    ru_tok = byte_tok.convert_ids_to_tokens(byte_tok(" человек", add_special_tokens=False)["input_ids"])
    plan = plan_trim(byte_tok, EN_TRAIN, keep_tokens=ru_tok)
    assert all(byte_tok.convert_tokens_to_ids(t) in plan.id_map for t in ru_tok)
    assert _pieces(trim_tokenizer(byte_tok, plan), " человек") == ru_tok
    with pytest.raises(VocabError, match="min_count"):
        plan_trim(byte_tok, EN_TRAIN, min_count=0)


def test_errors_empty_corpus_and_non_bpe(byte_tok):
    for texts in ([], ["", ""]):
        with pytest.raises(VocabError, match="empty corpus"):
            plan_trim(byte_tok, texts)
    core = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(VocabError, match="WordLevel.*Supported"):
        plan_trim(PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]"), ["a"])


def test_errors_plan_that_drops_special_or_byte_tokens(byte_tok):
    model = _model(byte_tok, tied=False)
    plan = plan_trim(byte_tok, EN_TRAIN)
    for victim in (byte_tok.eos_token_id, byte_tok.pad_token_id, byte_tok.convert_tokens_to_ids("Ā")):
        ids = [i for i in plan.kept_ids if i != victim]
        bad = dataclasses.replace(plan, kept_ids=ids, id_map={o: n for n, o in enumerate(ids)})
        with pytest.raises(VocabError, match="would drop"):
            trim_tokenizer(byte_tok, bad)
    ids = [i for i in plan.kept_ids if i != byte_tok.eos_token_id]
    bad = dataclasses.replace(plan, kept_ids=ids, id_map={o: n for n, o in enumerate(ids)})
    with pytest.raises(VocabError, match="eos_token_id"):
        trim_model(copy.deepcopy(model), bad)
    assert model.config.vocab_size == len(byte_tok)  # refused before anything changed


def test_errors_model_smaller_than_tokenizer_and_foreign_plan(byte_tok, tok):
    plan = plan_trim(byte_tok, EN_TRAIN)
    with pytest.raises(VocabError, match="embedding rows"):
        trim_model(_model(byte_tok, tied=False, rows=len(byte_tok) - 5), plan)
    if len(tok) != len(byte_tok):
        with pytest.raises(VocabError, match="made for a tokenizer"):
            trim_tokenizer(tok, plan)
