"""The public API and the command line over it: each ``lmadapt`` command is one :mod:`lmadapt.api` call.

``lmadapt.steer`` (generation from model paths, optionally steered) must give, token for token, what
``steered_generate`` / ``generate`` give on the same models loaded by hand, and ``lmadapt generate`` must
print exactly that; inconsistent steering arguments are refused together, before anything loads, named
as the caller spelled them (keyword arguments in Python, flags on the command line).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

import lmadapt
from lmadapt.adapters.format import save_adapter
from lmadapt.api import config_reference, evaluate_model, load
from lmadapt.cli import main
from lmadapt.cli.generate import FLAG_NAMES
from lmadapt.config import describe
from lmadapt.decoding.generation import generate
from lmadapt.decoding.steering import steered_generate
from lmadapt.decoding.value_model import ValueModel, load_value_model, save_value_model
from lmadapt.errors import LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.run import evaluate
from lmadapt.methods import available_methods, build_method
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.tree import adapters_disabled
from lmadapt.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """The tiny base model's folder, a random LoRA adapter for it, a second (tuned) model, two value models."""
    root = tmp_path_factory.mktemp("api")
    model = tiny_llama()
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "init": "random"})
    method.apply(model)
    adapter = save_adapter(model, method, root / "adapter", base_model="tiny-llama",
                           base_fingerprint=fingerprint(tiny_llama()))
    tuned = root / "tuned"
    tiny_llama(seed=1).save_pretrained(tuned)
    tiny_tokenizer().save_pretrained(tuned)
    values = []
    for seed in (5, 6):
        vm = ValueModel(tiny_llama(seed=seed), tiny_tokenizer())
        with torch.no_grad():  # a random head: a zero one values every token alike and VAS changes nothing
            vm.value_head.weight.normal_(generator=torch.Generator().manual_seed(seed))
        values.append(save_value_model(vm, root / f"value{seed}"))
    return {"model": str(tiny_model_dir), "adapter": str(adapter), "tuned": str(tuned),
            "value5": str(values[0]), "value6": str(values[1])}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# (lmadapt generate flags, lmadapt.steer keyword arguments, the steered_generate arguments on loaded models)
CASES = {
    "adapter expert": (
        ["--proxy-small-model", "{model}", "--proxy-expert-adapter", "{adapter}", "--proxy-beta", "2",
         "--expert-chat"],
        {"small_model": "{model}", "expert_adapter": "{adapter}", "beta": 2.0, "expert_chat": True},
        lambda f: {"expert": load(f["model"], f["adapter"])[0], "beta": 2.0, "expert_chat": True}),
    "expert and anti-expert": (
        ["--proxy-expert", "{tuned}", "--proxy-anti-expert", "{model}", "--proxy-beta", "3"],
        {"expert": "{tuned}", "anti_expert": "{model}", "beta": 3.0},
        lambda f: {"expert": load(f["tuned"])[0], "anti_expert": load(f["model"])[0], "beta": 3.0}),
    "two value models": (
        ["--value-model", "{value5}", "--value-model", "{value6}", "--value-beta", "40", "--value-beta", "-30",
         "--vas-top-k", "3"],
        {"value_models": ["{value5}", "{value6}"], "value_betas": [40.0, -30.0], "vas_top_k": 3},
        lambda f: {"values": [(load_value_model(f["value5"])[0], 40.0), (load_value_model(f["value6"])[0], -30.0)],
                   "vas_top_k": 3}),
}


def filled(spec, f: dict[str, str]):
    if isinstance(spec, str):
        return spec.format(**f)
    if isinstance(spec, list):
        return [filled(s, f) for s in spec]
    if isinstance(spec, dict):
        return {k: filled(v, f) for k, v in spec.items()}
    return spec


