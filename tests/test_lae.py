"""LAE (arXiv:2303.10070): the offline EMA copy kept by the loop, and the online/offline ensemble at inference.

Training: with m = 0 the offline copy equals the online one after every step, with m = 1 it never moves, and for
any m (and a warm-up) it is the hand-computed recursion off_k = m off_{k-1} + (1 - m) on_k over the online values
the loop produced, for LoRA, IA3 and prompt tuning, fp32 and bf16; a run killed and resumed ends with the same
online and offline adapters as one that was not. Inference: the three combination rules against their formulas,
an ensemble of two identical adapters is that adapter (log-probabilities, scores, greedy text, CLI), and an
ensemble of two different ones is the combination of the two models run apart, with and without the KV cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_rows, write_jsonl
from safetensors.torch import load_file
from test_resume import ctrl_c_at

from lmadapt.adapters.format import WEIGHTS_NAME, adapter_metadata
from lmadapt.api import ENSEMBLE_ADAPTER, evaluate_model, load, load_ensemble, steer
from lmadapt.cli import main
from lmadapt.data import load_splits
from lmadapt.decoding.ensemble import COMBINES, EnsembleLM, combine_logprobs
from lmadapt.decoding.generation import generate
from lmadapt.decoding.scoring import score_continuations
from lmadapt.errors import AdapterError, ConfigError, LmadaptError
from lmadapt.methods import build_method
from lmadapt.models.loading import load_model
from lmadapt.recipes.finetune import (
    load_run_config,
    run_batcher,
    train,
    training_model_config,
)
from lmadapt.training.checkpoint import LAE_NAME, CheckpointError
from lmadapt.training.lae import OFFLINE_DIR
from lmadapt.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "ia3": {"name": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 4, "init": "random"},
}
PROMPTS = ["Text: goal team coach\nTopic:", "Text: chip\nTopic:", "Hello"]


@pytest.fixture(scope="module")
def make_config(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(data, make_rows(48))

    def make(output_dir: Path, method: str = "lora", **train_fields) -> dict:
        return {"model": {"name_or_path": str(tiny_model_dir)},
                "data": {"train": [str(data)], "max_length": 128},
                "method": dict(METHODS[method]),
                "train": {"lr": 2e-2, "batch_size": 4, "max_steps": 6, "tensorboard": False, "schedule": "constant",
                          "threads": 1, "lae_momentum": 0.6, **train_fields},
                "output_dir": str(output_dir)}
    return make


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS_NAME))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def lora_run(make_config, tmp_path_factory) -> Path:
    """A finished 6-step LoRA run with m = 0.6 and checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("lora") / "run"
    train(make_config(run, save_every=2), progress=False)
    return run


