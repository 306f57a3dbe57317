"""Token classification / NER (objective ``tag``, data format ``tagging``, eval task ``tagging``).

Label alignment on real BPE tokenizers (words split into several sub-tokens; first-sub-token and all-sub-token
modes); the loss against cross-entropy by hand; unmasked layers make an early token see a later one while pads stay
masked; the head saved and loaded back; entity F1 (conlleval / seqeval's default) on hand-worked sequences; bad
rows named by file, line and field; LoRA training through lmadapt.train that takes entity F1 from ~0 to > 0.8.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import write_jsonl
from safetensors.torch import load_file
from test_method_matrix import killed_at

from lmadapt.adapters.format import (
    load_adapter_contents,
    read_adapter_info,
    save_adapter,
)
from lmadapt.data import Batcher, DataConfig, load_splits
from lmadapt.data.tagging import align_tags, collect_tags, tokenize_words
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.evaluation import EvalConfig, evaluate
from lmadapt.evaluation.tasks.tagging import entities, entity_scores, predict_tags
from lmadapt.methods import build_method
from lmadapt.models.unmask import unmasked_layers
from lmadapt.objectives.base import build_objective
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_bpe_tokenizer, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
ROW = {"tokens": ["Johnathan", "visited", "Washington", "yesterday"], "tags": ["B-PER", "O", "B-LOC", "O"]}


def bpe() -> object:
    """A byte-level BPE (SmolLM2's kind) trained on a few words, so that longer words split into several tokens."""
    texts = ["the cat sat on the mat", "John went to York", "visit the city", "yes today was it"] * 20
    return tiny_bpe_tokenizer(texts, style="byte", vocab_size=300)


def write_rows(path, rows) -> str:
    write_jsonl(path, rows)
    return str(path)


# --- alignment ---------------------------------------------------------------------------------------------------

def test_first_subtoken_alignment_on_a_real_bpe():
    tok = bpe()
    ids, word_of = tokenize_words(tok, ROW["tokens"], " ", [])
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == " ".join(ROW["tokens"])  # nothing lost or added
    assert ids == tok(" ".join(ROW["tokens"]), add_special_tokens=False)["input_ids"]  # = the joined text's tokens
    per_word = [sum(w == k for w in word_of) for k in range(4)]
    assert all(n >= 2 for n in per_word)  # every word in several sub-tokens
    labels, later = align_tags(word_of, [TAGS.index(t) for t in ROW["tags"]], TAGS)
    starts = [word_of.index(k) for k in range(4)]
    assert [t for t, y in enumerate(labels) if y != -100] == starts
    assert [labels[t] for t in starts] == [3, 0, 1, 0]  # B-PER O B-LOC O, at each word's first sub-token
    # all-sub-token mode: the other pieces of "Johnathan" are I-PER, of "Washington" I-LOC, of the O words O
    for t, w in enumerate(word_of):
        if t not in starts:
            assert later[t] == [4, 0, 2, 0][w], (pieces[t], later[t])
        else:
            assert later[t] == -100


def test_separator_free_words_and_a_bos_prefix():
    """Chinese words joined with "": each word its own tokens (byte pieces of its characters); BOS unlabelled."""
    tok = tiny_tokenizer()
    words = ["江泽民", "在", "北京"]
    ids, word_of = tokenize_words(tok, words, "", [tok.bos_token_id])
    assert ids[0] == tok.bos_token_id and word_of[0] == -1
    assert tok.decode(ids[1:]) == "江泽民在北京"
    assert [sum(w == k for w in word_of) for k in range(3)] == [9, 3, 6]  # 3 bytes per character
    labels, later = align_tags(word_of, [3, 0, 1], TAGS)
    assert labels[:2] == [-100, 3] and later[2:10] == [4] * 8 and labels[10] == 0 and labels[13] == 1
    assert align_tags([0, 0], [1], ["O", "B-LOC"])[1] == [-100, -100]  # no I-LOC in the tag set: unlabelled


def test_tagging_rows_load_and_collate(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [ROW, {"tokens": ["Paris"], "tags": ["B-LOC"]}])
    data, _, report = load_splits(DataConfig(train=[path], max_length=64), bpe())  # format auto-detected
    assert report.format == "tagging" and report.tags == TAGS and report.tags_from_rows
    assert "Tags (collected from the training rows): O, B-LOC, I-LOC, B-PER, I-PER" in report.summary()
    assert report.trainable_tokens == 5  # one per word
    batch = Batcher(data, batch_size=2, max_length=64, packing=False, group_by_length=False, pad_id=0,
                    seed=0).collate([0, 1])
    assert batch["token_labels"] and batch["labels"][1, 0] == 1  # the first position keeps its tag (no shift)
    assert batch["labels"][1, 1:].eq(-100).all() and batch["later_labels"].shape == batch["labels"].shape
    given = load_splits(DataConfig(train=[path], format="tagging", labels=["O", "B-PER", "I-PER", "B-LOC"],
                                   max_length=64), bpe())[0]
    assert given.tag_names == ["O", "B-PER", "I-PER", "B-LOC"] and given.labels[1][0] == 3
    cut, _, report = load_splits(DataConfig(train=[path], max_length=3, truncation="right"), bpe())
    assert report.examples_truncated == 2 and cut.lengths == [3, 3] and cut.labels[0][0] == 3  # the first tag kept
    with pytest.raises(ValueError, match="tagging examples cannot be packed"):
        Batcher(data, batch_size=2, max_length=64, packing=True, group_by_length=False, pad_id=0, seed=0)


def test_collected_tags_are_o_then_b_and_i_per_type():
    assert collect_tags([["B-PER", "O"], ["I-LOC"], "junk", [3, "X"]]) == TAGS


# --- data errors -------------------------------------------------------------------------------------------------

def test_bad_tagging_rows_are_named_by_file_line_and_field(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [
        ROW,
        {"tokens": ["a", "b"], "tags": ["O"]},
        {"tokens": ["a"], "tags": ["B-MISC"]},
        {"tokens": ["a", "b"], "tags": ["O", "PER"]},
        {"tokens": ["a", ""], "tags": ["O", "O"]},
        {"tokens": "a b", "tags": ["O"]},
        {"tokens": ["a"]},
        {"tokens": ["a", 3], "tags": ["O", "O"]},
    ])
    with pytest.raises(DataError) as exc:
        load_splits(DataConfig(train=[path], format="tagging", labels=TAGS), bpe())
    text = str(exc.value)
    assert f"{path}:2: field 'tags': 1 tags for 2 words in 'tokens'; give one tag per word" in text
    assert f"{path}:3: field 'tags[0]': unknown tag 'B-MISC'; the tags are {TAGS}" in text
    assert f"{path}:4: field 'tags[1]': 'PER' is not a BIO tag" in text
    assert f"{path}:5: field 'tokens[1]': an empty word" in text
    assert f"{path}:6: field 'tokens': expected a non-empty list of strings, got str" in text
    assert f"{path}:7: field 'tags' is missing" in text
    assert f"{path}:8: field 'tokens[1]': expected a string, got int" in text
    problems = DataConfig(format="tagging", batching="packed", labels=["O", "PER"]).check()
    assert problems[0].startswith("batching: packed") and "labels: format tagging takes BIO tags: 'PER'" in problems[1]
    # I-X after O is not an error: conlleval reads it as the start of an entity
    ok = write_rows(tmp_path / "ok.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "I-LOC"]}])
    assert 2 in load_splits(DataConfig(train=[ok], format="tagging", labels=TAGS), bpe())[0].labels[0]


def test_config_and_data_mismatches_are_refused(tmp_path):
    with pytest.raises(ConfigError) as exc:
        build_objective({"name": "tag", "labels": ["O", "PER", "O"], "dropout": 1.0, "unmask_last": -1})
    text = str(exc.value)
    assert "distinct" in text and "'PER'" in text and "dropout" in text and "unmask_last" in text
    path = write_rows(tmp_path / "d.jsonl", [ROW])
    data = DataConfig(train=[path], format="tagging", validation_fraction=0.0)
    report = load_splits(data, tiny_tokenizer())[2]  # the tags collected from the rows: data.labels is empty
    objective = build_objective({"name": "tag", "labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]})
    assert "differ" in objective.data_problems(report, data)[0]
    assert "objective.word_separator" in build_objective({"name": "tag", "word_separator": ""}).data_problems(
        report, data)[0]
    text = dataclasses.replace(report, format="text")
    assert "set data.format: tagging" in build_objective({"name": "tag"}).data_problems(text, data)[0]
    assert "objective 'tag'" in build_objective({"name": "causal_lm"}).data_problems(report, data)[0]
    settled = build_objective({"name": "tag"})
    assert settled.data_problems(report, data) == [] and settled.config.labels == TAGS
    assert settled.config.word_separator == " "
    with pytest.raises(LmadaptError, match="no tag set"):
        build_objective({"name": "tag"}).setup(tiny_llama(), None, torch.device("cpu"))


# --- the loss and the mask ---------------------------------------------------------------------------------------

def attached(unmask="none", last=0, **fields):
    model = tiny_llama()
    objective = build_objective({"name": "tag", "labels": TAGS, "unmask_layers": unmask, "unmask_last": last,
                                 **fields})
    objective.setup(model, None, torch.device("cpu"))
    return model, objective


def tagged_batch() -> dict:
    """Rows of 7 and 4 real tokens (pad id 259); tags at some positions, other sub-tokens in later_labels."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 250, (2, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    ids[mask == 0] = 259
    labels = torch.full((2, 7), -100)
    later = torch.full((2, 7), -100)
    labels[0, [0, 2, 5]] = torch.tensor([3, 0, 1])
    later[0, [1, 6]] = torch.tensor([4, 2])
    labels[1, [0, 3]] = torch.tensor([1, 0])
    later[1, [1, 2]] = torch.tensor([2, 2])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "later_labels": later, "token_labels": True}


@pytest.mark.parametrize("all_subtokens", [False, True])
def test_loss_is_cross_entropy_by_hand_on_the_labelled_positions(all_subtokens):
    model, objective = attached("all", label_all_subtokens=all_subtokens)
    model.eval()  # no dropout: the hand computation has none
    batch = tagged_batch()
    out = objective.loss(model, batch)
    with torch.no_grad():
        h = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    z = h @ model.score.weight.T
    y = batch["labels"].clone()
    if all_subtokens:
        y[batch["later_labels"] != -100] = batch["later_labels"][batch["later_labels"] != -100]
    sel = y != -100
    want = sum(-F.log_softmax(z[b, t], -1)[y[b, t]] for b, t in sel.nonzero().tolist())
    assert out.count == objective.count(batch) == (9 if all_subtokens else 5)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)
    assert out.metrics["accuracy"] == float((z[sel].argmax(-1) == y[sel]).sum())
    with pytest.raises(LmadaptError, match="data.format: tagging"):
        objective.count({**batch, "token_labels": False})


def test_dropout_applies_in_training_only():
    model, objective = attached(dropout=0.5)
    batch = tagged_batch()
    model.eval()
    a, b = objective.loss(model, batch).loss, objective.loss(model, batch).loss
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = objective.loss(model, batch).loss
    torch.manual_seed(1)
    assert not torch.equal(c, objective.loss(model, batch).loss)


@pytest.mark.parametrize("unmask", [["none", 0], ["all", 0], ["none", 1]])
def test_a_later_token_moves_an_early_tag_only_through_unmasked_layers_and_pads_stay_masked(unmask):
    model, objective = attached(*unmask)
    batch = tagged_batch()
    other = {**batch, "input_ids": batch["input_ids"].clone()}
    other["input_ids"][0, 5] = (batch["input_ids"][0, 5] + 7) % 250
    padded = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 17)}
    with torch.no_grad():
        z, z_later, z_pads = (objective.token_logits(model, b) for b in (batch, other, padded))
    moved = (z[0, :5] - z_later[0, :5]).abs().amax(-1)
    if unmasked_layers(model):
        assert not objective.causal_attention and bool((moved > 1e-5).all())
    else:
        assert objective.causal_attention and float(moved.max()) == 0.0
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(z[real], z_pads[real], rtol=0, atol=1e-6)


def test_head_and_unmasking_are_saved_with_the_adapter_and_come_back(tmp_path):
    torch.manual_seed(3)
    model, objective = attached([-1], word_separator="")
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                           "init": "random"})
    method.apply(model)
    model.eval()
    batch = tagged_batch()
    with torch.no_grad():
        want = objective.token_logits(model, batch)
    save_adapter(model, method, tmp_path / "a", base_model="tiny", base_fingerprint=None, objective=objective)
    assert read_adapter_info(tmp_path / "a").objective["labels"] == TAGS
    fresh = tiny_llama()
    loaded = load_adapter_contents(fresh, tmp_path / "a")
    fresh.eval()
    assert loaded.objective.name == "tag" and unmasked_layers(fresh) == [1]
    assert loaded.objective.config.word_separator == "" and fresh.score.tag_config.labels == TAGS
    with torch.no_grad():
        torch.testing.assert_close(loaded.objective.token_logits(fresh, batch), want, rtol=0, atol=0)


# --- entity F1 ---------------------------------------------------------------------------------------------------

def test_entities_the_conlleval_way():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4)]  # entity at the end
    assert entities(["I-PER", "I-PER", "O"]) == [("PER", 0, 2)]  # I- first: starts an entity
    assert entities(["O", "I-LOC", "O"]) == [("LOC", 1, 2)]  # I- after O: starts one
    assert entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 3)]  # type change: a new one
    assert entities(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 1), ("PER", 1, 3)]  # B- always starts one
    assert entities(["I-PER", "B-PER"]) == [("PER", 0, 1), ("PER", 1, 2)]
    assert entities(["O", "O"]) == [] and entities([]) == []


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "I-ORG", "I-LOC"]]
    # gold: PER(0,2) LOC(3,4) | ORG(0,1) LOC(2,3); predicted: PER(0,2) | ORG(0,2) LOC(2,3) -> 2 of 3 right, 2 of 4
    s = entity_scores(gold, pred)
    assert (s["precision"], s["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 4))
    assert s["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert s["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert s["per_type"]["LOC"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert s["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    none = entity_scores([["O"]], [["B-X"]])
    assert (none["precision"], none["recall"], none["f1"]) == (0.0, 0.0, 0.0)  # zero_division = 0


# --- training through the loop -----------------------------------------------------------------------------------

LOWER = ["the", "met", "in", "and", "saw", "a", "city", "with", "for", "today"]
NAMES = ["Ann", "Bo", "Cruz", "Dee", "Eli", "Fay", "Gus", "Ho"]


def name_rows(n: int, seed: int) -> list[dict]:
    """Lowercase words are O, capitalised ones B-NAME (never two in a row)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, tags = [], []
        while len(words) < rng.randint(4, 8):
            if rng.random() < 0.35:
                words.append(rng.choice(NAMES))
                tags.append("B-NAME")
            words.append(rng.choice(LOWER))
            tags.append("O")
        rows.append({"tokens": words, "tags": tags})
    return rows


def run_config(tmp_path, tiny_model_dir, name="run", method=None, **train_fields) -> dict:
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train_file, name_rows(64, 0))
    write_jsonl(test_file, name_rows(30, 1))
    return {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [str(train_file)], "format": "tagging", "max_length": 64},
        "method": method or {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["all-linear"]},
        "objective": {"name": "tag", "unmask_layers": "all"},
        "train": {"lr": 5e-3, "batch_size": 8, "max_steps": 100, "tensorboard": False, "schedule": "constant",
                  "threads": 1, **train_fields},
        "evals": [{"task": "tagging", "data": [str(test_file)]}],
        "output_dir": str(tmp_path / name),
    }


def test_lora_training_takes_entity_f1_from_chance_to_above_0_8(tmp_path, tiny_model_dir):
    """With the byte tokenizer a word after the first starts with the space byte, so its first sub-token cannot see
    whether a capital follows unless a layer is unmasked: this trains with every layer bidirectional."""
    rows = name_rows(30, 1)
    untrained, _ = attached(labels=["O", "B-NAME", "I-NAME"])
    untrained.eval()
    gold = [r["tags"] for r in rows]
    before = entity_scores(gold, predict_tags(untrained, tiny_tokenizer(), [r["tokens"] for r in rows]))["f1"]
    result = train(run_config(tmp_path, tiny_model_dir), progress=False)
    after = result.evals_after[0]
    # an untrained head tags at chance (about a third of the words B-NAME); all O would score 0
    assert before < 0.4 and result.evals_before[0]["f1"] is None  # the base model has no head
    assert after["f1"] > 0.8 and after["per_type_f1"]["NAME"] == after["f1"]
    assert result.report["data"]["tags"] == ["O", "B-NAME", "I-NAME"]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["tag/accuracy"] for r in records if "tag/accuracy" in r]
    assert sum(accuracy[-5:]) / 5 > sum(accuracy[:5]) / 5
    # the adapter reproduces the evaluation through lmadapt's evaluate (as lmadapt eval runs it)
    model, tok = tiny_llama(), tiny_tokenizer()
    loaded = load_adapter_contents(model, result.adapter_dir)
    assert loaded.objective.config.labels == ["O", "B-NAME", "I-NAME"] and unmasked_layers(model) == [0, 1]
    again = evaluate(model, tok, EvalConfig(task="tagging", data=[str(tmp_path / "test.jsonl")]), progress=False)
    assert again["f1"] == pytest.approx(after["f1"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_lora_and_full_in_fp32_and_bf16_run_through_the_loop(tmp_path, tiny_model_dir, method, precision):
    spec = {"name": "full"} if method == "full" else None
    cfg = run_config(tmp_path, tiny_model_dir, method=spec, max_steps=3, precision=precision)
    cfg["objective"]["label_all_subtokens"] = True
    cfg["data"]["validation_fraction"] = 0.125  # held-out rows: the validation loss is the objective's too
    result = train({**cfg, "evals": []}, progress=False)
    assert result.report["steps"] == 3 and math.isfinite(result.report["final_train_loss"])
    assert math.isfinite(result.loop.val_loss)
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert saved["lmadapt_objective.score.weight"].dtype == torch.float32
    assert saved["lmadapt_objective.score.weight"].shape[0] == 3


def test_a_run_resumes_exactly(tmp_path, tiny_model_dir):
    def cfg(name):
        return {**run_config(tmp_path, tiny_model_dir, name, max_steps=6, save_every=2), "evals": []}
    whole = train(cfg("whole"), progress=False)
    with killed_at(5), pytest.raises(KeyboardInterrupt):
        train(cfg("cut"), progress=False)
    resumed = train(cfg("cut"), resume=True, progress=False)
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert "lmadapt_objective.score.weight" in a
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
