"""The loop end to end on a tiny model: it learns, it writes what it says, it resumes exactly, it stops safely."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file

from lmadapt.adapters.format import load_adapter
from lmadapt.errors import DataError, LmadaptError
from lmadapt.training.loop import NonFiniteLoss, Trainer
from lmadapt.recipes.finetune import train


def test_training_lowers_loss_and_writes_the_run_folder(run_config):
    run_config["train"].update(max_steps=30, eval_every=10, lr=2e-2)
    run_config["method"].update(target_modules=["all-linear"], r=8)
    result = train(run_config, progress=False)
    run = Path(run_config["output_dir"])
    losses = [r["loss"] for r in result.loop.history if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4  # nats/token; measured drop ~0.66
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "report.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    report = json.loads((run / "report.json").read_text())
    # r=8 on q,o (64x64), k,v (64->32), gate,up (64->128), down (128->64), in 2 layers
    per_layer = 8 * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 128) + (128 + 64))
    assert report["steps"] == 30 and report["trainable_parameters"] == 2 * per_layer
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_output_folder_is_not_overwritten_unless_asked(run_config):
    out = Path(run_config["output_dir"])
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(LmadaptError, match="already exists and is not empty.*--overwrite"):
        train(run_config, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    train(run_config, ["overwrite=true"], progress=False)
    assert not (out / "precious.txt").exists() and (out / "adapter").is_dir()


def test_bad_data_stops_before_anything_is_written(run_config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    run_config["data"]["train"] = [str(bad)]
    with pytest.raises(DataError, match=r"bad.jsonl:2.*completion"):
        train(run_config, progress=False)
    assert not Path(run_config["output_dir"]).exists()


def _nan_at(step_to_fail):
    """The causal LM objective, with a NaN loss at the ``step_to_fail``-th call."""
    from lmadapt.objectives.causal_lm import CausalLM, CausalLMConfig

    class NanAt(CausalLM):
        calls = 0

        def loss(self, model, batch, **kwargs):
            NanAt.calls += 1
            out = super().loss(model, batch, **kwargs)
            if NanAt.calls == step_to_fail:
                out.loss = out.loss * float("nan")
            return out
    return NanAt(CausalLMConfig())


def _trainer(run_config, tmp_path, objective, **train_overrides):
    from lmadapt.data import load_splits
    from lmadapt.methods import build_method
    from lmadapt.models.loading import load_model
    from lmadapt.recipes.finetune import load_run_config, run_batcher

    run_config["train"].update(train_overrides)
    cfg = load_run_config(run_config)
    model, tok = load_model(cfg.model)
    train_set, _, _ = load_splits(cfg.data, tok)
    method = build_method(cfg.method)
    method.apply(model)
    run_dir = tmp_path / "nanrun"
    run_dir.mkdir()
    return Trainer(model, method, cfg.train, run_batcher(train_set, cfg, tok), None, run_dir, base_model="tiny",
                   base_fingerprint="x", device=torch.device("cpu"), objective=objective)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(run_config, tmp_path):
    trainer = _trainer(run_config, tmp_path, _nan_at(3), save_every=2)
    with pytest.raises(NonFiniteLoss, match=r"stopped at step 3: the loss is nan.*step-0000002"):
        trainer.run(progress=False)
    assert [p.name for p in (trainer.run_dir / "checkpoints").iterdir()] == ["step-0000002"]


def test_nan_loss_can_be_skipped(run_config, tmp_path):
    trainer = _trainer(run_config, tmp_path, _nan_at(3), nan_policy="skip")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.run(progress=False)
    assert result.steps == 6 and result.skipped_steps == 1
    assert [r.get("skipped", False) for r in result.history] == [False, False, True, False, False, False]
    after = dict(trainer.model.named_parameters())
    assert all(torch.isfinite(after[n]).all() and not torch.equal(after[n], t) for n, t in before.items())


def _write_config(run_config, path, output_dir):
    cfg = json.loads(json.dumps(run_config))
    cfg["output_dir"] = str(output_dir)
    cfg["method"]["dropout"] = 0.1  # exercises the RNG state across the resume
    # one thread: with two, about one process in twenty computed the first step's LoRA gradients 1 ulp apart
    # from the others (fp32, same data, nothing resumed; not reproducible inside one process), and a CI run
    # failed on the ref run, not the resumed one. The resume itself is what this test checks.
    cfg["train"].update(max_steps=12, save_every=3, keep_last=2, schedule="cosine", warmup_steps=2,
                        grad_accum=2, threads=1)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args, **kw):
    # MKL_CBWR strict: MKL's GEMM reproducible whatever the buffer alignment (kept; the 9e-7 a CI run saw came
    # from two threads, see _write_config)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}
    return subprocess.Popen([sys.executable, "-m", "lmadapt.cli", *args], env=env, **kw)


def test_resume_after_sigkill_ends_with_the_same_weights(run_config, tmp_path):
    """Kill a real training process with SIGKILL after its second checkpoint; the resumed run ends
    bit-for-bit where an uninterrupted run ends."""
    ref_cfg = _write_config(run_config, tmp_path / "ref.yaml", tmp_path / "ref")
    cut_cfg = _write_config(run_config, tmp_path / "cut.yaml", tmp_path / "cut")
    assert _cli("train", str(ref_cfg), "--no-progress").wait(timeout=300) == 0

    proc = _cli("train", str(cut_cfg), "--no-progress", stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "step-0000006" / "trainer_state.json").exists():
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "adapter").exists(), "killed too late: the run had finished"
    assert _cli("train", str(cut_cfg), "--resume", "--no-progress").wait(timeout=300) == 0

    ref = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert ref.keys() == cut.keys()
    for key in ref:
        torch.testing.assert_close(cut[key], ref[key], rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 13))


def test_resume_without_checkpoint_is_refused(run_config):
    with pytest.raises(LmadaptError, match="does not exist; start the run without --resume"):
        train(run_config, resume=True, progress=False)


def test_a_damaged_checkpoint_is_reported_before_anything_is_restored(run_config, tmp_path):
    """Every file of the checkpoint is read before the first is applied: a truncated optimizer state leaves the
    model's weights, the optimizer and the random generators exactly as they were."""
    import random

    import numpy as np

    from lmadapt.training.checkpoint import CheckpointError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    trained = _trainer(run_config, tmp_path / "a", None, save_every=2, max_steps=5)
    trained.run(progress=False)
    fresh = _trainer(run_config, tmp_path / "b", None)
    newest = trained.run_dir / "checkpoints" / "step-0000004"
    shutil.copytree(trained.run_dir / "checkpoints", fresh.run_dir / "checkpoints")
    cut = fresh.run_dir / "checkpoints" / newest.name / "optimizer.safetensors"
    cut.write_bytes(cut.read_bytes()[:-10])

    weights = {n: p.detach().clone() for n, p in fresh.model.named_parameters() if p.requires_grad}
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    optimizer = fresh.optimizer
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(cut))} is truncated or corrupt.*step-0000002"):
        fresh.resume()
    assert fresh.optimizer is optimizer and fresh.state["step"] == 0
    for name, before in weights.items():
        assert torch.equal(dict(fresh.model.named_parameters())[name], before), name
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    lora_b = [n for n in weights if "lora_B" in n]
    saved = load_file(newest / "adapter" / "adapter_model.safetensors")
    assert lora_b and all(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)  # restoring would change B


