"""``lmadapt recovery-data``: the continuations are those a hand-written sampling loop draws with the seed (greedy:
transformers' greedy generate), the file loads in its declared format and trains, the same seed writes the same
bytes, outputs are never overwritten unasked nor left half-written, and bad rows are named by file, line and
field; the command end to end on the tiny model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl

import lmadapt
from lmadapt.cli import main
from lmadapt.data import DataConfig, load_splits
from lmadapt.decoding.generation import stop_token_ids
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.recipes import recovery_data as recipe
from lmadapt.recipes.finetune import train
from lmadapt.testing import tiny_llama, tiny_lora_adapters, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["The cat", "A house", "Rivers ", "Bread i", "Old oak"]  # 7 bytes each: 7 tokens, no padding


def hand_sample(model, tok, prompts: list[str], *, seed: int, batch_size: int, new: int, temperature: float,
                top_k: int, top_p: float, per: int) -> list[list[str]]:
    """``out[i][k]``: torch.manual_seed(seed) once, then per batch of ``batch_size`` (prompt, sample) pairs a KV-cached
    loop that draws torch.multinomial(softmax(top_p(top_k(z / T)))) for every row until all rows have stopped."""
    stops = stop_token_ids(model, tok)
    jobs = [(i, k) for i in range(len(prompts)) for k in range(per)]
    out = [[""] * per for _ in prompts]
    torch.manual_seed(seed)
    with torch.inference_mode():
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            step = model(torch.tensor([tok(prompts[i]).input_ids for i, _ in batch]), use_cache=True)
            tokens: list[list[int]] = [[] for _ in batch]
            done = [False] * len(batch)
            for _ in range(new):
                z = step.logits[:, -1, :].float() / temperature
                if top_k:
                    z = z.masked_fill(z < torch.topk(z, top_k).values[:, -1:], -math.inf)
                ascending, order = torch.sort(z)
                cut = ascending.softmax(-1).cumsum(-1) <= 1 - top_p  # the least likely tokens outside the nucleus
                cut[:, -1] = False
                z = z.masked_fill(cut.scatter(1, order, cut), -math.inf)
                drawn = torch.multinomial(z.softmax(-1), 1)
                for row, t in enumerate(drawn[:, 0].tolist()):
                    if not done[row]:
                        done[row] = t in stops
                        tokens[row] += [] if done[row] else [t]
                if all(done):
                    break
                step = model(drawn, past_key_values=step.past_key_values, use_cache=True)
            for (i, k), ids in zip(batch, tokens):
                out[i][k] = tok.decode(ids, skip_special_tokens=True)
    return out


def hf_greedy(model, tok, ids: list[int], new: int) -> str:
    """transformers' greedy generate of one unpadded prompt, decoded up to the first stop token."""
    stops = stop_token_ids(model, tok)
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new, eos_token_id=sorted(stops),
                         pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    return tok.decode(out[:next((j for j, t in enumerate(out) if t in stops), len(out))], skip_special_tokens=True)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, [{"prompt": p} for p in PROMPTS])
    return path


def make(tiny_model_dir, tmp_path, **settings) -> recipe.RecoveryReport:
    settings.setdefault("output", str(tmp_path / "out.jsonl"))
    settings.setdefault("model", str(tiny_model_dir))
    return lmadapt.make_recovery_data(progress=False, **settings)


# ------------------------------------------------------------------------------------------------ what is sampled

def test_continuations_are_what_a_hand_sampling_loop_draws_with_the_seed(tiny_model_dir, prompt_file, tmp_path):
    sampling = {"seed": 11, "batch_size": 4, "temperature": 0.8, "top_k": 40, "top_p": 0.9}
    report = make(tiny_model_dir, tmp_path, inputs=[str(prompt_file)], format="completion", samples_per_prompt=2,
                  max_new_tokens=12, **sampling)
    expected = hand_sample(tiny_llama(), tiny_tokenizer(), PROMPTS, new=12, per=2, **sampling)
    flat = [(p, c) for p, samples in zip(PROMPTS, expected) for c in samples]
    assert len({c for _, c in flat}) == 10  # ten different samples: the stream is not reseeded per batch
    kept = [{"prompt": p, "completion": c} for p, c in flat if c.strip()]
    assert rows_of(report.path) == kept
    assert report.counts == {"prompts": 5, "samples": 10, "dropped_empty": 10 - len(kept), "dropped_short": 0,
                             "dropped_duplicate": 0, "rows": len(kept)}


