"""What a new user meets on the command line: overrides anywhere, whole-section overrides, ``--version``, errors
that name the subcommand and the nearest flag, ``inspect`` on every kind of folder and on built-in names, the
dry run (``lmadapt train --dry-run`` / ``lmadapt.preview``), and config paths relative to the working directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

import lmadapt
from lmadapt.api import preview
from lmadapt.cli import main, parse
from lmadapt.config import ConfigError, deep_merge, parse_overrides
from lmadapt.data import DataConfig, load_splits
from lmadapt.decoding.value_model import ValueModel, save_value_model
from lmadapt.errors import LmadaptError
from lmadapt.models.loading import load_tokenizer
from lmadapt.recipes.dry_run import LOSS_END, LOSS_START
from lmadapt.recipes.finetune import load_run_config, train
from lmadapt.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# ------------------------------------------------------------------------------------------ overrides and flags

@pytest.mark.parametrize("argv, overrides, resume", [
    (["train", "--resume", "cfg.yaml", "lr=1"], ["lr=1"], True),
    (["train", "cfg.yaml", "train.lr=1", "--resume"], ["train.lr=1"], True),
    (["train", "cfg.yaml", "a=1", "--resume", "b=2", "--overwrite", "c=3"], ["a=1", "b=2", "c=3"], True),
    (["make-helper", "cfg.yaml", "--no-progress", "hidden_size=8"], ["hidden_size=8"], False),
])
def test_overrides_may_come_before_or_after_the_flags(argv, overrides, resume):
    args = parse(argv)
    assert (args.config, args.overrides, args.resume) == ("cfg.yaml", overrides, resume)


def test_a_mapping_override_replaces_the_section_and_a_dotted_one_merges(run_config):
    yaml_cfg = {**run_config, "objective": {"name": "distill", "temperature": 2.0}}
    cfg = load_run_config(yaml_cfg, ["method={name: full}", "objective={name: causal_lm}"])
    assert cfg.method == {"name": "full"} and cfg.objective == {"name": "causal_lm"}
    assert cfg.data.validation_fraction == 0.125  # other sections untouched
    with pytest.raises(ConfigError) as err:  # a dotted name change keeps the YAML's LoRA fields
        load_run_config(yaml_cfg, ["method.name=full"])
    assert "method.r" in str(err.value)
    merged = deep_merge({"train": {"lr": 1.0, "seed": 3}}, parse_overrides(["train.lr=2", "train={lr: 5}",
                                                                             "train.batch_size=4"]))
    assert merged == {"train": {"lr": 5, "batch_size": 4}}  # later overrides apply on top, in order
    assert type(merged["train"]) is dict  # plain dicts: config.yaml can be written from it


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"lmadapt {lmadapt.__version__}\n"


@pytest.mark.parametrize("argv, message", [
    (["train", "--resum", "cfg.yaml"], "lmadapt train: unknown flag --resum; did you mean --resume?"),
    (["train", "cfg.yaml", "--res"], "lmadapt train: unknown flag --res"),  # no abbreviations
    (["eval", "--task", "perplexity", "--data", "x", "--max-exmaples", "3"],
     "lmadapt eval: unknown flag --max-exmaples; did you mean --max-examples?"),
    (["eval", "--task", "perplexity", "--data", "x", "--dtype", "fp33"],
     "lmadapt eval: error: argument --dtype: invalid choice: 'fp33'"),
    (["trian", "cfg.yaml"], "lmadapt: error: argument command: invalid choice: 'trian'"),
    (["inspect", "a", "b"], "lmadapt inspect: error: unexpected argument 'b'"),
    (["train", "--resume"], "lmadapt train: error: the following arguments are required: config\n"),
])
def test_argument_errors_name_the_subcommand_and_the_nearest_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and message in err, err
    if "fp33" in message:
        assert err.rstrip().endswith("; did you mean fp32?")
    if "trian" in message:
        assert err.rstrip().endswith("; did you mean train?")


# ------------------------------------------------------------------------------------------ inspect

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("inspect")
    write_jsonl(root / "train.jsonl", [{"prompt": f"{i} +", "completion": f" {i + 1}"} for i in range(12)])
    cfg = {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": [str(root / "train.jsonl")]},
           "method": {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj"]},
           "train": {"batch_size": 4, "max_steps": 4, "save_every": 2, "tensorboard": False, "threads": 1},
           "output_dir": str(root / "run")}
    train(cfg, progress=False)
    return root / "run"


def test_inspect_recognises_train_runs_finished_or_not(finished_run, tmp_path):
    out = lmadapt.inspect(finished_run)
    steps = sorted(int(p.name.split("-")[1]) for p in (finished_run / "checkpoints").glob("step-*"))
    assert (out["kind"], out["made_by"], out["finished"], out["checkpoints"]) == ("train_run", "lmadapt train",
                                                                                  True, steps)
    assert steps and out["adapter"]["kind"] == "adapter" and out["adapter"]["parameters"] == 2 * (2 * 64 + 64 * 2)
    report = json.loads((finished_run / "report.json").read_text())
    assert out["run_report"]["steps"] == report["steps"] == 4
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    for step in steps:
        (unfinished / "checkpoints" / f"step-{step:07d}").symlink_to(finished_run / "checkpoints" / f"step-{step:07d}")
    (unfinished / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    out = lmadapt.inspect(unfinished)
    assert (out["kind"], out["finished"], out["checkpoints"], out["adapter"]) == ("train_run", False, steps, None)


def test_inspect_recognises_value_and_helper_models_and_their_runs(tmp_path):
    vas = tmp_path / "vas"
    value = save_value_model(ValueModel(tiny_llama(), tiny_tokenizer(), {"reward": "r:length"}),
                             vas / "values" / "length")
    (vas / "config.yaml").write_text(yaml.safe_dump({"rewards": ["r:length"], "output_dir": str(vas)}))
    write_jsonl(vas / "samples.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    (vas / "report.json").write_text(json.dumps({"samples": 3}))
    out = lmadapt.inspect(value)
    assert (out["kind"], out["hidden_size"], out["value_model"]["reward"]) == ("value_model", 64, "r:length")
    out = lmadapt.inspect(vas)
    assert (out["kind"], out["samples"], sorted(out["value_models"]), out["run_report"]) == \
        ("vas_train_run", 3, ["length"], {"samples": 3})

    helper_run = tmp_path / "helper"
    helper = helper_run / "model"
    tiny_llama().save_pretrained(helper)
    tiny_tokenizer().save_pretrained(helper)
    (helper / "lmadapt_helper.json").write_text(json.dumps({"what": "a small Llama", "parameters": 123,
                                                             "config": {"big": 1}}))
    (helper_run / "config.yaml").write_text(yaml.safe_dump({"tokenizer_from": "x", "output_dir": str(helper_run)}))
    out = lmadapt.inspect(helper)
    assert (out["kind"], out["num_hidden_layers"], out["helper"]) == ("helper_model", 2,
                                                                      {"what": "a small Llama", "parameters": 123})
    out = lmadapt.inspect(helper_run)
    assert (out["kind"], out["finished"], out["model"]["kind"]) == ("make_helper_run", False, "helper_model")


def test_inspect_accepts_builtin_names_without_converting_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMADAPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    out = lmadapt.inspect("smollm2-135m-instruct")
    assert (out["kind"], out["name"], out["converted"]) == ("builtin_model", "smollm2-135m-instruct", False)
    assert out["cache"] == str(tmp_path / "cache" / "models" / "smollm2-135m-instruct")
    assert not (tmp_path / "cache").exists()
    converted = tmp_path / "cache" / "models" / "gemma-3-270m"
    tiny_llama().save_pretrained(converted)
    out = lmadapt.inspect("gemma-3-270m")
    assert out["converted"] is True and out["model"]["vocab_size"] == 260
    assert main(["inspect", "smollm2-13m"]) == 2
    assert "smollm2-135m-instruct" in capsys.readouterr().err  # the built-in names are listed


# ------------------------------------------------------------------------------------------ dry run

def test_preview_renders_the_first_examples_with_their_loss_tokens_and_writes_nothing(run_config, tmp_path):
    before = files_under(tmp_path)
    result = preview(run_config, ["train.max_steps=3"], n=2)
    assert files_under(tmp_path) == before
    tok = load_tokenizer(run_config["model"]["name_or_path"])
    reference, _, report = load_splits(DataConfig(**run_config["data"]), tok)
    rows = [json.loads(line) for line in Path(run_config["data"]["train"][0]).read_text().splitlines()]
    assert len(result.examples) == 2 and result.data == report
    for i, ex in enumerate(result.examples):
        assert (ex.input_ids, ex.labels, ex.source) == (reference.input_ids[i], reference.labels[i],
                                                        reference.sources[i])
        row = rows[int(ex.source.rsplit(":", 1)[1]) - 1]
        assert ex.marked() == f"{row['prompt']}{LOSS_START}{row['completion']}{tok.eos_token}{LOSS_END}"
        assert ex.loss_tokens == len(row["completion"].encode()) + 1  # one token per byte, and EOS
    assert result.trainable_parameters == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # 2 layers, q 64->64, v 64->32
    assert result.config.train.max_steps == 3 and result.chat_template is None


def test_dry_run_on_the_command_line(run_config, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config))
    assert main(["train", str(cfg), "--dry-run", "--examples", "1", "data.use_chat_template=true"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- example 1 of ") and "<|im_start|>assistant\n" + LOSS_START in out
    assert "carry loss" in out and "Data (prompt_completion)" in out and "chat template: tokenizer" in out
    assert "nothing written" in out and "--- example 2" not in out
    assert not Path(run_config["output_dir"]).exists()
    assert main(["train", str(cfg), "--dry-run", "method.target_modules=[nothere]"]) == 2
    assert "nothere" in capsys.readouterr().err  # the method is applied: its targets are checked
    Path(run_config["output_dir"]).mkdir()
    (Path(run_config["output_dir"]) / "x").write_text("")
    assert main(["train", str(cfg), "--dry-run"]) == 2
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ paths

def test_config_paths_are_relative_to_the_working_directory(run_config, tmp_path, monkeypatch):
    """The rule docs/configuration.md states: every path in a config file is relative to where lmadapt runs,
    not to the config file."""
    configs = tmp_path / "configs"
    configs.mkdir()
    write_jsonl(configs / "beside.jsonl", [{"prompt": "a", "completion": " b"}] * 4)
    monkeypatch.chdir(tmp_path)
    here = dict(run_config, output_dir="out", data={"train": ["configs/beside.jsonl"]})
    (configs / "here.yaml").write_text(yaml.safe_dump(here))
    assert preview("configs/here.yaml", n=1).examples[0].marked().startswith("a" + LOSS_START)
    (configs / "beside.yaml").write_text(yaml.safe_dump(dict(here, data={"train": ["beside.jsonl"]})))
    with pytest.raises(LmadaptError, match="beside.jsonl"):
        preview("configs/beside.yaml", n=1)
    os.makedirs("out")
    (tmp_path / "out" / "x").write_text("")  # output_dir: ./out, not configs/out
    with pytest.raises(LmadaptError, match="output folder out already exists"):
        preview("configs/here.yaml", n=1)