@pytest.mark.parametrize("case", sorted(CASES))
def test_steer_from_paths_equals_steered_generate_and_the_command_line(folders, capsys, case):
    flags, kwargs, reference = CASES[case]
    prompts, n = ["Hi", "Once upon a time"], 8
    base, tok, _ = load(folders["model"])
    expected = steered_generate(base, tok, prompts, max_new_tokens=n, **reference(folders))
    plain = generate(base, tok, prompts, max_new_tokens=n)
    assert expected != plain  # the steering changes the greedy text, so passing it through is checked

    assert lmadapt.steer(folders["model"], prompts, max_new_tokens=n, **filled(kwargs, folders)) == expected
    argv = ["--model", folders["model"], "--max-new-tokens", str(n), *filled(flags, folders)]
    code, out, err = cli(capsys, *argv, "--prompt", prompts[0], "--prompt", prompts[1])
    assert code == 0, err
    assert out == "".join(f"### {p}\n{text}\n\n" for p, text in zip(prompts, expected))
    code, out, err = cli(capsys, *argv, "--prompt", prompts[0])  # one prompt: streamed
    assert code == 0, err
    assert out == expected[0] + "\n"


def test_steer_without_steering_is_plain_generation_with_the_adapter(folders, capsys):
    model, tok, _ = load(folders["model"], folders["adapter"])
    expected = generate(model, tok, ["Hi", "Yo"], max_new_tokens=6, chat=True)
    assert lmadapt.steer(folders["model"], ["Hi", "Yo"], adapter=folders["adapter"], max_new_tokens=6,
                         chat=True) == expected
    code, out, err = cli(capsys, "--model", folders["model"], "--adapter", folders["adapter"], "--chat",
                         "--max-new-tokens", "6", "--prompt", "Hi", "--prompt", "Yo")
    assert code == 0, err
    assert out == f"### Hi\n{expected[0]}\n\n### Yo\n{expected[1]}\n\n"


def test_sampled_steer_with_a_seed_equals_steered_generate(folders):
    base, tok, _ = load(folders["model"])
    vm, _ = load_value_model(folders["value5"])
    kw = {"temperature": 1.0, "seed": 3, "max_new_tokens": 8}
    expected = steered_generate(base, tok, ["Hi"], values=[(vm, 0.0)], vas_top_k=4, **kw)
    assert lmadapt.steer(folders["model"], ["Hi"], value_models=[folders["value5"]], value_betas=[0.0],
                         vas_top_k=4, **kw) == expected


# keyword arguments, the part of the message that names them
PROBLEMS = [
    ({"beta": 2.0}, "{beta} needs an expert"),
    ({"expert_chat": True}, "{expert_chat} needs an expert"),
    ({"expert": "x"}, "{expert} and {anti_expert} go together"),
    ({"expert_adapter": "x"}, "{expert_adapter} needs {small_model}"),
    ({"small_model": "x"}, "{small_model} needs {expert_adapter}"),
    ({"small_model": "x", "expert_adapter": "y", "expert": "a", "anti_expert": "b"}, "Choose one"),
    ({"value_models": ["v"], "value_betas": [1.0, 2.0]}, "{value_betas}: 2 weight(s) for 1 value model(s) in {value_models}"),
    ({"vas_top_k": 4}, "{vas_top_k} needs a value model in {value_models}"),
]


def test_one_value_model_folder_not_in_a_list_is_refused():
    with pytest.raises(LmadaptError, match="value_models is a list of value-model folders; got the single 'v'"):
        lmadapt.steer("no/such/model", ["Hi"], value_models="v")
FLAGS = {"small_model": "--proxy-small-model", "expert_adapter": "--proxy-expert-adapter", "expert": "--proxy-expert",
         "anti_expert": "--proxy-anti-expert", "beta": "--proxy-beta", "expert_chat": "--expert-chat",
         "value_models": "--value-model", "value_betas": "--value-beta", "vas_top_k": "--vas-top-k"}


def as_flags(kwargs: dict) -> list[str]:
    argv = []
    for key, value in kwargs.items():
        for item in value if isinstance(value, list) else [value]:
            argv += [FLAGS[key]] if item is True else [FLAGS[key], str(item)]
    return argv


def test_the_command_line_names_every_steer_argument_by_its_flag():
    assert FLAG_NAMES == FLAGS


@pytest.mark.parametrize("kwargs, message", PROBLEMS)
def test_inconsistent_steering_is_refused_before_loading_naming_the_keywords(kwargs, message):
    with pytest.raises(LmadaptError) as err:  # the model does not exist: the check runs before any load
        lmadapt.steer("no/such/model", ["Hi"], **kwargs)
    assert message.format(**{k: k for k in FLAGS}) in str(err.value)


