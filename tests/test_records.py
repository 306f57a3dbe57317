"""An adapter remembers how it was made, and eval, generate and merge default to it.

The lmadapt record holds the base model, the chat template the training data went through (name and text)
and the system prompt; ``lmadapt.api`` loads the recorded base when no model is given (and names it when it
is gone), prompts with the recorded template and system prompt unless told otherwise, and ``merge`` writes the
template into the merged tokenizer, which plain transformers then renders exactly as training did. References:
the templates rendered by jinja2 directly, transformers' ``apply_chat_template`` on the merged folder, and the
same calls made with every setting spelled out.
"""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest
import torch
from conftest import make_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmadapt.adapters.format import (
    adapter_metadata,
    load_adapter,
    read_adapter_info,
    save_adapter,
    write_record,
)
from lmadapt.api import (
    base_model,
    chat_settings,
    evaluate_model,
    inspect,
    load,
    merge,
    steer,
)
from lmadapt.cli import main
from lmadapt.config import ConfigError
from lmadapt.data import DataConfig, load_splits
from lmadapt.data.templates import (
    CHATML_TEMPLATE,
    FALLBACK_CHAT_TEMPLATE,
    resolve_chat_template,
)
from lmadapt.data.tokens import IGNORE, render_chat, training_record
from lmadapt.decoding.generation import generate
from lmadapt.errors import AdapterError, LmadaptError
from lmadapt.evaluation.predictions import read_predictions
from lmadapt.methods import build_method
from lmadapt.models.fingerprint import fingerprint
from lmadapt.recipes.finetune import load_run_config, train
from lmadapt.testing import CHATML_TEMPLATE as TESTING_CHATML
from lmadapt.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "Be brief."
CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Text: goal team\nTopic:"}]


def jinja(template: str, messages: list[dict], add_generation_prompt: bool, eos: str = "<|im_end|>") -> str:
    """The reference rendering: the template through jinja2 itself, not through transformers or lmadapt."""
    return jinja2.Template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            eos_token=eos)


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory):
    """A tiny model whose tokenizer has no chat template (as a base model's)."""
    path = tmp_path_factory.mktemp("plain-base")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer(chat_template=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, plain_base):
    """A LoRA run on prompt/completion rows rendered as chat turns with data.chat_template=chatml."""
    root = tmp_path_factory.mktemp("records")
    write_jsonl(root / "train.jsonl", make_rows(16))
    cfg = {"model": {"name_or_path": str(plain_base)},
           "data": {"train": [str(root / "train.jsonl")], "max_length": 96, "use_chat_template": True,
                    "system_prompt": SYSTEM, "chat_template": "chatml"},
           "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "init": "random"},
           "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 2, "tensorboard": False, "threads": 1},
           "output_dir": str(root / "run")}
    result = train(cfg, progress=False)
    eval_rows = [{"prompt": r["prompt"], "label": r["completion"]} for r in make_rows(6, seed=3)]
    write_jsonl(root / "eval.jsonl", eval_rows)
    return {"adapter": result.adapter_dir, "base": plain_base, "eval": root / "eval.jsonl", "root": root}


def test_training_records_the_base_the_template_and_the_system_prompt(trained):
    info = read_adapter_info(trained["adapter"])
    assert info.base_model == str(trained["base"].resolve())
    assert info.chat_template == {"name": "chatml", "template": CHATML_TEMPLATE}
    assert info.system_prompt == SYSTEM
    out = inspect(trained["adapter"])
    assert (out["chat_template"], out["system_prompt"]) == ("chatml", SYSTEM)


def test_the_training_data_is_rendered_with_the_chosen_template(tmp_path):
    rows = make_rows(3)
    write_jsonl(tmp_path / "t.jsonl", rows)
    tok = tiny_tokenizer(chat_template=False)
    cfg = DataConfig(train=[str(tmp_path / "t.jsonl")], use_chat_template=True, system_prompt=SYSTEM,
                     chat_template="chatml", max_length=512)
    data, _, _ = load_splits(cfg, tok)
    for row, ids, labels in zip(rows, data.input_ids, data.labels):
        turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["prompt"]},
                 {"role": "assistant", "content": row["completion"]}]
        assert ids == tok(jinja(CHATML_TEMPLATE, turns, False), add_special_tokens=False)["input_ids"]
        assert tok.decode([i for i, label in zip(ids, labels) if label != IGNORE]) == row["completion"] + "<|im_end|>"


