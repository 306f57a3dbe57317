"""Compatibility of model updates (MUSCLE, arXiv:2407.09435): flip metrics from hand-made predictions, the
compatibility-aware objective against a hand-computed loss, through the loop, and `lmadapt compare` on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_rows, write_jsonl
from safetensors.torch import load_file
from test_method_matrix import killed_at

from lmadapt.cli import main
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.objectives.base import build_objective
from lmadapt.objectives.compat_kd import CompatKD, CompatKDConfig, choose_teacher
from lmadapt.objectives.distill import _DistillSums
from lmadapt.recipes.finetune import train
from lmadapt.reporting import read_metrics
from lmadapt.testing import tiny_llama, tiny_tokenizer
from lmadapt.updates.compat import (
    compare_models,
    compare_predictions,
    flip_table,
    rouge_l,
    token_f1,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def cls_rows(predictions: list[str], golds: list[str]) -> list[dict]:
    """Prediction rows as the classification task writes them."""
    return [{"id": f"q{i}", "prediction": p, "gold": g, "score": -1.0, "correct": p == g, "gold_score": -1.5,
             "scores": {"a": -1.0, "b": -2.0, "c": -3.0}} for i, (p, g) in enumerate(zip(predictions, golds))]


def gen_rows(predictions: list[str], golds: list) -> list[dict]:
    return [{"id": i, "prediction": p, "gold": g, "score": None, "correct": False}
            for i, (p, g) in enumerate(zip(predictions, golds))]


# ------------------------------------------------------------------------------------------ metrics

def test_hand_made_predictions_give_the_known_rates():
    gold = ["a", "a", "b", "b", "c", "c", "a", "b", "c", "a"]
    old = ["a", "a", "b", "c", "a", "b", "c", "b", "a", "b"]  # right: 0 1 2 7
    new = ["a", "b", "c", "b", "b", "b", "b", "b", "a", "c"]  # right: 0 3 7
    result = compare_predictions(cls_rows(old, gold), cls_rows(new, gold), task="classification")
    f = result.summary["flips"]
    # negative: 1, 2 (old right, new wrong); positive: 3; both right: 0, 7;
    # both wrong: 4 (a/b), 5 (b/b same), 6 (c/b), 8 (a/a same), 9 (b/c) -> inconsistent 4, 6, 9
    assert (f["negative_flips"], f["positive_flips"], f["both_right"], f["both_wrong"], f["inconsistent_flips"]) == \
        (2, 1, 2, 5, 3)
    assert f["nfr"] == pytest.approx(0.2) and f["pfr"] == pytest.approx(0.1)
    assert f["inconsistent_flip_rate"] == pytest.approx(0.3)
    assert (f["old_accuracy"], f["new_accuracy"]) == (pytest.approx(0.4), pytest.approx(0.3))
    assert f["old_accuracy"] - f["new_accuracy"] == pytest.approx(f["nfr"] - f["pfr"])
    assert [r["flip"] for r in result.rows] == ["both_right", "negative", "negative", "positive",
                                                "both_wrong_different", "both_wrong_same", "both_wrong_different",
                                                "both_right", "both_wrong_same", "both_wrong_different"]
    assert result.summary["outputs"]["same_prediction"] == pytest.approx(0.4)  # 0, 5, 7, 8
    assert "metric_flips" not in result.summary  # off by default for classification
    assert "NFR" in flip_table(result.summary)


def test_rows_are_matched_by_id_not_by_position():
    gold = ["a", "b", "c"]
    old, new = cls_rows(["a", "b", "a"], gold), cls_rows(["a", "a", "c"], gold)
    result = compare_predictions(old, list(reversed(new)), task="classification")
    assert [r["id"] for r in result.rows] == ["q0", "q1", "q2"]
    assert [r["flip"] for r in result.rows] == ["both_right", "negative", "positive"]


@pytest.mark.parametrize("task", ["classification", "generation", "multiple_choice"])
def test_old_equal_to_new_flips_nothing(task):
    if task == "generation":
        rows = gen_rows(["Paris", "a dog", "blue"], ["Paris", ["the cat", "a cat"], "red"])
    elif task == "classification":
        rows = cls_rows(["a", "b", "a"], ["a", "a", "b"])
    else:
        rows = [{"id": i, "prediction": p, "gold": g, "score": -1.0, "correct": p == g, "gold_score": -2.0 - i,
                 "scores": [-1.0, -2.0], "scores_per_token": [-1.0, -1.0], "prediction_per_token": p,
                 "correct_per_token": p == g} for i, (p, g) in enumerate([(0, 0), (1, 0), (1, 1)])]
    result = compare_predictions(rows, [dict(r) for r in rows], task=task,
                                 metric="gold_score" if task == "multiple_choice" else None)
    for view in ("flips", "flips_at_threshold", "flips_per_token", "metric_flips"):
        if view in result.summary:
            m = result.summary[view]
            assert m["nfr"] == m["pfr"] == m["negative_flips"] == m["positive_flips"] == 0, view
            assert m.get("inconsistent_flips", 0) == 0
    assert result.summary["outputs"]["same_prediction"] == 1.0
    if task == "generation":
        assert result.summary["outputs"]["mean_token_f1"] == 1.0


def test_similarity_measures_by_hand():
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(2 * 2 / (2 + 3))  # "cat sat" vs 3 tokens
    assert rouge_l("cat sat on mat", "cat on the mat sat") == pytest.approx(2 * 3 / (4 + 4))  # LCS "cat on mat"
    assert token_f1("", "") == rouge_l("", "") == 1.0 and token_f1("x", "") == rouge_l("", "x") == 0.0
    assert token_f1("x y z", "z y x") == 1.0 and rouge_l("x y z", "z y x") == pytest.approx(2 / 6)  # order counts


def test_generation_is_judged_by_match_by_threshold_and_by_the_continuous_metric():
    golds = ["Paris", ["New York", "NYC"], "red green blue", "one two three four"]
    old = ["paris!", "nyc", "red green", "one two three four"]
    new = ["Paris", "Boston", "red", "one two"]
    result = compare_predictions(gen_rows(old, golds), gen_rows(new, golds), task="generation", threshold=0.6,
                                 tolerance=0.1)
    rows = result.rows
    # normalized match: old right on 0, 1, 3 ("paris!" -> "paris"), new right on 0 only
    assert [r["flip"] for r in rows] == ["both_right", "negative", "both_wrong_different", "negative"]
    exact = compare_predictions(gen_rows(old, golds), gen_rows(new, golds), task="generation", match="exact")
    assert [r["flip"] for r in exact.rows][:2] == ["positive", "both_wrong_different"]  # "paris!" != "Paris"
    # token F1 to the best answer: old 1, 1, 0.8, 1; new 1, 0, 0.5, 2*2/6
    assert [r["old_similarity"] for r in rows] == pytest.approx([1, 1, 0.8, 1])
    assert [r["new_similarity"] for r in rows] == pytest.approx([1, 0, 0.5, 4 / 6])
    assert [r["flip_at_threshold"] for r in rows] == ["both_right", "negative", "negative", "both_right"]  # 4/6 >= 0.6
    m = result.summary["metric_flips"]
    assert m["negative_flips"] == 3 and m["nfr"] == pytest.approx(0.75)
    assert m["mean_decrease"] == pytest.approx((1 + 0.3 + (1 - 4 / 6)) / 3)
    assert (m["old_mean"], m["new_mean"]) == (pytest.approx(3.8 / 4), pytest.approx((1.5 + 4 / 6) / 4))
    assert [r["output_similarity"] for r in rows] == pytest.approx([1, 0, 2 * 1 / 3, 2 * 2 / 6])
    assert result.summary["outputs"]["same_prediction"] == 0.25
    # a tolerance above every drop: no metric flips
    loose = compare_predictions(gen_rows(old, golds), gen_rows(new, golds), task="generation", tolerance=1.0)
    assert loose.summary["metric_flips"]["negative_flips"] == 0 and loose.summary["metric_flips"]["mean_decrease"] is None


# ------------------------------------------------------------------------------------------ bad input

def test_mismatched_ids_are_listed():
    gold = ["a"] * 5
    old, new = cls_rows(["a"] * 5, gold), cls_rows(["a"] * 4, gold[:4])
    new.append({**new[0], "id": "extra"})
    with pytest.raises(LmadaptError, match=r"1 id\(s\) \('q4'\) only in old.ndjson, 1 id\(s\) \('extra'\) only in "
                                           r"new.ndjson.*same data file"):
        compare_predictions(old, new, task="classification", old_name="old.ndjson", new_name="new.ndjson")


def test_other_gold_for_one_id_is_refused():
    old, new = cls_rows(["a", "b"], ["a", "b"]), cls_rows(["a", "b"], ["a", "a"])
    with pytest.raises(LmadaptError, match=r"different answers \(gold\) for 1 id\(s\) \('q1'\)"):
        compare_predictions(old, new, task="classification")


def test_rows_missing_keys_or_repeating_ids_are_named():
    rows = cls_rows(["a", "b"], ["a", "b"])
    broken = [dict(rows[0]), {k: v for k, v in rows[1].items() if k != "correct"}, dict(rows[0])]
    with pytest.raises(LmadaptError, match=r"mine.jsonl is not a predictions file of task 'classification': row 2: "
                                           r"missing correct; row 3: id 'q0' repeats.*lmadapt eval --predictions"):
        compare_predictions(broken, rows, task="classification", old_name="mine.jsonl")


def test_predictions_of_another_task_are_refused():
    with pytest.raises(LmadaptError, match=r"gen.jsonl holds predictions of task 'generation'.*not of "
                                           r"'classification'.*--task classification"):
        compare_predictions(cls_rows(["a"], ["a"]), [{**r, "gold_score": 0.0} for r in gen_rows(["a"], ["a"])],
                            task="classification", new_name="gen.jsonl")


def test_unknown_and_flipless_tasks_are_refused():
    with pytest.raises(ConfigError, match="Did you mean 'classification'"):
        compare_predictions([], [], task="clasification")
    with pytest.raises(LmadaptError, match="task 'perplexity' has no right or wrong answer"):
        compare_predictions([], [], task="perplexity")
    with pytest.raises(LmadaptError, match="threshold: a similarity in"):
        compare_predictions([], [], task="generation", threshold=2.0)


# ------------------------------------------------------------------------------------------ the objective

def test_the_teacher_is_the_old_model_exactly_where_it_is_right():
    old = torch.tensor([[5.0, 1, 0], [0, 3, 1], [0, 1, 4], [2, 2.5, 0], [1, 0, 0]])  # argmax 0, 1, 2, 1, 0
    new = torch.full((5, 3), -7.0)
    student = torch.zeros(5, 3, requires_grad=True)
    targets = torch.tensor([0, 2, 2, 1, -100])  # old right on rows 0, 2, 3; row 4 has no target
    teacher, use_old, use_new = choose_teacher(student, old.clone(), new, targets)
    assert use_old.tolist() == [True, False, True, True, False]
    assert use_new.tolist() == [False, True, False, False, False]
    torch.testing.assert_close(teacher[use_old], old[use_old], rtol=0, atol=0)
    torch.testing.assert_close(teacher[1], new[1], rtol=0, atol=0)
    # without a new model: the student's own logits, so that row has no KL
    teacher, use_old, use_new = choose_teacher(student + 0.5, old.clone(), None, targets)
    assert not use_new.any() and torch.equal(teacher[1], torch.full((3,), 0.5))


def _batch_with_old_hits(old: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Two rows of 12 tokens (the first 4 untrained, 3 padding in row 2) whose targets are the old model's argmax at
    every other trained position, so the old model is right there and (almost surely) wrong elsewhere."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        guess = old(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    labels = ids.clone()
    labels[:, 5::2] = guess[:, 4:-1:2]  # position t predicts label t + 1
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(student, old, new, batch, kd_weight: float, T: float) -> tuple[torch.Tensor, int, int]:
    """CE + kd_weight * T^2 * KL to the masked teacher, from full forwards in float64."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    s = student(**inputs).logits[:, :-1].double()
    with torch.no_grad():
        o = old(**inputs).logits[:, :-1].double()
        n = None if new is None else new(**inputs).logits[:, :-1].double()
    y = batch["labels"][:, 1:]
    keep = y != -100
    s, o, y = s[keep], o[keep], y[keep]
    right = o.argmax(-1) == y
    ce = F.cross_entropy(s, y, reduction="sum")
    log_ps = F.log_softmax(s / T, -1)
    kl_old = F.kl_div(log_ps[right], F.log_softmax(o[right] / T, -1), log_target=True, reduction="sum")
    kl_new = 0.0 if n is None else F.kl_div(log_ps[~right], F.log_softmax(n[keep][~right] / T, -1),
                                            log_target=True, reduction="sum")
    return ce + kd_weight * T ** 2 * (kl_old + kl_new), int(keep.sum()), int(right.sum())


