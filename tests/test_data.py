"""Data: every file type is read, every bad row is named by file, line and field, loss masks are exact,
lengths are accounted for, and packed rows compute exactly what the examples compute alone."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_rows, write_jsonl

from lmadapt.config import from_dict
from lmadapt.data import (
    IGNORE,
    Batcher,
    DataConfig,
    TokenizedDataset,
    expand_patterns,
    load_dataset,
    load_splits,
    pack_rows,
    read_records,
    render_chat,
)
from lmadapt.data.readers import parse_json
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.testing import tiny_llama, tiny_tokenizer


def _cfg(files, **kw) -> DataConfig:
    return DataConfig(train=[str(f) for f in files], **kw)


def _trained(tok, ids, labels) -> str:
    return tok.decode([t for t, label in zip(ids, labels) if label != IGNORE])


def _dataset(lengths, seed=0) -> TokenizedDataset:
    gen = torch.Generator().manual_seed(seed)
    ds = TokenizedDataset()
    for i, n in enumerate(lengths):
        ids = torch.randint(0, 256, (n,), generator=gen).tolist()
        ds.add(f"x:{i}", ids, [IGNORE] + ids[1:])
    return ds


# --- reading files -------------------------------------------------------------------------------

def test_every_file_type_is_read_with_its_source(tmp_path):
    row = {"prompt": "p", "completion": "c"}
    write_jsonl(tmp_path / "a.jsonl", [row, row])
    (tmp_path / "b.json").write_text(json.dumps([row, row, row]))
    (tmp_path / "c.json").write_text(json.dumps({"version": 1, "rows": [row]}))
    (tmp_path / "d.csv").write_text('prompt,completion\np,c\n"multi\nline",c\n')
    pq.write_table(pa.Table.from_pylist([row, row]), tmp_path / "e.parquet")
    (tmp_path / "f.txt").write_text("a document\n\nwith lines\n")
    (tmp_path / "g.md").write_text("# title\n")
    records, problems = read_records(sorted(str(p) for p in tmp_path.iterdir()))
    assert problems == []
    sources = [r.source.replace(str(tmp_path) + "/", "") for r in records]
    assert sources == ["a.jsonl:1", "a.jsonl:2", "b.json:item 1", "b.json:item 2", "b.json:item 3",
                       "c.json:item 1", "d.csv:2", "d.csv:3", "e.parquet:row 1", "e.parquet:row 2", "f.txt", "g.md"]
    assert records[7].data == {"prompt": "multi\nline", "completion": "c"}
    assert records[10].data == {"text": "a document\n\nwith lines\n"}


def test_globs_and_directories_expand_and_a_pattern_matching_nothing_is_named(tmp_path):
    for name in ("x1.jsonl", "x2.jsonl", "y.jsonl"):
        write_jsonl(tmp_path / name, [{"text": name}])
    records, _ = read_records(str(tmp_path / "x*.jsonl"))
    assert [r.data["text"] for r in records] == ["x1.jsonl", "x2.jsonl"]
    records, _ = read_records([str(tmp_path), str(tmp_path / "y.jsonl")])  # a file is read once
    assert len(records) == 3
    with pytest.raises(ConfigError) as err:
        read_records([str(tmp_path / "x1.jsonl"), str(tmp_path / "nope*.jsonl"), "missing.csv"])
    assert f"no file matches '{tmp_path / 'nope*.jsonl'}'" in str(err.value)
    assert "no file matches 'missing.csv'" in str(err.value)
    (tmp_path / "notes.docx").write_text("x")
    records, _ = read_records(str(tmp_path / "*"))  # globs and folders skip unsupported types
    assert len(records) == 3
    with pytest.raises(ConfigError, match=r"notes.docx: unsupported file type '.docx'"):
        read_records(str(tmp_path / "notes.docx"))
    with pytest.raises(ConfigError, match=r"data.train: no file matches .*\*.parquet"):
        load_splits(_cfg([tmp_path / "*.parquet"]), tiny_tokenizer())


# --- bad rows ------------------------------------------------------------------------------------

def _bad_prompt_file(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [b'{"prompt": "a", "completion": "ok"}',
             b'{"prompt": "a", "completion": "b",}',
             b'{"prompt": "a"}',
             b'{"prompt": "a", "completion": 3}',
             b'{"prompt": "a", "completion": ["x"]}',
             b'{"prompt": "a", "completion": "  "}',
             b'{"prompt": "\xff", "completion": "b"}',
             b'["not", "an", "object"]',
             b'',
             b'{"prompt": "a", "completion": "fine"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_each_bad_row_is_named_by_file_line_and_field(tmp_path, tokenizer):
    path = _bad_prompt_file(tmp_path)
    with pytest.raises(DataError) as err:
        load_splits(_cfg([path]), tokenizer)
    problems = err.value.problems
    assert problems == [
        f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes at column 35)",
        f"{path}:3: field 'completion' is missing (the row has: prompt)",
        f"{path}:4: field 'completion': expected a string, got int",
        f"{path}:5: field 'completion': expected a string, got list",
        f"{path}:6: field 'completion' is empty",
        f"{path}:7: invalid UTF-8 (byte 0xff at column 13)",
        f"{path}:8: expected a JSON object {{...}}, got list",
    ]
    assert "7 malformed row(s)" in str(err.value) and "skip_bad_rows" in str(err.value)


def test_skip_bad_rows_skips_and_counts_them(tmp_path, tokenizer):
    path = _bad_prompt_file(tmp_path)
    train, val, report = load_splits(_cfg([path], skip_bad_rows=True), tokenizer)
    assert (report.rows_read, report.rows_skipped, report.train_examples, len(train)) == (9, 7, 2, 2)
    assert val is None and report.skipped[0].startswith(f"{path}:2:")
    assert "Skipped 7 malformed rows" in report.summary()


def test_bad_chat_rows_name_the_turn_and_field(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    write_jsonl(path, [
        {"messages": good},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
        {"messages": "hi"},
        {"messages": [{"role": "user", "content": "hi"}, "hello"]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"conversation": good},
    ])
    with pytest.raises(DataError) as err:
        load_splits(_cfg([path]), tokenizer)
    assert err.value.problems == [
        f"{path}:2: field 'messages[1].role': unknown role 'bot' (allowed: system, user, assistant, tool)",
        f"{path}:3: field 'messages': expected a list of turns, got str",
        f"{path}:4: field 'messages[1]': expected an object with 'role' and 'content', got str",
        f"{path}:5: field 'messages[1].content': expected a string, got int",
        f"{path}:6: field 'messages': no assistant turn, so nothing to train on",
        f"{path}:7: field 'messages' is missing (the row has: conversation)",
    ]


def test_bad_rows_in_csv_json_parquet_and_text_files(tmp_path, tokenizer):
    csv_path, json_path, pq_path = tmp_path / "a.csv", tmp_path / "b.json", tmp_path / "c.parquet"
    csv_path.write_bytes(b"prompt,completion\np,c\np,c,extra\np,\n\xfe,c\n")
    json_path.write_text(json.dumps([{"prompt": "p", "completion": "c"}, 7, {"prompt": "p", "completion": None}]))
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}]),
                   pq_path)
    with pytest.raises(DataError) as err:
        load_splits(_cfg([csv_path, json_path, pq_path]), tokenizer)
    assert err.value.problems == [
        f"{csv_path}:3: expected 2 columns as in the header, got 3",
        f"{csv_path}:4: field 'completion' is empty",
        f"{csv_path}:5: invalid UTF-8 (byte 0xfe at column 1)",
        f"{json_path}:item 2: expected an object {{...}}, got int",
        f"{json_path}:item 3: field 'completion': expected a string, got null",
        f"{pq_path}:row 2: field 'completion': expected a string, got null",
    ]
    empty, bad = tmp_path / "empty.txt", tmp_path / "bad.md"
    empty.write_text("  \n")
    bad.write_bytes(b"fine line\nbad \xc3 line\n")
    with pytest.raises(DataError) as err:
        load_splits(_cfg([empty, bad]), tokenizer)
    assert err.value.problems == [f"{empty}: field 'text' is empty",
                                  f"{bad}:2: invalid UTF-8 (byte 0xc3 at column 5)"]


def test_unreadable_files_stop_even_with_skip_bad_rows(tmp_path, tokenizer):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a",\n "completion": }]')
    with pytest.raises(LmadaptError, match=r"(?s)broken.json:2: not valid JSON.*not whole files"):
        load_splits(_cfg([broken], skip_bad_rows=True), tokenizer)


# --- masks ---------------------------------------------------------------------------------------

def test_prompt_tokens_carry_no_loss_and_the_completion_plus_eos_does(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"prompt": "Text: goal team\nTopic:", "completion": " sport"}])
    train, _, report = load_splits(_cfg([path]), tokenizer)
    ids, labels = train.input_ids[0], train.labels[0]
    n_prompt = len(tokenizer("Text: goal team\nTopic:")["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert _trained(tokenizer, ids, labels) == " sport<|im_end|>"
    assert report.trainable_tokens == len(" sport") + 1
    train, _, _ = load_splits(_cfg([path], loss_on_prompt=True), tokenizer)
    assert train.labels[0][1:] == train.input_ids[0][1:] and train.labels[0][0] == IGNORE


def test_instruction_rows_use_the_documented_prompt(tmp_path, tokenizer):
    path = tmp_path / "i.jsonl"
    write_jsonl(path, [{"instruction": "Add", "input": "1 2", "output": "3"},
                       {"instruction": "Hi", "input": None, "output": "Hello"}])
    train, _, _ = load_splits(_cfg([path]), tokenizer)
    assert [tokenizer.decode(ids) for ids in train.input_ids] == [
        "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n3<|im_end|>",
        "### Instruction:\nHi\n\n### Response:\nHello<|im_end|>"]
    trained = [_trained(tokenizer, ids, labels) for ids, labels in zip(train.input_ids, train.labels)]
    assert trained == ["3<|im_end|>", "Hello<|im_end|>"]


def test_chat_trains_only_assistant_content_and_end_of_turn(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Héllo!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Ciao"}]
    write_jsonl(path, [{"messages": messages}])
    train, _, _ = load_splits(_cfg([path]), tokenizer)
    ids, labels = train.input_ids[0], train.labels[0]
    assert tokenizer.decode(ids) == render_chat(tokenizer, messages)
    assert _trained(tokenizer, ids, labels) == "Héllo!<|im_end|>Ciao<|im_end|>"
    plain = tiny_tokenizer(chat_template=False)  # the fallback template
    train, _, _ = load_splits(_cfg([path]), plain)
    assert plain.decode(train.input_ids[0]).startswith("<|system|>\nBe brief.<|im_end|>\n<|user|>\nHi")
    assert _trained(plain, train.input_ids[0], train.labels[0]) == "Héllo!<|im_end|>Ciao<|im_end|>"


def test_chat_templates_that_rewrite_earlier_turns_or_refuse_rows(tmp_path):
    path = tmp_path / "c.jsonl"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Héllo!"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
    write_jsonl(path, [{"messages": messages}, {"messages": [{"role": "system", "content": "x"}] + messages}])
    tok = tiny_tokenizer()
    tok.chat_template = (  # like reasoning templates: only the last assistant turn gets a marker
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if loop.last and m['role'] == 'assistant' %}{{ '[final] ' }}{% endif %}"
        "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(DataError) as err:
        load_splits(_cfg([path]), tok)
    assert err.value.problems == [f"{path}:2: field 'messages': the chat template refused this conversation "
                                  f"(no system turns)"]
    train, _, _ = load_splits(_cfg([path], skip_bad_rows=True), tok)
    assert _trained(tok, train.input_ids[0], train.labels[0]) == "Héllo!<|im_end|>[final] Ciao<|im_end|>"


def test_prompt_completion_through_the_chat_template_with_a_system_prompt(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"prompt": "2+2?", "completion": "4"}])
    train, _, _ = load_splits(_cfg([path], use_chat_template=True, system_prompt="Math."), tokenizer)
    assert tokenizer.decode(train.input_ids[0]) == (
        "<|im_start|>system\nMath.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")
    assert _trained(tokenizer, train.input_ids[0], train.labels[0]) == "4<|im_end|>"


# --- lengths -------------------------------------------------------------------------------------

def test_truncation_is_exact_and_counted(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"prompt": "p" * 10, "completion": "c" * 5},     # 16 tokens with EOS
                       {"prompt": "p" * 3, "completion": "c" * 3},      # 7: fits
                       {"prompt": "p" * 20, "completion": "c" * 2}])    # 23: nothing trainable in the first 12
    for mode, kept, truncated, lost, dropped in (("right", 2, 1, 4, 1), ("left", 3, 2, 15, 0), ("drop", 1, 0, 0, 2)):
        train, _, report = load_splits(_cfg([path], max_length=12, truncation=mode), tokenizer)
        assert (len(train), report.examples_truncated, report.tokens_truncated, report.examples_dropped) == \
            (kept, truncated, lost, dropped), mode
        assert all(len(ids) <= 12 for ids in train.input_ids)
    train, _, _ = load_splits(_cfg([path], max_length=12, truncation="left"), tokenizer)
    assert tokenizer.decode(train.input_ids[0]) == "ppppppccccc<|im_end|>" and train.labels[0][0] == IGNORE


def test_long_text_is_split_into_chunks_without_losing_tokens(tmp_path, tokenizer):
    text = "".join(chr(97 + i % 26) for i in range(250))
    (tmp_path / "doc.txt").write_text(text)
    train, _, report = load_splits(_cfg([tmp_path / "doc.txt"], max_length=64), tokenizer)
    assert [len(ids) for ids in train.input_ids] == [64, 64, 64, 59]
    assert sum(train.input_ids, []) == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert (report.documents_chunked, report.tokens_truncated, report.examples_dropped) == (1, 0, 0)
    assert all(labels[0] == IGNORE and labels[1:] == ids[1:] for ids, labels in zip(train.input_ids, train.labels))


# --- splits and config ---------------------------------------------------------------------------

def test_validation_hold_out_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, make_rows(40))
    train, val, report = load_splits(_cfg([path], validation_fraction=0.25, batching="padded"), tokenizer)
    again, val_again, _ = load_splits(_cfg([path], validation_fraction=0.25, batching="padded"), tokenizer)
    assert (len(train), len(val), report.validation_examples) == (30, 10, 10)
    assert val.sources == val_again.sources and not set(val.sources) & set(train.sources)
    other, _ = load_dataset(_cfg([path], validation_fraction=0.25, seed=1), tokenizer, split="validation")
    assert other.sources != val.sources
    val_path = tmp_path / "v.jsonl"
    write_jsonl(val_path, make_rows(3))
    val_only, _ = load_dataset(DataConfig(validation=[str(val_path)]), tokenizer, split="validation")
    assert len(val_only) == 3


def test_config_check_reports_contradictions():
    with pytest.raises(ConfigError) as err:
        from_dict(DataConfig, {"validation_fraction": 1.0,
                               "max_length": 1, "system_prompt": "x", "validation": ["v.jsonl"]})
    assert [p.split(":")[0] for p in err.value.problems] == [
        "max_length", "validation_fraction", "validation_fraction", "system_prompt"]
    with pytest.raises(ConfigError, match="batching: 'packing' is not one of 'length_grouped', 'packed', 'padded'"):
        from_dict(DataConfig, {"batching": "packing"})
    with pytest.raises(ConfigError, match="truncation: 'middle' is not one of 'right', 'left', 'drop'"):
        from_dict(DataConfig, {"truncation": "middle"})
    assert from_dict(DataConfig, {"train": "a.jsonl"}).train == ["a.jsonl"]


def test_format_is_detected_from_the_first_row(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"body": "x"}])
    with pytest.raises(LmadaptError, match=r"cannot tell the format from the keys \['body'\]"):
        load_splits(_cfg([path]), tokenizer)
    _, _, report = load_splits(_cfg([path], text_field="body"), tokenizer)
    assert report.format == "text"


# --- batching ------------------------------------------------------------------------------------

LENGTHS = [5, 17, 30, 3, 9, 22, 12, 1, 40, 8, 14, 26, 6, 19, 2, 33, 11, 7, 25, 4]


@pytest.mark.parametrize("mode", ["packing", "grouped", "plain"])
def test_every_example_once_per_epoch_and_order_fixed_by_seed_and_epoch(mode):
    ds = _dataset(LENGTHS * 10)
    make = lambda seed: Batcher(ds, batch_size=4, max_length=64, packing=mode == "packing",  # noqa: E731
                                group_by_length=mode == "grouped", pad_id=259, seed=seed)
    batcher = make(0)
    plans = [batcher.batches(epoch) for epoch in range(3)]
    for plan in plans:
        assert sorted(i for batch in plan for row in batch for i in row) == list(range(len(ds)))
        assert len(plan) == len(batcher)
    assert plans[0] == make(0).batches(0) and plans[1] == make(0).batches(1)
    assert plans[0] != plans[1] and plans[0] != make(1).batches(0)
    assert all(len(batch) == 4 for batch in batcher.batches(0)[:-1])


def test_grouped_batches_hold_similar_lengths_and_drop_last():
    ds = _dataset(LENGTHS * 10)
    plain = Batcher(ds, batch_size=8, max_length=64, packing=False, group_by_length=False, pad_id=259, seed=0)
    grouped = Batcher(ds, batch_size=8, max_length=64, packing=False, group_by_length=True, pad_id=259, seed=0)
    assert grouped.padding_stats()["padding_fraction"] < 0.5 * plain.padding_stats()["padding_fraction"]
    dropping = Batcher(ds, batch_size=8, max_length=64, packing=False, group_by_length=True, pad_id=259, seed=0,
                       drop_last=True)
    assert len(dropping) == 200 // 8 and all(len(b) == 8 for b in dropping.batches(3))


def test_collate_masks_example_boundaries_and_padding():
    ds = _dataset([5, 3, 4])
    packed = Batcher(ds, batch_size=2, max_length=8, packing=True, group_by_length=False, pad_id=259, seed=0)
    out = packed.collate([[0, 1], [2]])
    assert out["input_ids"].shape == (2, 8) and "attention_mask" not in out
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert out["labels"][0, 5] == IGNORE and out["labels"][0, 6] == ds.input_ids[1][1]
    assert out["input_ids"][1, 4:].tolist() == [259] * 4 and out["labels"][1, 4:].tolist() == [IGNORE] * 4
    assert int(out["num_target_tokens"]) == 4 + 2 + 3
    padded = Batcher(ds, batch_size=2, max_length=8, packing=False, group_by_length=False, pad_id=259, seed=0)
    out = padded.collate([0, 1])
    assert out["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert out["labels"][1].tolist() == [IGNORE] + ds.input_ids[1][1:] + [IGNORE] * 2
    assert pack_rows([0, 1, 2], [5, 3, 4], 8) == [[0, 1], [2]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_same_logits_as_examples_alone(attn):
    """Eval and train mode (fp32): attention and positions restart at every packed example."""
    model = tiny_llama(attn_implementation=attn)
    ds = _dataset([5, 17, 30, 3, 9, 22, 12, 1, 40])
    batcher = Batcher(ds, batch_size=3, max_length=64, packing=True, group_by_length=False, pad_id=259, seed=0)
    for train_mode in (False, True):
        model.train(train_mode)
        checked = 0
        with torch.no_grad():
            alone = [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids in ds.input_ids]
            for batch in batcher.batches(0):
                mb = batcher.collate(batch)
                logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
                for r, row in enumerate(batch):
                    start = 0
                    for i in row:
                        n = len(ds.input_ids[i])
                        torch.testing.assert_close(logits[r, start:start + n], alone[i], atol=1e-5, rtol=0)
                        start, checked = start + n, checked + 1
        assert checked == len(ds) and any(len(row) > 1 for batch in batcher.batches(0) for row in batch)


def test_packing_needs_a_forward_without_kv_cache():
    """Canary: with a cache, transformers ignores packed position_ids and attends across examples. The loop
    passes use_cache=False; if this starts failing, transformers honours packing with a cache too."""
    model = tiny_llama(use_cache=True)
    ds = _dataset([6, 6])
    mb = Batcher(ds, batch_size=1, max_length=12, packing=True, group_by_length=False, pad_id=259,
                 seed=0).collate([[0, 1]])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([ds.input_ids[1]]), use_cache=False).logits[0]
        leaky = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"]).logits[0, 6:]
        sealed = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits[0, 6:]
    assert (leaky - alone).abs().max() > 1e-3
    torch.testing.assert_close(sealed, alone, atol=1e-5, rtol=0)


def test_packing_on_the_conftest_task_fills_rows(train_file, tokenizer):
    train, _, report = load_splits(_cfg([train_file], max_length=128), tokenizer)
    batcher = Batcher(train, batch_size=4, max_length=128, packing=True, group_by_length=False,
                      pad_id=tokenizer.pad_token_id, seed=0)
    stats = batcher.padding_stats()
    assert stats["tokens"] == report.tokens and stats["target_tokens"] == report.trainable_tokens
    assert stats["useful_fraction"] > 0.9
    total = sum(int(batcher.collate(b)["num_target_tokens"]) for b in batcher.batches(0))
    assert total == report.trainable_tokens
    assert Counter(i for b in batcher.batches(5) for row in b for i in row) == Counter(range(len(train)))


# --- input Python's parsers or the tokenizer cannot take ---------------------------------------------

def test_json_too_deep_or_with_a_huge_integer_is_named_by_line():
    deep = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"
    assert parse_json(deep) == (None, 6 + 4999, "nested too deeply (5,001 levels)")  # the deepest '['
    digits_in_a_string = '{"s": "' + "9" * 5000 + '", "n": ' + "7" * 4400 + "}"
    assert parse_json(digits_in_a_string) == (None, digits_in_a_string.index("7"),
                                              "number too long (4,400 digits; at most 4,300)")
    assert parse_json('{"n": ' + "7" * 4300 + ", \"f\": " + "7" * 5000 + ".5}")[2] is None  # floats have no limit
    assert parse_json('{"a": 1,}') == (None, 8, "not valid JSON (Expecting property name enclosed in double "
                                                "quotes at column 9)")


def test_deep_rows_and_huge_integers_in_jsonl_and_json_files(tmp_path, tokenizer):
    good = json.dumps({"prompt": "p", "completion": "c"})
    lines, many = tmp_path / "a.jsonl", tmp_path / "b.json"
    lines.write_text("\n".join([good, "[" * 3000 + "]" * 3000, '{"n": ' + "1" * 4500 + "}", good]) + "\n")
    with pytest.raises(DataError) as err:
        load_splits(_cfg([lines]), tokenizer)
    assert err.value.problems == [f"{lines}:2: nested too deeply (3,000 levels)",
                                  f"{lines}:3: number too long (4,500 digits; at most 4,300)"]
    many.write_text("[\n" + good + ",\n" + '{"n": ' + "1" * 4500 + "}\n]")
    with pytest.raises(LmadaptError, match=rf"(?s){many}:3: number too long \(4,500 digits; at most 4,300\)"):
        load_splits(_cfg([many]), tokenizer)


def test_escaped_lone_surrogates_are_row_problems(tmp_path, tokenizer):
    path = tmp_path / "s.jsonl"
    rows = [{"prompt": "p", "completion": " ok"}, {"prompt": "lone \ud800 here", "completion": " c"},
            {"prompt": "a pair \ud83d\ude00 is fine", "completion": " \udc80"},
            {"messages": [{"role": "user", "content": "hi \udfff"}, {"role": "assistant", "content": "yo"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # json.dumps writes \ud800 escapes
    with pytest.raises(DataError) as err:
        load_splits(_cfg([path], format="prompt_completion"), tokenizer)
    hint = "in JSON, \\ud800-\\udfff escapes must come in high-low pairs"
    assert err.value.problems[:2] == [f"{path}:2: field 'prompt': contains an unpaired surrogate (U+D800); {hint}",
                                      f"{path}:3: field 'completion': contains an unpaired surrogate (U+DC80); {hint}"]
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps(rows[3]) + "\n")
    with pytest.raises(DataError) as err:
        load_splits(_cfg([chat]), tokenizer)
    assert err.value.problems == [f"{chat}:1: field 'messages[0].content': contains an unpaired surrogate "
                                  f"(U+DFFF); {hint}"]
    train, _, report = load_splits(_cfg([path], format="prompt_completion", skip_bad_rows=True), tokenizer)
    assert (len(train), report.rows_skipped) == (1, 3)
    with pytest.raises(ConfigError, match=r"system_prompt: contains an unpaired surrogate \(U\+DCFF\)"):
        from_dict(DataConfig, {"system_prompt": "x\udcff", "use_chat_template": True})


def test_files_without_rows_are_named(tmp_path, tokenizer):
    empty, blank, header, array = (tmp_path / n for n in ("e.jsonl", "b.jsonl", "h.csv", "a.json"))
    empty.write_bytes(b"")
    blank.write_bytes(b"\n  \n\r\n")
    header.write_text("prompt,completion\n")
    array.write_text("[]")
    with pytest.raises(LmadaptError) as err:
        load_splits(_cfg([empty, blank, header, array]), tokenizer)
    why = "holds no rows (the file is empty or blank, a CSV header only, or an empty JSON array)"
    listed = "".join(f"  - {path}: {why}\n" for path in (empty, blank, header, array))
    assert str(err.value) == f"data.train: no rows to train on:\n{listed}Add rows to the file(s), or name other files."
    good = tmp_path / "g.jsonl"
    write_jsonl(good, make_rows(4))
    train, _, report = load_splits(_cfg([good, empty]), tokenizer)
    assert len(train) == 4 and report.empty_files == [str(empty)]
    assert f"1 file(s) held no rows: {empty}." in report.summary()


def test_a_directory_without_data_files_says_so(tmp_path):
    folder = tmp_path / "data"
    (folder / "part").mkdir(parents=True)
    kinds = "no .jsonl/.ndjson/.json/.csv/.parquet/.txt/.md files directly in it"
    with pytest.raises(ConfigError) as err:
        expand_patterns([str(folder)])
    assert err.value.problems == [f"{folder} is a directory with {kinds} (it is empty)"]
    (folder / "notes.docx").write_text("x")
    with pytest.raises(ConfigError) as err:
        expand_patterns([str(folder)])
    assert err.value.problems == [f"{folder} is a directory with {kinds} (it holds 1 file(s) of other types, "
                                  f"e.g. notes.docx)"]
    write_jsonl(folder / "part" / "rows.jsonl", make_rows(2))
    with pytest.raises(ConfigError) as err:
        expand_patterns([str(folder)])
    assert err.value.problems == [f"{folder} is a directory with {kinds}; subfolders are not read (e.g. "
                                  f"{folder / 'part' / 'rows.jsonl'}): name them, or use a glob such as "
                                  f"'{folder}/**/*.jsonl'"]
    assert expand_patterns([f"{folder}/**/*.jsonl"]) == [folder / "part" / "rows.jsonl"]
