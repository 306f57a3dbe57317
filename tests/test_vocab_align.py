"""The ``align`` initialisation of new token rows (Yamaguchi et al., arXiv:2406.11477, the paper's recommended one;
METHODS.md 17a): e_t = sum_seq f(seq | t) mean(E[seq]) over the old-token sequences that t's occurrences in the
corpus overlap, with ``merge`` for tokens the corpus lacks and ``random`` where merge cannot resolve.

With lmadapt's continued-BPE tokenizers every occurrence of t overlaps the same old pieces (a new encoding only
coarsens the old one), so align equals ``mean`` on the tokens seen; a hand-made tokenizer whose new merges come
before old ones gives a token two segmentations and checks the frequency weighting by hand.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from test_vocab_expand import ENGLISH, GERMAN
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmadapt.methods import build_method
from lmadapt.testing import tiny_bpe_tokenizer, tiny_llama
from lmadapt.vocab.bpe import VocabError
from lmadapt.vocab.expand import NewToken, extend_tokenizer, learn_new_tokens
from lmadapt.vocab.init import align_counts, init_new_rows, resize_for, subtoken_ids

pytestmark = pytest.mark.usefixtures("one_thread")

GREEK = [
    "Η γάτα κάθεται στο χαλί και ο σκύλος κοιμάται στον ήλιο.",
    "Τα παιδιά παίζουν στον κήπο γιατί ο καιρός είναι ωραίος.",
    "Ο δάσκαλος λέει ότι οι μαθητές πρέπει να διαβάσουν το κεφάλαιο.",
] * 4


def hand_bpe(vocab: list[str], merges: list[tuple[str, str]], normalizer=None) -> PreTrainedTokenizerFast:
    """A BPE over single letters with the given vocabulary (ids in order) and merges, words split on spaces."""
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if normalizer is not None:
        core.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=core)


OLD_VOCAB = ["a", "b", "c", "x", "xa", "ab"]
OLD_MERGES = [("x", "a"), ("a", "b")]
# 'bc' and 'abc' are merged BEFORE the old merges, so they can pre-empt them: 'abc' alone is old ab|c, but in
# 'xabc' the new merges take 'abc' first and the old tokenizer has xa|b|c there, so 'abc' overlaps (xa, b, c).
NEW_MERGES = [("b", "c"), ("a", "bc"), *OLD_MERGES]
BC, ABC = NewToken("bc", "b", "c", 1), NewToken("abc", "a", "bc", 1)


@pytest.fixture(scope="module")
def hand_pair():
    return hand_bpe(OLD_VOCAB, OLD_MERGES), hand_bpe(OLD_VOCAB + ["bc", "abc"], NEW_MERGES)


def _resized(old, new, tied: bool):
    """A tiny Llama for ``old``, resized for ``new``; with its two matrices as they were before the resize."""
    model = tiny_llama(vocab_size=len(old), tie_word_embeddings=tied)
    before = [w.detach().clone() for w in (model.get_input_embeddings().weight, model.lm_head.weight)]
    resize_for(model, new)
    return model, before


def _matrices(model, before):
    """(resized matrix, its old rows) for the input embedding and the head (the same pair twice when tied)."""
    return ((model.get_input_embeddings().weight, before[0]), (model.lm_head.weight, before[1]))


def test_the_hand_made_tokenizer_gives_abc_two_old_segmentations(hand_pair):
    old, new = hand_pair
    assert old.tokenize("abc xabc") == ["ab", "c", "xa", "b", "c"]
    assert new.tokenize("abc xabc") == ["abc", "x", "abc"]
    v = old.get_vocab()
    got = align_counts(old, new, ["abc abc xabc", "ab xa"], [6, 7])
    # overlap, not containment: 'xa' shares the 'a' of the second 'abc' and is part of its sequence
    assert got == {7: Counter({(v["ab"], v["c"]): 2, (v["xa"], v["b"], v["c"]): 1})}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_align_row_is_the_frequency_weighted_mean_of_the_overlapped_sequences(hand_pair, tied):
    old, new = hand_pair
    model, before = _resized(old, new, tied)
    report = init_new_rows(model, old, new, [BC, ABC], "align", texts=["abc abc xabc", "ab xa"])
    v = old.get_vocab()
    a, b, c, xa, ab = (v[s] for s in ("a", "b", "c", "xa", "ab"))
    for w, w0 in _matrices(model, before):
        assert torch.equal(w[: len(old)], w0)  # old rows untouched
        # abc: seen twice as ab|c and once as xa|b|c
        want = 2 / 3 * (w0[ab] + w0[c]) / 2 + 1 / 3 * (w0[xa] + w0[b] + w0[c]) / 3
        torch.testing.assert_close(w[7], want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(w[6], (w0[b] + w0[c]) / 2)  # bc never occurs: merge's (E_b + E_c) / 2
        assert not torch.allclose(w[7], (w0[ab] + w0[c]) / 2)  # not mean: the weighting shows
        assert not torch.allclose(w[7], ((w0[b] + w0[c]) / 2 + w0[a]) / 2)  # nor merge
    assert (report.matrices, report.rows, report.fell_back, report.random) == (1 if tied else 2, 2, ["bc"], [])
    assert str(report) == f"align: 2 new row(s) in {1 if tied else 2} matrix(es); 1 fell back to merge"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_token_neither_seen_nor_resolvable_by_merge_gets_a_random_row(hand_pair, tied):
    """'abc' alone (its part 'bc' is not among the tokens given) in text without it: merge cannot resolve it."""
    old, new = hand_pair
    model, before = _resized(old, new, tied)
    report = init_new_rows(model, old, new, [ABC], "align", texts=["ab xa"], seed=5)
    gen = torch.Generator().manual_seed(5)
    for w, w0 in _matrices(model, before)[: 1 if tied else 2]:  # one draw per matrix, in order
        old_rows = w0.double()
        z = torch.randn(w0.shape[1], generator=gen, dtype=torch.float64)
        torch.testing.assert_close(w[7].double(), old_rows.mean(0) + old_rows.std(0) * z)
        assert torch.equal(w[: len(old)], w0) and torch.count_nonzero(w[6]) == 0
    assert report.fell_back == ["abc"] and report.random == ["abc"]
    assert str(report).endswith("1 fell back to merge (1 of them on to random)")
    again, _ = _resized(old, new, tied)
    init_new_rows(again, old, new, [ABC], "align", texts=["ab xa"], seed=6)
    assert not torch.allclose(again.get_input_embeddings().weight[7], model.get_input_embeddings().weight[7])


@pytest.mark.parametrize("style", ["byte", "metaspace"])
def test_with_continued_bpe_align_is_mean_on_seen_tokens_and_merge_on_the_rest(style):
    """A continued-BPE encoding coarsens the old one: every occurrence of t overlaps exactly S(t), the pieces
    ``mean`` averages, so align == mean where t occurs; tokens absent from the texts take merge's row."""
    old = tiny_bpe_tokenizer(ENGLISH, style=style, vocab_size=420, split_words=False, chat_template=False)
    new_tokens = learn_new_tokens(old, GERMAN, 40)
    new = extend_tokenizer(old, new_tokens)
    ids = new.convert_tokens_to_ids([t.token for t in new_tokens])
    texts = GERMAN[:4]
    occurrences = Counter(i for seq in new(texts, add_special_tokens=False).input_ids for i in seq)
    counts = align_counts(old, new, texts, ids)
    assert set(counts) == {i for i in ids if occurrences[i]}
    for t, i in zip(new_tokens, ids):
        if i in counts:
            assert counts[i] == Counter({tuple(subtoken_ids(old, t.token)): occurrences[i]}), t.token
    unseen = [t for t, i in zip(new_tokens, ids) if i not in counts]
    assert 5 <= len(unseen) <= len(new_tokens) - 5

    for tied in (False, True):
        rows = {}
        for method in ("align", "mean", "merge"):
            model, before = _resized(old, new, tied)
            report = init_new_rows(model, old, new, new_tokens, method, texts=texts)
            rows[method] = [w.detach().clone() for w, _ in _matrices(model, before)]
            if method == "align":
                assert report.fell_back == [t.token for t in unseen] and report.random == []
                assert all(torch.equal(w[: len(old)], w0) for w, w0 in _matrices(model, before))
        for k in range(2):
            for t, i in zip(new_tokens, ids):
                want = rows["mean" if i in counts else "merge"][k][i]
                torch.testing.assert_close(rows["align"][k][i], want, rtol=1e-6, atol=1e-7)