def test_greedy_equals_transformers_greedy_generate(tiny_model_dir, tmp_path):
    path = tmp_path / "varied.jsonl"
    texts = ["Hi", "A longer prompt", "Mid size"]
    write_jsonl(path, [{"prompt": t} for t in texts])
    report = make(tiny_model_dir, tmp_path, inputs=[str(path)], temperature=0.0, max_new_tokens=10, batch_size=1)
    model, tok = tiny_llama(), tiny_tokenizer()
    expected = [t + hf_greedy(model, tok, tok(t).input_ids, 10) for t in texts]
    assert [r["text"] for r in rows_of(report.path)] == [e for e, t in zip(expected, texts) if e != t]


def test_text_rows_prompt_with_their_first_tokens_and_from_scratch_with_bos_alone(tiny_model_dir, tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = ["Once upon a time there was a king.", "Short", "Rain fell on the quiet town all night."]
    write_jsonl(path, [{"text": d} for d in docs])
    report = make(tiny_model_dir, tmp_path, inputs=[str(path)], prompt_tokens=9, temperature=0.0, max_new_tokens=8,
                  batch_size=1)
    model, tok = tiny_llama(), tiny_tokenizer()
    prefixes = [d[:9] for d in docs]  # one token per byte: 9 tokens are 9 characters; "Short" is used whole
    texts = [p + hf_greedy(model, tok, tok(p).input_ids, 8) for p in prefixes]
    assert [r["text"] for r in rows_of(report.path)] == [t for t, p in zip(texts, prefixes) if t != p]
    assert yaml.safe_load(report.meta_path.read_text())["prompts"] == {
        "kind": "text", "files": [str(path)], "count": 3, "prompt_tokens": 9}

    scratch = make(tiny_model_dir, tmp_path, output=str(tmp_path / "scratch.jsonl"), from_scratch=2,
                   temperature=0.0, max_new_tokens=8, format="completion")
    alone = hf_greedy(model, tok, [tok.bos_token_id], 8)
    assert rows_of(scratch.path) == [{"prompt": "", "completion": alone}] * 2


def test_messages_are_answered_after_their_last_user_turn_with_the_chat_template(tiny_model_dir, tmp_path):
    path = tmp_path / "chat.jsonl"
    talk = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Name a fruit"},
            {"role": "assistant", "content": "Apple"}]
    write_jsonl(path, [{"messages": talk}])
    report = make(tiny_model_dir, tmp_path, inputs=[str(path)], temperature=0.0, max_new_tokens=8)
    model, tok = tiny_llama(), tiny_tokenizer()
    ids = tok.apply_chat_template(talk[:4], add_generation_prompt=True, tokenize=True, return_dict=False)
    answer = hf_greedy(model, tok, list(ids), 8)
    assert report.format == "chat"
    assert rows_of(report.path) == [{"messages": talk[:4] + [{"role": "assistant", "content": answer}]}]


def test_an_adapter_samples_from_the_tuned_model(tiny_model_dir, tmp_path):
    adapter = tiny_lora_adapters({"r": 4, "alpha": 8}, root=tmp_path / "adapters")[0]
    report = make(tiny_model_dir, tmp_path, adapter=adapter, from_scratch=1, temperature=0.0, max_new_tokens=8)
    tuned, tok, _ = lmadapt.load(str(tiny_model_dir), adapter)
    plain = hf_greedy(tiny_llama(), tok, [tok.bos_token_id], 8)
    expected = hf_greedy(tuned, tok, [tok.bos_token_id], 8)
    assert expected != plain
    assert rows_of(report.path) == [{"text": expected}]
    meta = yaml.safe_load(report.meta_path.read_text())
    assert (meta["adapter"], meta["method"]) == (str(Path(adapter).resolve()), "lora")


# ------------------------------------------------------------------------------------------------ filters

