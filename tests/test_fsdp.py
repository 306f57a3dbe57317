"""FSDP2 (``train.distributed: fsdp``) on CPU with gloo: two processes holding half of every parameter train the
adapter one process trains with the same global batch, save it in the same files, and resume a killed run to the
bit. Each run is a real ``lmadapt train`` in two spawned processes (as torchrun starts them), on the tiny Llama.

The data make the hard cases happen: 45 training rows in global micro-batches of 4 leave the 12th micro-batch
(step 6 with grad_accum 2) a single row, and 5 validation rows leave the second validation batch one row, so
rank 1 runs stand-ins there; max_grad_norm 0.05 is below every step's norm, so every step is clipped across
the shards.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lmadapt.errors import ConfigError
from lmadapt.methods import build_method
from lmadapt.recipes.finetune import train
from lmadapt.training.config import TrainConfig
from lmadapt.training.distributed import Distributed
from lmadapt.training.fsdp import fsdp_problems
from lmadapt.training.run import Run

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
# fp32, the same numbers summed in another order: one process sums the gradient over 4 rows; FSDP sums 2 rows per
# process, reduce-scatters each micro-batch's sum (then adds the micro-batches: ddp adds them first), and takes
# the clipping norm as a sum over shards. About 1e-7 relative per gradient; after the Adam steps the weights
# differ by at most 5.2e-8 (LoRA), 1.2e-7 (full fine-tuning), 3.7e-7 (BA-LoRA's export), measured. AdamW runs with
# eps 1e-6 (not 1e-8): an entry whose gradient nearly cancels over the rows (|g| ~ 1e-9, B ~ 0 in the first
# steps) is otherwise moved by about lr x sign(g), and the order of the sums decides that sign: with eps 1e-8 one
# LoRA entry in 1,792 ended 7.1e-6 apart (under ddp 9.5e-7, by the same cause).
FP32_ORDER = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, resume: bool, kill_at: int | None) -> None:
    import torch.distributed as dist

    from lmadapt.training.loop import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if kill_at is not None:  # every process stops before step kill_at + 1, as a kill of the launch would
        original = Trainer._step

        def step_or_stop(self):
            if self.state["step"] == kill_at:
                raise KeyboardInterrupt
            return original(self)
        Trainer._step = step_or_stop
    try:
        train(cfg, resume=resume, progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _two_processes(cfg: dict, *, resume: bool = False, kill_at: int | None = None) -> None:
    mp.spawn(_worker, args=(2, _free_port(), cfg, resume, kill_at), nprocs=2, join=True)


def _one_process(cfg: dict) -> None:
    assert "WORLD_SIZE" not in os.environ
    train(cfg, progress=False)


def _config(root: Path, model_dir: Path, name: str, method: dict, **train_cfg) -> dict:
    from conftest import make_rows, write_jsonl

    rows = make_rows(50, seed=3)
    if not (root / "train.jsonl").exists():
        write_jsonl(root / "train.jsonl", rows[:45])
        write_jsonl(root / "val.jsonl", rows[45:])
    return {"model": {"name_or_path": str(model_dir), "device": "cpu"},  # gloo, also where CUDA is present
            "data": {"train": [str(root / "train.jsonl")], "validation": [str(root / "val.jsonl")],
                     "max_length": 128, "batching": "padded"},
            "method": method,
            "train": {"lr": 5e-3, "batch_size": 4, "grad_accum": 2, "max_steps": 6, "schedule": "constant",
                      "max_grad_norm": 0.05, "eps": 1e-6, "tensorboard": False, "threads": 1, **train_cfg},
            "output_dir": str(root / name)}


def _fsdp(cfg: dict) -> dict:
    """The same run on two processes: 2 rows each, the same global batch of 4."""
    return {**cfg, "train": {**cfg["train"], "batch_size": 2, "distributed": "fsdp"}}


def _tensors(run_dir: Path, what: str = "adapter/adapter_model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / what))


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_model_dir):
    """One process; two FSDP processes; the FSDP run killed before step 5 and resumed from its step-3 checkpoint."""
    root = tmp_path_factory.mktemp("fsdp-lora")
    one = _config(root, tiny_model_dir, "one", LORA, save_every=3)
    _one_process(one)
    _two_processes(_fsdp({**one, "output_dir": str(root / "fsdp")}))
    killed = _fsdp({**one, "output_dir": str(root / "killed")})
    _two_processes(killed, kill_at=4)
    assert not (root / "killed" / "adapter").exists()
    assert [p.name for p in (root / "killed" / "checkpoints").iterdir()] == ["step-0000003"]
    _two_processes(killed, resume=True)
    return root


def test_two_sharded_processes_train_the_adapter_of_one(lora_runs):
    one, fsdp = lora_runs / "one", lora_runs / "fsdp"
    a, b = _tensors(one), _tensors(fsdp)
    assert _worst(a, b) < FP32_ORDER
    assert all(float(a[k].abs().max()) > 1e-3 for k in a if "lora_B" in k)  # it trained (B starts at zero)
    # the same files: PEFT's config, the same keys, shapes and dtypes (whole tensors, not one rank's half)
    assert json.loads((one / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((fsdp / "adapter" / "adapter_config.json").read_text())
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    # the same curve, logged once (rank 0): losses, clipped gradient norms, validation with a one-row batch
    logs = {run: _log(lora_runs / run) for run in ("one", "fsdp")}
    assert [r["step"] for r in logs["fsdp"] if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(logs["one"], logs["fsdp"], strict=True):
        assert x.keys() == y.keys()
        for key in ("loss", "grad_norm", "val_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), key
        assert x.get("tokens") == y.get("tokens")
    assert all(r["grad_norm"] > 0.05 for r in logs["fsdp"] if "grad_norm" in r)  # every step was clipped


def test_a_sharded_checkpoint_holds_whole_tensors_like_one_process(lora_runs):
    """The step-3 checkpoint: AdamW's moments gathered from the shards, in one process's layout and order."""
    ckpt = "checkpoints/step-0000003"
    a, b = _tensors(lora_runs / "one", f"{ckpt}/optimizer.safetensors"), _tensors(
        lora_runs / "fsdp", f"{ckpt}/optimizer.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(k.endswith("exp_avg_sq") for k in a)
    for k in a:  # moments carry the gradients' 1e-7 (relative) differences
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-9), k
    assert _worst(_tensors(lora_runs / "one", f"{ckpt}/adapter/adapter_model.safetensors"),
                  _tensors(lora_runs / "fsdp", f"{ckpt}/adapter/adapter_model.safetensors")) < FP32_ORDER


def test_a_killed_sharded_run_resumes_to_the_same_weights(lora_runs):
    a, b = _tensors(lora_runs / "fsdp"), _tensors(lora_runs / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in _log(lora_runs / "killed") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 4-5 the killed launch may have logged are logged once


def test_the_sharded_adapter_loads_into_a_plain_model(lora_runs, tiny_model_dir):
    """lmadapt and PEFT load it into an unsharded transformers model, and it gives one process's outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmadapt.adapters.format import load_adapter

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])
    outputs = {}
    for run in ("one", "fsdp"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        load_adapter(model, lora_runs / run / "adapter")
        with torch.no_grad():
            outputs[run] = model(input_ids=ids).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     str(lora_runs / "fsdp" / "adapter")).eval()
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
        by_peft = peft(input_ids=ids).logits
    assert torch.allclose(by_peft, outputs["fsdp"], atol=1e-5)
    assert torch.allclose(outputs["fsdp"], outputs["one"], atol=1e-5)
    assert float((outputs["fsdp"] - base).abs().max()) > 1e-3  # the adapter changes the model


