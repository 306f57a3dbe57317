"""Forgetting measured by default (issue 16; "Simple and Scalable Strategies to Continually Pre-train LLMs",
arXiv:2403.08763, METHODS.md section 15): an ``evals:`` entry's ``role`` (target or retention) and ``every``
(evaluate every N optimizer steps during training too). The evaluations land at the right steps in
``metrics.jsonl`` with the values of the model at that step, the report lists target and retention rows apart,
``evals.png`` is written, the evaluations draw nothing from the random streams training uses, and a resumed
run with them ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import interrupted_at as ctrl_c_at
from conftest import write_jsonl
from matplotlib.figure import Figure
from safetensors.torch import load_file

from lmadapt.errors import ConfigError
from lmadapt.evaluation.config import EvalConfig, eval_names
from lmadapt.evaluation.report import role_rows, role_summary
from lmadapt.recipes import finetune
from lmadapt.recipes.finetune import load_run_config, train
from lmadapt.reporting import plot_evals, read_metrics
from lmadapt.training.loop import Trainer


@pytest.fixture
def eval_files(tmp_path):
    """A 'target' set like the training rows and a 'retention' set of other text."""
    target = tmp_path / "topics_heldout.jsonl"
    write_jsonl(target, [{"text": "Text: goal match striker\nTopic: sport"},
                         {"text": "Text: recipe oven flour\nTopic: food"}])
    general = tmp_path / "en_heldout.txt"
    general.write_text("The committee will publish its findings in the spring, after the hearings.\n")
    return target, general


@pytest.fixture
def cpt_config(run_config, eval_files):
    cfg = json.loads(json.dumps(run_config))
    target, general = eval_files
    cfg["train"].update(max_steps=6, lr=2e-2)
    cfg["evals"] = [{"task": "perplexity", "data": [str(target)], "every": 2},
                    {"task": "perplexity", "data": [str(general)], "role": "retention", "every": 3},
                    {"task": "perplexity", "data": [str(general)], "name": "en_ends", "role": "retention"}]
    return cfg


def _curve(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


def test_entries_are_evaluated_at_their_steps_with_the_model_of_that_step(cpt_config, tmp_path):
    result = train(cpt_config, progress=False)
    records = read_metrics(result.run_dir / "metrics.jsonl")
    target = _curve(records, "eval/topics_heldout/perplexity")
    retention = _curve(records, "eval/en_heldout/perplexity")
    assert [s for s, _ in target] == [0, 2, 4, 6]  # before, every 2 steps, after (the last step, once)
    assert [s for s, _ in retention] == [0, 3, 6]
    assert [s for s, _ in _curve(records, "eval/en_ends/perplexity")] == [0, 6]  # every: 0 -> the two ends
    assert target[0][1] == result.evals_before[0]["perplexity"]
    assert target[-1][1] == result.evals_after[0]["perplexity"]
    assert len({v for _, v in target}) == 4  # training moved the model between the evaluations
    nll = _curve(records, "eval/topics_heldout/nll")
    assert all(math.isclose(math.exp(n), p, rel_tol=1e-9) for (_, n), (_, p) in zip(nll, target))
    # the value logged at step 2 is that of the model after 2 optimizer steps: a run of 2 steps (constant lr,
    # same seed and data) ends on the same weights, and its "after" evaluation gives the same perplexity
    short = {**cpt_config, "output_dir": str(tmp_path / "short"), "train": {**cpt_config["train"], "max_steps": 2}}
    after_two = train(short, progress=False).evals_after[0]["perplexity"]
    assert math.isclose(target[1][1], after_two, rel_tol=1e-5)
    assert not math.isclose(target[0][1], after_two, rel_tol=1e-3)


def test_the_report_lists_target_and_retention_apart(cpt_config, capsys):
    result = train(cpt_config, progress=False)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert [(e["name"], e["role"]) for e in report["evals"]] == [
        ("topics_heldout", "target"), ("en_heldout", "retention"), ("en_ends", "retention")]
    assert all({"eval", "before", "after"} <= set(e) for e in report["evals"])  # the keys before this feature
    assert [(r["eval"], r["metric"]) for r in report["target"]] == [("topics_heldout", "perplexity")]
    assert [(r["eval"], r["metric"]) for r in report["retention"]] == [("en_heldout", "perplexity"),
                                                                       ("en_ends", "perplexity")]
    for row, entry in zip(report["target"] + report["retention"], report["evals"]):
        before, after = entry["before"]["perplexity"], entry["after"]["perplexity"]
        assert (row["before"], row["after"]) == (before, after)
        assert math.isclose(row["change"], after - before) and math.isclose(row["relative_change"], after / before - 1)
        worse = "forgetting" if row["role"] == "retention" else "worse"
        assert row["verdict"] == (worse if after > before else "better")
    ret = report["retention"][0]
    line = (f"retention: en_heldout perplexity {ret['before']:.2f} -> {ret['after']:.2f} "
            f"({ret['relative_change']:+.1%}, {ret['verdict']})")
    assert line in capsys.readouterr().err


def test_role_rows_by_hand():
    rows = role_rows([
        ("en", "retention", {"task": "perplexity", "perplexity": 64.4, "nll": 4.165, "tokens": 9},
         {"task": "perplexity", "perplexity": 71.1, "nll": 4.264, "tokens": 9}),
        ("de", "target", {"perplexity": 120.0, "nll": 4.787}, {"perplexity": 45.0, "nll": 3.807}),
        ("qa", "retention", {"accuracy": 0.5, "n": 10, "match": "normalized"}, {"accuracy": 0.6, "n": 10}),
        ("cls", "target", {"accuracy": 0.8, "macro_f1": 0.75}, {"accuracy": 0.7, "macro_f1": 0.75}),
    ])
    assert [(r["role"], r["eval"], r["metric"], r["verdict"]) for r in rows] == [
        ("target", "de", "perplexity", "better"), ("target", "cls", "accuracy", "worse"),
        ("target", "cls", "macro_f1", "unchanged"),
        ("retention", "en", "perplexity", "forgetting"), ("retention", "qa", "accuracy", "better")]
    assert rows[3]["relative_change"] == pytest.approx(71.1 / 64.4 - 1) and "relative_change" not in rows[1]
    assert role_summary(rows).splitlines()[3] == "retention: en perplexity 64.40 -> 71.10 (+10.4%, forgetting)"
    assert role_summary(rows).splitlines()[1] == "target:    cls accuracy 0.8000 -> 0.7000 (-0.1000, worse)"


def test_the_plot_is_written_only_with_curves(cpt_config, tmp_path):
    result = train(cpt_config, progress=False)
    assert (result.run_dir / "evals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = json.loads(json.dumps(cpt_config))
    plain["output_dir"] = str(tmp_path / "plain")
    for e in plain["evals"]:
        e.pop("every", None)
    result = train(plain, progress=False)
    assert not (result.run_dir / "evals.png").exists()
    records = read_metrics(result.run_dir / "metrics.jsonl")
    assert [s for s, _ in _curve(records, "eval/topics_heldout/perplexity")] == [0, 6]


@pytest.fixture
def exact_config(cpt_config):
    cfg = json.loads(json.dumps(cpt_config))
    cfg["method"]["dropout"] = 0.1  # training draws from torch's RNG: the evaluations must not move it
    cfg["train"].update(max_steps=6, save_every=2, grad_accum=2, threads=1, precision="fp32", lr=5e-3)
    return cfg


def _adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.adapter_dir / "adapter_model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_with_evals_during_training_ends_bit_identical(exact_config, tmp_path):
    straight = train({**exact_config, "output_dir": str(tmp_path / "straight")}, progress=False)
    cut = {**exact_config, "output_dir": str(tmp_path / "cut")}
    with ctrl_c_at(5), pytest.raises(KeyboardInterrupt):  # after the step-4 checkpoint and evaluation
        train(cut, progress=False)
    resumed = train(cut, resume=True, progress=False)
    assert _same(_adapter(straight), _adapter(resumed))
    key = "eval/topics_heldout/perplexity"
    a = _curve(read_metrics(straight.run_dir / "metrics.jsonl"), key)
    b = _curve(read_metrics(resumed.run_dir / "metrics.jsonl"), key)
    assert a == b and [s for s, _ in a] == [0, 2, 4, 6]  # each step once: the resumed run logs none twice

    # every (like name and role) decides only what is evaluated and logged: a resume may change it
    changed = {**exact_config, "output_dir": str(tmp_path / "changed")}
    with ctrl_c_at(3), pytest.raises(KeyboardInterrupt):
        train(changed, progress=False)
    changed["evals"] = [{**e, "every": 1} for e in changed["evals"]]
    again = train(changed, resume=True, progress=False)
    assert _same(_adapter(straight), _adapter(again))
    steps = [s for s, _ in _curve(read_metrics(again.run_dir / "metrics.jsonl"), key)]
    assert steps == [0, 2, 3, 4, 5, 6]  # every 2 up to the checkpoint at step 2, then every step


def _drawing_evaluate(*args, **kwargs):
    """An evaluation that draws from every random stream (as a sampling one would)."""
    torch.rand(1000)
    random.random()
    np.random.rand(10)
    return finetune_evaluate(*args, **kwargs)


finetune_evaluate = finetune.evaluate


def test_evaluations_during_training_leave_the_random_streams_alone(exact_config, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, "evaluate", _drawing_evaluate)  # before and after training too, in both runs
    plain = json.loads(json.dumps(exact_config))
    for e in plain["evals"]:
        e.pop("every", None)
    reference = _adapter(train({**plain, "output_dir": str(tmp_path / "plain")}, progress=False))
    every_step = json.loads(json.dumps(exact_config))
    every_step["evals"][0]["every"] = 1
    assert _same(reference, _adapter(train({**every_step, "output_dir": str(tmp_path / "evals")}, progress=False)))

    # the check can fail: the same evaluations without the loop's isolation move the dropout masks
    monkeypatch.setattr(Trainer, "evaluate_during_training", lambda self, step: self.step_evals(step))
    moved = _adapter(train({**every_step, "output_dir": str(tmp_path / "bare")}, progress=False))
    assert not _same(reference, moved)


def test_config_errors_name_the_entry(run_config):
    def problems(**entry):
        cfg = {**run_config, "evals": [{"task": "perplexity", "data": ["a.txt"], **entry}]}
        with pytest.raises(ConfigError) as err:
            load_run_config(cfg)
        return str(err.value)

    assert "evals[0].every: must be >= 0 (0: only before and after training), got -1" in problems(every=-1)
    assert "evals[0].role: 'forgetting' is not one of 'target', 'retention'" in problems(role="forgetting")
    assert "evals[0].name: 'a/b' must be non-empty, without '/' or spaces" in problems(name="a/b")
    cfg = {**run_config, "evals": [{"task": "perplexity", "data": ["a.txt"], "name": "en"},
                                   {"task": "perplexity", "data": ["b.txt"], "name": "en"}]}
    with pytest.raises(ConfigError, match=r"evals\[1\]\.name: 'en' is also the name of evals\[0\]"):
        load_run_config(cfg)
    # role and every are read by every task: they are not refused as settings the task does not read
    assert EvalConfig(task="generation", data=["a.jsonl"], role="retention", every=5).check() == []


def test_default_names_are_the_file_stems_made_unique():
    def cfg(task: str, path: str, name: str | None = None) -> EvalConfig:
        return EvalConfig(task=task, data=[path], name=name)
    assert eval_names([cfg("perplexity", "data/de_heldout.txt"), cfg("perplexity", "en/val.jsonl"),
                       cfg("completion_loss", "val.jsonl"), cfg("perplexity", "data/*.txt"),
                       cfg("perplexity", "x/val.jsonl"), cfg("perplexity", "q.txt", name="mine")]) == [
        "de_heldout", "val-perplexity-1", "val-completion_loss", "perplexity", "val-perplexity-4", "mine"]


def test_the_plot_has_a_panel_per_metric_and_a_curve_per_evaluation(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.update(fig=fig, path=path))
    records = [{"step": 0, "eval/de/perplexity": 50.0, "eval/de/nll": 3.9, "eval/en/perplexity": 20.0,
                "eval/mc/accuracy": 0.5, "eval/mc/per_class_accuracy[a]": 0.4},
               {"step": 1, "loss": 3.0},
               {"step": 2, "eval/de/perplexity": 40.0, "eval/de/nll": 3.7},
               {"step": 4, "eval/de/perplexity": 30.0, "eval/de/nll": 3.4, "eval/en/perplexity": 22.0,
                "eval/mc/accuracy": 0.45}]
    roles = {"de": "target", "en": "retention", "mc": "retention"}
    metrics = {"de": ["perplexity"], "en": ["perplexity"], "mc": ["accuracy"]}
    assert plot_evals(records, tmp_path / "evals.png", roles, metrics=metrics) == tmp_path / "evals.png"
    axes = drawn["fig"].axes
    assert [ax.get_title() for ax in axes] == ["perplexity", "accuracy"]  # nll and per-class not drawn
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle())
              for ax in axes for line in ax.get_lines()}
    assert curves == {"de (target)": ([0, 2, 4], [50.0, 40.0, 30.0], "-"),
                      "en (retention)": ([0, 4], [20.0, 22.0], "--"),
                      "mc (retention)": ([0, 4], [0.5, 0.45], "--")}
    assert plot_evals([{"step": 1, "loss": 3.0}], tmp_path / "none.png", roles) is None
