"""Learned Embedding Propagation (METHODS.md section 17b; arXiv:2412.21140): subtoken averaging, the fp64
least-squares map P, the three modes, special-token rows, padding rows, tied models and the errors."""

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmadapt.testing import tiny_bpe_tokenizer, tiny_llama
from lmadapt.vocab.bpe import VocabError
from lmadapt.vocab.lep import (
    averaging_matrix,
    fit_projection,
    propagate,
    propagate_matrices,
    shared_token_rows,
    subtoken_average,
    subtokens_by_id,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EN = ["the cat sat on the mat", "a dog ran in the park and the cat slept", "language models learn from text",
      "the weather is nice today, isn't it?", "numbers like 12 and 345 appear too"]
RU = ["кошка сидела на ковре", "собака бежала в парке", "языковые модели учатся на тексте",
      "погода сегодня хорошая"]
OLD_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NEW_SPECIAL = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]  # <pad> is new: ids shift by one
D = 64  # tiny_llama hidden size


def _byte_level(corpus, vocab_size, specials):
    """A byte-level BPE whose special tokens play no bos/eos/pad role: LEP finds them as added tokens alone."""
    return tiny_bpe_tokenizer(corpus * 20, vocab_size=vocab_size, special_tokens=specials, roles=False,
                              chat_template=False)


