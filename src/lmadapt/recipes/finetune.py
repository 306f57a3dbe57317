"""``lmadapt train`` (:func:`train`): one call from a config to an adapter, a report and a before/after evaluation.

The recipe over the one run (:class:`lmadapt.training.run.Run`): prepare the output folder -> load the model
-> load and validate the data (training, validation, every evaluation's files, the ``init_adapter`` folder)
-> method -> objective -> the loop -> save the adapter -> evaluate -> report. Nothing is written until the
folder, the config and all of these inputs have passed their checks. The ``evals:`` run on the base model
before training, during it at their ``every`` steps, and on the adapted model after; target and retention
sets are reported apart, and ``evals.png`` plots them over the steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmadapt.adapters.format import (
    AdapterInfo,
    check_base,
    load_adapter_weights,
    read_adapter_info,
    read_adapter_tensors,
    save_adapter,
)
from lmadapt.config import ConfigError, config_source, option, to_dict
from lmadapt.data import DataConfig, load_splits
from lmadapt.data.dataset import load_replay
from lmadapt.data.replay import with_replay
from lmadapt.data.tokens import set_chat_template, training_record
from lmadapt.errors import AdapterError
from lmadapt.evaluation.config import EvalConfig, duplicate_name_problems, eval_names
from lmadapt.evaluation.examples import load_examples
from lmadapt.evaluation.report import (
    compare_table,
    headline_metrics,
    logged_metrics,
    role_rows,
    role_summary,
)
from lmadapt.evaluation.run import evaluate
from lmadapt.methods import Method, build_method
from lmadapt.methods.registry import METHODS
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.loading import ModelConfig, load_model, model_display_name
from lmadapt.models.tree import count_parameters
from lmadapt.objectives.base import OBJECTIVES, build_objective
from lmadapt.registry import config_with_sections
from lmadapt.reporting import MetricsLog, plot_evals, read_metrics
from lmadapt.training.config import TrainConfig
from lmadapt.training.fsdp import gathered
from lmadapt.training.lae import OFFLINE_DIR, save_offline_adapter
from lmadapt.training.loop import LoopResult
from lmadapt.training.run import Run, loop_report, loss_summary, make_batcher, say


@dataclass
class RunConfig:
    model: ModelConfig = option(default_factory=ModelConfig, help="The base model to adapt.")
    data: DataConfig = option(default_factory=DataConfig, help="Training and validation data.")
    method: dict[str, Any] = option(default_factory=lambda: {"name": "lora"},
                                    help="How to adapt: 'name' (lora, full, freeze, ...) plus that method's fields.")
    objective: dict[str, Any] = option(
        default_factory=lambda: {"name": "causal_lm"},
        help="What to minimise: 'name' (causal_lm, distill, ...) plus that objective's fields. causal_lm: "
             "next-token loss on the tokens the data marks (SFT or raw text).")
    train: TrainConfig = option(default_factory=TrainConfig, help="Optimisation and the loop.")
    evals: list[EvalConfig] = option([], "Evaluations run on the base model before training and on the "
                                         "adapted model after (and every N steps with every: N); their results "
                                         "form the before/after table, target and retention sets apart.")
    init_adapter: str | None = option(
        None, "Start from the weights of this adapter folder (lmadapt or PEFT, same method, rank and target "
              "modules, trained on this base model) instead of a fresh initialisation, e.g. to continue "
              "training an adapter on new data.")
    output_dir: str = option("runs/lmadapt", "Run folder: adapter, checkpoints, metrics, report.")
    overwrite: bool = option(False, "Replace an existing, non-empty output_dir.")


def load_run_config(source: str | Path | dict[str, Any] | RunConfig,
                    overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """A validated :class:`RunConfig` from a YAML path, a dict or a RunConfig, with ``key=value`` overrides.

    Every problem (unknown keys with "did you mean", wrong types, bad values, method and objective fields) is
    reported in one :class:`ConfigError`.
    """
    data, where = config_source(source, overrides)
    cfg, problems = config_with_sections(RunConfig, data, where, {
        "method": (METHODS, {"name": "lora"}), "objective": (OBJECTIVES, {"name": "causal_lm"})})
    if cfg is not None:
        problems += duplicate_name_problems(cfg.evals)
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


def train(config: str | Path | dict[str, Any] | RunConfig, overrides: list[str] | dict[str, Any] = (), *,
          resume: bool = False, progress: bool = True) -> TrainResult:
    """Train an adapter as ``config`` says; returns where it went and what was measured.

    With ``resume=True`` the run continues from the newest complete checkpoint in ``output_dir``
    and ends with the same weights as a run that was never interrupted; ``config`` may differ from the run's
    ``config.yaml`` only where :mod:`lmadapt.training.resume` allows (a finished run is not redone). Under
    torchrun every process calls this; rank 0 writes.
    """
    cfg = load_run_config(config, overrides)
    run = Run.from_environment(cfg.output_dir, cfg.train, cfg.model.device, overwrite=cfg.overwrite, resume=resume,
                               config=cfg, shardable=True)  # on resume: cfg is compared with the run's config.yaml
    cfg = dataclasses.replace(cfg, train=run.train)  # precision resolved: config.yaml records the choice
    method, objective = build_method(cfg.method), build_objective(cfg.objective)
    run.check_sharding(method, evals=bool(cfg.evals))  # train.distributed: fsdp refuses what it cannot train
    model, tokenizer = load_model(dataclasses.replace(training_model_config(cfg, method), device=str(run.device)))
    base_fp = fingerprint(model)  # before prepare() may resize the vocabulary: loading checks the base as loaded
    tokenizer = set_chat_template(method.prepare(model, tokenizer), cfg.data)  # data.chat_template, for the evals too
    train_set, val_set, data_report = load_splits(cfg.data, tokenizer)  # raises before anything is written
    mismatch = objective.data_problems(data_report, cfg.data)
    if mismatch:
        raise ConfigError(mismatch, str(config) if isinstance(config, (str, Path)) else None)
    say(data_report.summary(), run.dist)
    replay_set, replay_report = load_replay(cfg.data, tokenizer) if cfg.data.replay.train else (None, None)
    if replay_report is not None:
        say(f"Replay, {cfg.data.replay.share:.1%} of the rows of every batch: {replay_report.summary()}", run.dist)
    check_eval_data(cfg.evals)
    base_name = model_display_name(cfg.model)
    init = read_init_adapter(cfg.init_adapter, method, model, base_fp) if cfg.init_adapter else None
    if cfg.train.lae_offline_init:  # LAE's offline copy starts from it (lmadapt.training.lae): checked now
        read_init_adapter(cfg.train.lae_offline_init, method, model, base_fp, key="train.lae_offline_init")
    batch = dict(max_length=cfg.data.max_length, batching=cfg.data.batching, pad_id=tokenizer.pad_token_id)
    batcher = with_replay(run.batcher(train_set, **batch), replay_set, cfg.data.replay.share)
    val_batcher = run.batcher(val_set, **batch) if val_set is not None and len(val_set) else None

    run.create(cfg)
    names = eval_names(cfg.evals)
    evals_before = run.once(run.path / "evals_before.json",
                            lambda: _log_evals(run, 0, names, _evaluate_all(model, tokenizer, cfg, run, "before")))
    run.apply_method(model, method, batcher)
    if init is not None:
        load_adapter_weights(model, method, init)
        say(f"adapter initialised from {init.path}", run.dist)
    objective.setup(model, tokenizer, run.device)  # after apply: what the objective trains (a head) wins
    model.config.use_cache = False  # packed position_ids are ignored in train mode otherwise
    trainable, total = count_parameters(model)
    say(f"method {method.name}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)",
        run.dist)
    result = run.fit(model, method, objective, batcher, val_batcher, base_model=base_name, base_fingerprint=base_fp,
                     progress=progress, step_evals=_during_training(model, tokenizer, cfg.evals, names, run))

    adapter_dir = run.path / "adapter"
    with gathered(model):  # FSDP: the tensors the save reads are whole on rank 0 (every process enters)
        if run.dist.is_main:
            save_adapter(model, method, adapter_dir, base_model=base_name, base_fingerprint=base_fp, overwrite=True,
                         tokenizer=tokenizer if method.changes_tokenizer else None, objective=objective,
                         extra=training_record(cfg.data, data_report.format, tokenizer), export=True)
            if result.offline is not None:  # LAE: the offline copy, in the same format, beside adapter/
                save_offline_adapter(model, method, result.offline, run.path / OFFLINE_DIR,
                                     momentum=cfg.train.lae_momentum, warmup_steps=cfg.train.lae_warmup_steps,
                                     base_model=base_name, base_fingerprint=base_fp, overwrite=True,
                                     objective=objective, export=True,
                                     tokenizer=tokenizer if method.changes_tokenizer else None,
                                     extra=training_record(cfg.data, data_report.format, tokenizer))
    evals_after = _log_evals(run, result.steps, names, _evaluate_all(model, tokenizer, cfg, run, "after"))
    roles = role_rows([(n, e.role, b, a) for n, e, b, a in zip(names, cfg.evals, evals_before, evals_after)])
    report = {"model": base_name, "base_fingerprint": base_fp, "method": method.name, "objective": objective.name,
              "trainable_parameters": trainable, "total_parameters": total, "data": to_dict(data_report),
              **({"replay_data": to_dict(replay_report)} if replay_report is not None else {}),
              **loop_report(result),
              "evals": [{"eval": _eval_name(e), "name": n, "role": e.role, "before": b, "after": a}
                        for n, e, b, a in zip(names, cfg.evals, evals_before, evals_after)],
              "target": [r for r in roles if r["role"] == "target"],
              "retention": [r for r in roles if r["role"] == "retention"]}
    curves = any(e.every for e in cfg.evals)  # evals.png: the evaluations over the steps
    if curves and run.dist.is_main:
        plot_evals(read_metrics(run.path / "metrics.jsonl"), run.path / "evals.png",
                   {n: e.role for n, e in zip(names, cfg.evals)}, title=f"{method.name} on {base_name}",
                   metrics={n: list(headline_metrics(a)) for n, a in zip(names, evals_after)})
    run.finish(report, title=f"{method.name} on {base_name}")
    if cfg.evals:
        say(compare_table([(_eval_name(e), b, a) for e, b, a in zip(cfg.evals, evals_before, evals_after)]),
            run.dist)
        say(role_summary(roles), run.dist)
    if curves:
        say(f"evaluation curves {run.path / 'evals.png'}", run.dist)
    say(loss_summary(result), run.dist)
    say(f"adapter saved to {adapter_dir}; report {run.path / 'report.json'}; loss curve {run.path / 'loss.png'}",
        run.dist)
    if result.offline is not None:
        say(f"LAE offline adapter saved to {run.path / OFFLINE_DIR}; ensemble the two with --adapter {adapter_dir} "
            f"--ensemble-adapter {run.path / OFFLINE_DIR} (docs/lae.md)", run.dist)
    return TrainResult(run.path, adapter_dir, result, evals_before, evals_after, report)


def check_eval_data(evals: list[EvalConfig]) -> None:
    """Read every evaluation's examples now, so that a missing file or a bad row stops the run before anything
    is written rather than after the base model's evaluation (:func:`evaluate` reads them again)."""
    for i, e in enumerate(evals):
        try:
            load_examples(e)
        except ConfigError as exc:
            raise ConfigError([f"evals[{i}].data: {p}" for p in exc.problems]) from None


