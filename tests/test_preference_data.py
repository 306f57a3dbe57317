"""The ``preference`` data format (for objective ``dpo``): rows become two sequences masked on the prompt, pairs
stay together in every batch and process split, TRL's conversational and implicit-prompt rows train exactly the
replies (as the chat template renders them), and bad rows are named by file, line and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_objective_dpo import pair_rows

from lmadapt.config import ConfigError
from lmadapt.data import Batcher, DataConfig, load_splits
from lmadapt.data.formats import shared_start
from lmadapt.errors import DataError, LmadaptError
from lmadapt.testing import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ the data

def test_preference_rows_become_two_sequences_masked_on_the_prompt(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"prompt": "Hi?", "chosen": " Hello!", "rejected": " Go."}])
    tok = tiny_tokenizer()
    data, _, report = load_splits(DataConfig(train=[str(path)]), tok)  # format auto
    assert report.format == "preference" and report.train_examples == 1 and data.paired and len(data) == 2
    enc = tok("Hi?", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    for k, response in enumerate([" Hello!", " Go."]):
        ids = tok(response, add_special_tokens=False)["input_ids"] + [eos]
        assert data.input_ids[k] == enc + ids
        assert data.labels[k] == [-100] * len(enc) + ids
    assert "1 training preference pairs" in report.summary()


def test_the_chat_template_renders_the_prompt_and_only_the_replies_train(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"question": "Hi?", "good": "Hello!", "bad": "Go."}])
    tok = tiny_tokenizer()
    cfg = DataConfig(train=[str(path)], format="preference", prompt_field="question", chosen_field="good",
                     rejected_field="bad", use_chat_template=True, system_prompt="Be kind.")
    data, _, _ = load_splits(cfg, tok)
    for k, reply in enumerate(["Hello!", "Go."]):
        text = tok.decode(data.input_ids[k])
        assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>")
        assert tok.decode([t for t in data.labels[k] if t != -100]) == f"{reply}<|im_end|>"


def test_pairs_stay_together_in_every_batch_and_on_every_rank_split(tmp_path):
    rows = [{"prompt": "p" * (i % 7 + 1), "chosen": f" c{i}" + "x" * (i % 5), "rejected": f" r{i}"} for i in range(23)]
    path = tmp_path / "p.jsonl"
    write_jsonl(path, rows)
    tok = tiny_tokenizer()
    data, _, _ = load_splits(DataConfig(train=[str(path)]), tok)
    for grouped in (True, False):
        batcher = Batcher(data, batch_size=4, max_length=256, packing=False, group_by_length=grouped,
                          pad_id=tok.pad_token_id, seed=3)
        seen = []
        for epoch in range(2):
            for batch in batcher.batches(epoch):
                mb = batcher.collate(batch)
                n = mb["pairs"]
                assert mb["input_ids"].shape[0] == 2 * n == 2 * len(batch)
                for k in range(n):
                    chosen = tok.decode(mb["input_ids"][k][mb["attention_mask"][k].bool()])
                    rejected = tok.decode(mb["input_ids"][n + k][mb["attention_mask"][n + k].bool()])
                    i = int(re.match(r"\d+", chosen.split(" c")[1]).group())
                    assert rejected.endswith(f" r{i}<|im_end|>") and chosen.startswith(rows[i]["prompt"])
                    seen.append((epoch, i))
                for rank in range(2):  # torchrun shards the plan's rows (pairs), never a pair's two sequences
                    assert all(row[1] == row[0] + 1 and row[0] % 2 == 0 for row in batch[rank::2])
        assert sorted(seen) == [(e, i) for e in range(2) for i in range(23)]  # every pair once per epoch
        assert batcher.padding_stats()["tokens"] == sum(data.lengths)


def test_packing_and_loss_on_prompt_are_refused_for_pairs(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, pair_rows(3))
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError) as exc:
        load_splits(DataConfig(train=[str(path)], format="preference", batching="packed", loss_on_prompt=True), tok)
    assert "data.batching: packed cannot hold preference pairs" in str(exc.value)
    assert "data.loss_on_prompt: preference pairs compare" in str(exc.value)
    with pytest.raises(LmadaptError, match=r"data.batching: packed .* \(the rows of data.train are preference pairs"):
        load_splits(DataConfig(train=[str(path)], batching="packed"), tok)  # auto-detected
    data, _, _ = load_splits(DataConfig(train=[str(path)]), tok)
    with pytest.raises(ValueError, match="preference pairs cannot be packed"):
        Batcher(data, batch_size=2, max_length=64, packing=True, group_by_length=False, pad_id=0, seed=0)


def test_bad_rows_are_named_by_file_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "ok", "chosen": " a", "rejected": " b"},
            {"prompt": "no chosen", "rejected": " b"},
            {"prompt": "number", "chosen": 3, "rejected": " b"},
            {"prompt": "empty", "chosen": " a", "rejected": "  "},
            {"prompt": "same", "chosen": " a", "rejected": " a"}]
    write_jsonl(path, rows)
    with pytest.raises(DataError) as exc:
        load_splits(DataConfig(train=[str(path)]), tiny_tokenizer())
    assert exc.value.problems == [
        f"{path}:2: field 'chosen' is missing (the row has: prompt, rejected)",
        f"{path}:3: field 'chosen': expected a string, got int",
        f"{path}:4: field 'rejected' is empty",
        f"{path}:5: field 'rejected': the same text as 'chosen', so the pair prefers nothing",
    ]


def test_a_pair_is_dropped_whole_when_one_sequence_is_too_long(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"prompt": "Q", "chosen": " short", "rejected": " much too long " * 4},
                       {"prompt": "Q", "chosen": " fine", "rejected": " also fine"}])
    data, _, report = load_splits(DataConfig(train=[str(path)], max_length=20, truncation="drop"), tiny_tokenizer())
    assert len(data) == 2 and report.train_examples == 1 and report.examples_dropped == 1
    assert tiny_tokenizer().decode(data.input_ids[0]).startswith("Q fine")


# ------------------------------------------------------------------------------------------------ TRL's row forms

def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


PROMPT = [turn("system", "Be kind."), turn("user", "Hi?"), turn("assistant", "Yes?"), turn("user", "Help me.")]
CONVERSATION = {"prompt": PROMPT, "chosen": [turn("assistant", "Gladly.")], "rejected": [turn("assistant", "No.")]}


def load_rows(rows: list[dict], folder: Path, **data):
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "p.jsonl", rows)
    return load_splits(DataConfig(train=[str(folder / "p.jsonl")], **data), tiny_tokenizer())


def test_conversational_rows_train_exactly_the_replies_after_the_prompt(tmp_path):
    """TRL's conversational form: the prompt is the template's rendering of the prompt turns with the generation
    prompt, the response what follows it; only the reply's tokens (not the prompt's own assistant turn) train."""
    data, _, report = load_rows([CONVERSATION], tmp_path, use_chat_template=True)  # format auto
    assert report.format == "preference" and data.paired and len(data) == 2
    tok = tiny_tokenizer()
    prompt = tok(tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    for k, reply in enumerate(["Gladly.", "No."]):
        whole = tok.apply_chat_template(PROMPT + [turn("assistant", reply)], tokenize=False)
        assert data.input_ids[k] == tok(whole, add_special_tokens=False)["input_ids"]
        assert data.input_ids[k][:len(prompt)] == prompt and set(data.labels[k][:len(prompt)]) == {-100}
        assert tok.decode([t for t in data.labels[k] if t != -100]) == f"{reply}<|im_end|>"
    # as a chat SFT row of the same turns renders it, but without training on the prompt's "Yes?"
    chat, _, _ = load_rows([{"messages": PROMPT + [turn("assistant", "Gladly.")]}], tmp_path / "chat")
    assert chat.input_ids[0] == data.input_ids[0]
    assert tok.decode([t for t in chat.labels[0] if t != -100]) == "Yes?<|im_end|>Gladly.<|im_end|>"


def test_the_implicit_prompt_forms_equal_the_explicit_ones(tmp_path):
    implicit = {"chosen": PROMPT + CONVERSATION["chosen"], "rejected": PROMPT + CONVERSATION["rejected"]}
    a, _, _ = load_rows([CONVERSATION], tmp_path / "a", use_chat_template=True)
    b, _, report = load_rows([implicit], tmp_path / "b", use_chat_template=True)
    assert report.format == "preference" and (a.input_ids, a.labels) == (b.input_ids, b.labels)
    for chat in (False, True):  # TRL's standard implicit form: the shared characters, the space to the responses
        c, _, _ = load_rows([{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}], tmp_path / "c",
                            use_chat_template=chat)
        d, _, _ = load_rows([{"chosen": "The sky is blue.", "rejected": "The sky is green."}], tmp_path / "d",
                            use_chat_template=chat)
        assert (c.input_ids, c.labels) == (d.input_ids, d.labels)


def test_shared_start_is_trls_extract_prompt():
    assert shared_start("The sky is blue.", "The sky is green.") == len("The sky is")  # the space opens the replies
    assert shared_start("abc", "abd") == 2 and shared_start("x", "y") == 0 and shared_start(" a", " b") == 0
    assert shared_start("ab", "abc") == 2  # one is the other's start
    assert shared_start(PROMPT + [turn("assistant", "A")], PROMPT + [turn("assistant", "B")]) == len(PROMPT)


def test_conversations_need_the_chat_template_setting(tmp_path):
    with pytest.raises(LmadaptError, match=r"data.use_chat_template: the rows of data.train hold conversations .* "
                                           r"set data.use_chat_template: true"):
        load_rows([CONVERSATION], tmp_path)


def test_bad_conversational_rows_are_named_by_file_line_and_field(tmp_path):
    user, reply = [turn("user", "Q?")], [turn("assistant", "A.")]
    rows = [CONVERSATION,
            {"prompt": user, "chosen": "A.", "rejected": reply},
            {"prompt": user, "chosen": [turn("user", "A.")], "rejected": reply},
            {"prompt": user + [turn("assistant", "Hm.")], "chosen": reply, "rejected": [turn("assistant", "B.")]},
            {"prompt": user, "chosen": reply, "rejected": []},
            {"prompt": [turn("human", "Q?")], "chosen": reply, "rejected": [turn("assistant", " ")]},
            {"prompt": user, "chosen": reply, "rejected": reply},
            {"chosen": [turn("system", "S."), turn("user", "A?"), turn("assistant", "x")],
             "rejected": [turn("system", "S."), turn("user", "B?"), turn("assistant", "y")]},
            {"chosen": user + reply, "rejected": user + reply + [turn("assistant", "More.")]},
            {"chosen": reply, "rejected": [turn("assistant", "B.")]}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as exc:
        load_splits(DataConfig(train=[str(tmp_path / "p.jsonl")], use_chat_template=True), tiny_tokenizer())
    path = tmp_path / "p.jsonl"
    assert exc.value.problems == [
        (f"{path}:2: field 'chosen': expected a list of messages, as in the row's other fields (TRL's conversational "
         f"form), got str"),
        (f"{path}:3: field 'chosen[0].role': 'user', but 'chosen' holds the assistant's reply only; put the turns "
         f"before it in 'prompt'"),
        (f"{path}:4: field 'prompt[1].role': the prompt ends with an assistant turn; end it with the turn that "
         f"'chosen' and 'rejected' reply to (user or tool)"),
        f"{path}:5: field 'rejected' is empty",
        (f"{path}:6: field 'prompt[0].role': unknown role 'human' (allowed: system, user, assistant, tool); "
         f"field 'rejected[0].content' is empty"),
        f"{path}:7: field 'rejected': the same turns as 'chosen', so the pair prefers nothing",
        (f"{path}:8: field 'chosen[1].role': 'user'; without 'prompt', 'chosen' and 'rejected' must be the same "
         f"conversation up to the assistant's reply (the implicit prompt) and hold only assistant turns after it, but "
         f"they differ from turn 1 on; field 'rejected[1].role': 'user'; without 'prompt', 'chosen' and 'rejected' "
         f"must be the same conversation up to the assistant's reply (the implicit prompt) and hold only assistant "
         f"turns after it, but they differ from turn 1 on"),
        (f"{path}:9: field 'chosen[1].role': the prompt ends with an assistant turn; end it with the turn that "
         f"'chosen' and 'rejected' reply to (user or tool); field 'chosen': nothing of it is left after the turns it "
         f"shares with the other reply (it is the start of the other); give 'prompt', or replies that differ"),
        (f"{path}:10: field 'chosen': 'chosen' and 'rejected' share no turn before the reply, so there is no prompt; "
         f"begin both with the prompt's turns (TRL's implicit prompt), or give 'prompt'"),
    ]
