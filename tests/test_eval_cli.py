"""``lmadapt eval`` and ``lmadapt generate`` flags, and the progress they show.

The command line's results are compared with the library calls given the same settings; the progress status
lines are checked against a fake clock.
"""

import json
from pathlib import Path

import pytest
import torch

import lmadapt.api as api
import lmadapt.progress as progress
from lmadapt.api import load
from lmadapt.cli import main
from lmadapt.decoding.generation import generate
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.predictions import read_predictions
from lmadapt.evaluation.report import result_table
from lmadapt.evaluation.run import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

TOPICS = [{"prompt": "Text: goal team\nTopic:", "completion": " sport"},
          {"prompt": "Text: chip code\nTopic:", "completion": " tech"},
          {"prompt": "Text: soup bread\nTopic:", "completion": " food"}]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def adapter(tmp_path):
    from lmadapt.adapters.format import save_adapter
    from lmadapt.methods import build_method
    from lmadapt.testing import tiny_llama

    tuned = tiny_llama()
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "init": "random"})
    method.apply(tuned)
    return str(save_adapter(tuned, method, tmp_path / "adapter", base_model="tiny", base_fingerprint=None))


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------------ lmadapt eval

def test_eval_flags_set_the_evaluation_settings(tmp_path, tiny_model_dir, adapter, capsys):
    data = _jsonl(tmp_path / "pc.jsonl", TOPICS)
    preds = tmp_path / "preds.jsonl"
    code, out, err = _cli(capsys, "eval", "--model", str(tiny_model_dir), "--adapter", adapter, "--task",
                          "generation", "--data", data, "--chat", "--system-prompt", "Be brief.", "--max-new-tokens",
                          "3", "--match", "exact", "--batch-size", "2", "--threads", "1", "--predictions", str(preds),
                          "--json")
    assert code == 0, err
    model, tok, _ = load(str(tiny_model_dir), adapter)
    cfg = EvalConfig(task="generation", data=[data], chat=True, system_prompt="Be brief.", max_new_tokens=3,
                     match="exact", batch_size=2)
    expected = evaluate(model, tok, cfg, progress=False, predictions=tmp_path / "ref.jsonl")
    assert json.loads(out) == json.loads(json.dumps(expected))
    assert read_predictions(preds) == read_predictions(tmp_path / "ref.jsonl")
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["prompt"]}] for r in TOPICS]
    direct = [o.lstrip().split("\n")[0] for o in generate(model, tok, prompts, max_new_tokens=3)]
    assert [p["prediction"] for p in read_predictions(preds)] == direct


def test_eval_json_with_compare_holds_both_results_and_the_table_is_the_default(tmp_path, tiny_model_dir, adapter,
                                                                                  capsys):
    data = _jsonl(tmp_path / "pc.jsonl", TOPICS)
    common = ["eval", "--model", str(tiny_model_dir), "--adapter", adapter, "--task", "completion_loss", "--data",
              data, "--threads", "1"]
    code, out, err = _cli(capsys, *common, "--compare", "--json")
    assert code == 0, err
    both = json.loads(out)
    model, tok, _ = load(str(tiny_model_dir), adapter)
    cfg = EvalConfig(task="completion_loss", data=[data])
    assert both["adapted"]["nll"] == pytest.approx(evaluate(model, tok, cfg, progress=False)["nll"], rel=1e-6)
    assert both["base"]["nll"] != pytest.approx(both["adapted"]["nll"], rel=1e-6)
    code, out, _ = _cli(capsys, *common)
    assert code == 0
    assert out.strip() == result_table([("completion_loss", both["adapted"])]).strip()
    assert out.splitlines()[2].split()[:2] == ["completion_loss", "nll"]


def test_a_flag_the_task_does_not_read_is_refused_by_its_name(tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "pc.jsonl", TOPICS)
    code, _, err = _cli(capsys, "eval", "--model", str(tiny_model_dir), "--task", "classification", "--data", data,
                        "--max-new-tokens", "3", "--threads", "1")
    assert code == 2
    assert "--max-new-tokens: task 'classification' does not read this setting" in err
    code, _, err = _cli(capsys, "eval", "--model", str(tiny_model_dir), "--task", "generation", "--data", data,
                        "--system-prompt", "x", "--no-chat", "--threads", "1")
    assert code == 2 and "--system-prompt: only used with chat: true" in err
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--task", "generation", "--data", data, "--threads", "-1"])
    assert exit_.value.code == 2 and "--threads: must be >= 0" in capsys.readouterr().err


