import math

import pytest

from lmadapt.config import parse_overrides
from lmadapt.errors import ConfigError
from lmadapt.recipes.finetune import load_run_config
from lmadapt.training.schedules import lr_factor


def test_unknown_keys_get_did_you_mean_and_all_errors_are_reported_together(run_config):
    bad = dict(run_config)
    bad["train"] = {**run_config["train"], "learning_rate": 1e-3, "batch_size": "eight"}
    bad["method"] = {"name": "lora", "rank": 4}
    bad["data"] = {**run_config["data"], "max_lenght": 12}
    with pytest.raises(ConfigError) as err:
        load_run_config(bad)
    msg = str(err.value)
    assert "train.learning_rate: unknown key" in msg
    assert "train.batch_size: expected int, got str 'eight'" in msg
    assert "data.max_lenght: unknown key. Did you mean 'max_length'?" in msg
    assert "method.rank: unknown key" in msg
    assert len(err.value.problems) == 4


def test_unknown_method_and_bad_literal(run_config):
    bad = {**run_config, "method": {"name": "lorra"}, "train": {"precision": "bf61"}}
    with pytest.raises(ConfigError) as err:
        load_run_config(bad)
    msg = str(err.value)
    assert "unknown method 'lorra'. Did you mean 'lora'?" in msg
    assert "train.precision: 'bf61' is not one of 'fp32', 'bf16', 'fp16', 'auto'" in msg


def test_cross_field_checks_name_the_key(run_config):
    bad = {**run_config, "method": {"name": "lora", "r": 0}, "train": {"lr": -1}}
    with pytest.raises(ConfigError) as err:
        load_run_config(bad)
    assert "method.r: must be >= 1, got 0" in str(err.value)
    assert "train.lr: must be > 0, got -1.0" in str(err.value)


def test_overrides_are_typed_and_nested(run_config):
    assert parse_overrides(["train.lr=1e-4", "method.r=8", "data.batching=packed"]) == {
        "train": {"lr": 1e-4}, "method": {"r": 8}, "data": {"batching": "packed"}}
    cfg = load_run_config(run_config, ["train.lr=1e-4", "method.r=16", "method.target_modules=[q_proj]"])
    assert cfg.train.lr == 1e-4 and cfg.method["r"] == 16 and cfg.method["target_modules"] == ["q_proj"]
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["train.lr"])


def test_yaml_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1e-4\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+, column \d+: not valid YAML"):
        load_run_config(path)


def test_method_may_be_given_as_a_name(run_config):
    cfg = load_run_config({**run_config, "method": "full"})
    assert cfg.method == {"name": "full"}


@pytest.mark.parametrize(
    "schedule,step,expected",
    [
        ("constant", 5, 1.0),
        ("linear", 1, 1.0),           # warm-up is step 0; decay progress = (step - 1) / 5
        ("linear", 3, 0.6),
        ("linear", 5, 0.2),
        ("cosine", 3, 0.5 * (1 + math.cos(math.pi * 2 / 5))),
        ("wsd", 3, 1.0),              # stable until the last 40% (steps 4 and 5)
        ("wsd", 4, 1.0),
        ("wsd", 5, 0.5),
    ],
)
def test_schedules_against_hand_values(schedule, step, expected):
    got = lr_factor(step, total=6, warmup=1, schedule=schedule, decay_ratio=0.4)
    assert got == pytest.approx(expected, abs=1e-9)
    assert lr_factor(0, total=6, warmup=2, schedule=schedule) == pytest.approx(0.5)


def test_training_without_data_names_the_key(run_config):
    run_config["data"].pop("train")
    with pytest.raises(ConfigError, match=r"data.train: required to train"):
        load_run_config(run_config)