def test_byte_tokens_of_one_character_align_exactly():
    """Byte-level tokens that split a UTF-8 character share its character offsets (both bytes of 'γ' have
    offsets (2, 3)), so aligning by character offsets would put the second byte into 'ĠÎ' (space + first byte);
    alignment in BPE-model space gives exactly the pieces 'Ġ', 'Î'."""
    old = tiny_bpe_tokenizer(ENGLISH, vocab_size=420)
    new_tokens = learn_new_tokens(old, GREEK, 30)
    new = extend_tokenizer(old, new_tokens)
    ids = new.convert_tokens_to_ids([t.token for t in new_tokens])
    split = new.convert_tokens_to_ids("ĠÎ")  # a space and the first byte of a Greek letter
    assert split in ids

    # what character offsets would give for the first occurrence of 'ĠÎ'
    o = old(GREEK[0], return_offsets_mapping=True, add_special_tokens=False)
    n = new(GREEK[0], return_offsets_mapping=True, add_special_tokens=False)
    s, e = n["offset_mapping"][n["input_ids"].index(split)]
    by_chars = [i for i, (a, b) in zip(o["input_ids"], o["offset_mapping"]) if a < e and b > s]
    assert old.convert_ids_to_tokens(by_chars) == ["Ġ", "Î", "³"]  # wrong: '³' is the next token's byte

    counts = align_counts(old, new, GREEK, ids)
    occurrences = sum(seq.count(split) for seq in new(GREEK, add_special_tokens=False).input_ids)
    assert occurrences > 10
    assert counts[split] == Counter({tuple(old.convert_tokens_to_ids(["Ġ", "Î"])): occurrences})
    for t, i in zip(new_tokens, ids):
        if i in counts:
            assert list(counts[i]) == [tuple(subtoken_ids(old, t.token))], t.token
    model, before = _resized(old, new, False)
    init_new_rows(model, old, new, new_tokens, "align", texts=GREEK)
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[split], before[0][old.convert_tokens_to_ids(["Ġ", "Î"])].mean(0))


