"""``lmadapt.train`` (:func:`train`): one call from a config to an adapter, a report and a before/after evaluation.

Order matters for the user's data: the output folder is checked first, the data are validated next,
and nothing is written until both have passed.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lmadapt.adapters.format import (
    check_base,
    load_adapter_weights,
    read_adapter_info,
    save_adapter,
)
from lmadapt.config import ConfigError, config_source, option, to_dict
from lmadapt.data import Batcher, DataConfig, load_splits
from lmadapt.errors import LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.report import compare_table
from lmadapt.evaluation.run import evaluate
from lmadapt.fsutil import atomic_write_json, atomic_write_text, check_output_dir
from lmadapt.hardware import resolve_precision
from lmadapt.methods import Method, build_method, config_with_method
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.loading import (
    ModelConfig,
    load_model,
    model_display_name,
    resolve_device,
)
from lmadapt.models.tree import count_parameters
from lmadapt.reporting import plot_loss, read_metrics
from lmadapt.training.checkpoint import checkpoint_dirs
from lmadapt.training.config import TrainConfig
from lmadapt.training.loop import LoopResult, Trainer


@dataclass
class RunConfig:
    model: ModelConfig = option(default_factory=ModelConfig, help="The base model to adapt.")
    data: DataConfig = option(default_factory=DataConfig, help="Training and validation data.")
    method: dict[str, Any] = option(default_factory=lambda: {"name": "lora"},
                                    help="How to adapt: 'name' (lora, full, freeze, ...) plus that method's fields.")
    train: TrainConfig = option(default_factory=TrainConfig, help="Optimisation and the loop.")
    evals: list[EvalConfig] = option([], "Evaluations run on the base model before training and on the "
                                         "adapted model after; their results form the before/after table.")
    init_adapter: str | None = option(
        None, "Start from the weights of this adapter folder (lmadapt or PEFT, same method, rank and target "
              "modules, trained on this base model) instead of a fresh initialisation, e.g. to continue "
              "training an adapter on new data.")
    output_dir: str = option("runs/lmadapt", "Run folder: adapter, checkpoints, metrics, report.")
    overwrite: bool = option(False, "Replace an existing, non-empty output_dir.")


def load_run_config(source: str | Path | dict[str, Any] | RunConfig,
                    overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """A validated :class:`RunConfig` from a YAML path, a dict or a RunConfig, with ``key=value`` overrides.

    Every problem (unknown keys with "did you mean", wrong types, bad values, method fields) is reported
    in one :class:`ConfigError`.
    """
    data, where = config_source(source, overrides)
    cfg, problems = config_with_method(RunConfig, data, where, default_method={"name": "lora"})
    if cfg is not None and not cfg.data.train:
        problems.append("data.train: required to train: give the training files or globs, "
                        "e.g. data.train=[train.jsonl]")
    if problems:
        raise ConfigError(problems, where)
    return cfg


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    loop: LoopResult
    evals_before: list[dict[str, Any]] = field(default_factory=list)
    evals_after: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(config: str | Path | dict[str, Any] | RunConfig, overrides: list[str] | dict[str, Any] = (), *,
          resume: bool = False, progress: bool = True) -> TrainResult:
    """Train an adapter as ``config`` says; returns where it went and what was measured.

    With ``resume=True`` the run continues from the newest complete checkpoint in ``output_dir``
    and ends with the same weights as a run that was never interrupted.
    """
    cfg = load_run_config(config, overrides)
    precision = resolve_precision(cfg.train.precision, resolve_device(cfg.model.device))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    run_dir = Path(cfg.output_dir)
    if resume:
        if not checkpoint_dirs(run_dir):
            raise LmadaptError(f"cannot resume: {run_dir} has no complete checkpoint (train.save_every "
                               f"must be > 0 for a run to leave checkpoints)")
    else:
        check_output_dir(run_dir, cfg.overwrite)
    set_seed(cfg.train.seed)
    method = build_method(cfg.method)
    model, tokenizer = load_model(training_model_config(cfg, method))
    train_set, val_set, data_report = load_splits(cfg.data, tokenizer)  # raises before anything is written
    _say(data_report.summary())
    base_name, base_fp = model_display_name(cfg.model), fingerprint(model)
    batcher = _batcher(train_set, cfg, tokenizer)
    val_batcher = _batcher(val_set, cfg, tokenizer) if val_set is not None and len(val_set) else None

    if not resume:
        if run_dir.exists() and cfg.overwrite:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    evals_before = _evals_before(model, tokenizer, cfg, run_dir)

    if method.calibration_batches:
        plan = batcher.batches(0)[: method.calibration_batches]
        method.calibrate(model, [batcher.collate(b) for b in plan])
    method.apply(model)
    if cfg.init_adapter:
        info = read_adapter_info(cfg.init_adapter)
        check_base(info, model, base_fp)
        load_adapter_weights(model, method, info)
        _say(f"adapter initialised from {info.path}")
    model.config.use_cache = False  # packed position_ids are ignored in train mode otherwise
    trainable, total = count_parameters(model)
    _say(f"method {method.name}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)")

    device = next(model.parameters()).device
    trainer = Trainer(model, method, cfg.train, batcher, val_batcher, run_dir, base_model=base_name,
                      base_fingerprint=base_fp, device=device)
    if trainer.state["threads"]:
        _say(f"{trainer.state['threads']} CPU thread(s) (train.threads; 0 = the cores idle now)")
    if resume:
        where = trainer.resume()
        _drop_metrics_after(run_dir / "metrics.jsonl", trainer.state["step"])
        _say(f"resuming from {where} (step {trainer.state['step']} of {trainer.total_steps})")
    result = trainer.run(progress=progress)

    adapter_dir = save_adapter(model, method, run_dir / "adapter", base_model=base_name,
                               base_fingerprint=base_fp, overwrite=True)
    evals_after = [evaluate(model, tokenizer, e) for e in cfg.evals]
    records = read_metrics(run_dir / "metrics.jsonl")
    plot_loss(records, run_dir / "loss.png", title=f"{method.name} on {base_name}")
    report = _report(cfg, method, data_report, result, evals_before, evals_after, trainable, total, base_fp)
    atomic_write_json(run_dir / "report.json", report)
    if cfg.evals:
        _say(compare_table([(_eval_name(e), b, a) for e, b, a in zip(cfg.evals, evals_before, evals_after)]))
    _say(f"adapter saved to {adapter_dir}; report {run_dir / 'report.json'}; loss curve {run_dir / 'loss.png'}")
    return TrainResult(run_dir, adapter_dir, result, evals_before, evals_after, report)


def training_model_config(cfg: RunConfig, method: Method) -> ModelConfig:
    """The model section with ``dtype: auto`` resolved for training.

    bf16 autocast over a frozen base casts every frozen weight to bf16 on every forward; storing the
    frozen weights in bf16 skips those casts and halves their memory, with the same matmul inputs. A
    method that trains the base weights keeps them in fp32 (the optimizer's master copy).
    """
    if cfg.model.dtype != "auto":
        return cfg.model
    frozen_bf16 = cfg.train.precision == "bf16" and not method.trains_base_weights
    return dataclasses.replace(cfg.model, dtype="bf16" if frozen_bf16 else "fp32")


def _batcher(dataset: Any, cfg: RunConfig, tokenizer: Any) -> Batcher:
    return Batcher(dataset, batch_size=cfg.train.batch_size, max_length=cfg.data.max_length,
                   packing=cfg.data.batching == "packed", group_by_length=cfg.data.batching == "length_grouped",
                   pad_id=tokenizer.pad_token_id, seed=cfg.train.seed)


def _eval_name(e: EvalConfig) -> str:
    return f"{e.task} ({', '.join(Path(p).name for p in e.data)})"


def _evals_before(model: Any, tokenizer: Any, cfg: RunConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Base-model evaluations, computed once per run folder (a resumed run reuses them)."""
    path = run_dir / "evals_before.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    results = [evaluate(model, tokenizer, e) for e in cfg.evals]
    atomic_write_json(path, results)
    return results


def _drop_metrics_after(path: Path, step: int) -> None:
    """A killed run may have logged steps past its last checkpoint; the resumed run logs them again."""
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _report(cfg: RunConfig, method: Method, data_report: Any, result: LoopResult, before: list, after: list,
            trainable: int, total: int, base_fp: str) -> dict[str, Any]:
    return {
        "model": model_display_name(cfg.model),
        "base_fingerprint": base_fp,
        "method": method.name,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "data": to_dict(data_report),
        "steps": result.steps,
        "target_tokens": result.tokens,
        "seconds": round(result.seconds, 2),
        "target_tokens_per_s": round(result.tokens / max(result.seconds, 1e-9), 1),
        "input_tokens": result.input_tokens,
        "input_tokens_per_s": round(result.input_tokens / max(result.seconds, 1e-9), 1),
        "final_train_loss": result.final_loss,
        "final_val_loss": result.val_loss,
        "skipped_steps": result.skipped_steps,
        "evals": [{"eval": _eval_name(e), "before": b, "after": a}
                  for e, b, a in zip(cfg.evals, before, after)],
    }
