"""Evaluation and generation against references computed by hand on the tiny model.

Perplexity vs cross-entropy computed directly; continuation scores (cached and batched) vs one full
forward per option; generation vs ``model.generate`` and a cache-free argmax loop; batching and left
padding change nothing; matching rules; file rows with problems named by file:line:field.
"""

import json
import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import lmadapt.evaluation.tasks.generation as ev
from lmadapt.config import from_dict
from lmadapt.decoding.generation import (
    encode_prompt,
    generate,
    left_pad,
    stop_token_ids,
)
from lmadapt.decoding.scoring import score_continuations
from lmadapt.errors import ConfigError, DataError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.report import compare_table
from lmadapt.evaluation.run import evaluate
from lmadapt.evaluation.tasks.classification import classification_accuracy
from lmadapt.evaluation.tasks.generation import generation_accuracy, normalize_answer
from lmadapt.evaluation.tasks.multiple_choice import multiple_choice_accuracy
from lmadapt.evaluation.tasks.perplexity import perplexity

TEXTS = ["The cat sat on the mat.", "Hi", "A somewhat longer sentence about language models and data.",
         "x" * 40]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


def _full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1, from one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return -F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")


def _naive_scores(model, context: list[int], continuation: list[int]) -> torch.Tensor:
    """Per-token log-likelihood of ``continuation`` after ``context``: one full forward, nothing shared."""
    return _full_logprobs(model, context + continuation)[len(context) - 1:]


# ------------------------------------------------------------------------------------------------ perplexity

def test_perplexity_is_exp_of_mean_cross_entropy(model, tokenizer):
    losses = torch.cat([-_full_logprobs(model, _ids(tokenizer, t)) for t in TEXTS])
    ref_nll = losses.mean().item()
    for batch_size in (1, 4):
        out = perplexity(model, tokenizer, TEXTS, batch_size=batch_size, progress=False)
        assert out["tokens"] == len(losses)
        assert out["nll"] == pytest.approx(ref_nll, rel=1e-6)
        assert out["perplexity"] == pytest.approx(math.exp(ref_nll), rel=1e-6)


def test_long_texts_are_split_into_windows_overlapping_by_one_token(model, tokenizer):
    text = "A long text, long enough to need three windows of sixteen tokens."
    ids = _ids(tokenizer, text)
    losses = []
    for start in range(0, len(ids) - 1, 15):  # windows ids[0:16], ids[15:31], ...: each token predicted once
        losses.append(-_full_logprobs(model, ids[start:start + 16]))
    losses = torch.cat(losses)
    out = perplexity(model, tokenizer, [text, "Hi"], max_length=16, batch_size=3, progress=False)
    assert len(losses) == len(ids) - 1
    assert out["tokens"] == len(ids) - 1 + 1
    expected = (losses.sum().item() - _full_logprobs(model, _ids(tokenizer, "Hi")).sum().item()) / out["tokens"]
    assert out["nll"] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------- continuation scoring

@pytest.mark.parametrize("strategy", ["cached", "batched"])
def test_scores_equal_one_full_forward_per_continuation(model, tokenizer, strategy):
    context = _ids(tokenizer, "Text: the team scored a late goal in the league match\nTopic:")
    continuations = [_ids(tokenizer, s) for s in (" sport", " tech", "!", " food and drink")]
    got = score_continuations(model, context, continuations, strategy=strategy)
    for scores, cont in zip(got, continuations):
        assert scores.shape == (len(cont),)
        torch.testing.assert_close(scores, _naive_scores(model, context, cont), atol=1e-4, rtol=0)


def test_single_token_continuations_need_one_forward(model, tokenizer):
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    context = _ids(tokenizer, "Pick a letter:")
    try:
        got = score_continuations(model, context, [[65], [66], [67]])
    finally:
        hook.remove()
    assert calls == [(1, len(context))]
    for scores, cont in zip(got, [[65], [66], [67]]):
        torch.testing.assert_close(scores, _naive_scores(model, context, cont), atol=1e-4, rtol=0)


MC = [
    {"prompt": "Q: What do cows drink?\nA:", "choices": [" milk", " water", " tea"], "answer": 1},
    {"prompt": "Q: Capital of France?\nA:", "choices": [" Paris", " Rome"], "answer": " Rome"},
    {"prompt": "Q: 2 + 2 =", "choices": [" 4", " 22", " four", " fish"], "answer": 0},
    {"prompt": "Q: Sky colour?\nA:", "choices": [" blue", " green"], "answer": 0},
]


