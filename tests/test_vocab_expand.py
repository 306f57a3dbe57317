"""Vocabulary expansion (METHODS.md 17a): learning new BPE tokens, extending the tokenizer, initialising new rows.

Tokenizers are trained here on a few sentences (:func:`lmadapt.testing.tiny_bpe_tokenizer`): a byte-level BPE
(GPT-2/SmolLM2 style) and a SentencePiece-style BPE with byte fallback and no pre-splitting (Llama-2 style).
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, CanineTokenizer, PreTrainedTokenizerFast

from lmadapt.testing import tiny_bpe_tokenizer, tiny_llama
from lmadapt.vocab.bpe import SUPPORTED, BPEModel, VocabError
from lmadapt.vocab.expand import NewToken, extend_tokenizer, learn_new_tokens
from lmadapt.vocab.init import (
    INIT_METHODS,
    init_new_rows,
    resize_for,
    sparsemax,
    subtoken_ids,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ENGLISH = [
    "The cat sat on the mat and the dog slept in the sun.",
    "A quick brown fox jumps over the lazy dog every morning.",
    "We went to the market to buy bread, cheese and some fruit.",
    "The weather was cold, so the children stayed inside and read books.",
    "She wrote a long letter to her friend who lives in another country.",
    "Scientists found that the new method works better than the old one.",
    "The train was late again, and the passengers were not happy about it.",
    "He opened the window to let the fresh air into the small room.",
    "Our team played well in the match and won the game in the last minute.",
    "The teacher asked the students to read the next chapter before Monday.",
    "They built a house near the river with a garden full of flowers.",
    "Many people think that learning a language takes years of practice.",
] * 3
GERMAN = [
    "Die Katze sitzt auf der Matte und der Hund schläft in der Sonne.",
    "Wir gehen heute in die Stadt und kaufen Brot und Käse.",
    "Die Kinder spielen im Garten, weil das Wetter schön ist.",
    "Die Regierung hat die Entwicklung der Wirtschaft nicht verstanden.",
    "Der Lehrer sagt, dass die Schüler das nächste Kapitel lesen sollen.",
    "Die Zusammenarbeit zwischen den Unternehmen ist wichtig für die Zukunft.",
    "Der Zug ist wieder zu spät, und die Fahrgäste sind nicht zufrieden.",
    "Wissenschaftler haben gezeigt, dass die neue Methode besser ist.",
    "Die Gesellschaft trägt eine große Verantwortung für die Kinder.",
    "Er öffnet das Fenster und die frische Luft kommt in das Zimmer.",
    "Die Mannschaft hat das Spiel in der letzten Minute gewonnen.",
    "Viele Menschen denken, dass eine Sprache zu lernen Jahre dauert.",
] * 4
HELD_OUT_GERMAN = ["Die Kinder und der Hund spielen in der Sonne, weil die Zukunft schön ist."]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on ENGLISH, with ChatML special tokens and template."""
    return tiny_bpe_tokenizer(ENGLISH, vocab_size=420)


def sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """A Llama-2-style BPE: '▁' for spaces, no pre-splitting, <0x..> byte fallback (umlauts are unknown)."""
    return tiny_bpe_tokenizer(ENGLISH, style="metaspace", vocab_size=420, split_words=False, chat_template=False)


@pytest.fixture(scope="module")
def byte_tok() -> PreTrainedTokenizerFast:
    return byte_level_bpe()


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def expanded(request):
    old = byte_level_bpe() if request.param == "byte_level" else sentencepiece_bpe()
    new_tokens = learn_new_tokens(old, GERMAN, 40)
    return old, extend_tokenizer(old, new_tokens), new_tokens


def test_new_tokens_get_the_ids_after_every_old_id_and_old_ids_keep_their_strings(expanded):
    old, new, new_tokens = expanded
    n = len(old)
    assert len(new) == n + len(new_tokens)
    assert new.convert_ids_to_tokens(list(range(n))) == old.convert_ids_to_tokens(list(range(n)))
    assert new.convert_tokens_to_ids([t.token for t in new_tokens]) == list(range(n, n + len(new_tokens)))
    assert all(t.token == t.left + t.right and t.token not in old.get_vocab() for t in new_tokens)
    # a merge's count never exceeds the best count before it: BPE frequencies do not increase
    assert [t.frequency for t in new_tokens] == sorted((t.frequency for t in new_tokens), reverse=True)