def _characters_only(corpus, vocab_size, specials):
    """A BPE over whitespace-split words with no byte alphabet and no unk token: a character it never saw cannot
    be spelled at all. Kept here, not in lmadapt.testing: only the empty-encoding test wants so broken a tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=[],
                                  show_progress=False)
    tok.train_from_iterator(corpus * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def toks():
    """An English byte-level BPE ("old") and one trained on English + Russian with more merges ("new")."""
    return _byte_level(EN, 300, OLD_SPECIAL), _byte_level(EN + RU, 420, NEW_SPECIAL)


def _models(old, new, *, tied=False, perturb=True, seed=0):
    """base (old vocab), instruct (= base with perturbed weights), donor (base resized to the new vocabulary,
    padded to a multiple of 64, with trained-like rows and non-zero padding rows)."""
    base = tiny_llama(vocab_size=len(old), seed=seed, tie_word_embeddings=tied)
    instruct = copy.deepcopy(base)
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in instruct.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    donor = copy.deepcopy(base)
    rows = -(-(len(new) + 1) // 64) * 64
    donor.resize_token_embeddings(rows, mean_resizing=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        mats = {id(m.weight): m.weight for m in (donor.get_input_embeddings(), donor.get_output_embeddings())}
        for w in mats.values():  # one matrix when tied
            avg = subtoken_average(base.get_input_embeddings().weight, old, new)
            w[: len(new)] = avg + 0.1 * torch.randn(avg.shape, generator=g)
            w[len(new):] = torch.randn(rows - len(new), D, generator=g)
    return base, instruct, donor


def _plain_rows(old, new):
    """New ids that are neither special nor padding: the rows that must be E_D P."""
    return torch.tensor([i for i in range(len(new)) if i not in new.added_tokens_decoder])


# ---- step 1: subtoken averaging ------------------------------------------------------------------------------

def test_subtoken_average_matches_tokenizer_encoding(toks):
    old, new = toks
    E = torch.randn(len(old), D, dtype=torch.float64)
    avg = subtoken_average(E, old, new)
    assert avg.shape == (len(new), D)
    old_vocab, checked = old.get_vocab(), []
    for token, i in new.get_vocab().items():
        if i in new.added_tokens_decoder:  # specials: see test_sum_mode_and_special_tokens
            continue
        if token in old_vocab:  # shared token: exactly its old row
            assert torch.equal(avg[i], E[old_vocab[token]])
        text = new.decode([i])
        if new.encode(text, add_special_tokens=False) == [i]:  # whole characters: compare with old.encode
            ids = old.encode(text, add_special_tokens=False)
            torch.testing.assert_close(avg[i], E[ids].mean(0), rtol=0, atol=1e-12)
            checked.append(token)
    assert sum(t not in old_vocab for t in checked) > 30  # new (Russian) merges were compared, not only shared ones


def test_partial_utf8_tokens_keep_their_bytes(toks):
    """A token holding half a Cyrillic character decodes to U+FFFD; its old spelling must keep the raw bytes."""
    old, new = toks
    ids = subtokens_by_id(old, new)
    partial = [i for i in range(len(new)) if "\ufffd" in new.decode([i]) and i not in new.added_tokens_decoder]
    assert partial
    for i in partial:
        assert "".join(old.convert_ids_to_tokens(ids[i])) == new.convert_ids_to_tokens(i)


def test_text_path_agrees_with_piece_path(toks):
    """With a different decoder the pieces are not comparable and decode/encode is used; for whole-character
    tokens both give the same spelling."""
    old, new = toks
    data = json.loads(new.backend_tokenizer.to_str())
    data["decoder"] = {"type": "Sequence", "decoders": [data["decoder"]]}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)))
    a, b = subtokens_by_id(old, new), subtokens_by_id(old, other)
    whole = [i for i in a if "\ufffd" not in new.decode([i])]
    assert len(whole) > 200 and all(a[i] == b[i] for i in whole)


def test_sum_mode_and_special_tokens(toks):
    old, new = toks
    E = torch.randn(len(old), D, dtype=torch.float64)
    ids = subtokens_by_id(old, new)
    mean, summ = subtoken_average(E, old, new), subtoken_average(E, old, new, mode="sum")
    lengths = torch.tensor([len(ids[i]) for i in range(len(new))], dtype=torch.float64)
    torch.testing.assert_close(summ, mean * lengths[:, None])
    assert ids[new.convert_tokens_to_ids("<|im_end|>")] == [old.convert_tokens_to_ids("<|im_end|>")]
    assert ids[1] == old.encode("<pad>", add_special_tokens=False)  # new-only special: spelled as text


def test_empty_old_encoding_gives_zero_rows_and_is_counted():
    old = _characters_only(EN, 80, ["<s>"])  # Cyrillic cannot be spelled
    new = _characters_only(EN + RU, 200, ["<s>"])
    alphabet = {t for t in old.get_vocab() if len(t) == 1}
    expected = sorted(i for t, i in new.get_vocab().items() if not any(ch in alphabet for ch in t))
    _, empty = averaging_matrix(old, new)
    assert empty == expected and len(empty) > 20
    avg = subtoken_average(torch.randn(len(old), 8), old, new)
    assert avg[empty].abs().sum() == 0 and (avg[[i for i in range(len(new)) if i not in empty]] != 0).any(1).all()


def test_averaging_matrix_shape_and_errors(toks):
    old, new = toks
    matrix, _ = averaging_matrix(old, new, rows=512, columns=320)
    assert matrix.shape == (512, 320) and matrix.to_dense()[len(new):].abs().sum() == 0
    torch.testing.assert_close(matrix.to_dense()[: len(new)].sum(1), torch.ones(len(new), dtype=torch.float64))
    with pytest.raises(VocabError, match="only 100 rows"):
        averaging_matrix(old, new, rows=100)
    with pytest.raises(VocabError, match="old embedding matrix has only 50 rows"):
        averaging_matrix(old, new, columns=50)
    with pytest.raises(VocabError, match="choose one of: mean, sum.*'occ'"):
        averaging_matrix(old, new, mode="occ")


# ---- step 2 and 3 on matrices --------------------------------------------------------------------------------

def test_fit_projection_is_lstsq_on_rows():
    g = torch.Generator().manual_seed(0)
    src, dst = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    rows = torch.arange(0, 200, 3)
    want = torch.linalg.lstsq(src[rows].double(), dst[rows].double()).solution
    torch.testing.assert_close(fit_projection(src, dst, rows), want)
    # the normal equations hold: src^T (src P - dst) = 0
    P = fit_projection(src, dst)
    assert (src.double().T @ (src.double() @ P - dst.double())).abs().max() < 1e-10
    with pytest.raises(VocabError, match="10 row\\(s\\) to fit a 16 x 16 projection"):
        fit_projection(src, dst, torch.arange(10))


def test_identity_when_instruct_equals_base(toks):
    old, new = toks
    base, _, donor = _models(old, new)
    E_B, E_D = base.get_input_embeddings().weight, donor.get_input_embeddings().weight
    A, _ = averaging_matrix(old, new, rows=E_D.shape[0], columns=E_B.shape[0])
    E_new, P, residual = propagate_matrices(E_B, E_B.clone(), E_D, A)
    torch.testing.assert_close(P, torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(E_new, E_D, rtol=1e-5, atol=1e-6)
    assert residual < 1e-12


def test_recovers_a_known_linear_map(toks):
    """E_I = E_B M (input and LM head, different M): P recovers M and the new rows are E_D M."""
    old, new = toks
    base, instruct, donor = _models(old, new, perturb=False)
    g = torch.Generator().manual_seed(5)
    maps = {name: torch.eye(D) + 0.3 * torch.randn(D, D, generator=g) / D ** 0.5 for name in ("input", "output")}
    with torch.no_grad():
        instruct.get_input_embeddings().weight.copy_(base.get_input_embeddings().weight @ maps["input"])
        instruct.get_output_embeddings().weight.copy_(base.get_output_embeddings().weight @ maps["output"])
    A, _ = averaging_matrix(old, new, rows=donor.get_input_embeddings().weight.shape[0], columns=len(old))
    _, P, res = propagate_matrices(base.get_input_embeddings().weight, instruct.get_input_embeddings().weight,
                                   donor.get_input_embeddings().weight, A)
    torch.testing.assert_close(P.float(), maps["input"], rtol=0, atol=1e-4)
    assert res < 1e-5
    E_D = {"input": donor.get_input_embeddings().weight.clone(), "output": donor.get_output_embeddings().weight.clone()}
    model, report = propagate(base, instruct, donor, old, new)
    rows = _plain_rows(old, new)
    got = {"input": model.get_input_embeddings().weight, "output": model.get_output_embeddings().weight}
    for name in ("input", "output"):
        torch.testing.assert_close(got[name][rows], (E_D[name] @ maps[name])[rows], rtol=1e-4, atol=1e-5)
        assert report.residuals[name] < 1e-5
    assert not torch.allclose(got["input"][rows], got["output"][rows])  # each matrix had its own P


def test_straight_copies_the_donor(toks):
    old, new = toks
    base, instruct, donor = _models(old, new)
    E_D = donor.get_input_embeddings().weight.clone()
    with torch.no_grad():  # P = I: the residual is ||E_B~ - E_I~|| / ||E_I~||
        B_t, I_t = (subtoken_average(m.get_input_embeddings().weight.double(), old, new) for m in (base, instruct))
    residual_id = torch.linalg.norm(B_t - I_t) / torch.linalg.norm(I_t)
    model, report = propagate(base, instruct, donor, old, new, mode="straight")
    rows = _plain_rows(old, new)
    assert torch.equal(model.get_input_embeddings().weight[rows], E_D[rows])
    assert report.residuals["input"] == pytest.approx(float(residual_id), rel=1e-6)


def test_union_fits_on_shared_tokens_only(toks):
    old, new = toks
    base, instruct, donor = _models(old, new)
    E_B, E_I = base.get_input_embeddings().weight, instruct.get_input_embeddings().weight
    E_D = donor.get_input_embeddings().weight
    old_vocab = old.get_vocab()
    shared = sorted(set(old_vocab) & set(new.get_vocab()))
    assert 64 < len(shared) < len(new)
    assert shared_token_rows(old, new).tolist() == sorted(new.get_vocab()[t] for t in shared)
    old_ids = torch.tensor([old_vocab[t] for t in shared])
    want = torch.linalg.lstsq(E_B[old_ids].double(), E_I[old_ids].double()).solution
    A, _ = averaging_matrix(old, new, rows=E_D.shape[0], columns=len(old))
    _, P_union, _ = propagate_matrices(E_B, E_I, E_D, A, mode="union", shared_rows=shared_token_rows(old, new))
    _, P_conv, _ = propagate_matrices(E_B, E_I, E_D, A)
    torch.testing.assert_close(P_union, want, rtol=0, atol=1e-10)
    assert (P_union - P_conv).abs().max() > 1e-3  # the Russian rows changed the conversion fit
    with pytest.raises(VocabError, match="'union' mode needs shared_rows"):
        propagate_matrices(E_B, E_I, E_D, A, mode="union")
    _, report = propagate(base, instruct, donor, old, new, mode="union")
    assert report.fit_rows == len(shared)


# ---- whole models --------------------------------------------------------------------------------------------

def test_model_special_rows_padding_and_forward(toks):
    old, new = toks
    base, instruct, donor = _models(old, new)
    old_in = instruct.get_input_embeddings().weight.clone()
    old_out = instruct.get_output_embeddings().weight.clone()
    rows = donor.get_input_embeddings().weight.shape[0]
    model, report = propagate(base, instruct, donor, old, new)
    assert model is instruct and model.config.vocab_size == rows == report.rows and report.tokens == len(new)
    W_in, W_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert W_in.shape == W_out.shape == (rows, D) and W_in is not W_out and not report.tied
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        i_new, i_old = new.convert_tokens_to_ids(name), old.convert_tokens_to_ids(name)
        assert torch.equal(W_in[i_new], old_in[i_old]) and torch.equal(W_out[i_new], old_out[i_old])
    assert (new.convert_tokens_to_ids("<|im_end|>"), old.convert_tokens_to_ids("<|im_end|>")) == (3, 2)  # ids moved
    assert report.special_rows_copied == 3 and report.special_tokens_missing == ["<pad>"]
    assert report.special_tokens_copied == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert W_in[len(new):].abs().sum() == 0 and W_out[len(new):].abs().sum() == 0
    assert report.empty_encodings == 0 and report.fit_rows == len(new) and report.mode == "conversion"
    assert 0 < report.residuals["input"] < 1 and 0 < report.residuals["output"] < 1
    ids = torch.tensor([new.encode("<|im_start|> кошка сидела на ковре<|im_end|>", add_special_tokens=False)])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], rows) and torch.isfinite(logits).all()


def test_keep_shared_keeps_the_instruct_rows_of_shared_tokens_and_projects_only_the_new(toks):
    old, new = toks
    base, instruct, donor = _models(old, new)
    E_I = {k: m.weight.clone() for k, m in (("input", instruct.get_input_embeddings()),
                                            ("output", instruct.get_output_embeddings()))}
    projected, _ = propagate(base, copy.deepcopy(instruct), donor, old, new)
    model, report = propagate(base, instruct, donor, old, new, keep_shared=True)
    old_vocab = old.get_vocab()
    shared = {i: old_vocab[t] for t, i in new.get_vocab().items() if t in old_vocab and i not in new.added_tokens_decoder}
    assert report.shared_rows_kept == len(shared) > 64 and report.special_rows_copied == 3
    fresh = [i for i in _plain_rows(old, new).tolist() if i not in shared]
    assert fresh, "the new tokenizer must hold tokens the old one lacks"
    for key, W, P in (("input", model.get_input_embeddings().weight, projected.get_input_embeddings().weight),
                      ("output", model.get_output_embeddings().weight, projected.get_output_embeddings().weight)):
        new_ids, old_ids = torch.tensor(list(shared)), torch.tensor(list(shared.values()))
        assert torch.equal(W[new_ids], E_I[key][old_ids])  # bit for bit the instruct model's own rows
        assert not torch.equal(P[new_ids], E_I[key][old_ids])  # which plain conversion only approximates
        assert torch.equal(W[fresh], P[fresh])  # the new tokens: E_D P, as without keep_shared


def test_tied_model_writes_one_matrix(toks):
    old, new = toks
    base, instruct, donor = _models(old, new, tied=True)
    E_I = instruct.get_input_embeddings().weight.clone()
    A, _ = averaging_matrix(old, new, rows=donor.get_input_embeddings().weight.shape[0], columns=len(old))
    want, _, _ = propagate_matrices(base.get_input_embeddings().weight, E_I, donor.get_input_embeddings().weight, A)
    model, report = propagate(base, instruct, donor, old, new)
    W = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is W and report.tied and set(report.residuals) == {"input"}
    rows = _plain_rows(old, new)
    torch.testing.assert_close(W[rows], want[rows], rtol=0, atol=0)
    assert torch.equal(W[new.convert_tokens_to_ids("<|im_end|>")], E_I[old.convert_tokens_to_ids("<|im_end|>")])
    assert model(input_ids=torch.tensor([[5, 300, 400]])).logits.shape[-1] == W.shape[0]


def test_errors_name_what_is_wrong(toks):
    old, new = toks
    base, instruct, donor = _models(old, new)
    narrow = tiny_llama(vocab_size=len(old), hidden_size=32)
    with pytest.raises(VocabError, match=r"base model's input embeddings are \(300, 64\).*instruct model's are "
                                         r"\(300, 32\)"):
        propagate(base, narrow, donor, old, new)
    with pytest.raises(VocabError, match=r"\(300, 64\).*instruct model's are \(310, 64\)"):
        propagate(base, tiny_llama(vocab_size=310), donor, old, new)
    with pytest.raises(VocabError, match="donor's hidden size is 32"):
        propagate(base, instruct, tiny_llama(vocab_size=448, hidden_size=32), old, new)
    with pytest.raises(VocabError, match="donor has 400 embedding rows but the new tokenizer has 420 ids"):
        propagate(base, instruct, tiny_llama(vocab_size=400), old, new)
    with pytest.raises(VocabError, match="unknown LEP mode 'convert'; choose one of: conversion, straight, union"):
        propagate(base, instruct, donor, old, new, mode="convert")
    with pytest.raises(VocabError, match="unknown subtoken averaging mode 'median'"):
        propagate(base, instruct, donor, old, new, averaging="median")
    assert instruct.get_input_embeddings().weight.shape[0] == len(old)  # nothing changed on refusal