@pytest.mark.parametrize("with_new, T", [(True, 1.0), (False, 1.0), (True, 2.0)])
def test_the_loss_is_ce_plus_lambda_times_the_masked_kl(with_new, T):
    old, new = tiny_llama(seed=1, initializer_range=0.2), tiny_llama(seed=2, initializer_range=0.2)
    new = new if with_new else None
    batch = _batch_with_old_hits(old)
    objective = CompatKD(CompatKDConfig(old_model="unused", kd_weight=0.7, temperature=T, chunk_size=5), old, new)
    objective.setup(tiny_llama(), None, torch.device("cpu"))
    student = tiny_llama(seed=3)
    out = objective.loss(student, batch, drop_padding_mask=True)
    out.loss.backward()
    reference_student = tiny_llama(seed=3)
    expected, n, hits = _reference(reference_student, old, new, batch, 0.7, T)
    expected.backward()
    assert out.count == n == objective.count(batch) == 8 + 5 and hits >= 4
    assert out.metrics["old_teacher_share"] == hits
    assert out.metrics["new_teacher_share"] == (n - hits if with_new else 0)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for p, q in zip(student.parameters(), reference_student.parameters()):
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-4, atol=1e-6)


def test_distill_kl_gradient_at_temperature_one_leaves_an_fp32_teacher_as_it_was():
    """At T = 1 the chunked KL once subtracted in place from the teacher's own fp32 rows, so its backward used
    wrong teacher probabilities."""
    s = torch.randn(6, 9, generator=torch.Generator().manual_seed(0), requires_grad=True)
    t = torch.randn(6, 9, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 2, -100, 3, 4, 0])
    before = t.clone()
    kl, _ = _DistillSums.apply(s, t, y, 1.0, 4)
    kl.backward()
    assert torch.equal(t, before)
    ref = s.detach().clone().requires_grad_(True)
    keep = y != -100
    F.kl_div(F.log_softmax(ref[keep], -1), F.log_softmax(t[keep], -1), log_target=True, reduction="sum").backward()
    torch.testing.assert_close(s.grad, ref.grad)