def test_full_fine_tuning_sharded_equals_one_process(tmp_path, tiny_model_dir):
    """Every weight trains and is sharded (embeddings and head in the root unit); the FSDP run also recomputes
    each block in the backward (train.gradient_checkpointing), which changes no gradient."""
    one = _config(tmp_path, tiny_model_dir, "one", {"name": "full"}, lr=1e-3, max_steps=3)
    _one_process(one)
    fsdp = _fsdp({**one, "output_dir": str(tmp_path / "fsdp")})
    fsdp["train"]["gradient_checkpointing"] = True
    _two_processes(fsdp)
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "fsdp")
    base = _tensors(Path(tiny_model_dir), "model.safetensors")
    assert a.keys() == base.keys()  # every weight, under its base key
    assert _worst(a, b) < FP32_ORDER
    assert max(float((b[k] - base[k]).abs().max()) for k in b) > 1e-4  # it trained


def test_a_loss_on_the_base_models_logits_trains_sharded(tmp_path, tiny_model_dir):
    """BA-LoRA's consistency term needs the frozen base's logits (ctx.base_logits(): a second forward with the
    adapters off, inside the step); its PiSSA start rewrites the base weights before sharding, and its final
    adapter is exported (a plain LoRA computed from the gathered factors and the residual start). The SVD term
    is off: the singular values of a micro-batch's logits are not a sum over its rows, so they differ between
    one process's 4 rows and each process's 2 (as under ddp)."""
    method = {"name": "balora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "lambda_consistency": 0.5, "consistency_schedule": "constant", "lambda_svd": 0.0}
    one = _config(tmp_path, tiny_model_dir, "one", method, max_steps=3)
    _one_process(one)
    _two_processes(_fsdp({**one, "output_dir": str(tmp_path / "fsdp")}))
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "fsdp")
    assert _worst(a, b) < FP32_ORDER
    record = json.loads((tmp_path / "fsdp" / "adapter" / "adapter_config.json").read_text())
    assert record["peft_type"] == "LORA" and record["r"] == 8  # exported: rank 2r, PEFT's own config
    logs = {run: [r for r in _log(tmp_path / run) if "loss" in r] for run in ("one", "fsdp")}
    assert [r["loss"] for r in logs["fsdp"]] == pytest.approx([r["loss"] for r in logs["one"]], rel=1e-5)