def test_multiple_choice_matches_full_forward_scores(model, tokenizer):
    hits_sum = hits_mean = 0
    for ex in MC:
        context = _ids(tokenizer, ex["prompt"])
        scores = [_naive_scores(model, context, _ids(tokenizer, c)) for c in ex["choices"]]
        gold = ex["answer"] if isinstance(ex["answer"], int) else ex["choices"].index(ex["answer"])
        hits_sum += max(range(len(scores)), key=lambda i: scores[i].sum()) == gold
        hits_mean += max(range(len(scores)), key=lambda i: scores[i].mean()) == gold
    for strategy in ("cached", "batched"):
        out = multiple_choice_accuracy(model, tokenizer, MC, strategy=strategy, progress=False)
        assert out["n"] == 4
        assert out["accuracy"] == hits_sum / 4 and out["accuracy_per_token"] == hits_mean / 4
    first = _naive_scores(model, _ids(tokenizer, MC[0]["prompt"]), _ids(tokenizer, " milk")).sum().item()
    assert out["samples"][0]["log_likelihoods"][0] == pytest.approx(first, abs=1e-4)


def _topic_examples() -> list[dict]:
    words = {"sport": "team goal match coach", "tech": "chip robot code phone", "food": "bread soup cheese"}
    return [{"prompt": f"Text: {w} {i}\nTopic:", "label": f" {label}"}
            for i, (label, w) in enumerate(list(words.items()) * 3)]


def test_classification_cached_scoring_equals_naive_scoring(model, tokenizer):
    labels = [" food", " sport", " tech"]
    examples = _topic_examples()
    expected = {g: {p: 0 for p in labels} for g in labels}
    for ex in examples:
        context = _ids(tokenizer, ex["prompt"])
        sums = [_naive_scores(model, context, _ids(tokenizer, l)).sum().item() for l in labels]
        expected[ex["label"]][labels[max(range(3), key=sums.__getitem__)]] += 1
    cached = classification_accuracy(model, tokenizer, examples, labels, progress=False)
    batched = classification_accuracy(model, tokenizer, examples, labels, strategy="batched", progress=False)
    assert cached["confusion"] == batched["confusion"] == expected
    assert cached["accuracy"] == sum(expected[l][l] for l in labels) / len(examples)
    assert cached["per_class_accuracy"] == {l: expected[l][l] / 3 for l in labels}


def test_labels_match_ignoring_surrounding_spaces_and_unknown_labels_are_reported(model, tokenizer):
    examples = [{"prompt": "Topic:", "label": "sport"}, {"prompt": "Topic:", "label": "weather"}]
    with pytest.raises(DataError, match=r"example 1: field 'label': 'weather' is not one of the labels"):
        classification_accuracy(model, tokenizer, examples, [" sport", " tech"], progress=False)
    out = classification_accuracy(model, tokenizer, examples[:1], [" sport", " tech"], progress=False)
    assert sum(out["confusion"][" sport"].values()) == 1


def test_a_label_that_is_a_token_prefix_of_another_warns(model, tokenizer):
    with pytest.warns(UserWarning, match="' sport' is a token-prefix of ' sports'"):
        classification_accuracy(model, tokenizer, [{"prompt": "Topic:", "label": " sport"}],
                                [" sport", " sports"], progress=False)


# ------------------------------------------------------------------------------------------------ generation

