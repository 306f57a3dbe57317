"""``lmadapt vocab expand|trim|propagate|inspect`` on a tiny Llama with a byte-level BPE trained here (English and
Russian): the folders load in transformers, keep what the library promises (old rows, same pieces, same logits over
kept ids, LEP's straight mode = the donor's rows), and bad input is one line naming the file or flag."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lmadapt.cli import main
from lmadapt.cli import vocab as cli_vocab
from lmadapt.testing import SPECIAL_TOKENS, tiny_bpe_tokenizer, tiny_llama
from lmadapt.vocab.corpus import read_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def _words(text: str) -> list[str]:
    return text.split()


EN = _words("the a quick brown fox jumps over lazy dog while people walk through green parks and talk about weather "
            "music books travel friends often quietly yesterday tomorrow garden river mountain window kitchen coffee")
RU = _words("и в не на я быть он с что а по это она этот к но они мы как из у который то за свой весь год от так")
GERMAN = [
    "Die Katze sitzt auf der Matte und der Hund schläft in der Sonne.",
    "Wir gehen heute in die Stadt und kaufen Brot und Käse.",
    "Die Kinder spielen im Garten, weil das Wetter schön ist.",
    "Die Regierung hat die Entwicklung der Wirtschaft nicht verstanden.",
    "Der Lehrer sagt, dass die Schüler das nächste Kapitel lesen sollen.",
    "Die Zusammenarbeit zwischen den Unternehmen ist wichtig für die Zukunft.",
    "Der Zug ist wieder zu spät, und die Fahrgäste sind nicht zufrieden.",
    "Die Gesellschaft trägt eine große Verantwortung für die Kinder.",
] * 3


def _sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + "." for _ in range(n)]


EN_TEXT = _sentences(EN, 120, 0)


def _tokenizer() -> PreTrainedTokenizerFast:
    return tiny_bpe_tokenizer(EN_TEXT + _sentences(RU, 120, 1), vocab_size=600)


def _save(folder: Path, tok: PreTrainedTokenizerFast, seed: int) -> Path:
    model = tiny_llama(vocab_size=len(tok), seed=seed, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("base"), _tokenizer(), seed=0)


@pytest.fixture(scope="module")
def german(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "de.txt"
    path.write_text("\n".join(GERMAN) + "\n\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def expanded(base: Path, german: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "expanded"
    assert main(["vocab", "expand", "--model", str(base), "--corpus", str(german), "--n", "24", "--output", str(out),
                 "--no-progress"]) == 0
    return out


def _load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a user error; the message, checked to be one line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lmadapt {argv[0]}: error: ") and "\n" not in err, err
    return err


def test_choices_written_in_the_cli_are_the_librarys():
    from lmadapt.vocab.init import INIT_METHODS
    from lmadapt.vocab.lep import AVERAGING, MODES

    assert (cli_vocab.INIT_METHODS, cli_vocab.LEP_MODES, cli_vocab.LEP_AVERAGING) == (INIT_METHODS, MODES, AVERAGING)


def test_expand_writes_a_loadable_folder_that_keeps_old_rows_and_shortens_the_corpus(base, german, expanded, capsys):
    from lmadapt.vocab.expansion import read_expansion

    old_model, old_tok = _load(base)
    model, tok = _load(expanded)
    record = json.loads((expanded / "vocab_expansion.json").read_text())
    n_old = len(old_tok)
    assert len(tok) == n_old + 24 == record["old_tokens"] + len(record["new_tokens"])
    assert record["base_model"] == str(base.resolve()) and record["init"] == "merge"
    assert record["corpus"] == {"files": [str(german)], "texts": len(GERMAN),
                                "words": sum(len(t.split()) for t in GERMAN)}
    assert [tok.convert_ids_to_tokens(n_old + k) for k in range(24)] == [t["token"] for t in record["new_tokens"]]
    assert model.get_input_embeddings().weight.shape[0] == -(-(n_old + 24) // 8) * 8  # a multiple of 8
    for get in ("get_input_embeddings", "get_output_embeddings"):
        new_w, old_w = getattr(model, get)().weight, getattr(old_model, get)().weight
        assert torch.equal(new_w[:n_old], old_w)
        first = record["new_tokens"][0]  # merge init: e_t = (e_l + e_r) / 2, both parts old tokens
        parts = old_w[old_tok.convert_tokens_to_ids([first["left"], first["right"]])]
        torch.testing.assert_close(new_w[n_old], parts.mean(0))
    before = sum(len(old_tok(t, add_special_tokens=False)["input_ids"]) for t in GERMAN)
    after = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in GERMAN)
    words = record["corpus"]["words"]
    assert after < before
    assert record["tokens_per_word"] == pytest.approx({"before": before / words, "after": after / words})
    assert read_expansion(expanded)[1].old_tokens == n_old
    assert main(["vocab", "inspect", str(expanded)]) == 0
    assert f"24 new token(s) after {n_old} old, init merge" in capsys.readouterr().out


def test_read_corpus_reads_lines_rows_and_columns(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"body": "row one"}\n\n{"body": ""}\n{"body": "row two"}\n', encoding="utf-8")
    (tmp_path / "c.csv").write_text('id,body\n1,"a, quoted"\n2,plain\n', encoding="utf-8")
    texts, files = read_corpus([str(tmp_path / "a.txt")])
    assert texts == ["first line", "second line"] and files == [str(tmp_path / "a.txt")]
    texts, _ = read_corpus([str(tmp_path / "b.jsonl"), str(tmp_path / "c.csv")], "body")
    assert texts == ["row one", "row two", "a, quoted", "plain"]


def test_trim_writes_a_smaller_model_with_the_same_logits_on_held_out_text(base, tmp_path, capsys):
    corpus = tmp_path / "en.txt"
    corpus.write_text("\n".join(EN_TEXT), encoding="utf-8")
    out = tmp_path / "trimmed"
    old_model, old_tok = _load(base)
    russian = max(old_tok.tokenize(" который"), key=len)  # a piece no English text uses
    assert main(["vocab", "trim", "--model", str(base), "--corpus", str(corpus), "--check-fraction", "0.25",
                 "--keep-token", russian, "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    model, tok = _load(out)
    report = json.loads((out / "vocab_trim.json").read_text())
    assert len(tok) == report["tokens_after"] == model.get_input_embeddings().weight.shape[0] < len(old_tok)
    assert len(russian) > 1 and russian in tok.get_vocab() and report["kept_by_reason"]["keep_tokens"] == 1
    d = old_model.config.hidden_size
    assert report["params_saved"] == 2 * (len(old_tok) - len(tok)) * d  # untied: both matrices shrink
    assert report["bytes_saved"] == 4 * report["params_saved"]
    assert sum(p.numel() for p in model.parameters()) == report["model_params_after"]
    _, held = cli_vocab.split_held_out(EN_TEXT, 0.25)
    check = report["held_out_check"]
    assert report["corpus"]["held_out"] == len(held) == check["texts"] == 30
    kept = tok.get_vocab()
    covered = [t for t in held if all(p in kept for p in old_tok.tokenize(t))]
    assert check["covered"] == len(covered) >= 20
    assert f"{len(covered) / 30:.1%} use only kept tokens" in printed
    kept_old_ids = old_tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(list(range(len(tok)))))
    with torch.no_grad():
        for text in covered[:5]:
            old_ids, new_ids = old_tok(text)["input_ids"], tok(text)["input_ids"]
            assert tok.convert_ids_to_tokens(new_ids) == old_tok.convert_ids_to_tokens(old_ids)
            old_logits = old_model(torch.tensor([old_ids])).logits[..., kept_old_ids]
            torch.testing.assert_close(model(torch.tensor([new_ids])).logits, old_logits)
    assert model.config.eos_token_id == tok.eos_token_id and tok.decode(tok(EN_TEXT[0])["input_ids"]) == EN_TEXT[0]
    assert main(["vocab", "trim", "--model", str(base), "--corpus", str(corpus), "--check-fraction", "0",
                 "--output", str(out), "--overwrite", "--no-progress"]) == 0
    assert "held-out check: skipped" in capsys.readouterr().out
    again = json.loads((out / "vocab_trim.json").read_text())
    assert again["corpus"] == {"files": [str(corpus)], "texts": len(EN_TEXT), "held_out": 0}
    assert main(["vocab", "inspect", str(out)]) == 0
    assert f"{len(old_tok)} -> {again['tokens_after']} tokens" in capsys.readouterr().out


def test_the_held_out_check_refuses_a_tokenizer_that_encodes_kept_text_differently(base):
    from lmadapt.vocab.bpe import BPEModel, VocabError

    old = AutoTokenizer.from_pretrained(base)
    bpe = BPEModel.from_tokenizer(old)
    bpe.merges = bpe.merges[: len(bpe.merges) // 2]  # every token still there, but later merges never fire
    assert cli_vocab.check_encodings(old, bpe.to_tokenizer(old), [])["texts"] == 0
    with pytest.raises(VocabError, match="whose tokens are all kept encode to other pieces"):
        cli_vocab.check_encodings(old, bpe.to_tokenizer(old), EN_TEXT[:10])
    assert cli_vocab.check_encodings(old, old, EN_TEXT[:10])["covered_share"] == 1.0


def test_propagate_writes_the_instruct_model_with_the_donors_tokenizer(base, expanded, tmp_path):
    instruct_tok = AutoTokenizer.from_pretrained(base)
    instruct_tok.chat_template = "{{ messages[0]['content'] }}<|im_end|>"
    instruct = _save(tmp_path / "instruct", instruct_tok, seed=1)
    donor, donor_tok = _load(expanded)
    special = [donor_tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS]
    rest = [i for i in range(len(donor_tok)) if i not in special]
    for mode, inst_dir in (("straight", instruct), ("conversion", instruct), ("conversion", base)):
        out = tmp_path / f"{mode}-{inst_dir.name}"
        assert main(["vocab", "propagate", "--base", str(base), "--instruct", str(inst_dir), "--donor",
                     str(expanded), "--mode", mode, "--output", str(out), "--no-progress"]) == 0
        model, tok = _load(out)
        inst, inst_tok = _load(inst_dir)
        assert tok.get_vocab() == donor_tok.get_vocab() and tok.chat_template == inst_tok.chat_template
        report = json.loads((out / "vocab_propagate.json").read_text())
        assert report["mode"] == mode and report["special_rows_copied"] == len(SPECIAL_TOKENS)
        for get in ("get_input_embeddings", "get_output_embeddings"):
            w, w_donor = getattr(model, get)().weight, getattr(donor, get)().weight
            assert w.shape == w_donor.shape
            assert torch.equal(w[special], getattr(inst, get)().weight[special])
            if mode == "straight":  # P = I: every other row is the donor's
                assert torch.equal(w[rest], w_donor[rest])
            elif inst_dir == base:  # instruct = base: P = argmin ||E_B~ P - E_B~|| = I, so E_D P = E_D
                torch.testing.assert_close(w[rest], w_donor[rest], atol=1e-5, rtol=1e-4)
                assert report["residuals"][get.split("_")[1]] < 1e-6
            else:
                assert not torch.allclose(w[rest], w_donor[rest], atol=1e-3)
        assert model.model.layers[0].mlp.up_proj.weight.equal(inst.model.layers[0].mlp.up_proj.weight)


def test_bad_input_is_one_line_naming_the_file_or_flag(base, german, expanded, tmp_path, capsys):
    out = str(tmp_path / "out")
    expand = ["vocab", "expand", "--model", str(base), "--n", "4", "--output", out, "--no-progress", "--corpus"]
    missing = str(tmp_path / "nope.txt")
    assert f"--corpus {missing}: no such file" in _error(capsys, [*expand, missing])
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    assert "blank.txt: the file has no text" in _error(capsys, [*expand, str(german), str(tmp_path / "blank.txt")])
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "Die Katze"}\n{"body": "Der Hund"}\n', encoding="utf-8")
    assert f"{rows}:2: no field 'text' (it has: body)" in _error(capsys, [*expand, str(rows)])
    assert "already exists" in _error(capsys, [*expand[:7], str(expanded), "--corpus", str(german)])
    assert "is the --model folder" in _error(capsys, [*expand[:7], str(base), "--overwrite", "--corpus", str(german)])
    assert "yields only" in _error(capsys, [*expand[:5], "100000", *expand[6:], str(german)])
    other = tmp_path / "other"
    _save(other, AutoTokenizer.from_pretrained(expanded), seed=0)
    assert "another vocabulary than --base" in _error(capsys, ["vocab", "propagate", "--base", str(base),
                                                               "--instruct", str(other), "--donor", str(expanded),
                                                               "--output", out, "--no-progress"])
    assert "was not written by lmadapt vocab" in _error(capsys, ["vocab", "inspect", str(base)])
    assert not Path(out).exists()