def read_init_adapter(path: str | Path, method: Method, model: Any, base_fingerprint: str,
                      key: str = "init_adapter") -> AdapterInfo:
    """The ``init_adapter`` folder (or another setting's, named ``key`` in errors), read and checked before
    anything is written: its config and tensors are readable, it holds an adapter of the run's method, and it
    was trained on this base model.

    Whether its tensors fit the method's rank and target modules is known only once the method is applied
    (after the base evaluation); :func:`load_adapter_weights` reports that.
    """
    try:
        info = read_adapter_info(path)
        name = info.method.get("name") if isinstance(info.method, dict) else None
        if name != method.name:
            raise AdapterError(f"{info.path} holds a {name!r} adapter, but method.name is {method.name!r}; give "
                               f"an adapter trained with method {method.name!r}, or set method.name={name}")
        read_adapter_tensors(info.path)
        check_base(info, model, base_fingerprint)
    except AdapterError as exc:
        raise AdapterError(f"{key}: {exc}") from None
    return info


def training_model_config(cfg: RunConfig, method: Method) -> ModelConfig:
    """The model section with ``dtype: auto`` resolved for training (``cfg.train.precision`` already resolved).

    bf16 autocast over a frozen base casts every frozen weight to bf16 on every forward; storing the
    frozen weights in bf16 skips those casts and halves their memory, with the same matmul inputs. A
    method that trains the base weights keeps them in fp32 (the optimizer's master copy).
    """
    if cfg.model.dtype != "auto":
        return cfg.model
    frozen_bf16 = cfg.train.precision == "bf16" and not method.trains_base_weights
    return dataclasses.replace(cfg.model, dtype="bf16" if frozen_bf16 else "fp32")