def _greedy_by_hand(model, ids: list[int], n: int, stops: set[int]) -> list[int]:
    """Argmax decoding with a full forward per token: no cache, no transformers generation code."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = model(torch.tensor([ids + out])).logits[0, -1].argmax().item()
            if token in stops:
                break
            out.append(token)
    return out


def _decoded_ids(monkeypatch, tokenizer) -> list[list[int]]:
    """Record the token ids each ``tokenizer.decode`` call receives."""
    calls: list[list[int]] = []
    original = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: calls.append(list(ids)) or original(ids, **kw))
    return calls


def test_greedy_generation_equals_model_generate_and_a_cache_free_loop(model, tokenizer, monkeypatch):
    prompt = "Once upon a time"
    ids = _ids(tokenizer, prompt)
    stops = stop_token_ids(model, tokenizer)
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, use_cache=True,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stops))[0, len(ids):].tolist()
    hf = hf[:next((i for i, t in enumerate(hf) if t in stops), len(hf))]
    decoded = _decoded_ids(monkeypatch, tokenizer)
    text = generate(model, tokenizer, [prompt], max_new_tokens=20)
    assert decoded == [hf] == [_greedy_by_hand(model, ids, 20, stops)]
    assert text == [tokenizer.decode(hf, skip_special_tokens=True)]


def test_generation_uses_the_kv_cache_even_when_the_config_says_no(model, tokenizer):
    assert model.config.use_cache is False
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        generate(model, tokenizer, ["Hello there"], max_new_tokens=5)
    finally:
        hook.remove()
    assert lengths[0] == len(_ids(tokenizer, "Hello there")) and set(lengths[1:]) == {1}


PROMPTS = ["Hello world", "A", "The quick brown fox jumps over", "xyz", "Once upon a time there", "Q:"]


def test_batching_and_left_padding_change_nothing(model, tokenizer):
    one = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1)
    four = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4)
    assert one == four
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_streamed_pieces_add_up_to_the_returned_text(model, tokenizer):
    pieces: dict[int, str] = {}
    out = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=10, batch_size=3,
                   stream=lambda i, piece: pieces.__setitem__(i, pieces.get(i, "") + piece))
    assert [pieces.get(i, "") for i in range(3)] == out


def test_chat_prompts_go_through_the_chat_template(model, tokenizer):
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hi"}],
                                             tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert encode_prompt(tokenizer, "Hi", chat=True, system_prompt="Be brief.") == _ids(tokenizer, rendered)
    assert encode_prompt(tokenizer, "") == [tokenizer.bos_token_id]  # something to predict the first token from
    chat = generate(model, tokenizer, ["Hi"], max_new_tokens=8, chat=True, system_prompt="Be brief.")
    assert chat == generate(model, tokenizer, [rendered], max_new_tokens=8)


def test_sampling_is_reproducible_with_a_seed_and_leaves_the_global_rng_alone(model, tokenizer):
    state = torch.get_rng_state()
    a = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert a == b


def test_generation_accuracy_exact_vs_normalized(model, tokenizer, monkeypatch):
    outputs = ["The Sport.", "tech\nText: more rambling", "  food ", "bread", "An apple"]
    monkeypatch.setattr(ev, "generate", lambda *a, **kw: outputs)
    examples = [{"prompt": "p", "answer": "sport"}, {"prompt": "p", "answer": "tech"},
                {"prompt": "p", "answer": "food"}, {"prompt": "p", "answer": "soup"},
                {"prompt": "p", "answer": ["pear", "apple"]}]
    normalized = generation_accuracy(model, tokenizer, examples, match="normalized")
    exact = generation_accuracy(model, tokenizer, examples, match="exact")
    assert normalize_answer("The Sport.") == "sport"
    assert normalized["correct"] == 4 and normalized["accuracy"] == pytest.approx(0.8)
    assert exact["correct"] == 2 and [s["correct"] for s in exact["samples"]] == [False, True, True, False, False]
    assert exact["samples"][1]["prediction"] == "tech"


def test_generation_accuracy_on_the_real_model_uses_greedy_generate(model, tokenizer):
    prompts = ["Hello", "Q:"]
    outs = generate(model, tokenizer, prompts, max_new_tokens=4)
    examples = [{"prompt": p, "answer": o.lstrip().split("\n")[0]} for p, o in zip(prompts, outs)]
    assert generation_accuracy(model, tokenizer, examples, max_new_tokens=4, match="exact")["accuracy"] == 1.0


# ---------------------------------------------------------------------------------- modes, files, tables

def test_train_mode_is_restored_and_forwards_run_in_inference_mode(model, tokenizer):
    model.train()
    modes = []
    hook = model.register_forward_pre_hook(lambda m, a: modes.append((m.training, torch.is_inference_mode_enabled())))
    try:
        perplexity(model, tokenizer, TEXTS[:2], progress=False)
        multiple_choice_accuracy(model, tokenizer, MC[:1], progress=False)
        generate(model, tokenizer, ["Hi"], max_new_tokens=2)
    finally:
        hook.remove()
    assert model.training and modes and set(modes) == {(False, True)}


@dataclass
class _Record:
    source: str
    data: dict


def _stub_data_module(monkeypatch) -> None:
    """``lmadapt.data.read_records`` as agreed (Records with ``file:line`` sources), for JSONL files."""
    def read_records(patterns, text_field="text"):
        records = []
        for path in [patterns] if isinstance(patterns, str) else patterns:
            with open(path, encoding="utf-8") as fh:
                records += [_Record(f"{path}:{i}", json.loads(line)) for i, line in enumerate(fh, 1)]
        return records, []
    monkeypatch.setitem(sys.modules, "lmadapt.data", types.SimpleNamespace(read_records=read_records))


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_evaluate_reads_files_and_names_bad_rows_by_file_line_and_field(model, tokenizer, tmp_path, monkeypatch):
    _stub_data_module(monkeypatch)
    bad = _write(tmp_path / "mc.jsonl", [{"question": "Q?", "options": [" a", " b"], "gold": 0},
                                         {"question": "Q?", "options": " a", "gold": 0},
                                         {"question": "Q?", "options": [" a", " b"], "gold": 5}])
    cfg = from_dict(EvalConfig, {"task": "multiple_choice", "data": [bad], "prompt_field": "question",
                                 "choices_field": "options", "answer_field": "gold"})
    with pytest.raises(DataError) as err:
        evaluate(model, tokenizer, cfg, progress=False)
    assert err.value.problems == [f"{bad}:2: field 'options': expected a list of at least 2 non-empty strings, "
                                  f"got ' a'",
                                  f"{bad}:3: field 'gold': index 5 is out of range for 2 choices"]
    cfg.max_examples = 1
    out = evaluate(model, tokenizer, cfg, progress=False)
    assert out["task"] == "multiple_choice" and out["n"] == 1
    json.dumps(out)  # results go to report.json as they are


def test_evaluate_classification_defaults_to_the_labels_in_the_data(model, tokenizer, tmp_path, monkeypatch):
    _stub_data_module(monkeypatch)
    path = _write(tmp_path / "cls.jsonl", _topic_examples())
    cfg = from_dict(EvalConfig, {"task": "classification", "data": [path]})
    out = evaluate(model, tokenizer, cfg, progress=False)
    assert out["labels"] == [" food", " sport", " tech"] and out["n"] == 9
    direct = classification_accuracy(model, tokenizer, _topic_examples(), out["labels"], progress=False)
    assert out["confusion"] == direct["confusion"]


def test_eval_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        from_dict(EvalConfig, {"task": "clasification", "data": [], "batch_size": 0, "labels": ["a", "a"]})
    msg = str(err.value)
    assert "task: 'clasification' is not one of" in msg and "Did you mean 'classification'?" in msg
    with pytest.raises(ConfigError) as err:
        from_dict(EvalConfig, {"task": "perplexity", "data": [], "batch_size": 0, "labels": ["a", "a"]})
    assert {p.split(":")[0] for p in err.value.problems} == {"data", "batch_size", "labels"}


def test_compare_table_text_and_markdown():
    before = {"task": "classification", "accuracy": 0.5, "n": 10, "per_class_accuracy": {" sport": 0.25},
              "confusion": {" sport": {" sport": 1}}, "samples": []}
    after = {"task": "classification", "accuracy": 0.75, "n": 10, "per_class_accuracy": {" sport": 1.0},
             "confusion": {" sport": {" sport": 4}}, "samples": []}
    ppl = ({"perplexity": 12.5, "nll": 2.526, "tokens": 99}, {"perplexity": 9.0, "nll": 2.197, "tokens": 99})
    rows = [("topics", before, after), ("wiki", *ppl)]
    text = compare_table(rows).splitlines()
    assert text[0].split() == ["eval", "metric", "base", "adapted", "change"]
    assert text[2].split() == ["topics", "accuracy", "0.5000", "0.7500", "+0.2500"]
    assert text[3].split() == ["topics", "per_class_accuracy[sport]", "0.2500", "1.0000", "+0.7500"]
    assert text[4].split() == ["wiki", "perplexity", "12.5000", "9.0000", "-3.5000"]
    assert len(text) == 6 and len({len(line) for line in text}) == 1  # columns aligned, numbers right-aligned
    md = compare_table(rows, markdown=True).splitlines()
    assert md[0] == "| eval | metric | base | adapted | change |"
    assert md[2] == "| topics | accuracy | 0.5000 | 0.7500 | +0.2500 |"


def test_with_the_real_data_module(model, tokenizer, tmp_path):
    import lmadapt.data  # noqa: F401  (the real module, not the stub above: this test fails without it)

    path = _write(tmp_path / "gen.jsonl", [{"prompt": "Hi", "answer": "x"}, {"prompt": "Hi", "answer": 3}])
    cfg = from_dict(EvalConfig, {"task": "generation", "data": [path]})
    with pytest.raises(DataError, match=r"gen.jsonl:2.*field 'answer'"):
        evaluate(model, tokenizer, cfg, progress=False)


def test_chat_prompts_use_the_same_fallback_template_as_training():
    """A tokenizer without a chat template: generation/evaluation render chat prompts exactly as the
    training data were rendered (lmadapt.data.FALLBACK_CHAT_TEMPLATE), so a model tuned on it can be evaluated."""
    from lmadapt.data import render_chat
    from lmadapt.testing import tiny_tokenizer

    tok = tiny_tokenizer(chat_template=False)
    ids = encode_prompt(tok, "Name a fruit.", chat=True, system_prompt="Be brief.")
    expected = render_chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
                           add_generation_prompt=True)
    assert tok.decode(ids) == expected
    assert expected.endswith("<|assistant|>\n") and "<|user|>\nName a fruit." in expected
