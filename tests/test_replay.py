"""Replay (data.replay; arXiv:2403.08763, METHODS.md section 15): the share of replay rows per batch (within 1% over
10k batches, as METHODS.md asks, and in fact exact to a row), every main row once per epoch, the replay corpus
cycled, the plan a pure function of (seed, epoch), and a resumed run with replay bit-identical to an
uninterrupted one."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import interrupted_at as ctrl_c_at
from conftest import make_rows, write_jsonl
from safetensors.torch import load_file

from lmadapt.data import Batcher
from lmadapt.data.config import DataConfig, ReplayConfig
from lmadapt.data.dataset import TokenizedDataset, load_replay
from lmadapt.data.replay import ReplayBatcher, epoch_batches
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.recipes.finetune import load_run_config, train


def dataset(n: int, seed: int, lo: int = 3, hi: int = 40, base: int = 0) -> TokenizedDataset:
    rng = random.Random(seed)
    out = TokenizedDataset()
    for i in range(n):
        ids = [base + i] * rng.randint(lo, hi)  # every token names its example
        out.add(f"f:{i}", ids, list(ids))
    return out


def batcher(data: TokenizedDataset, batch_size: int, batching: str) -> Batcher:
    return Batcher(data, batch_size=batch_size, max_length=64, packing=batching == "packed",
                   group_by_length=batching == "length_grouped", pad_id=0, seed=3)


@pytest.mark.parametrize("batch_size", [1, 3, 8, 32])
@pytest.mark.parametrize("share", [0.005, 0.05, 0.25, 0.5, 0.9])
def test_the_replay_share_of_10k_batches_is_the_requested_one(share, batch_size):
    counts = epoch_batches(10_000 * batch_size, batch_size, share)[:10_000]
    fraction = sum(counts) / (10_000 * batch_size)
    assert abs(fraction - share) <= 0.01 * share  # METHODS.md: within +-1%
    assert sum(counts) == int(10_000 * batch_size * share + 0.5 + 1e-9)  # floor(n s B + 1/2): to half a row
    assert all(abs(k - share * batch_size) < 1 for k in counts)  # and spread evenly, never bunched


@pytest.mark.parametrize("batching", ["length_grouped", "packed", "padded"])
def test_plans_over_10k_batches_keep_the_share_use_every_main_row_once_and_cycle_the_replay(batching):
    main, replay = dataset(45, seed=1), dataset(13, seed=2, base=1000)  # the replay corpus is the shorter
    b = ReplayBatcher(batcher(main, 8, batching), replay, share=0.25)
    main_rows = sum(len(batch) for batch in b.main.batches(0))
    seen, replay_seen, total_rows, batches, epoch = Counter(), Counter(), 0, 0, 0
    while batches < 10_000:
        plan = b.batches(epoch)
        assert len(plan) == len(b) and all(len(batch) <= 8 for batch in plan)
        main_part = [tuple(r) for batch in plan for r in batch if not b.is_replay(r)]
        assert sorted(main_part) == sorted(tuple(r) for batch in b.main.batches(epoch) for r in batch)
        assert len(main_part) == main_rows  # one pass over the main rows per epoch
        for batch in plan:
            replay_seen.update(i for r in batch if b.is_replay(r) for i in r)
            total_rows += len(batch)
        seen.update(i for r in main_part for i in r)
        batches += len(plan)
        epoch += 1
    replay_rows = sum(replay_seen.values()) if batching != "packed" else None
    fraction = sum(1 for e in range(epoch) for batch in b.batches(e) for r in batch if b.is_replay(r)) / total_rows
    assert abs(fraction - 0.25) <= 0.5 / (main_rows + b.per_epoch)  # to half a row per epoch
    assert set(seen) == set(range(45))
    # cycled: each replay example used as often as any other, to one pass
    assert set(replay_seen) == set(range(45, 58)) and max(replay_seen.values()) - min(replay_seen.values()) <= 1
    if replay_rows is not None:
        assert replay_rows == epoch * b.per_epoch


def test_the_plan_is_a_pure_function_of_seed_and_epoch_and_collates_the_replay_tokens():
    main, replay = dataset(30, seed=1), dataset(20, seed=2, base=1000)
    first, again = (ReplayBatcher(batcher(main, 4, "length_grouped"), replay, share=0.5) for _ in range(2))
    assert [again.batches(e) for e in (3, 0, 7)] == [first.batches(e) for e in (3, 0, 7)]  # any order of epochs
    other_seed = ReplayBatcher(Batcher(main, batch_size=4, max_length=64, packing=False, group_by_length=True,
                                       pad_id=0, seed=4), replay, share=0.5)
    assert other_seed.batches(0) != first.batches(0)
    batch = first.batches(2)[5]
    out = first.collate(batch)
    for b, row in enumerate(batch):
        (i,) = row
        want = (main if i < 30 else replay).input_ids[i if i < 30 else i - 30]
        assert out["input_ids"][b, :len(want)].tolist() == want
    assert sum(first.is_replay(r) for r in batch) == 2


def test_packed_replay_rows_are_packed_from_the_replay_corpus_only():
    main, replay = dataset(30, seed=1), dataset(40, seed=2, lo=3, hi=10, base=1000)
    b = ReplayBatcher(batcher(main, 4, "packed"), replay, share=0.25)
    batch = b.batches(0)[0]
    out = b.collate(batch)
    assert out["input_ids"].shape == (4, 64)
    for row, ids in zip(batch, out["input_ids"].tolist()):
        real = [t for t in ids if t != 0]
        assert all((t >= 1000) == b.is_replay(row) for t in real)  # a row holds one corpus
        assert len(real) == sum(len(b.collator.dataset.input_ids[i]) for i in row)


def test_replay_settings_are_checked():
    assert ReplayConfig(train=["old.jsonl"], share=0.25).check() == []
    assert ReplayConfig().check() == []  # no replay
    assert ReplayConfig(train=["old.jsonl"]).check()[0].startswith("share: 0 takes nothing")
    assert ReplayConfig(share=0.1).check()[0].startswith("train: share > 0 but no replay files")
    assert ReplayConfig(train=["x"], share=1.0).check()[0].startswith("share: must be in [0, 1)")
    with pytest.raises(ConfigError, match=r"data\.replay\.fromat: unknown key. Did you mean 'format'\?"):
        load_run_config({"data": {"train": ["x.jsonl"], "replay": {"train": ["y.jsonl"], "fromat": "text"}}})
    with pytest.raises(ConfigError, match=r"data\.replay: replay mixes next-token rows into the batches, which "
                                          r"train_tasks cannot take"):
        load_run_config({"data": {"train": ["x.jsonl"], "train_tasks": [0],
                                  "replay": {"train": ["y.jsonl"], "share": 0.2}}})


def test_the_replay_corpus_is_read_with_its_own_format_and_errors_name_data_replay(tmp_path, tokenizer):
    old = tmp_path / "old.jsonl"
    write_jsonl(old, [{"content": "The cat sat on the mat."}, {"content": "Dogs bark."}])
    cfg = DataConfig(train=["unused.jsonl"], format="prompt_completion", use_chat_template=True,
                     replay=ReplayConfig(train=[str(old)], share=0.25, format="text", text_field="content"))
    replay, report = load_replay(cfg, tokenizer)
    assert len(replay) == 2 and report.format == "text"
    assert tokenizer.decode(replay.input_ids[1]).startswith("Dogs bark.")
    assert all(label == i for label, i in zip(replay.labels[1][1:], replay.input_ids[1][1:]))  # text: all trained
    missing = DataConfig(train=["unused.jsonl"], replay=ReplayConfig(train=[str(tmp_path / "no.jsonl")], share=0.1))
    with pytest.raises((ConfigError, LmadaptError), match=r"data\.replay\.train"):
        load_replay(missing, tokenizer)


# ------------------------------------------------------------------------------------------------ through the loop

@pytest.fixture
def replay_config(run_config, tmp_path):
    old = tmp_path / "old.jsonl"
    write_jsonl(old, [{"text": " ".join(r["prompt"].split()[1:])} for r in make_rows(10, seed=7)])
    cfg = json.loads(json.dumps(run_config))
    cfg["data"]["replay"] = {"train": [str(old)], "share": 0.25}
    cfg["data"]["batching"] = "padded"
    cfg["method"]["dropout"] = 0.1  # the RNG state crosses the resume too
    cfg["train"].update(max_steps=8, save_every=2, grad_accum=2, threads=1, precision="fp32", schedule="infinite",
                        warmup_steps=2, cooldown_steps=2)
    return cfg


def test_a_resumed_replay_run_ends_bit_identical_to_an_uninterrupted_one(replay_config, tmp_path):
    def run(name: str) -> dict:
        return {**replay_config, "output_dir": str(tmp_path / name)}

    straight = train(run("straight"), progress=False)
    with ctrl_c_at(5), pytest.raises(KeyboardInterrupt):
        train(run("cut"), progress=False)
    resumed = train(run("cut"), resume=True, progress=False)
    a = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.report["input_tokens"] == straight.report["input_tokens"]
    assert straight.report["replay_data"]["train_examples"] == 10

    # the replay rows are trained on: the same run without them ends elsewhere, having read other tokens
    plain = {**run("plain"), "data": {k: v for k, v in replay_config["data"].items() if k != "replay"}}
    without = train(plain, progress=False)
    c = load_file(str(without.adapter_dir / "adapter_model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert without.report["input_tokens"] != straight.report["input_tokens"]


def test_changing_the_replay_on_resume_is_refused(replay_config, tmp_path):
    cfg = {**replay_config, "output_dir": str(tmp_path / "run")}
    with ctrl_c_at(3), pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    changed = json.loads(json.dumps(cfg))
    changed["data"]["replay"]["share"] = 0.5
    with pytest.raises(LmadaptError, match=r"data\.replay\.share: run has 0\.25, now 0\.5"):
        train(changed, resume=True, progress=False)
    assert Path(cfg["output_dir"], "checkpoints").is_dir()