def run_batcher(dataset: Any, cfg: RunConfig, tokenizer: Any, world_size: int = 1) -> Any:
    """The batch planner ``train`` builds for ``dataset`` (global micro-batches under ``world_size`` processes)."""
    return make_batcher(dataset, batch_size=cfg.train.batch_size * world_size, max_length=cfg.data.max_length,
                        batching=cfg.data.batching, pad_id=tokenizer.pad_token_id, seed=cfg.train.seed)


def _evaluate_all(model: Any, tokenizer: Any, cfg: RunConfig, run: Run, when: str) -> list[dict[str, Any]]:
    """The run's evaluations, on rank 0 (the others get empty results and wait); each one's per-example
    predictions go to ``predictions/<i>-<task>-<when>.jsonl`` in the run folder."""
    results = [{} for _ in cfg.evals]
    if run.dist.is_main:
        results = [evaluate(model, tokenizer, e, predictions=run.path / "predictions" / f"{i}-{e.task}-{when}.jsonl")
                   for i, e in enumerate(cfg.evals)]
    run.dist.barrier()
    return results


def _during_training(model: Any, tokenizer: Any, evals: list[EvalConfig], names: list[str],
                     run: Run) -> Callable[[int], dict[str, float]] | None:
    """The loop's ``step_evals``: at step s, every evaluation whose ``every`` divides s, on rank 0 (the others
    wait), as ``{"eval/<name>/<metric>": value}``; None when no evaluation has an ``every``."""
    due = [(name, e) for name, e in zip(names, evals) if e.every]
    if not due:
        return None

    def step_evals(step: int) -> dict[str, float]:
        now = [(name, e) for name, e in due if step % e.every == 0]
        record: dict[str, float] = {}
        if now and run.dist.is_main:
            for name, e in now:
                record.update(_eval_record(name, evaluate(model, tokenizer, e, progress=False)))
        if now:
            run.dist.barrier()
        return record
    return step_evals


def _eval_record(name: str, result: dict[str, Any]) -> dict[str, float]:
    return {f"eval/{name}/{metric}": value for metric, value in logged_metrics(result).items()}


def _log_evals(run: Run, step: int, names: list[str], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results`` (returned as they are), also written to ``metrics.jsonl`` at ``step`` (rank 0): the base model's
    at step 0 and the adapted model's at the last step, the ends of the curves in ``evals.png``."""
    if run.dist.is_main and results:
        log = MetricsLog(run.path, tensorboard=False)
        try:
            log.log({"step": step, **{k: v for n, r in zip(names, results) for k, v in _eval_record(n, r).items()}})
        finally:
            log.close()
    return results


def _eval_name(e: EvalConfig) -> str:
    return f"{e.task} ({', '.join(Path(p).name for p in e.data)})"
