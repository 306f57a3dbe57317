import math

import pytest

from lmadapt.config import brief, parse_overrides, read_yaml
from lmadapt.errors import ConfigError
from lmadapt.methods import available_methods
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


# --- YAML that parses but that a config cannot hold ----------------------------------------------

@pytest.mark.parametrize("raw,problem", [
    (b"train:\n  seed: " + b"7" * 5000 + b"\n", "line 2, column 9: number too long (5,000 digits; at most 4,300)"),
    (b"a: " + b"[" * 150 + b"]" * 150 + b"\n", "line 1, column 103: nested too deeply (more than 100 levels)"),
    (b"train:\n  seed: 1\noutput_dir: 2024-13-45\n",
     "line 3, column 13: '2024-13-45' is not a valid date (month must be in 1..12); quote it to use it as text"),
    (b"x: 2024-01-01 25:00:00\n",
     "line 1, column 4: '2024-01-01 25:00:00' is not a valid date (hour must be in 0..23); quote it to use it as text"),
    (b"train:\n  lr: 1e-4\x00\n",
     "line 2, column 11: not valid YAML (the character U+0000 is not allowed in YAML; remove it)"),
    (b"train:\n  lr: 1e-4\n  note: caf\xe9\n", "line 3, column 12: not valid UTF-8 (byte 0xe9); save it as UTF-8"),
    ("a: 1\n".encode("utf-16"),
     "line 1, column 1: not valid UTF-8 (byte 0xff) (it looks like UTF-16); save it as UTF-8"),
    (b"x: !!int abc\n",
     "line 1, column 4: 'abc' cannot be read as int (invalid literal for int() with base 10: 'abc')"),
    # six levels of ten aliases: 1 + 10 * (1 + 10 * (... 11)) = 1,111,111 values from a 7-line file
    ("\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] +
               [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]).encode(),
     "line 6, column 5: aliases expand this value to 1,111,111 values (at most 1,000,000); write the value out"),
], ids=["bigint", "deep", "bad-date", "bad-time", "nul", "latin1", "utf16", "int-tag", "alias-bomb"])
def test_yaml_python_cannot_hold_is_named_by_line_and_column(raw, problem, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as err:
        read_yaml(path)
    assert err.value.problems == [f"{path} {problem}"]


def test_valid_dates_stay_the_text_written(tmp_path, run_config):
    path = tmp_path / "cfg.yaml"
    path.write_text("output_dir: 2024-01-02\nnote: 2024-01-02 10:00:00\n")
    assert read_yaml(path) == {"output_dir": "2024-01-02", "note": "2024-01-02 10:00:00"}
    assert load_run_config(run_config, ["output_dir=2024-01-02"]).output_dir == "2024-01-02"


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as err:
        read_yaml(tmp_path)
    assert err.value.problems == [f"{tmp_path} is a directory; give the YAML config file in it"]


def test_overrides_python_cannot_hold_name_the_override():
    with pytest.raises(ConfigError) as err:
        parse_overrides(["train.seed=" + "7" * 5000, "output_dir=" + "[" * 200 + "]" * 200, "x=2024-13-45",
                         "train.lr=1e-4"])
    assert err.value.problems == [  # a long override is shown as its first 37 and last 38 characters
        f"override 'train.seed={'7' * 26}...{'7' * 38}': number too long (5,000 digits; at most 4,300)",
        f"override 'output_dir={'[' * 26}...{']' * 38}': nested too deeply (more than 100 levels)",
        "override 'x=2024-13-45': '2024-13-45' is not a valid date (month must be in 1..12); quote it to use it "
        "as text",
    ]
    assert parse_overrides(["x=[", "y=*z", "z="]) == {"x": "[", "y": "*z", "z": ""}  # not YAML: kept as text


@pytest.mark.parametrize("name,got", [([1], "list [1]"), (5, "int 5"), (None, "null"),
                                      ({"a": "lora"}, "dict {'a': 'lora'}")])
def test_a_method_name_that_is_not_a_string(name, got, run_config):
    with pytest.raises(ConfigError) as err:
        load_run_config({**run_config, "method": {"name": name}})
    assert err.value.problems == [f"method.name: expected a method name (a string), got {got}. "
                                  f"Available: {', '.join(sorted(available_methods()))}"]
    assert {"lora", "full", "freeze", "dora", "pissa"} <= set(available_methods())
    with pytest.raises(ConfigError) as err:
        load_run_config(run_config, ["method.name=[lora]"])
    assert err.value.problems[0].startswith("method.name: expected a method name (a string), got list ['lora']")


def test_long_values_are_shortened_in_messages(run_config):
    huge = [["x"] * 10] * 10_000  # 100,000 strings, as a YAML alias bomb gives
    with pytest.raises(ConfigError) as err:
        load_run_config({**run_config, "output_dir": huge})
    (problem,) = err.value.problems
    assert problem.startswith("output_dir: expected str, got list [['x', 'x', 'x', 'x', 'x', 'x', ...], ")
    assert len(problem) <= len("output_dir: expected str, got list ") + 200
    assert brief("y" * 1000) == "'" + "y" * 37 + "..." + "y" * 38 + "'"
    assert len(brief(list(range(10**6)), limit=50)) <= 50