def test_the_config_needs_an_old_model_and_sane_values():
    with pytest.raises(ConfigError) as err:
        build_objective({"name": "compat_kd", "temperature": 0, "kd_weight": -1})
    text = str(err.value)
    assert "old_model: give the old task model" in text and "temperature: must be > 0" in text
    assert "kd_weight: must be >= 0" in text


# ------------------------------------------------------------------------------------------ through the loop

@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_model_dir):
    """Version 1 (another tiny model, same tokenizer), a LoRA task adapter trained on it (the old task model),
    version 2 (the tiny model dir) and the training data."""
    root = tmp_path_factory.mktemp("versions")
    v1 = root / "v1"
    tiny_llama(seed=1).save_pretrained(v1)
    tiny_tokenizer().save_pretrained(v1)
    data = root / "train.jsonl"
    write_jsonl(data, make_rows(48))
    old = train(run_config(root / "old_run", v1, data, {"name": "lora", **LORA}, lr=3e-2, max_steps=12), progress=False)
    return {"v1": v1, "v2": tiny_model_dir, "old_adapter": old.adapter_dir, "data": data, "root": root}


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def run_config(output_dir, model, data, method, objective=None, **train_fields) -> dict:
    cfg = {"model": {"name_or_path": str(model)},
           "data": {"train": [str(data)], "max_length": 128, "validation_fraction": 0.125},
           "method": method,
           "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 4, "tensorboard": False, "schedule": "constant",
                     "threads": 1, **train_fields},
           "output_dir": str(output_dir)}
    if objective is not None:
        cfg["objective"] = objective
    return cfg