@pytest.mark.parametrize("formats, settings, own_template, expected", [
    ("prompt_completion", {}, True, {"chat_template": None, "system_prompt": None}),
    ("text", {}, False, {"chat_template": None, "system_prompt": None}),
    ("prompt_completion", {"use_chat_template": True, "system_prompt": SYSTEM}, True,
     {"chat_template": {"name": "tokenizer", "template": TESTING_CHATML}, "system_prompt": SYSTEM}),
    ("chat", {}, False, {"chat_template": {"name": "fallback", "template": FALLBACK_CHAT_TEMPLATE},
                         "system_prompt": None}),
    ("chat", {"chat_template": "chatml"}, True,
     {"chat_template": {"name": "chatml", "template": CHATML_TEMPLATE}, "system_prompt": None}),
    ("chat, instruction", {"use_chat_template": True, "system_prompt": SYSTEM}, False,
     {"chat_template": {"name": "fallback", "template": FALLBACK_CHAT_TEMPLATE}, "system_prompt": SYSTEM}),
])
def test_the_record_says_whether_and_which_template_and_system_prompt(formats, settings, own_template, expected):
    assert training_record(DataConfig(**settings), formats, tiny_tokenizer(own_template)) == expected


def test_the_fallback_template_is_announced_once_per_tokenizer(capsys):
    tok = tiny_tokenizer(chat_template=False)
    for _ in range(2):
        assert render_chat(tok, CONVERSATION, True) == jinja(FALLBACK_CHAT_TEMPLATE, CONVERSATION, True)
    assert capsys.readouterr().err.count("has no chat template") == 1
    render_chat(tiny_tokenizer(chat_template=False), CONVERSATION)  # another tokenizer: its own notice
    assert capsys.readouterr().err.count("data.chat_template") == 1
    render_chat(tiny_tokenizer(), CONVERSATION)  # its own template
    assert render_chat(tok, CONVERSATION, template=CHATML_TEMPLATE) == jinja(CHATML_TEMPLATE, CONVERSATION, False)
    assert capsys.readouterr().err == ""


def test_data_chat_template_takes_a_name_a_jinja_text_or_a_file(tmp_path, monkeypatch, run_config):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}", encoding="utf-8")
    assert resolve_chat_template("mine.jinja").template.startswith("{% for m in messages %}[")
    assert resolve_chat_template("{{ messages[0]['content'] }}").name == "jinja"
    assert resolve_chat_template("fallback").template == FALLBACK_CHAT_TEMPLATE
    bad = {"chatm": "Did you mean 'chatml'?", "{% for x in %}": "not valid Jinja (line 1",
           "missing.jinja": "relative to the working directory"}
    for value, message in bad.items():
        with pytest.raises(ConfigError) as err:
            load_run_config(run_config, [f"data.chat_template={json.dumps(value)}"])
        assert "data.chat_template:" in str(err.value) and message in str(err.value)


def test_chat_settings_follow_the_record_unless_given(trained, tmp_path):
    adapter = trained["adapter"]
    assert chat_settings(adapter) == (True, SYSTEM)
    assert chat_settings(adapter, chat=False) == (False, None)
    assert chat_settings(adapter, system_prompt="") == (True, "")
    assert chat_settings(None) == (False, None)
    plain = _adapter(tmp_path / "plain", trained["base"])  # saved without a training record
    assert chat_settings(plain) == (False, None)


def test_eval_defaults_to_how_the_adapter_was_trained(trained, tmp_path):
    base, adapter = str(trained["base"]), trained["adapter"]
    settings = {"task": "classification", "data": [str(trained["eval"])]}
    runs = {"default": (None, settings), "explicit": (base, {**settings, "chat": True, "system_prompt": SYSTEM}),
            "plain": (base, {**settings, "chat": False})}
    scores = {}
    for name, (model, cfg) in runs.items():
        evaluate_model(model, cfg, adapter, predictions=tmp_path / f"{name}.jsonl", threads=None)
        scores[name] = [row["scores"] for row in read_predictions(tmp_path / f"{name}.jsonl")]
    assert scores["default"] == scores["explicit"]
    assert scores["default"] != scores["plain"]