def test_dedup_and_min_new_tokens_drop_and_count(tiny_model_dir, tmp_path):
    copies = make(tiny_model_dir, tmp_path, output=str(tmp_path / "greedy.jsonl"), from_scratch=4, temperature=0.0,
                  max_new_tokens=6, dedup=True)
    assert copies.counts["rows"] == 1 and copies.counts["dropped_duplicate"] == 3

    settings = {"from_scratch": 12, "max_new_tokens": 10, "seed": 3}
    everything = make(tiny_model_dir, tmp_path, output=str(tmp_path / "all.jsonl"), **settings)
    tok = tiny_tokenizer()
    lengths = [len(tok(r["text"], add_special_tokens=False).input_ids) for r in rows_of(everything.path)]
    least = sorted(lengths)[len(lengths) // 2]  # the median: some rows fall short of it, some do not
    assert min(lengths) < least
    short = make(tiny_model_dir, tmp_path, output=str(tmp_path / "long.jsonl"), min_new_tokens=least, **settings)
    assert rows_of(short.path) == [r for r, n in zip(rows_of(everything.path), lengths) if n >= least]
    assert short.counts["dropped_short"] == sum(n < least for n in lengths) > 0


# ------------------------------------------------------------------------------------------------ the file

@pytest.mark.parametrize("fmt", ["text", "completion", "chat"])
def test_the_file_loads_in_its_declared_format(tiny_model_dir, prompt_file, tmp_path, fmt):
    report = make(tiny_model_dir, tmp_path, inputs=[str(prompt_file)], format=fmt, samples_per_prompt=2,
                  max_new_tokens=8, chat=fmt != "text")
    meta = yaml.safe_load(report.meta_path.read_text())
    keys = {k.removeprefix("data."): v for k, v in meta["train_with"].items()}
    assert keys == report.data_keys == {"format": {"text": "text", "completion": "prompt_completion",
                                                   "chat": "chat"}[fmt], **({"use_chat_template": True}
                                                                            if fmt == "completion" else {})}
    train_set, _, data_report = load_splits(DataConfig(train=[str(report.path)], **keys), tiny_tokenizer())
    assert data_report.format == keys["format"]
    assert len(train_set) == report.counts["rows"] > 0


def test_the_file_trains_as_data_and_as_replay(tiny_model_dir, prompt_file, run_config, tmp_path):
    chat = make(tiny_model_dir, tmp_path, output=str(tmp_path / "chat.jsonl"), inputs=[str(prompt_file)],
                format="chat", max_new_tokens=8)
    text = make(tiny_model_dir, tmp_path, output=str(tmp_path / "text.jsonl"), from_scratch=4, max_new_tokens=8)
    run_config["data"] = {"train": [str(chat.path)], "max_length": 64,
                          "replay": {"train": [str(text.path)], "share": 0.5, "format": "text"}}
    run_config["train"].update(max_steps=1, batch_size=2)
    result = train(run_config, progress=False)
    assert result.loop.steps == 1 and math.isfinite(result.loop.final_loss)


def test_the_same_seed_writes_the_same_bytes(tiny_model_dir, prompt_file, tmp_path):
    def once(name: str, seed: int) -> tuple[bytes, bytes]:
        report = make(tiny_model_dir, tmp_path, output=str(tmp_path / name), inputs=[str(prompt_file)], seed=seed,
                      samples_per_prompt=2, max_new_tokens=10, top_p=0.95)
        return report.path.read_bytes(), report.meta_path.read_bytes()

    first, again, other = once("a.jsonl", 5), once("b.jsonl", 5), once("c.jsonl", 6)
    assert first == again
    assert first[0] != other[0]


def test_an_existing_output_is_refused_unless_overwrite(tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(LmadaptError, match=r"out\.jsonl already exists.*--overwrite"):
        make(tiny_model_dir, tmp_path, inputs=[str(prompt_file)], model="no-such-model")  # refused before loading
    assert out.read_text() == "keep me\n"
    out.unlink()
    recipe.meta_path(out).write_text("old: provenance\n")
    with pytest.raises(LmadaptError, match=r"meta\.yaml already exists"):
        make(tiny_model_dir, tmp_path, inputs=[str(prompt_file)])
    report = make(tiny_model_dir, tmp_path, inputs=[str(prompt_file)], max_new_tokens=4, overwrite=True)
    assert len(rows_of(report.path)) == report.counts["rows"]
    assert "old" not in yaml.safe_load(report.meta_path.read_text())


def test_a_crash_while_sampling_leaves_no_file(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    calls = []
    real = recipe.generate

    def fail_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "generate", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        make(tiny_model_dir, tmp_path, inputs=[str(prompt_file)], batch_size=2, max_new_tokens=4)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]  # no output, provenance or temporary file


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_rows_are_named_by_file_line_and_field_before_the_model_loads(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "fine"}), json.dumps({"prompt": 3}), json.dumps({"text": "x"}),
                               "{not json", json.dumps({"prompt": "  "})]) + "\n")
    chat = tmp_path / "bad_chat.jsonl"
    write_jsonl(chat, [{"messages": [{"role": "user", "content": "ok"}]},
                       {"messages": [{"role": "boss", "content": "hi"}, {"role": "user", "content": 5}]},
                       {"messages": [{"role": "system", "content": "s"}]}, {"messages": []}])
    with pytest.raises(DataError) as caught:  # no model named: bad rows are refused before loading
        lmadapt.make_recovery_data(output=str(tmp_path / "o.jsonl"), inputs=[str(path)], model="no-such-model")
    message = str(caught.value)
    for expected in (f"{path}:2: field 'prompt': expected a string, got int",
                     f"{path}:3: field 'prompt' is missing (the row has: text)",
                     f"{path}:4: not valid JSON", f"{path}:5: field 'prompt' is empty"):
        assert expected in message
    assert f"{path}:1" not in message and "4 malformed row(s)" in message
    with pytest.raises(DataError) as caught:
        lmadapt.make_recovery_data(output=str(tmp_path / "o.jsonl"), inputs=[str(chat)], model="no-such-model")
    message = str(caught.value)
    assert re.search(rf"{re.escape(str(chat))}:2: field 'messages\[0\]\.role': .*got 'boss'; "
                     rf"field 'messages\[1\]\.content': expected a string, got int", message)
    assert f"{chat}:3: field 'messages': no user turn" in message
    assert f"{chat}:4: field 'messages': expected a non-empty list of turns, got an empty list" in message
    assert not list(tmp_path.glob("o.jsonl*"))