def compat_objective(versions, **fields) -> dict:
    return {"name": "compat_kd", "old_model": str(versions["v1"]), "old_adapter": str(versions["old_adapter"]),
            **fields}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_short_run_through_the_loop_logs_the_old_teachers_share(versions, tmp_path, method, precision):
    spec = {"name": "lora", **LORA} if method == "lora" else {"name": "full"}
    cfg = run_config(tmp_path / "run", versions["v2"], versions["data"], spec,
                     compat_objective(versions, new_model=str(versions["v2"])), precision=precision)
    result = train(cfg, progress=False)
    assert result.report["steps"] == 4 and math.isfinite(result.report["final_train_loss"])
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 4
    for r in steps:  # every target token has exactly one teacher (a new model is given), the old one often
        assert 0.1 < r["compat_kd/old_teacher_share"] < 0.9
        assert r["compat_kd/old_teacher_share"] + r["compat_kd/new_teacher_share"] == pytest.approx(1.0)
        assert r["loss"] == pytest.approx(r["compat_kd/ce"] + r["compat_kd/kl"], rel=1e-4)


def test_a_run_resumes_exactly(versions, tmp_path):
    def cfg(name):
        return run_config(tmp_path / name, versions["v2"], versions["data"], {"name": "lora", **LORA},
                          compat_objective(versions), max_steps=6, save_every=2)
    whole = train(cfg("whole"), progress=False)
    with killed_at(5), pytest.raises(KeyboardInterrupt):
        train(cfg("cut"), progress=False)
    resumed = train(cfg("cut"), resume=True, progress=False)
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_old_teacher_with_another_tokenizer_is_refused(versions, tmp_path):
    other = tmp_path / "wide"
    tiny_llama(vocab_size=300).save_pretrained(other)
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    cfg = run_config(tmp_path / "run", versions["v2"], versions["data"], {"name": "lora", **LORA},
                     {"name": "compat_kd", "old_model": str(other)})
    with pytest.raises(LmadaptError, match=r"objective.old_model: .*different tokenizer"):
        train(cfg, progress=False)