def test_added_tokens_outside_the_bpe_vocab_keep_their_ids():
    """Llama-3 keeps added tokens out of the BPE vocabulary; tokenizers would renumber them after new tokens."""
    old = byte_level_bpe()
    old.add_tokens(["<extra>"])
    assert "<extra>" not in BPEModel.from_tokenizer(old).vocab
    new_tokens = learn_new_tokens(old, GERMAN, 10)
    new = extend_tokenizer(old, new_tokens)
    assert new.convert_tokens_to_ids("<extra>") == old.convert_tokens_to_ids("<extra>") == len(old) - 1
    assert new.convert_tokens_to_ids([t.token for t in new_tokens]) == list(range(len(old), len(old) + 10))
    text = "Die Kinder<extra> und der Hund"
    assert _coarsens(old.convert_ids_to_tokens(old(text).input_ids), new.convert_ids_to_tokens(new(text).input_ids))


def test_bpe_model_round_trips_and_refuses_to_drop_special_tokens(byte_tok):
    bpe = BPEModel.from_tokenizer(byte_tok)
    same = bpe.to_tokenizer(byte_tok, id_map={i: i for i in range(len(byte_tok))})
    assert same(ENGLISH[0] + "<|im_end|>").input_ids == byte_tok(ENGLISH[0] + "<|im_end|>").input_ids
    with pytest.raises(VocabError, match=r"1 added/special token\(s\) would be dropped: \['<pad>'\]"):
        bpe.to_tokenizer(byte_tok, id_map={i: i for i in range(len(byte_tok)) if i != byte_tok.pad_token_id})


def _coarsens(old_pieces: list[str], new_pieces: list[str]) -> bool:
    """True when each new piece is the concatenation of a contiguous run of old pieces."""
    j = 0
    for piece in new_pieces:
        acc = ""
        while len(acc) < len(piece) and j < len(old_pieces):
            acc += old_pieces[j]
            j += 1
        if acc != piece:
            return False
    return j == len(old_pieces)


def test_new_encoding_coarsens_the_old_one_and_decodes_identically(expanded):
    old, new, _ = expanded
    for text in ENGLISH[:12] + GERMAN[:12] + HELD_OUT_GERMAN:
        a, b = old(text).input_ids, new(text).input_ids
        assert _coarsens(old.convert_ids_to_tokens(a), new.convert_ids_to_tokens(b)), text
        assert new.decode(b) == old.decode(a)
    german_old = sum(len(old(t).input_ids) for t in GERMAN[:12] + HELD_OUT_GERMAN)
    german_new = sum(len(new(t).input_ids) for t in GERMAN[:12] + HELD_OUT_GERMAN)
    assert german_new < 0.85 * german_old


def test_english_without_new_token_strings_encodes_to_identical_ids(expanded):
    old, new, new_tokens = expanded
    strings = {t.token for t in new_tokens}
    untouched = [s for s in ENGLISH[:12]
                 if not any(t in "".join(old.convert_ids_to_tokens(old(s).input_ids)) for t in strings)]
    assert len(untouched) >= 2
    for s in untouched:
        assert new(s).input_ids == old(s).input_ids
    # a text that does use a new token's string does change, proving the check above could fail
    assert new(GERMAN[0]).input_ids != old(GERMAN[0]).input_ids


def test_reported_frequency_is_the_count_under_the_new_tokenizer_minus_later_merges(expanded):
    """A token's count when encoding the corpus equals its frequency at merge time less the occurrences that
    later merges consumed (a later token with it as left or right part)."""
    _, new, new_tokens = expanded
    expected = {t.token: t.frequency for t in new_tokens}
    for t in new_tokens:
        for part in (t.left, t.right):
            if part in expected:
                expected[part] -= t.frequency
    counts = Counter(i for ids in new(GERMAN, add_special_tokens=False).input_ids for i in ids)
    got = {t.token: counts[new.convert_tokens_to_ids(t.token)] for t in new_tokens}
    assert got == expected
    assert all(got[t.token] > 0 for t in new_tokens if expected[t.token] > 0)


def _naive_bpe(words: Counter, n: int, known: set[str]) -> list[tuple[str, str, str, int]]:
    """Reference: recount every pair at every step (slow, obviously right)."""
    words = Counter({tuple(w): c for w, c in words.items()})
    out = []
    for _ in range(n):
        pairs = Counter()
        for w, c in words.items():
            for p in pairwise(w):
                if p[0] + p[1] not in known:
                    pairs[p] += c
        if not pairs:
            break
        (a, b), c = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if c < 2:
            break
        known.add(a + b)
        out.append((a + b, a, b, c))
        merged = Counter()
        for w, cw in words.items():
            res, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == (a, b):
                    res.append(a + b)
                    j += 2
                else:
                    res.append(w[j])
                    j += 1
            merged[tuple(res)] += cw
        words = merged
    return out