def test_the_new_tokens_method_passes_its_corpus_to_align(tmp_path):
    old = tiny_bpe_tokenizer(ENGLISH, vocab_size=420)
    corpus = tmp_path / "de.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in GERMAN), encoding="utf-8")
    method = build_method({"name": "new_tokens", "corpus": [str(corpus)], "n": 12, "init": "align"})
    model = tiny_llama(vocab_size=len(old))
    before = model.get_input_embeddings().weight.detach().clone()
    new = method.prepare(model, old)
    emb = model.get_input_embeddings().weight
    seen = Counter(i for seq in new(GERMAN, add_special_tokens=False).input_ids for i in seq)
    assert sum(1 for i in range(len(old), len(new)) if seen[i]) >= 8
    for i in range(len(old), len(new)):
        if seen[i]:  # align == mean for a seen token (previous test)
            token = new.convert_ids_to_tokens(i)
            torch.testing.assert_close(emb[i], before[subtoken_ids(old, token)].mean(0))
    assert torch.equal(emb[: len(old)], before)
    direct = tiny_llama(vocab_size=len(old))
    resize_for(direct, new)
    init_new_rows(direct, old, new, learn_new_tokens(old, GERMAN, 12), "align", texts=GERMAN)
    assert torch.equal(emb, direct.get_input_embeddings().weight)


def test_align_without_texts_or_with_tokenizers_that_split_text_differently_is_refused(hand_pair):
    old, new = hand_pair
    model, _ = _resized(old, new, False)
    with pytest.raises(VocabError, match=r"align initialisation needs target-language texts \(texts=\.\.\."):
        init_new_rows(model, old, new, [BC, ABC], "align")
    other = hand_bpe(OLD_VOCAB + ["bc", "abc"], NEW_MERGES, normalizer=normalizers.Replace("x", "a"))
    with pytest.raises(VocabError, match="the text at index 1 splits into different strings under the old and the new tokenizer"):
        init_new_rows(model, old, other, [BC, ABC], "align", texts=["abc", "xabc"])