@pytest.fixture(scope="module")
def ia3_run(make_config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ia3") / "run"
    train(make_config(run, "ia3", max_steps=3, lr=5e-2), progress=False)
    return run


# --- the offline copy during training --------------------------------------------------------------------------

def trainer_for(cfg: dict, tmp_path: Path) -> Trainer:
    run = load_run_config(cfg)
    method = build_method(run.method)
    model, tok = load_model(training_model_config(run, method))
    train_set, _, _ = load_splits(run.data, tok)
    method.apply(model)
    (tmp_path / "t").mkdir(parents=True)
    return Trainer(model, method, run.train, run_batcher(train_set, run, tok), None, tmp_path / "t",
                   base_model="tiny", base_fingerprint="x", device=torch.device("cpu"))


def recorded_run(trainer: Trainer) -> tuple[dict, list[dict], list[dict]]:
    """(offline at the start, the online values after each step, the offline values after each step), float64."""
    lae, f64 = trainer.lae, lambda d: {n: t.detach().double().clone() for n, t in d.items()}
    start, online, offline = f64(lae.offline), [], []
    update = lae.update

    def spy(step: int, retrack: bool = False) -> None:
        update(step, retrack)
        online.append(f64(lae._params))
        offline.append(f64(lae.offline))
    lae.update = spy
    trainer.run(progress=False)
    return start, online, offline


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning"])
def test_the_offline_copy_is_the_hand_computed_ema(make_config, tmp_path, method, precision):
    m, warmup = 0.7, 1
    trainer = trainer_for(make_config(tmp_path / "unused", method, max_steps=4, precision=precision,
                                      lae_momentum=m, lae_warmup_steps=warmup), tmp_path)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(trainer.lae.offline) == trainable and trainable
    assert all(t.dtype == torch.float32 for t in trainer.lae.offline.values())
    start, online, offline = recorded_run(trainer)
    assert len(online) == 4
    assert any(not torch.equal(online[-1][n], start[n]) for n in start)  # the online adapter moved
    expected = start
    for k, on in enumerate(online, 1):
        mk = 0.0 if k <= warmup else m
        expected = {n: mk * expected[n] + (1 - mk) * on[n] for n in on}
        for n in on:
            torch.testing.assert_close(offline[k - 1][n], expected[n], rtol=1e-6, atol=1e-7, msg=f"step {k} {n}")
    assert any((offline[-1][n] - online[-1][n]).abs().max() > 1e-4 for n in start)  # the average lags


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_momentum_0_follows_the_online_copy_and_momentum_1_never_moves(make_config, tmp_path, method):
    for m in (0.0, 1.0):
        trainer = trainer_for(make_config(tmp_path / "unused", method, max_steps=3, lae_momentum=m), tmp_path / str(m))
        start, online, offline = recorded_run(trainer)
        for on, off in zip(online, offline):
            for n in on:
                assert torch.equal(off[n], on[n].float().double() if m == 0 else start[n]), (m, n)
        assert any(not torch.equal(online[-1][n], start[n]) for n in start)


def test_config_checks_name_the_lae_keys(make_config, tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_run_config(make_config(tmp_path, lae_momentum=1.5))
    assert "train.lae_momentum: must be in [0, 1]" in str(exc.value)
    with pytest.raises(ConfigError, match="lae_warmup_steps and lae_offline_init .* set lae_momentum"):
        load_run_config(make_config(tmp_path, lae_momentum=None, lae_warmup_steps=3))


# --- run folder, checkpoints, resume ---------------------------------------------------------------------------

def test_the_run_writes_the_offline_adapter_beside_the_online_one(lora_run):
    online, offline = tensors(lora_run / "adapter"), tensors(lora_run / OFFLINE_DIR)
    assert online.keys() == offline.keys()
    assert max((online[k] - offline[k]).abs().max() for k in online) > 1e-4
    record = json.loads(adapter_metadata(lora_run / OFFLINE_DIR)["lmadapt"])
    assert record["lae"] == {"role": "offline", "momentum": 0.6, "warmup_steps": 0}
    assert record["method"] == json.loads(adapter_metadata(lora_run / "adapter")["lmadapt"])["method"]
    for step in ("step-0000002", "step-0000004"):
        assert (lora_run / "checkpoints" / step / LAE_NAME).is_file()


def test_a_killed_run_resumes_to_the_same_online_and_offline_adapters(make_config, lora_run, tmp_path):
    cut = tmp_path / "cut"
    with ctrl_c_at(5), pytest.raises(KeyboardInterrupt):
        train(make_config(cut, save_every=2), progress=False)
    bare = Path(shutil.copytree(cut, tmp_path / "bare"))
    (bare / "checkpoints" / "step-0000004" / LAE_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"holds no LAE offline copy \\({LAE_NAME}\\)"):
        train(make_config(bare, save_every=2), resume=True, progress=False)

    train(make_config(cut, save_every=2), resume=True, progress=False)
    assert_same(tensors(cut / "adapter"), tensors(lora_run / "adapter"))
    assert_same(tensors(cut / OFFLINE_DIR), tensors(lora_run / OFFLINE_DIR))


def test_the_offline_copy_can_start_from_the_previous_tasks_offline_adapter(make_config, lora_run, tmp_path):
    cfg = make_config(tmp_path / "next", max_steps=2, lae_momentum=1.0,
                      lae_offline_init=str(lora_run / OFFLINE_DIR))
    cfg["init_adapter"] = str(lora_run / "adapter")
    train(cfg, progress=False)
    assert_same(tensors(tmp_path / "next" / OFFLINE_DIR), tensors(lora_run / OFFLINE_DIR))  # m = 1: kept as loaded
    assert not torch.equal(tensors(tmp_path / "next" / "adapter")[next(iter(tensors(lora_run / "adapter")))],
                           tensors(lora_run / "adapter")[next(iter(tensors(lora_run / "adapter")))])

    bad = make_config(tmp_path / "bad", lae_offline_init=str(tmp_path / "nowhere"))
    with pytest.raises(AdapterError, match="train.lae_offline_init: .*nowhere is not an adapter folder"):
        train(bad, progress=False)
    assert not (tmp_path / "bad").exists()


# --- the ensemble ---------------------------------------------------------------------------------------------

def test_the_combination_rules_are_their_formulas():
    a = torch.tensor([[0.5, 0.3, 0.2]]).log()
    b = torch.tensor([[0.1, 0.6, 0.3]]).log()
    torch.testing.assert_close(combine_logprobs([a, b], "prob"), torch.tensor([[0.3, 0.45, 0.25]]).log())
    torch.testing.assert_close(combine_logprobs([a, b], "prob", [0.25, 0.75]),
                               torch.tensor([[0.2, 0.525, 0.275]]).log())
    geo = torch.tensor([[math.sqrt(0.05), math.sqrt(0.18), math.sqrt(0.06)]]).log()
    torch.testing.assert_close(combine_logprobs([a, b], "logprob"), geo)
    torch.testing.assert_close(combine_logprobs([a, b], "max"), torch.tensor([[0.5, 0.6, 0.3]]).log())
    with pytest.raises(LmadaptError, match="prob, logprob, max"):
        combine_logprobs([a, b], "mean")


def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().log_softmax(-1)


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("which", ["lora", "ia3", "lora-bf16"])
def test_an_ensemble_of_an_adapter_with_itself_is_that_adapter(lora_run, ia3_run, which, combine):
    run, dtype = (ia3_run, None) if which == "ia3" else (lora_run, "bf16" if which.endswith("bf16") else None)
    single, tok, _ = load(None, run / "adapter", dtype=dtype)
    ensemble, _ = load_ensemble(None, run / "adapter", run / "adapter", combine=combine, dtype=dtype)
    assert len(ensemble.models) == (1 if which.startswith("lora") else 2)  # LoRA shares one base model
    atol = 1e-5 if dtype is None else 0  # the members are the same bf16 model, so the rule alone can differ
    torch.testing.assert_close(logprobs(ensemble, IDS).log_softmax(-1), logprobs(single, IDS),
                               rtol=0, atol=max(atol, 1e-5))
    for got, want in zip(score_continuations(ensemble, [5, 6, 7], [[8, 9, 10], [11]]),
                         score_continuations(single, [5, 6, 7], [[8, 9, 10], [11]])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert generate(ensemble, tok, PROMPTS, max_new_tokens=6) == generate(single, tok, PROMPTS, max_new_tokens=6)


@pytest.mark.parametrize("combine", COMBINES)
def test_an_ensemble_of_two_adapters_combines_the_two_models_run_apart(lora_run, combine):
    online, tok, _ = load(None, lora_run / "adapter")
    offline, _, _ = load(None, lora_run / OFFLINE_DIR)
    ensemble, _ = load_ensemble(None, lora_run / "adapter", lora_run / OFFLINE_DIR, combine=combine)
    assert [m.adapter for m in ensemble.members] == ["default", ENSEMBLE_ADAPTER]
    expected = combine_logprobs([logprobs(online, IDS), logprobs(offline, IDS)], combine).log_softmax(-1)
    assert (logprobs(online, IDS) - logprobs(offline, IDS)).abs().max() > 1e-4  # two different adapters
    torch.testing.assert_close(logprobs(ensemble, IDS), expected, rtol=0, atol=1e-5)

    # greedy decoding from the members' KV caches == the argmax of the whole-sequence ensemble, token by token
    rows = [list(tok(p).input_ids) for p in PROMPTS[:2]]
    want = []
    for row in rows:
        seq = list(row)
        for _ in range(6):
            seq.append(int(combine_logprobs([logprobs(online, torch.tensor([seq]))[0, -1],
                                             logprobs(offline, torch.tensor([seq]))[0, -1]], combine).argmax()))
        want.append(tok.decode(seq[len(row):], skip_special_tokens=True))
    got = generate(ensemble, tok, PROMPTS[:2], max_new_tokens=6)
    assert got == [w.split(tok.eos_token)[0] for w in want]


def test_ensemble_generate_refuses_what_it_does_not_do(lora_run):
    ensemble, _ = load_ensemble(None, lora_run / "adapter", lora_run / OFFLINE_DIR)
    assert isinstance(ensemble, EnsembleLM)
    with pytest.raises(LmadaptError, match="not num_beams=4"):
        ensemble.generate(IDS, generation_config=type("G", (), {"num_beams": 4})())
    with pytest.raises(LmadaptError, match="give adapter= \\(--adapter\\) too"):
        evaluate_model(None, {"task": "perplexity", "data": ["x.jsonl"]}, ensemble_adapter=lora_run / "adapter")


def cli(*argv: object) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``lmadapt ARGV`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_eval_and_generate_take_an_ensemble_adapter(lora_run, tmp_path):
    data = tmp_path / "texts.jsonl"
    write_jsonl(data, [{"text": r["prompt"] + r["completion"]} for r in make_rows(6)])
    common = ["eval", "--task", "perplexity", "--data", data, "--adapter", lora_run / "adapter", "--json",
              "--no-progress"]
    alone = json.loads(cli(*common)[1])
    same = json.loads(cli(*common, "--ensemble-adapter", lora_run / "adapter")[1])
    mixed = json.loads(cli(*common, "--ensemble-adapter", lora_run / OFFLINE_DIR, "--ensemble-combine", "max")[1])
    assert same["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-5)
    assert mixed["perplexity"] != pytest.approx(alone["perplexity"], rel=1e-5)
    args = ["generate", "--adapter", lora_run / "adapter", "--max-new-tokens", 5, "--jsonl", "--prompt", PROMPTS[0]]
    assert cli(*args, "--ensemble-adapter", lora_run / "adapter")[1] == cli(*args)[1]
    rc, _, err = cli("generate", "--ensemble-adapter", lora_run / "adapter", "--prompt", "hi")
    assert rc == 2 and "give adapter= (--adapter) too" in err


def test_the_ensemble_can_be_the_base_model_of_proxy_tuning(lora_run, tiny_model_dir):
    """With beta = 0 the proxy terms add nothing: the steered ensemble of an adapter with itself is that adapter."""
    single, tok, _ = load(None, lora_run / "adapter")
    got = steer(None, PROMPTS, adapter=lora_run / "adapter", ensemble_adapter=lora_run / "adapter",
                small_model=str(tiny_model_dir), expert_adapter=lora_run / OFFLINE_DIR, beta=0.0, max_new_tokens=6)
    assert got == generate(single, tok, PROMPTS, max_new_tokens=6)


def test_the_cli_offers_the_combination_rules_the_library_has():
    import argparse

    from lmadapt.cli.common import add_ensemble_args

    p = argparse.ArgumentParser()
    add_ensemble_args(p)
    action = next(a for a in p._actions if a.dest == "ensemble_combine")
    assert tuple(action.choices) == COMBINES and action.default == "prob"
