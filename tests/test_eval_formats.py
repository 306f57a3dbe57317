"""Evaluation on files in the training formats, classification labels from the whole file, completion_loss.

References: scores from one full forward over ids built by hand (the prompt rendered as training renders it),
the same evaluation on a file in the task's own format, and a training run's own validation loss.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmadapt.data import INSTRUCTION_INPUT_PROMPT, INSTRUCTION_PROMPT, render_chat
from lmadapt.errors import ConfigError, DataError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.predictions import read_predictions
from lmadapt.evaluation.run import evaluate
from lmadapt.evaluation.tasks.completion_loss import completion_loss
from lmadapt.recipes.finetune import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1, from one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return -F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")


def _score(model, context: list[int], candidate: list[int]) -> float:
    return _logprobs(model, context + candidate)[len(context) - 1:].sum().item()


def _plain(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


def _chat(tokenizer, turns: list[dict]) -> list[int]:
    text = render_chat(tokenizer, turns, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _bare(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _evaluate(model, tokenizer, tmp_path, **settings) -> tuple[dict, list[dict]]:
    out = tmp_path / "preds.jsonl"
    result = evaluate(model, tokenizer, EvalConfig(**settings), progress=False, predictions=out)
    return result, read_predictions(out)


# ------------------------------------------------------------------------------------- training-format rows

CONVERSATION = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "Text: goal team\nTopic?"}, {"role": "assistant", "content": "sport"},
                {"role": "user", "content": "Text: chip code\nTopic?"}, {"role": "assistant", "content": "tech"}]


def test_classification_reads_every_training_format_rendered_as_training_renders_it(model, tokenizer, tmp_path):
    rows = {
        "prompt_completion": [{"prompt": "Text: goal team\nTopic:", "completion": " sport"},
                              {"prompt": "Text: chip code\nTopic:", "completion": " tech"}],
        "instruction": [{"instruction": "Name the topic.", "input": "goal team", "output": "sport"},
                        {"instruction": "Name the topic of: chip code", "output": "tech"}],
        "chat": [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3] + [{"role": "user", "content": "more"}]}],
    }
    contexts = {
        "prompt_completion": [_plain(tokenizer, r["prompt"]) for r in rows["prompt_completion"]],
        "instruction": [_plain(tokenizer, INSTRUCTION_INPUT_PROMPT.format(instruction="Name the topic.",
                                                                          input="goal team")),
                        _plain(tokenizer, INSTRUCTION_PROMPT.format(instruction="Name the topic of: chip code"))],
        # the turns before the last assistant turn; turns after it are not read
        "chat": [_chat(tokenizer, CONVERSATION[:4]), _chat(tokenizer, CONVERSATION[1:2])],
    }
    for fmt, data in rows.items():
        path = _jsonl(tmp_path / f"{fmt}.jsonl", data)
        out, preds = _evaluate(model, tokenizer, tmp_path, task="classification", data=[path])
        labels = sorted({p["gold"] for p in preds})
        assert out["labels"] == labels and len(labels) == 2, fmt
        for p, context in zip(preds, contexts[fmt]):
            ref = {label: _score(model, context, _bare(tokenizer, label)) for label in labels}
            assert p["scores"] == pytest.approx(ref, abs=1e-4), fmt
            assert p["prediction"] == max(labels, key=ref.__getitem__)


def test_with_chat_prompt_completion_rows_become_turns_after_the_system_prompt(model, tokenizer, tmp_path):
    training = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hi there", "completion": "hello"},
                                              {"prompt": "Bye", "completion": "ciao"}])
    own = _jsonl(tmp_path / "gen.jsonl", [{"prompt": "Hi there", "answer": "hello"},
                                          {"prompt": "Bye", "answer": "ciao"}])
    settings = dict(task="generation", chat=True, system_prompt="Be brief.", max_new_tokens=5, match="exact")
    out, preds = _evaluate(model, tokenizer, tmp_path, data=[training], **settings)
    ref_out, ref = _evaluate(model, tokenizer, tmp_path, data=[own], **settings)
    assert [p["prediction"] for p in preds] == [p["prediction"] for p in ref]
    assert [p["gold"] for p in preds] == ["hello", "ciao"] and out["accuracy"] == ref_out["accuracy"]
    system_turn = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    _, cls = _evaluate(model, tokenizer, tmp_path, task="classification", data=[training], chat=True,
                       system_prompt="Be brief.")
    ids = _chat(tokenizer, system_turn)
    assert cls[0]["scores"]["hello"] == pytest.approx(_score(model, ids, _bare(tokenizer, "hello")), abs=1e-4)


def test_system_prompt_goes_before_conversations_without_a_system_turn(model, tokenizer, tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    _, preds = _evaluate(model, tokenizer, tmp_path, task="classification", data=[path], chat=True,
                         system_prompt="Be brief.")
    own = _chat(tokenizer, CONVERSATION[:4])  # has a system turn: kept as it is
    added = _chat(tokenizer, [{"role": "system", "content": "Be brief."}, CONVERSATION[1]])
    for p, context in zip(preds, (own, added)):
        assert p["scores"]["tech"] == pytest.approx(_score(model, context, _bare(tokenizer, "tech")), abs=1e-4)


def test_bad_training_rows_are_named_by_file_line_and_training_field(model, tokenizer, tmp_path):
    path = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"},
                                          {"prompt": "a", "completion": 3}])
    with pytest.raises(DataError) as err:
        evaluate(model, tokenizer, EvalConfig(task="generation", data=[path]), progress=False)
    assert [p.split(": field")[0] for p in err.value.problems] == [f"{path}:2", f"{path}:3"]
    assert "field 'completion' is missing" in err.value.problems[0]
    with pytest.raises(ConfigError, match="system_prompt: only used with chat: true"):
        evaluate(model, tokenizer, EvalConfig(task="generation", data=[path], system_prompt="x"))


def test_rows_in_neither_format_get_a_hint_naming_both(model, tokenizer, tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [{"question": "a", "reply": "b"}])
    with pytest.raises(DataError, match="training rows \\(prompt/completion, instruction/output or chat"):
        evaluate(model, tokenizer, EvalConfig(task="classification", data=[path]), progress=False)


# ------------------------------------------------------------------------------------- labels of the whole file

def test_labels_come_from_the_whole_file_not_the_evaluated_rows(model, tokenizer, tmp_path):
    rows = [{"prompt": f"Text {i}\nTopic:", "label": " sport"} for i in range(2)] + \
           [{"prompt": f"Text {i}\nTopic:", "label": label} for i, label in enumerate([" tech", " food"])]
    path = _jsonl(tmp_path / "cls.jsonl", rows)
    out, preds = _evaluate(model, tokenizer, tmp_path, task="classification", data=[path], max_examples=2)
    assert out["labels"] == [" food", " sport", " tech"] and out["n"] == 2
    assert all(set(p["scores"]) == {" food", " sport", " tech"} for p in preds)
    one = _jsonl(tmp_path / "one.jsonl", rows[:2])
    with pytest.warns(UserWarning, match=r"only 1 candidate label \(' sport'\).*accuracy measures nothing"):
        out = evaluate(model, tokenizer, EvalConfig(task="classification", data=[one]), progress=False)
    assert out["accuracy"] == 1.0  # what the warning is about


# ------------------------------------------------------------------------------------- completion_loss

def test_completion_loss_is_the_nll_of_completion_and_eos_only(model, tokenizer, tmp_path):
    rows = [{"prompt": "Question: what is two and two?\nAnswer:", "completion": " four"},
            {"prompt": "", "completion": "A text without a prompt."},
            {"prompt": "Say hi.", "completion": " hi"}]
    nll = count = 0.0
    per_row = []
    for row in rows:
        prompt, completion = _bare(tokenizer, row["prompt"]), _bare(tokenizer, row["completion"])
        ids = prompt + completion + [tokenizer.eos_token_id]
        losses = -_logprobs(model, ids)[max(len(prompt), 1) - 1:]  # the tokens after the prompt (the first: never)
        per_row.append((losses.mean().item(), len(losses)))
        nll, count = nll + losses.sum().item(), count + len(losses)
    for batch_size in (1, 3):
        out = completion_loss(model, tokenizer, rows, batch_size=batch_size, progress=False)
        assert out["tokens"] == count and out["nll"] == pytest.approx(nll / count, rel=1e-5)
        assert out["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    path = _jsonl(tmp_path / "pc.jsonl", rows)
    _, preds = _evaluate(model, tokenizer, tmp_path, task="completion_loss", data=[path])
    assert [(p["score"], p["tokens"]) for p in preds] == [(pytest.approx(s, rel=1e-5), n) for s, n in per_row]


def test_completion_loss_of_a_conversation_counts_every_assistant_turn(model, tokenizer):
    text = render_chat(tokenizer, CONVERSATION)
    ids = _bare(tokenizer, text)
    losses = -_logprobs(model, ids)
    trained = set()  # the positions of "sport<|im_end|>" and "tech<|im_end|>", found by hand
    for reply in ("sport<|im_end|>", "tech<|im_end|>"):
        start = len(_bare(tokenizer, text[:text.index(reply)]))
        trained |= set(range(start, start + len(_bare(tokenizer, reply))))
    ref = sum(losses[t - 1].item() for t in trained) / len(trained)
    out = completion_loss(model, tokenizer, [{"prompt": CONVERSATION[:4], "completion": "tech"}], progress=False)
    assert out["tokens"] == len(trained) and out["nll"] == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("case", ["prompt_completion", "instruction_chat", "messages"])
def test_completion_loss_equals_the_runs_validation_loss(run_config, tmp_path, case):
    rows = {"prompt_completion": [{"prompt": f"Text: goal {i}\nTopic:", "completion": " sport"} for i in range(5)],
            "instruction_chat": [{"instruction": "Topic?", "input": f"chip {i}", "output": "tech"} for i in range(5)],
            "messages": [{"messages": CONVERSATION[1:] if i % 2 else CONVERSATION} for i in range(5)]}[case]
    val = _jsonl(tmp_path / "val.jsonl", rows)
    chat = case == "instruction_chat"
    run_config["data"].update(validation=[val], validation_fraction=0.0, use_chat_template=chat,
                              **({"system_prompt": "Be brief."} if chat else {}))
    run_config["train"].update(max_steps=2, batch_size=2)
    ev = {"task": "completion_loss", "data": [val], "batch_size": 3, "max_length": 128}
    run_config["evals"] = [{**ev, **({"chat": True, "system_prompt": "Be brief."} if chat else {})}]
    result = train(run_config, progress=False)
    after = result.evals_after[0]
    assert after["nll"] == pytest.approx(result.report["final_val_loss"], rel=1e-5)
    assert after["tokens"] == _validation_targets(run_config)


def _validation_targets(run_config) -> int:
    """Loss-bearing tokens of the run's validation split, as training loads it."""
    from lmadapt.data import DataConfig, load_dataset
    from lmadapt.testing import tiny_tokenizer

    val_set, _ = load_dataset(DataConfig(**run_config["data"]), tiny_tokenizer(), "validation")
    return sum(label != -100 for labels in val_set.labels for label in labels)