def test_incremental_merges_match_a_naive_bpe_reference(byte_tok):
    pre, model = byte_tok.backend_tokenizer.pre_tokenizer, byte_tok.backend_tokenizer.model
    words = Counter()
    for text in GERMAN:
        for w, _ in pre.pre_tokenize_str(text):
            words[tuple(t.value for t in model.tokenize(w))] += 1
    reference = _naive_bpe(words, 60, set(byte_tok.get_vocab()))
    got = learn_new_tokens(byte_tok, GERMAN, 60)
    assert [(t.token, t.left, t.right, t.frequency) for t in got] == reference


def test_no_token_is_learned_across_special_tokens(byte_tok):
    texts = ["xyz<|im_end|>xyz<|im_start|>qq"] * 10
    got = learn_new_tokens(byte_tok, texts, 2)
    assert {t.token for t in got} <= {"xyz", "xy", "yz", "qq"}, got
    assert not any("<" in t.token or "|" in t.token for t in got)


def test_byte_fallback_pieces_are_never_merged():
    tok = sentencepiece_bpe()
    got = learn_new_tokens(tok, GERMAN, 40)
    assert not any("<0x" in t.token for t in got)
    assert "<0xC3>" in tok.convert_ids_to_tokens(tok("schön").input_ids)  # umlauts do occur as bytes


def test_extended_tokenizer_saves_and_reloads_with_identical_encodings(tmp_path, expanded):
    old, new, _ = expanded
    new.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    for text in ENGLISH[:3] + GERMAN[:3]:
        assert back(text).input_ids == new(text).input_ids
    assert len(back) == len(new)
    assert back.special_tokens_map == new.special_tokens_map == old.special_tokens_map
    assert back.all_special_ids == old.all_special_ids
    assert back.chat_template == old.chat_template
    if old.chat_template:
        chat = [{"role": "user", "content": GERMAN[0]}]
        ids = back.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        assert back.decode(ids) == old.decode(old.apply_chat_template(chat, tokenize=True, add_generation_prompt=True))


def test_learning_is_deterministic(byte_tok):
    assert learn_new_tokens(byte_tok, GERMAN, 30) == learn_new_tokens(byte_tok, list(reversed(GERMAN)), 30)


# ---- errors ------------------------------------------------------------------------------------------------


def test_n_below_one_is_refused(byte_tok):
    with pytest.raises(VocabError, match="at least 1, got n=0"):
        learn_new_tokens(byte_tok, GERMAN, 0)


def test_a_corpus_with_no_new_pair_says_why(byte_tok):
    with pytest.raises(VocabError, match="yields no new token: every adjacent token pair"):
        words = [w for w in ("the", "cat", "sat", "on", "mat", "and", "dog", "in", "sun") if len(byte_tok(" " + w).input_ids) == 1]
        assert len(words) >= 5
        learn_new_tokens(byte_tok, ["".join(" " + w for w in words)] * 5, 3)
    with pytest.raises(VocabError, match=r"yields no new token: .* occurs 1 time\(s\), fewer than min_frequency=2"):
        learn_new_tokens(byte_tok, ["Xylophonquartett"], 3)
    with pytest.raises(VocabError, match="no text"):
        learn_new_tokens(byte_tok, ["", "<|im_end|>"], 3)


def test_asking_for_more_tokens_than_the_corpus_yields_names_both_numbers(byte_tok):
    with pytest.raises(VocabError) as err:
        learn_new_tokens(byte_tok, GERMAN[:12], 10_000, min_frequency=2)
    msg = str(err.value)
    found = int(msg.split("yields only ")[1].split()[0])
    assert "asked for n=10000" in msg and f"Ask for n={found} or fewer" in msg and "lower min_frequency" in msg
    assert len(learn_new_tokens(byte_tok, GERMAN[:12], found)) == found


@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "slow"])
def test_tokenizers_that_cannot_be_extended_are_named(kind):
    if kind == "slow":
        tok, name = CanineTokenizer(), "CanineTokenizer is not a fast"
    else:
        model = (models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]") if kind == "wordpiece"
                 else models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0, False))
        tok, name = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model)), ("WordPiece" if kind == "wordpiece"
                                                                                 else "Unigram")
    with pytest.raises(VocabError, match=name) as err:
        learn_new_tokens(tok, GERMAN, 3)
    assert SUPPORTED in str(err.value)