def test_bf16_gathers_in_bf16_and_keeps_fp32_adapter_weights(tmp_path, tiny_model_dir):
    """train.precision bf16: the frozen base is stored in bf16, the LoRA factors in fp32; FSDP all-gathers both in
    bf16 and sums the gradients in fp32. The result is one process's bf16 run to bf16's precision (measured:
    4.3e-4 on factors up to 0.13 after 3 steps; bf16 keeps 8 bits, 3.9e-3 relative)."""
    one = _config(tmp_path, tiny_model_dir, "one", LORA, precision="bf16", max_steps=3)
    _one_process(one)
    _two_processes(_fsdp({**one, "output_dir": str(tmp_path / "fsdp")}))
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "fsdp")
    assert {v.dtype for v in b.values()} == {torch.float32}
    assert _worst(a, b) < 2e-3
    assert all(float(v.abs().max()) > 1e-3 for k, v in b.items() if "lora_B" in k)
    norms = {run: [r["grad_norm"] for r in _log(tmp_path / run) if "grad_norm" in r] for run in ("one", "fsdp")}
    assert norms["fsdp"] == pytest.approx(norms["one"], rel=5e-3)


def test_what_fsdp_cannot_train_is_refused_before_anything_is_written(tmp_path):
    """Every problem at once, each naming its setting and the way out (train.distributed: ddp)."""
    train_cfg = TrainConfig(precision="fp16", lae_momentum=0.9, distributed="fsdp")
    allora = build_method({"name": "allora", "r": 4, "eta": 1.0, "target_modules": ["q_proj"]})
    problems = fsdp_problems(train_cfg, allora, evals=True)
    assert len(problems) == 4
    assert "allora" in problems[0] and "before_optimizer_step, after_optimizer_step" in problems[0]
    for problem, key in zip(problems, ("train.distributed", "train.precision", "train.lae_momentum", "evals")):
        assert problem.startswith(key) and "train.distributed: ddp" in problem
    assert fsdp_problems(TrainConfig(distributed="fsdp"), build_method(LORA), evals=False) == []
    two = Distributed(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="only lmadapt train trains sharded"):
        Run(tmp_path / "helper", TrainConfig(distributed="fsdp"), "cpu", dist=two)  # a recipe that is not shardable
    assert not (tmp_path / "helper").exists()
    run = Run(tmp_path / "run", TrainConfig(distributed="fsdp", precision="fp16"), "cpu", dist=two, shardable=True)
    with pytest.raises(ConfigError, match="train.precision: fp16"):
        run.check_sharding(build_method(LORA), evals=False)
    alone = Run(tmp_path / "alone", TrainConfig(distributed="fsdp", precision="fp16"), "cpu", shardable=True)
    alone.check_sharding(allora, evals=True)  # one process: nothing is sharded, nothing refused
