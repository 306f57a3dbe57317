"""The evaluation task registry and per-example predictions.

For every task: the predictions file has one line per row with a stable id, its scores equal a full
forward computed by hand, and the accuracy (or NLL) recomputed from the file equals the reported one.
The registry is the one list of tasks: config validation, the CLI's choices and the docs follow it.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmadapt.config import from_dict
from lmadapt.decoding.generation import generate
from lmadapt.errors import ConfigError, DataError
from lmadapt.evaluation import registry
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.examples import string_problem
from lmadapt.evaluation.predictions import read_predictions
from lmadapt.evaluation.registry import EvalTask, available_tasks, get_task, register_task
from lmadapt.evaluation.run import evaluate

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1, from one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return -F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")


def _continuation(model, tokenizer, prompt: str, candidate: str) -> float:
    """Summed log-likelihood of ``candidate`` (tokenized alone) after ``prompt``, from one full forward."""
    context = _ids(tokenizer, prompt)
    cont = list(tokenizer(candidate, add_special_tokens=False).input_ids)
    return _logprobs(model, context + cont)[len(context) - 1:].sum().item()


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _run(model, tokenizer, tmp_path, settings: dict) -> tuple[dict, list[dict]]:
    out_file = tmp_path / "out" / "predictions.jsonl"  # the folder does not exist yet
    out = evaluate(model, tokenizer, from_dict(EvalConfig, settings), progress=False, predictions=out_file)
    return out, read_predictions(out_file)


# -------------------------------------------------------------------------------------- predictions, per task

def test_perplexity_predictions_are_per_text_mean_nll(model, tokenizer, tmp_path):
    texts = ["The cat sat on the mat.", "A somewhat longer sentence about language models.", "x" * 40]
    path = _jsonl(tmp_path / "ppl.jsonl", [{"id": "cat", "text": texts[0]}, {"id": None, "text": texts[1]},
                                           {"id": "", "text": texts[2]}])  # null or empty: no id
    out, preds = _run(model, tokenizer, tmp_path, {"task": "perplexity", "data": [path], "batch_size": 2})
    assert [p["id"] for p in preds] == ["cat", f"{path}:2", f"{path}:3"]
    for p, text in zip(preds, texts):
        ref = -_logprobs(model, _ids(tokenizer, text))
        assert p["tokens"] == len(ref) and p["score"] == pytest.approx(ref.mean().item(), rel=1e-6)
        assert p["prediction"] is None and p["gold"] is None and p["correct"] is None
    weighted = sum(p["score"] * p["tokens"] for p in preds) / sum(p["tokens"] for p in preds)
    assert weighted == pytest.approx(out["nll"], rel=1e-12) and out["tokens"] == sum(p["tokens"] for p in preds)


def test_generation_predictions_give_the_reported_accuracy(model, tokenizer, tmp_path):
    prompts = ["Hello", "Q:", "Once upon"]
    outs = [o.lstrip().split("\n")[0] for o in generate(model, tokenizer, prompts, max_new_tokens=4)]
    rows = [{"prompt": prompts[0], "answer": outs[0]}, {"prompt": prompts[1], "answer": [outs[1] + "zz", "nope"]},
            {"id": 7, "prompt": prompts[2], "answer": ["no", outs[2]]}]
    path = _jsonl(tmp_path / "gen.jsonl", rows)
    out, preds = _run(model, tokenizer, tmp_path, {"task": "generation", "data": [path], "max_new_tokens": 4,
                                                   "match": "exact"})
    assert [p["id"] for p in preds] == [f"{path}:1", f"{path}:2", 7]
    assert [p["prediction"] for p in preds] == outs and [p["gold"] for p in preds] == [r["answer"] for r in rows]
    assert [p["correct"] for p in preds] == [True, False, True] and {p["score"] for p in preds} == {None}
    assert out["accuracy"] == pytest.approx(2 / 3) == sum(p["correct"] for p in preds) / len(preds)


MC = [{"id": "cows", "prompt": "Q: What do cows drink?\nA:", "choices": [" milk", " water", " tea"], "answer": 1},
      {"prompt": "Q: Capital of France?\nA:", "choices": [" Paris", " Rome"], "answer": " Rome"},
      {"prompt": "Q: 2 + 2 =", "choices": [" 4", " 22", " four", " fish"], "answer": 0},
      {"prompt": "Q: Sky colour?\nA:", "choices": [" blue", " green"], "answer": 0}]


def test_multiple_choice_predictions_hold_every_choice_score(model, tokenizer, tmp_path):
    path = _jsonl(tmp_path / "mc.jsonl", MC)
    out, preds = _run(model, tokenizer, tmp_path, {"task": "multiple_choice", "data": [path]})
    assert [p["id"] for p in preds] == ["cows", f"{path}:2", f"{path}:3", f"{path}:4"]
    for p, row in zip(preds, MC):
        ref = [_continuation(model, tokenizer, row["prompt"], c) for c in row["choices"]]
        assert p["scores"] == pytest.approx(ref, abs=1e-4)
        assert p["prediction"] == max(range(len(ref)), key=p["scores"].__getitem__)
        assert p["score"] == p["scores"][p["prediction"]] and p["gold_score"] == p["scores"][p["gold"]]
        assert p["gold"] == (row["answer"] if isinstance(row["answer"], int) else row["choices"].index(row["answer"]))
        assert p["correct"] == (p["prediction"] == p["gold"])
        assert p["prediction_per_token"] == max(range(len(ref)), key=p["scores_per_token"].__getitem__)
    assert out["accuracy"] == sum(p["correct"] for p in preds) / 4
    assert out["accuracy_per_token"] == sum(p["correct_per_token"] for p in preds) / 4


def test_classification_predictions_from_csv_give_the_confusion_matrix(model, tokenizer, tmp_path):
    words = {"sport": "team goal match", "tech": "chip robot code", "food": "bread soup cheese"}
    rows = [{"prompt": f"Text: {w} {i}\nTopic:", "label": label}
            for i, (label, w) in enumerate(list(words.items()) * 2)]
    path = tmp_path / "cls.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "label"])
        writer.writeheader()
        writer.writerows(rows)
    labels = [" food", " sport", " tech"]
    out, preds = _run(model, tokenizer, tmp_path, {"task": "classification", "data": [str(path)], "labels": labels})
    # the header is line 1 and each quoted prompt spans two lines: rows start on lines 2, 4, 6, ...
    assert [p["id"] for p in preds] == [f"{path}:{2 + 2 * i}" for i in range(len(rows))]
    confusion = {g: {p: 0 for p in labels} for g in labels}
    for p, row in zip(preds, rows):
        ref = {l: _continuation(model, tokenizer, row["prompt"], l) for l in labels}
        assert p["scores"] == pytest.approx(ref, abs=1e-4) and p["gold"] == " " + row["label"]
        assert p["prediction"] == max(labels, key=p["scores"].__getitem__)
        assert p["score"] == p["scores"][p["prediction"]] and p["gold_score"] == p["scores"][p["gold"]]
        confusion[p["gold"]][p["prediction"]] += 1
    assert out["confusion"] == confusion
    assert out["accuracy"] == sum(p["correct"] for p in preds) / len(preds) == out["correct"] / len(preds)


# -------------------------------------------------------------------------------------- ids, atomic writes

def test_repeated_and_malformed_ids_are_bad_rows(model, tokenizer, tmp_path):
    path = _jsonl(tmp_path / "ppl.jsonl", [{"id": "a", "text": "one"}, {"id": "a", "text": "two"},
                                           {"id": [1], "text": "three"}, {"id": True, "text": "four"}])
    with pytest.raises(DataError) as err:
        evaluate(model, tokenizer, EvalConfig(task="perplexity", data=[path]), progress=False)
    assert err.value.problems == [
        f"{path}:2: field 'id': 'a' is also the id of {path}:1; give every row its own id",
        f"{path}:3: field 'id': expected a string or an integer, got [1]",
        f"{path}:4: field 'id': expected a string or an integer, got True"]


def test_a_failed_evaluation_leaves_the_old_predictions_file_alone(model, tokenizer, tmp_path):
    target = tmp_path / "preds.jsonl"
    target.write_text("old\n")
    bad = _jsonl(tmp_path / "gen.jsonl", [{"prompt": "Hi", "answer": 3}])
    with pytest.raises(DataError, match="field 'answer'"):
        evaluate(model, tokenizer, EvalConfig(task="generation", data=[bad]), progress=False, predictions=target)
    assert target.read_text() == "old\n"
    good = _jsonl(tmp_path / "ppl.jsonl", [{"text": "some text"}])
    evaluate(model, tokenizer, EvalConfig(task="perplexity", data=[good]), progress=False, predictions=target)
    assert [p["id"] for p in read_predictions(target)] == [f"{good}:1"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["gen.jsonl", "ppl.jsonl", "preds.jsonl"]  # no temp file


# -------------------------------------------------------------------------------------- the registry

def test_settings_a_task_does_not_read_are_refused():
    with pytest.raises(ConfigError) as err:
        from_dict(EvalConfig, {"task": "perplexity", "data": ["x.txt"], "chat": True, "labels": ["a"],
                               "max_length": 64, "text_field": "body"})
    assert [p.split(":")[0] for p in err.value.problems] == ["labels", "chat"]
    assert "task 'perplexity' does not read this setting" in err.value.problems[0]
    ok = from_dict(EvalConfig, {"task": "classification", "data": ["x"], "labels": ["a"], "chat": True})
    assert ok.check() == []


def test_a_task_registered_in_one_file_is_validated_evaluated_and_offered_by_the_cli(model, tokenizer, tmp_path,
                                                                                     monkeypatch):
    available_tasks()  # the built-in tasks, before the registry is copied
    monkeypatch.setattr(registry, "TASKS", dict(registry.TASKS))

    def run(model, tokenizer, rows, cfg, progress):
        preds = [{"prediction": len(r["prompt"]), "gold": r["size"], "score": None,
                  "correct": len(r["prompt"]) == r["size"]} for r in rows]
        return {"accuracy": sum(p["correct"] for p in preds) / len(rows), "n": len(rows)}, preds

    def size_problem(value, row, cfg):
        return None if isinstance(value, int) else f"expected an integer, got {value!r}"

    register_task(EvalTask(name="prompt_length", fields={"prompt": string_problem, "size": size_problem}, run=run))
    path = _jsonl(tmp_path / "len.jsonl", [{"question": "abc", "size": 3}, {"question": "hello", "size": 2}])
    out, preds = _run(model, tokenizer, tmp_path, {"task": "prompt_length", "data": [path],
                                                   "prompt_field": "question"})
    assert out == {"task": "prompt_length", "accuracy": 0.5, "n": 2}
    assert preds[1] == {"id": f"{path}:2", "prediction": 5, "gold": 2, "score": None, "correct": False}
    with pytest.raises(ConfigError, match="Did you mean 'prompt_length'"):
        from_dict(EvalConfig, {"task": "prompt_lenght", "data": [path]})
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "abc", "size": "3"}, {"size": 1}])
    with pytest.raises(DataError) as err:
        evaluate(model, tokenizer, EvalConfig(task="prompt_length", data=[bad], prompt_field="question"))
    assert err.value.problems == [f"{bad}:1: field 'size': expected an integer, got '3'",
                                  f"{bad}:2: field 'question': missing"]
    from lmadapt.cli import build_parser

    assert build_parser().parse_args(["eval", "--task", "prompt_length", "--data", path]).task == "prompt_length"
    with pytest.raises(TypeError, match="already registered"):
        register_task(EvalTask(name="prompt_length", fields={"prompt": string_problem}, run=run))
    register_task(EvalTask(name="other", fields={"prompt": string_problem}, run=run, reads=("temperature",)))
    with pytest.raises(ConfigError, match=r"reads settings EvalConfig does not have: \['temperature'\]"):
        from_dict(EvalConfig, {"task": "other", "data": [path]})  # (registry.TASKS is this test's copy)


def test_unknown_task_names_are_refused_everywhere(capsys):
    with pytest.raises(ConfigError, match="task: 'perplexty' is not one of .* Did you mean 'perplexity'"):
        get_task("perplexty")
    from lmadapt.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--task", "perplexty", "--data", "x.jsonl"])
    choices = ", ".join(map(repr, available_tasks()))
    assert f"invalid choice: 'perplexty' (choose from {choices})" in capsys.readouterr().err


def test_building_the_cli_parser_loads_no_task():
    code = "import sys, lmadapt.cli; lmadapt.cli.build_parser(); print(sorted(m for m in ('torch', 'transformers') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_docs_list_every_task_with_its_fields():
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("\n## The tasks\n", 1)[1].split("\n#", 1)[0]
    table = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| `")}
    for name in available_tasks():
        task = get_task(name)
        assert f"### {name}\n" in text, name
        assert all(f"`{key}`" in table[f"`{name}`"] for key in task.fields), (name, table.get(f"`{name}`"))


def test_cli_eval_writes_the_adapted_and_the_base_predictions(tmp_path, tiny_model_dir, tokenizer, capsys):
    from lmadapt.adapters.format import save_adapter
    from lmadapt.cli import main
    from lmadapt.methods import build_method
    from lmadapt.testing import tiny_llama

    tuned = tiny_llama()
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "init": "random"})
    method.apply(tuned)
    adapter = save_adapter(tuned, method, tmp_path / "adapter", base_model="tiny", base_fingerprint=None)
    data = _jsonl(tmp_path / "mc.jsonl", MC)
    out = tmp_path / "preds.jsonl"
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--task", "multiple_choice",
                 "--data", data, "--compare", "--predictions", str(out)]) == 0
    assert "multiple_choice  accuracy" in capsys.readouterr().out
    adapted, base = read_predictions(out), read_predictions(tmp_path / "preds.base.jsonl")
    cfg = EvalConfig(task="multiple_choice", data=[data])
    for model, got in ((tuned, adapted), (tiny_llama(), base)):
        evaluate(model, tokenizer, cfg, progress=False, predictions=tmp_path / "ref.jsonl")
        ref = read_predictions(tmp_path / "ref.jsonl")
        assert [p["id"] for p in got] == [p["id"] for p in ref]
        for p, r in zip(got, ref):
            assert p["scores"] == pytest.approx(r["scores"], abs=1e-4)
    assert adapted[0]["scores"] != pytest.approx(base[0]["scores"], abs=1e-4)  # the adapter changes the scores