@pytest.mark.parametrize("kwargs, message", PROBLEMS)
def test_inconsistent_steering_flags_are_refused_naming_the_flags(capsys, kwargs, message):
    code, _, err = cli(capsys, "--model", "no/such/model", "--prompt", "Hi", *as_flags(kwargs))
    assert code == 2
    assert message.format(**FLAGS) in err


def test_every_steering_problem_is_reported_at_once():
    with pytest.raises(LmadaptError) as err:
        lmadapt.steer("no/such/model", ["Hi"], beta=1.0, vas_top_k=3, expert="x")
    text = str(err.value)
    assert "expert and anti_expert go together" in text and "vas_top_k needs a value model" in text
    assert "beta needs an expert" not in text  # there is an expert, only without its anti-expert


def test_models_with_another_vocabulary_are_refused_naming_the_flag_and_folder(folders, tmp_path, capsys):
    bigger = tiny_tokenizer()
    bigger.add_tokens(["abc"])
    value = save_value_model(ValueModel(tiny_llama(seed=5, vocab_size=261), bigger), tmp_path / "value")
    anti = tmp_path / "anti"
    tiny_llama(vocab_size=261).save_pretrained(anti)
    bigger.save_pretrained(anti)
    for argv, named in ((["--value-model", str(value)], f"the --value-model {value} tokenizer differs"),
                        (["--proxy-expert", folders["tuned"], "--proxy-anti-expert", str(anti)],
                         f"the --proxy-anti-expert {anti} tokenizer differs")):
        code, _, err = cli(capsys, "--model", folders["model"], "--prompt", "Hi", *argv)
        assert code == 2 and named in err and "id 260: (none) vs 'abc'" in err
    with pytest.raises(LmadaptError, match=f"the value_models {value} tokenizer differs"):
        lmadapt.steer(folders["model"], ["Hi"], value_models=[str(value)])


# --- the other commands' calls ------------------------------------------------------------------------------
def test_evaluate_model_with_compare_equals_evaluate_with_the_adapter_on_and_off(folders, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    write_jsonl(data, [{"prompt": "Text: goal goal\nTopic:", "label": " sport"},
                       {"prompt": "Text: chip\nTopic:", "label": " tech"},
                       {"prompt": "Text: soup\nTopic:", "label": " food"}])
    settings = {"task": "classification", "data": [str(data)]}
    model, tok, _ = load(folders["model"], folders["adapter"])
    cfg = EvalConfig(task="classification", data=[str(data)])
    expected_after = evaluate(model, tok, cfg)
    with adapters_disabled(model):
        expected_before = evaluate(model, tok, cfg)
    assert evaluate_model(folders["model"], settings, folders["adapter"], compare=True) == (expected_after,
                                                                                          expected_before)
    assert evaluate_model(folders["model"], cfg, folders["adapter"]) == (expected_after, None)
    base, _, _ = load(folders["model"])
    assert evaluate_model(folders["model"], cfg)[0] == evaluate(base, tok, cfg) == expected_before
    with pytest.raises(LmadaptError, match="give adapter="):
        evaluate_model(folders["model"], cfg, compare=True)
    assert main(["eval", "--model", folders["model"], "--task", "classification", "--data", str(data),
                 "--compare"]) == 2
    assert "--compare evaluates the model with and without its adapter; give --adapter" in capsys.readouterr().err


def test_config_reference_lists_the_run_config_and_every_methods_keys(capsys):
    rows = config_reference()
    keys = [row[0] for row in rows]
    assert keys[:len(describe(lmadapt.RunConfig))] == [row[0] for row in describe(lmadapt.RunConfig)]
    assert "method.r  [lora]" in keys and "train.lr" in keys
    assert {k.split("[")[1].rstrip("]") for k in keys if k.startswith("method.")} == set(available_methods())
    assert main(["config-help"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[::2] == [f"{key}: {tp} = {default}" for key, tp, default, _ in rows]


def test_the_entry_points_run_the_package_main():
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "lmadapt"]
    assert entry.load() is main
    for module in ("lmadapt", "lmadapt.cli"):
        res = subprocess.run([sys.executable, "-m", module, "inspect", str(Path(__file__).parent / "nothere")],
                             check=False, capture_output=True, text=True)
        assert res.returncode == 2 and "lmadapt inspect: error:" in res.stderr and "nothere" in res.stderr