# ------------------------------------------------------------------------------------------ lmadapt compare

@pytest.fixture(scope="module")
def topic_data(versions):
    """Classification rows with ids, and the same rows without (so ids are file:line)."""
    rows = [{"id": f"t{i}", "prompt": r["prompt"], "label": r["completion"]} for i, r in enumerate(make_rows(9))]
    path = versions["root"] / "topics.jsonl"
    write_jsonl(path, rows)
    return path


def test_compare_cli_writes_the_files(versions, topic_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", str(versions["v1"]), str(versions["old_adapter"]), "--data", str(topic_data),
                 "--task", "classification", "--output", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "NFR" in printed and str(out) in printed
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "flips.jsonl", "new_predictions.jsonl",
                                                     "old_predictions.jsonl"]
    summary = json.loads((out / "compare.json").read_text())
    assert summary["old"]["kind"] == "model" and summary["new"]["kind"] == "adapter"
    assert summary["new"]["model"] is None  # the base the adapter records (v1)
    flips = [json.loads(line) for line in (out / "flips.jsonl").read_text().splitlines()]
    assert [f["id"] for f in flips] == [f"t{i}" for i in range(9)]
    f = summary["flips"]
    assert f["n"] == 9 and f["negative_flips"] == sum(r["flip"] == "negative" for r in flips)
    assert f["old_accuracy"] == summary["old"]["eval"]["accuracy"]
    assert f["new_accuracy"] == summary["new"]["eval"]["accuracy"]

    # one side read back from its predictions file (no model run), the other an adapter on a given base
    again = compare_models(out / "old_predictions.jsonl", versions["old_adapter"],
                           {"task": "classification", "data": [str(topic_data)]}, tmp_path / "cmp2",
                           new_model=str(versions["v1"]), progress=False)
    assert again.summary["flips"] == summary["flips"] and again.summary["old"]["eval"] is None
    assert again.summary["new"]["model"] == str(versions["v1"])


def test_compare_cli_errors_name_the_file_and_what_to_do(versions, topic_data, tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    rows = [{"id": "t0", "prediction": "x", "gold": "x", "score": None, "correct": True}]
    write_jsonl(preds, rows)
    out = tmp_path / "cmp"
    assert main(["compare", str(preds), str(versions["v2"]), "--data", str(topic_data), "--task", "classification",
                 "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{preds} is not a predictions file of task 'classification': row 1: missing gold_score" in err
    assert not out.exists()  # nothing half-written
    other = tmp_path / "g.jsonl"
    write_jsonl(other, [{**rows[0], "gold_score": 1.0}])
    assert main(["compare", str(other), str(other), "--task", "classification", "--output", str(out)]) == 2
    assert f"{other} holds predictions of task 'generation'" in capsys.readouterr().err
    assert main(["compare", str(versions["v2"]), str(versions["v2"]), "--task", "classification",
                 "--output", str(out)]) == 2
    assert "give the evaluation data (--data" in capsys.readouterr().err
    assert main(["compare", str(preds), str(preds), "--old-model", "x", "--task", "classification",
                 "--output", str(out)]) == 2
    assert "is not an adapter folder, so there is no base model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", str(preds), str(preds), "--task", "clasification", "--output", str(out)])
    assert "did you mean classification" in capsys.readouterr().err


def test_a_missing_old_adapter_is_named_by_its_setting(versions, tmp_path):
    cfg = run_config(tmp_path / "run", versions["v2"], versions["data"], {"name": "lora", **LORA},
                     {"name": "compat_kd", "old_adapter": str(tmp_path / "nowhere")})
    with pytest.raises(LmadaptError, match=r"objective.old_adapter: .*nowhere is not an adapter folder"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "adapter").exists()