def test_generate_defaults_to_how_the_adapter_was_trained(trained, capsys):
    prompts, kw = ["Text: goal team\nTopic:"], {"max_new_tokens": 6}
    model, tok = AutoModelForCausalLM.from_pretrained(trained["base"]), AutoTokenizer.from_pretrained(trained["base"])
    load_adapter(model, trained["adapter"])
    tok.chat_template = CHATML_TEMPLATE  # what the record says the adapter was trained with
    expected = generate(model.eval(), tok, prompts, chat=True, system_prompt=SYSTEM, **kw)
    assert steer(None, prompts, adapter=trained["adapter"], threads=None, **kw) == expected
    unchatted = generate(model, tok, prompts, chat=False, **kw)
    assert steer(None, prompts, adapter=trained["adapter"], chat=False, threads=None, **kw) == unchatted
    capsys.readouterr()
    assert main(["generate", "--adapter", str(trained["adapter"]), "--prompt", prompts[0], "--max-new-tokens",
                 "6"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"
    assert main(["generate", "--adapter", str(trained["adapter"]), "--no-chat", "--prompt", prompts[0],
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == unchatted[0] + "\n"


def test_merge_needs_no_model_and_writes_the_trained_template(trained, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained["adapter"]), "--output", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHATML_TEMPLATE
    plain = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert plain == jinja(CHATML_TEMPLATE, CONVERSATION, True) == render_chat(tok, CONVERSATION, True)
    provenance = json.loads((out / "lmadapt_merge.json").read_text())
    assert (provenance["chat_template"], provenance["system_prompt"]) == ("chatml", SYSTEM)
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    adapted, _, _ = load(None, trained["adapter"])
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits,
                                   adapted(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_model_trained_with_the_fallback_merges_with_it(plain_base, tmp_path):
    record = training_record(DataConfig(), "chat", tiny_tokenizer(chat_template=False))
    adapter = _adapter(tmp_path / "adapter", plain_base, extra=record)
    merge(None, adapter, tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == jinja(FALLBACK_CHAT_TEMPLATE, CONVERSATION, True, eos=tok.eos_token)


def test_the_recorded_base_is_loaded_and_a_missing_one_is_named(plain_base, tmp_path, capsys):
    moved = tmp_path / "base"
    shutil.copytree(plain_base, moved)
    adapter = _adapter(tmp_path / "adapter", moved)
    assert base_model(None, adapter) == str(moved.resolve())
    assert base_model("other", adapter) == "other"
    assert base_model(None, None) == "smollm2-135m-instruct"  # model.name_or_path's default
    assert base_model(None, _adapter(tmp_path / "builtin", moved, base="smollm2-135m-instruct")) \
        == "smollm2-135m-instruct"
    shutil.rmtree(moved)
    with pytest.raises(LmadaptError, match="--model") as err:
        base_model(None, adapter)
    assert str(moved.resolve()) in str(err.value)
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmadapt merge: error: adapter") and str(moved.resolve()) in err
    assert not (tmp_path / "out").exists()


def test_a_malformed_template_record_is_refused_naming_the_entry(plain_base, tmp_path):
    adapter = _adapter(tmp_path / "adapter", plain_base)
    record = json.loads(adapter_metadata(adapter)["lmadapt"])
    for bad, entry in (({"chat_template": "chatml"}, "lmadapt.chat_template:"),
                       ({"chat_template": {"name": "x"}}, "lmadapt.chat_template.template:"),
                       ({"system_prompt": 3}, "lmadapt.system_prompt:")):
        write_record(adapter, {**record, **bad})
        with pytest.raises(AdapterError, match=entry):
            read_adapter_info(adapter)


def _adapter(path, base_dir, *, base: str | None = None, extra: dict | None = None):
    """A random LoRA adapter for the tiny base model, recording ``base`` (default: ``base_dir``)."""
    model = tiny_llama()
    method = build_method({"name": "lora", "r": 2, "alpha": 4, "init": "random", "target_modules": ["q_proj"]})
    method.apply(model)
    return save_adapter(model, method, path, base_model=base or str(base_dir.resolve()),
                        base_fingerprint=fingerprint(tiny_llama()), extra=extra)


def test_merge_refuses_a_method_that_cannot_merge_before_loading_the_base(tmp_path):
    """Every LoRA-family method merges exactly; a method whose update is not a weight change (probe: a LoRA that
    says so) must be refused with a message that names the adapter and what to do instead, before any model
    is loaded (the recorded base does not exist) and without writing the output folder."""
    from lmadapt.adapters.format import save_adapter
    from lmadapt.methods.lora import Lora
    from lmadapt.methods.registry import METHODS

    class Unmergeable(Lora):
        name = "probe_unmergeable"
        peft_type = None
        mergeable = False

    METHODS.register(Unmergeable)
    try:
        method = build_method({"name": "probe_unmergeable", "r": 2, "target_modules": ["q_proj"]})
        model = tiny_llama()
        method.apply(model)
        folder = save_adapter(model, method, tmp_path / "adapter", base_model=str(tmp_path / "no-such-base"),
                              base_fingerprint=None)
        with pytest.raises(LmadaptError, match=r"adapter: method 'probe_unmergeable' cannot be merged .* "
                                               r"lmadapt.load\(\.\.\., adapter=\.\.\.\)"):
            merge(None, folder, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
    finally:
        METHODS.unregister("probe_unmergeable")