def test_cli_end_to_end_train_inspect_merge_generate_eval(run_config, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config))
    assert _cli("train", str(cfg), "train.max_steps=4", "--no-progress").wait(timeout=300) == 0
    adapter = Path(run_config["output_dir"]) / "adapter"

    out = subprocess.run([sys.executable, "-m", "lmadapt.cli", "inspect", str(adapter)], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    assert info["method"]["name"] == "lora" and info["tensors"] == 2 * 2 * 2

    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "lmadapt.cli", "merge", "--model", str(tiny_model_dir), "--adapter",
                    str(adapter), "--output", str(merged)], check=True, capture_output=True)
    ids = torch.randint(0, 250, (2, 12))
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    from lmadapt.api import load

    model, _, _ = load(str(tiny_model_dir), adapter)
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    again = subprocess.run([sys.executable, "-m", "lmadapt.cli", "merge", "--model", str(tiny_model_dir),
                            "--adapter", str(adapter), "--output", str(merged)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr

    gen = subprocess.run([sys.executable, "-m", "lmadapt.cli", "generate", "--model", str(tiny_model_dir),
                          "--adapter", str(adapter), "--prompt", "Text: goal\nTopic:", "--max-new-tokens", "3"],
                         capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr

    data = tmp_path / "eval.jsonl"
    write_jsonl(data, [{"prompt": "Text: goal goal\nTopic:", "label": " sport"},
                       {"prompt": "Text: chip\nTopic:", "label": " tech"}])
    ev = subprocess.run([sys.executable, "-m", "lmadapt.cli", "eval", "--model", str(tiny_model_dir), "--adapter",
                         str(adapter), "--task", "classification", "--data", str(data), "--compare"],
                        capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert "accuracy" in ev.stdout


def test_cli_reports_config_errors_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("trian:\n  lr: 1\nmethod:\n  name: lora\n  r: zero\n")
    res = subprocess.run([sys.executable, "-m", "lmadapt.cli", "train", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "trian: unknown key. Did you mean 'train'?" in res.stderr
    assert "method.r: expected int, got str 'zero'" in res.stderr
    assert "Traceback" not in res.stderr


def test_adapter_on_the_wrong_base_is_refused(run_config, tiny_model_dir):
    from lmadapt.testing import tiny_llama

    train(run_config, progress=False)
    other = tiny_llama(seed=1)
    with pytest.raises(LmadaptError, match="fingerprint"):
        load_adapter(other, Path(run_config["output_dir"]) / "adapter")


def test_loss_on_target_positions_only_equals_the_full_loss(model, tokenizer):
    """Asking for logits only where labels carry loss gives the same loss and gradients as full logits."""
    import torch.nn.functional as F

    from lmadapt.methods import build_method
    from lmadapt.objectives.causal_lm import causal_lm_loss, target_positions

    method = build_method({"name": "lora", "r": 4, "init": "random", "target_modules": ["all-linear"]})
    method.apply(model)
    ids = torch.randint(0, 250, (3, 40))
    labels = torch.full_like(ids, -100)
    labels[0, 30:34] = ids[0, 30:34]
    labels[1, 10:12] = ids[1, 10:12]
    labels[2, 39] = ids[2, 39]
    batch = {"input_ids": ids, "labels": labels}
    assert target_positions(model, labels).tolist() == [9, 10, 29, 30, 31, 32, 38]
    loss, n, out = causal_lm_loss(model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    full = model(input_ids=ids).logits[:, :-1].float()
    ref = F.cross_entropy(full.reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    assert n == 7 and out.logits.shape[1] == 7
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_init_adapter_starts_from_an_existing_adapter(run_config, tmp_path):
    run_config["train"].update(max_steps=3, lr=2e-2)
    first = train(run_config, progress=False)
    source = load_file(first.adapter_dir / "adapter_model.safetensors")
    # one step at a negligible learning rate: the result is the source adapter, not a fresh init
    again = {**run_config, "output_dir": str(tmp_path / "again"), "init_adapter": str(first.adapter_dir),
             "train": {**run_config["train"], "max_steps": 1, "lr": 1e-12}}
    continued = load_file(train(again, progress=False).adapter_dir / "adapter_model.safetensors")
    assert continued.keys() == source.keys()
    for key in source:
        torch.testing.assert_close(continued[key], source[key], rtol=0, atol=1e-7)
    assert any(source[k].abs().max() > 1e-3 for k in source if "lora_B" in k)  # B moved away from 0

    wrong_rank = {**again, "output_dir": str(tmp_path / "wrong"), "method": {**run_config["method"], "r": 2}}
    with pytest.raises(LmadaptError, match=r"adapter_model.safetensors.*lora_A.*shape"):
        train(wrong_rank, progress=False)