def test_extend_refuses_tokens_that_do_not_fit(byte_tok):
    with pytest.raises(VocabError, match="is not 'ab' \\+ 'c'"):
        extend_tokenizer(byte_tok, [NewToken("abd", "ab", "c", 3)])
    the = next(t for t in byte_tok.get_vocab() if t.startswith("Ġ") and len(t) > 2)
    with pytest.raises(VocabError, match="already a token"):
        extend_tokenizer(byte_tok, [NewToken(the, the[:2], the[2:], 3)])
    with pytest.raises(VocabError, match="must be tokens"):
        extend_tokenizer(byte_tok, [NewToken("qqqqzz", "qqqq", "zz", 3)])


# ---- initialising the new rows (init.py) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(byte_tok):
    new_tokens = learn_new_tokens(byte_tok, GERMAN, 40)
    return byte_tok, extend_tokenizer(byte_tok, new_tokens), new_tokens


def _resized(old, new, tied: bool):
    model = tiny_llama(vocab_size=len(old), tie_word_embeddings=tied)
    before = [w.detach().clone() for w in (model.get_input_embeddings().weight, model.lm_head.weight)]
    assert resize_for(model, new) == len(old)
    return model, before


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("method", INIT_METHODS)
def test_every_init_keeps_old_rows_and_old_logits(pair, method, tied):
    old, new, new_tokens = pair
    reference = tiny_llama(vocab_size=len(old), tie_word_embeddings=tied)
    model, (inp0, out0) = _resized(old, new, tied)
    report = init_new_rows(model, old, new, new_tokens, method, texts=GERMAN)
    rows = -(-len(new) // 8) * 8
    inp, out = model.get_input_embeddings().weight, model.lm_head.weight
    assert inp.shape[0] == out.shape[0] == model.config.vocab_size == rows
    assert (out is inp) == tied and report.matrices == (1 if tied else 2) and report.rows == len(new_tokens)
    assert torch.equal(inp[: len(old)], inp0) and torch.equal(out[: len(old)], out0)
    assert torch.count_nonzero(inp[len(new):]) == 0 and torch.count_nonzero(out[len(new):]) == 0
    new_rows = inp[len(old): len(new)]
    assert torch.isfinite(new_rows).all() and (new_rows.norm(dim=1) > 0).all()
    ids = torch.tensor([old(ENGLISH[0]).input_ids])
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
        assert got.shape[-1] == rows
        torch.testing.assert_close(got[..., : len(old)], want, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(model(torch.tensor([new(GERMAN[0]).input_ids])).logits).all()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_mean_is_the_mean_of_the_old_pieces_of_each_matrix(pair, tied):
    old, new, new_tokens = pair
    model, (inp0, out0) = _resized(old, new, tied)
    init_new_rows(model, old, new, new_tokens, "mean")
    for w, w0 in ((model.get_input_embeddings().weight, inp0), (model.lm_head.weight, out0)):
        for t in new_tokens:
            pieces = old(old.convert_tokens_to_string([t.token]), add_special_tokens=False).input_ids
            assert subtoken_ids(old, t.token) == pieces
            torch.testing.assert_close(w[new.convert_tokens_to_ids(t.token)], w0[pieces].mean(0))


def test_mean_of_a_string_that_is_one_old_token_is_that_row(pair):
    """METHODS 17 test 2: a token whose string is a single old token gets exactly that token's row."""
    old, _, _ = pair
    model = tiny_llama(vocab_size=len(old))
    emb = model.get_input_embeddings().weight
    for s in ("Ġthe", "Ġand", "Ġdog", "Ġthat", "Ġyear"):
        assert s in old.get_vocab()
        assert subtoken_ids(old, s) == [old.convert_tokens_to_ids(s)]
        assert torch.equal(emb[subtoken_ids(old, s)].mean(0), emb[old.convert_tokens_to_ids(s)])


def test_merge_follows_the_merge_path_recursively(pair):
    old, new, new_tokens = pair
    model, (inp0, out0) = _resized(old, new, False)
    report = init_new_rows(model, old, new, new_tokens, "merge")
    learned = {t.token: t for t in new_tokens}
    two_level = next(t for t in new_tokens if t.left in learned and t.right not in learned
                     and learned[t.left].left not in learned and learned[t.left].right not in learned)
    ll, lr, r = (old.convert_tokens_to_ids(s) for s in (learned[two_level.left].left,
                                                         learned[two_level.left].right, two_level.right))
    for w, w0 in ((model.get_input_embeddings().weight, inp0), (model.lm_head.weight, out0)):
        want = ((w0[ll] + w0[lr]) / 2 + w0[r]) / 2  # e_t = (e_l + e_r)/2 with e_l = (E_ll + E_lr)/2
        torch.testing.assert_close(w[new.convert_tokens_to_ids(two_level.token)], want)
    assert report.fell_back == []


def test_random_matches_the_old_rows_per_dimension_mean_and_std(byte_tok):
    new_tokens = learn_new_tokens(byte_tok, GERMAN, 150)
    new = extend_tokenizer(byte_tok, new_tokens)
    model, (inp0, _) = _resized(byte_tok, new, False)
    init_new_rows(model, byte_tok, new, new_tokens, "random", seed=3)
    rows = model.get_input_embeddings().weight[len(byte_tok): len(new)].double()
    mu, sd = inp0.double().mean(0), inp0.double().std(0)
    z = (rows - mu) / sd
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05  # 150 x 64 draws pooled
    assert (z.mean(0).abs() < 5 / 150 ** 0.5).all()
    again, _ = _resized(byte_tok, new, False)
    init_new_rows(again, byte_tok, new, new_tokens, "random", seed=3)
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_focus_puts_a_token_used_like_an_old_one_on_that_old_row(pair):
    old, new, new_tokens = pair
    assert "Ġund" in {t.token for t in new_tokens} and len(old(" and").input_ids) == 1
    texts = [f"The {a} {w} the {b} sat on the mat." for a in ("cat", "dog", "fox", "house", "river", "team")
             for b in ("sun", "garden", "room", "market") for w in ("and", "und")]
    model, (inp0, _) = _resized(old, new, False)
    report = init_new_rows(model, old, new, new_tokens, "focus", texts=texts)
    emb = model.get_input_embeddings().weight
    und, and_ = new.convert_tokens_to_ids("Ġund"), old.convert_tokens_to_ids("Ġand")
    torch.testing.assert_close(emb[und], inp0[and_], rtol=1e-4, atol=1e-5)
    assert (emb[und] - inp0[and_]).norm() < 0.1 * (inp0.mean(0) - inp0[and_]).norm()
    seen = Counter(i for ids in new(texts, add_special_tokens=False).input_ids for i in ids)
    assert sorted(report.fell_back) == sorted(t.token for t in new_tokens
                                             if seen[new.convert_tokens_to_ids(t.token)] < 3)
    assert 0 < len(report.fell_back) < len(new_tokens)


def test_sparsemax_is_the_projection_onto_the_simplex():
    p = sparsemax(np.array([1.0, 0.9, 0.1]))
    np.testing.assert_allclose(p, [0.55, 0.45, 0.0], atol=1e-12)  # tau = (1.9 - 1) / 2 by hand
    p = sparsemax(np.array([10.0, 9.0, 1.0]))
    np.testing.assert_allclose(p, [1.0, 0.0, 0.0])
    rng = np.random.default_rng(0)
    for _ in range(20):
        z = rng.normal(size=30)
        p = sparsemax(z)
        assert abs(p.sum() - 1) < 1e-12 and (p >= 0).all()
        # the projection is closer to z than any other point of the simplex sampled at random
        q = rng.dirichlet(np.ones(30), size=200)
        assert ((q - z) ** 2).sum(1).min() >= ((p - z) ** 2).sum() - 1e-12


def test_focus_rows_are_convex_combinations_of_old_rows(pair):
    old, new, new_tokens = pair
    texts = [f"The {a} und {b} sat on the {c}." for a in ("cat", "dog", "fox") for b in ("sun", "room")
             for c in ("mat", "garden", "market")]
    model, (inp0, _) = _resized(old, new, False)
    report = init_new_rows(model, old, new, new_tokens, "focus", texts=texts)
    emb = model.get_input_embeddings().weight.detach()
    fell = set(report.fell_back)
    top = inp0.norm(dim=1).max()
    for t in new_tokens:
        if t.token not in fell:  # inside the hull: no longer than the longest old row
            assert emb[new.convert_tokens_to_ids(t.token)].norm() <= top + 1e-5


def test_init_errors_say_what_to_do(pair):
    old, new, new_tokens = pair
    model = tiny_llama(vocab_size=len(old))
    with pytest.raises(VocabError, match="call resize_for"):
        init_new_rows(model, old, new, new_tokens, "mean")
    resize_for(model, new)
    with pytest.raises(VocabError, match="unknown initialisation 'avg'; choose one of random, mean_all"):
        init_new_rows(model, old, new, new_tokens, "avg")
    with pytest.raises(VocabError, match="needs target-language texts"):
        init_new_rows(model, old, new, new_tokens, "focus")
    with pytest.raises(VocabError, match="not new tokens"):
        init_new_rows(model, old, new, [NewToken("Ġthe", "Ġt", "he", 1)], "mean")