def test_threads_are_chosen_like_trains_and_put_back(tmp_path, tiny_model_dir, monkeypatch, capsys):
    data = _jsonl(tmp_path / "pc.jsonl", TOPICS)
    seen, asked = [], []
    real = api.evaluate
    monkeypatch.setattr(api, "evaluate", lambda *a, **kw: seen.append(torch.get_num_threads()) or real(*a, **kw))
    monkeypatch.setattr(api, "choose_threads", lambda n: asked.append(n) or (n if n > 0 else 3))
    before = torch.get_num_threads()
    argv = ["eval", "--model", str(tiny_model_dir), "--task", "completion_loss", "--data", data]
    assert main(argv) == 0 and main([*argv, "--threads", "2"]) == 0
    assert asked == [0, 2] and seen == [3, 2] and torch.get_num_threads() == before
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------ lmadapt generate

def test_generate_jsonl_prints_one_object_per_prompt_in_order(tiny_model_dir, capsys):
    prompts = ["Hello", "Once upon a time", "Q:"]
    argv = ["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--jsonl", "--threads", "1"]
    for p in prompts:
        argv += ["--prompt", p]
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    model, tok, _ = load(str(tiny_model_dir))
    expected = generate(model, tok, prompts, max_new_tokens=4)
    assert [json.loads(line) for line in out.splitlines()] == [{"prompt": p, "output": o}
                                                              for p, o in zip(prompts, expected)]
    code, out, _ = _cli(capsys, "generate", "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--jsonl",
                        "--threads", "1", "--prompt", "Hello")  # one prompt: JSONL too, not streamed
    assert code == 0 and json.loads(out) == {"prompt": "Hello", "output": expected[0]}


# ------------------------------------------------------------------------------------------------ progress

class _Clock:
    """The clock of lmadapt.progress: each reading is ``step`` seconds after the previous one (the first is 0)."""

    def __init__(self, step: float) -> None:
        self.now, self.step = -step, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_off_a_terminal_a_status_line_is_written_every_30_seconds(model, tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(progress, "_now", _Clock(10.0))
    rows = [{"prompt": f"Text {i}\nTopic:", "label": " sport" if i % 2 else " tech"} for i in range(7)]
    from lmadapt.evaluation.tasks.classification import classification_accuracy

    classification_accuracy(model, tokenizer, rows, [" sport", " tech"], progress=None)
    # the clock reads 0 at the start and +10 s per example: lines at 30 and 60 s, and a last one at the end
    assert capsys.readouterr().err.splitlines() == ["eval classification: 3/7 examples, 30 s",
                                                    "eval classification: 6/7 examples, 60 s",
                                                    "eval classification: 7/7 examples, 80 s"]
    monkeypatch.setattr(progress, "_now", _Clock(1.0))  # a short run writes nothing
    generate(model, tokenizer, ["a", "b", "c"], max_new_tokens=2, batch_size=2, progress=True)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "STATUS_EVERY_S", 0.0)
    generate(model, tokenizer, ["a", "b", "c"], max_new_tokens=2, batch_size=2, progress=True)
    assert capsys.readouterr().err.splitlines() == ["generate: 2/3 prompts, 1 s", "generate: 3/3 prompts, 2 s"]
    generate(model, tokenizer, ["a", "b", "c"], max_new_tokens=2, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""


def test_on_a_terminal_a_tqdm_bar_is_drawn(model, tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "_is_terminal", lambda stream: True)
    monkeypatch.setattr(progress, "STATUS_EVERY_S", 0.0)
    texts = _jsonl(tmp_path / "texts.jsonl", [{"text": "some text to score"}, {"text": "more text"}])
    evaluate(model, tokenizer, EvalConfig(task="perplexity", data=[texts], batch_size=1), progress=None)
    err = capsys.readouterr().err
    assert "eval perplexity" in err and "\r" in err and "batches, " not in err  # a bar, not status lines