def test_contradicting_settings_are_refused_together(tmp_path, prompt_file):
    with pytest.raises(ConfigError) as caught:
        lmadapt.make_recovery_data(output=str(tmp_path / "o.json"), inputs=[str(prompt_file)], from_scratch=3,
                                   temperature=0.0, samples_per_prompt=2, top_p=0.0, model="no-such-model")
    message = str(caught.value)
    for expected in ("output: ", "must end in .jsonl", "Choose one.", "samples_per_prompt: 2 greedy",
                     "top_p must be in (0, 1]"):
        assert expected in message
    inputs = [str(prompt_file)]
    for settings, expected in [({"inputs": inputs, "format": "text", "chat": True}, "format: text rows would"),
                               ({"from_scratch": 2, "format": "chat"}, "from_scratch: samples from the BOS"),
                               ({"inputs": inputs, "system_prompt": "Be kind."}, "system_prompt: only")]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            lmadapt.make_recovery_data(output=str(tmp_path / "o.jsonl"), model="no-such-model", **settings)


# ------------------------------------------------------------------------------------------------ the command

def test_the_command_end_to_end(tiny_model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    argv = ["recovery-data", str(prompt_file), "--output", str(out), "--model", str(tiny_model_dir),
            "--samples-per-prompt", "2", "--max-new-tokens", "8", "--seed", "4", "--temperature", "0.9",
            "--format", "completion", "--no-progress", "--threads", "1", "--max-prompts", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = rows_of(out)
    assert f"wrote {len(rows)} completion rows to {out} (4 prompts, 8 samples in" in printed
    assert "data.format: prompt_completion" in printed
    api = make(tiny_model_dir, tmp_path, output=str(tmp_path / "api.jsonl"), inputs=[str(prompt_file)],
               samples_per_prompt=2, max_new_tokens=8, seed=4, temperature=0.9, format="completion", max_prompts=4)
    assert api.path.read_bytes() == out.read_bytes()
    assert {r["prompt"] for r in rows} <= set(PROMPTS[:4])
    meta = yaml.safe_load(recipe.meta_path(out).read_text())
    assert meta["lmadapt_version"] == lmadapt.__version__ and meta["model"] == str(Path(tiny_model_dir).resolve())
    assert meta["sampling"] == {"samples_per_prompt": 2, "max_new_tokens": 8, "temperature": 0.9, "top_k": 0,
                                "top_p": 1.0, "seed": 4, "batch_size": 8}
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["recovery-data", "--output", str(tmp_path / "x.jsonl"), "--model", str(tiny_model_dir)]) == 2
    assert "Choose one." in capsys.readouterr().err
