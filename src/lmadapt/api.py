"""The public Python API: what every ``lmadapt`` command does, as one function call.

``load``, ``merge``, ``inspect``, ``preview`` (``lmadapt train --dry-run``), ``steer`` (generation, optionally
steered, from model paths), ``evaluate_model``, ``vas_train``, ``make_helper``, ``make_recovery_data``,
``serve`` (``lmadapt serve``) and ``config_reference`` live here; ``train``
(:func:`lmadapt.recipes.finetune.train`) and ``run_demo`` (:func:`lmadapt.recipes.demo.run_demo`) are the other
two commands' calls. Each CLI command is one call to one of these; a notebook calls them the same way.

    import lmadapt
    result = lmadapt.train("examples/lora_sft.yaml", ["train.max_steps=100"])
    model, tok, method = lmadapt.load("smollm2-135m-instruct", adapter=result.adapter_dir)
    print(lmadapt.generate(model, tok, ["Hello"], chat=True))
    print(lmadapt.steer("smollm2-360m-instruct", ["Hello"], small_model="smollm2-135m-instruct",
                        expert_adapter=result.adapter_dir, chat=True))
    lmadapt.merge(None, result.adapter_dir, "merged/")   # None: the base model the adapter records

An adapter remembers how it was made (:func:`base_model`, :func:`chat_settings`): ``load``, ``merge``,
``evaluate_model`` and ``steer`` default to the base model it records, prompt it with the chat template and
system prompt it was trained with, and ``merge`` writes that template into the merged tokenizer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmadapt.adapters.format import (
    AdapterInfo,
    load_adapter,
    load_adapter_contents,
    read_adapter_info,
)
from lmadapt.config import describe, from_dict
from lmadapt.decoding.ensemble import COMBINES, Combine, EnsembleLM, Member
from lmadapt.decoding.generation import generate
from lmadapt.decoding.steering import steered_generate
from lmadapt.decoding.value_model import load_value_model
from lmadapt.errors import LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.predictions import base_predictions_path
from lmadapt.evaluation.registry import get_task, unknown_task_problem
from lmadapt.evaluation.run import evaluate
from lmadapt.fsutil import atomic_dir
from lmadapt.hardware import choose_threads
from lmadapt.inspection import inspect_path
from lmadapt.methods import Method, available_methods, method_class
from lmadapt.models.builtins import BUILTINS, find_builtin
from lmadapt.models.loading import ModelConfig, load_model, model_display_name
from lmadapt.models.tree import adapters_disabled
from lmadapt.models.vocab import check_vocabularies

if TYPE_CHECKING:
    from lmadapt.recipes.dry_run import Preview
    from lmadapt.recipes.recovery_data import RecoveryReport
    from lmadapt.serving.engine_proxy import ProxySpec


def _model_config(model: str | ModelConfig, **overrides: Any) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    return ModelConfig(name_or_path=model, **{k: v for k, v in overrides.items() if v is not None})


def _adapter_info(adapter: str | Path | AdapterInfo | None) -> AdapterInfo | None:
    return adapter if isinstance(adapter, AdapterInfo) or adapter is None else read_adapter_info(adapter)


def base_model(model: str | ModelConfig | None, adapter: str | Path | AdapterInfo | None = None) -> str | ModelConfig:
    """The model to load: ``model`` when given; else the base model ``adapter`` records, when that is a built-in
    name or a folder that still exists; else (no adapter) ``model.name_or_path``'s default."""
    if model is not None:
        return model
    info = _adapter_info(adapter)
    if info is None:
        return ModelConfig().name_or_path
    recorded = info.base_model
    if recorded and (find_builtin(recorded) or Path(recorded).expanduser().is_dir()):
        return recorded
    if not recorded:
        raise LmadaptError(f"adapter {info.path} records no base model; give the model it was trained on with "
                           f"--model (model=...)")
    raise LmadaptError(f"adapter {info.path} was trained on base model {recorded!r}, which is neither a built-in "
                       f"model ({', '.join(BUILTINS)}) nor a folder that exists here; give that model's folder with "
                       f"--model (model=...)")


def chat_settings(adapter: str | Path | AdapterInfo | None, chat: bool | None = None,
                  system_prompt: str | None = None) -> tuple[bool, str | None]:
    """(chat, system_prompt) to prompt a model with ``adapter`` as it was trained: each as given, else as the
    adapter records (chat when its training data went through a chat template, with the system prompt training
    put before prompt/completion rows). Without an adapter or a record: no chat, no system prompt."""
    info = _adapter_info(adapter)
    if chat is None:
        chat = bool(info is not None and info.chat_template)
    if system_prompt is None and chat and info is not None:
        system_prompt = info.system_prompt
    return chat, system_prompt


def load(model: str | ModelConfig | None = None, adapter: str | Path | None = None, *, dtype: str | None = None,
         device: str | None = None, force: bool = False) -> tuple[Any, Any, Method | None]:
    """(model, tokenizer, method): the base model, with the adapter applied (unmerged) when given.

    ``model`` None: the base the adapter records (:func:`base_model`). The tokenizer is the one the adapter
    folder carries when it carries one (a method that changed the vocabulary saved it), else the base model's,
    with the chat template the adapter was trained with (its record's); heads an objective trained are restored
    onto the model.
    """
    info = _adapter_info(adapter)
    cfg = _model_config(base_model(model, info), dtype=dtype, device=device)
    base, tokenizer = load_model(cfg)
    method = None
    if adapter:
        loaded = load_adapter_contents(base, adapter, tokenizer=tokenizer, force=force)
        method, tokenizer = loaded.method, loaded.tokenizer
        if info is not None and info.chat_template:
            tokenizer.chat_template = info.chat_template["template"]
    base.eval()
    return base, tokenizer, method


ENSEMBLE_ADAPTER = "ensemble"  # the name the second LoRA adapter of an ensemble gets on the shared model


def load_ensemble(model: str | ModelConfig | None, adapter: str | Path, ensemble_adapter: str | Path, *,
                  combine: Combine = "prob", dtype: str | None = None, device: str | None = None,
                  force: bool = False) -> tuple[EnsembleLM, Any]:
    """(ensemble model, tokenizer): the base model with ``adapter`` and with ``ensemble_adapter``, as one model whose
    next-token distribution is their ensemble (:mod:`lmadapt.decoding.ensemble`; ``combine``: ``prob`` mixes the
    probabilities, ``logprob`` averages the log-probabilities, ``max`` takes the larger probability).

    LAE (arXiv:2303.10070): ``adapter`` is a run's ``adapter/`` and ``ensemble_adapter`` its ``adapter_offline/``.
    Two LoRA adapters share one base model (the second loads as a named adapter, :mod:`lmadapt.adapters.pool`);
    adapters of other methods get one model instance each (twice the memory). ``model`` None: the base ``adapter``
    records; both adapters must fit it (unless ``force``). The tokenizer and the chat settings are ``adapter``'s.
    """
    if combine not in COMBINES:  # before anything loads
        raise LmadaptError(f"ensemble combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    first, second = read_adapter_info(adapter), read_adapter_info(ensemble_adapter)
    cfg = _model_config(base_model(model, first), dtype=dtype, device=device)
    base, tokenizer, method = load(cfg, adapter, force=force)
    if method is not None and method.named_adapters and method_class(second.method["name"]).named_adapters:
        load_adapter(base, ensemble_adapter, name=ENSEMBLE_ADAPTER, force=force)
        base.eval()
        members = [Member(base, method.adapter_name), Member(base, ENSEMBLE_ADAPTER)]
    else:
        other, other_tokenizer, _ = load(cfg, ensemble_adapter, force=force)
        check_vocabularies(tokenizer, {f"ensemble adapter {ensemble_adapter}": other_tokenizer})
        members = [Member(base), Member(other)]
    return EnsembleLM(members, combine).eval(), tokenizer


def _load_for_inference(model: str | ModelConfig | None, adapter: str | Path | None,
                        ensemble_adapter: str | Path | None, combine: Combine, **load_args: Any) -> tuple[Any, Any]:
    """(model, tokenizer): :func:`load`, or :func:`load_ensemble` when ``ensemble_adapter`` is given."""
    if ensemble_adapter is None:
        return load(model, adapter, **load_args)[:2]
    if not adapter:
        raise LmadaptError("an ensemble adapter is ensembled with the model's adapter: give adapter= (--adapter) too")
    return load_ensemble(model, adapter, ensemble_adapter, combine=combine, **load_args)


def merge(model: str | ModelConfig | None, adapter: str | Path, output_dir: str | Path, *, overwrite: bool = False,
          dtype: str | None = None, force: bool = False) -> Path:
    """Write base + adapter as one plain transformers model folder (safetensors, tokenizer included).

    ``model`` None: the base the adapter records. The tokenizer carries the chat template the adapter was
    trained with, so that transformers' ``apply_chat_template`` prompts the merged model as it was trained.
    """
    info = read_adapter_info(adapter)
    _refuse_unmergeable(method_class(info.method["name"]), adapter)
    cfg = _model_config(base_model(model, info), dtype=dtype)
    base, tokenizer, method = load(cfg, adapter, force=force)
    assert method is not None
    _refuse_unmergeable(type(method), adapter)
    method.merge(base)
    method.unload(base)
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {"base_model": model_display_name(cfg), "adapter": str(Path(adapter).resolve()),
                      "method": method.name,
                      "chat_template": info.chat_template["name"] if info.chat_template else None,
                      "system_prompt": info.system_prompt}
        (tmp / "lmadapt_merge.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return Path(output_dir)


def _refuse_unmergeable(cls: type[Method], adapter: str | Path) -> None:
    """Checked before the base model is loaded, so the refusal costs nothing."""
    if not cls.mergeable:
        raise LmadaptError(f"{adapter}: method {cls.name!r} cannot be merged into the base weights (its update is "
                           f"not a change of the weights alone); serve it with lmadapt.load(..., adapter=...) or "
                           f"`lmadapt generate --adapter` instead of merging")


def inspect(path: str | Path) -> dict[str, Any]:
    """What an adapter, model, value-model, helper-model or run folder, or a built-in model name, holds, as a
    dict whose ``kind`` says which (:func:`lmadapt.inspection.inspect_path`). Nothing is loaded but JSON/YAML
    files and safetensors headers; a file that cannot be read raises an :class:`LmadaptError` naming it."""
    return inspect_path(path)


def preview(config: str | Path | dict[str, Any], overrides: Sequence[str] | dict[str, Any] = (), n: int = 3, *,
            resume: bool = False) -> Preview:
    """``lmadapt train --dry-run``: validate a run config as :func:`lmadapt.train` would, write nothing, and
    return the first ``n`` training examples as rendered, with the tokens that carry loss marked
    (:func:`lmadapt.recipes.dry_run.dry_run`)."""
    from lmadapt.recipes.dry_run import dry_run

    return dry_run(config, overrides, n, resume=resume)


def _trained_settings(settings: dict[str, Any], adapter: str | Path | None) -> dict[str, Any]:
    """Evaluation settings with ``chat`` and ``system_prompt`` (absent or None) as the adapter was trained, for
    a task that reads them."""
    task = settings.get("task")
    reads = get_task(task).settings() if isinstance(task, str) and not unknown_task_problem(task) else set()
    out = {k: v for k, v in settings.items() if not (k in ("chat", "system_prompt") and v is None)}
    if "chat" in reads:
        chat, system = chat_settings(adapter, out.get("chat"), out.get("system_prompt"))
        out["chat"] = chat
        if system is not None and "system_prompt" in reads:
            out["system_prompt"] = system
    return out


@contextlib.contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads for this block, as ``train.threads`` chooses them: ``threads`` when > 0, the idle cores
    when 0 (:func:`lmadapt.hardware.choose_threads`), unchanged when None; restored afterwards."""
    if threads is not None and threads < 0:
        raise LmadaptError(f"threads must be >= 0 (0: the idle cores), got {threads}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(choose_threads(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate_model(model: str | ModelConfig | None, cfg: EvalConfig | dict[str, Any],
                   adapter: str | Path | None = None, *,
                   compare: bool = False, dtype: str | None = None, device: str | None = None, force: bool = False,
                   progress: bool | None = None, predictions: str | Path | None = None,
                   threads: int | None = 0, ensemble_adapter: str | Path | None = None,
                   ensemble_combine: Combine = "prob") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(metrics of the model with its adapter, metrics of the same model with the adapter off or None).

    ``cfg`` is an :class:`EvalConfig` or its fields as a dict; the second result is computed only with
    ``compare=True`` (which needs ``adapter``): pass both to :func:`lmadapt.evaluation.report.compare_table`.
    ``predictions``: a JSONL file for the per-example predictions (with ``compare``, the base model's go to
    :func:`~lmadapt.evaluation.predictions.base_predictions_path` beside it). ``model`` None: the base the adapter
    records; ``chat`` and ``system_prompt`` absent from a dict: as the adapter was trained (:func:`chat_settings`).
    ``threads``: CPU threads, as ``train.threads`` (0: the idle cores; None: torch's setting as it is).
    ``progress``: False shows nothing; None or True a bar on a terminal, else a status line every 30 s.
    ``ensemble_adapter``: evaluate the ensemble of ``adapter`` and this one (LAE's offline adapter) instead,
    combined as ``ensemble_combine`` says (:func:`load_ensemble`); ``compare`` then switches both off.
    """
    if compare and not adapter:
        raise LmadaptError("compare=True evaluates the model with and without its adapter; give adapter=")
    cfg = cfg if isinstance(cfg, EvalConfig) else from_dict(EvalConfig, _trained_settings(cfg, adapter),
                                                            "the evaluation settings")
    with _cpu_threads(threads):
        base, tokenizer = _load_for_inference(model, adapter, ensemble_adapter, ensemble_combine, dtype=dtype,
                                              device=device, force=force)
        after = evaluate(base, tokenizer, cfg, progress=progress, predictions=predictions)
        if not compare:
            return after, None
        with adapters_disabled(base):
            return after, evaluate(base, tokenizer, cfg, progress=progress,
                                   predictions=base_predictions_path(predictions) if predictions else None)


def config_reference() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) of every run-config key, then of every method's ``method.*`` keys and every
    objective's ``objective.*`` keys."""
    from lmadapt.objectives.base import OBJECTIVES
    from lmadapt.recipes.finetune import RunConfig

    rows = describe(RunConfig)
    for name in available_methods():
        rows += [(f"method.{k}  [{name}]", t, d, h) for k, t, d, h in describe(method_class(name).config_class)]
    for name in OBJECTIVES.names():
        rows += [(f"objective.{k}  [{name}]", t, d, h) for k, t, d, h in describe(OBJECTIVES.get(name).config_class)]
    return rows


def vas_train(config: str | Path | dict[str, Any], overrides: Sequence[str] | dict[str, Any] = (), *,
              progress: bool = True) -> Path:
    """Train VAS value models (arXiv:2405.06639) as a YAML file or dict says, with ``key=value`` overrides;
    returns ``output_dir`` (the value models are in its ``values/<reward>/``). See docs/vas.md."""
    from lmadapt.recipes.vas_train import load_vas_config, train_value_model

    return train_value_model(load_vas_config(config, overrides), progress=progress)


def make_helper(config: str | Path | dict[str, Any], overrides: Sequence[str] | dict[str, Any] = (), *,
                progress: bool = True, resume: bool = False) -> Path:
    """Make a small same-tokenizer model by distillation as a YAML file or dict says, with ``key=value``
    overrides; returns the saved model folder. See docs/helper_models.md."""
    from lmadapt.recipes.helper_model import load_helper_config
    from lmadapt.recipes.helper_model import make_helper as make_helper_from_config

    extra = overrides if isinstance(overrides, dict) else list(overrides)
    return make_helper_from_config(load_helper_config(config, extra), progress=progress, resume=resume)


def make_recovery_data(settings: Mapping[str, Any] | None = None, *, progress: bool | None = None,
                       **keywords: Any) -> RecoveryReport:
    """Sample continuations from a model (+ adapter) and write them as a dataset to replay: recovery data
    (TransLLM's recovery KD, arXiv:2405.13923; :mod:`lmadapt.recipes.recovery_data`). ``settings`` and
    ``keywords`` are the fields of :class:`~lmadapt.recipes.recovery_data.RecoveryConfig` (``output`` required;
    ``inputs`` or ``from_scratch``); all problems are reported together, and bad rows, contradicting settings and
    an existing output are refused before the model loads. Returns a
    :class:`~lmadapt.recipes.recovery_data.RecoveryReport`. See docs/recovery_data.md.

        lmadapt.make_recovery_data(output="en_recovery.jsonl", inputs=["en.jsonl"], prompt_tokens=16,
                                   max_new_tokens=64)
    """
    from lmadapt.models.fingerprint import fingerprint
    from lmadapt.recipes.recovery_data import (
        RecoveryConfig,
        check_output,
        plan,
        read_prompts,
        sample_recovery_data,
    )

    cfg = from_dict(RecoveryConfig, {**dict(settings or {}), **keywords}, "the recovery-data settings")
    prompts = read_prompts(cfg)
    _, chat = plan(cfg, prompts.kind)
    check_output(cfg)
    with _cpu_threads(cfg.threads):
        model, tokenizer, method = load(cfg.model, cfg.adapter, dtype=cfg.dtype, device=cfg.device, force=cfg.force)
        _, system_prompt = chat_settings(cfg.adapter, chat, cfg.system_prompt)
        origin = {"model": model_display_name(base_model(cfg.model, cfg.adapter)),
                  "adapter": str(Path(cfg.adapter).resolve()) if cfg.adapter else None,
                  "method": method.name if method is not None else None,
                  "base_fingerprint": (read_adapter_info(cfg.adapter).base_fingerprint if cfg.adapter
                                       else fingerprint(model))}
        return sample_recovery_data(model, tokenizer, prompts, cfg, system_prompt=system_prompt, origin=origin,
                                    progress=progress)


# ---------------------------------------------------------------------------------------------- steer

def _steering_problems(given: Mapping[str, Any], name: Mapping[str, str]) -> list[str]:
    """Every inconsistent combination of the steering arguments ``given``, each named as ``name`` says."""
    small, adapter, expert, anti = (given[k] for k in ("small_model", "expert_adapter", "expert", "anti_expert"))
    n = name.__getitem__
    problems = []
    if adapter and not small:
        problems.append(f"{n('expert_adapter')} needs {n('small_model')} (the small base model it was trained on)")
    if small and not adapter:
        problems.append(f"{n('small_model')} needs {n('expert_adapter')} (the expert = small model + adapter)")
    if bool(expert) != bool(anti):
        problems.append(f"{n('expert')} and {n('anti_expert')} go together (the tuned and the untuned small model)")
    if (adapter or small) and (expert or anti):
        problems.append(f"{n('expert_adapter')}/{n('small_model')} and {n('expert')}/{n('anti_expert')} are two "
                        f"ways to give the expert. Choose one.")
    for key in ("beta", "expert_chat"):
        if given[key] is not None and not (small or adapter or expert or anti):
            problems.append(f"{n(key)} needs an expert: give {n('small_model')} with {n('expert_adapter')}, "
                            f"or {n('expert')} with {n('anti_expert')}")
    if isinstance(given["value_models"], (str, Path)):
        problems.append(f"{n('value_models')} is a list of value-model folders; got the single "
                        f"{given['value_models']!r}: wrap it in a list")
        return problems
    values, betas = list(given["value_models"]), given["value_betas"]
    if betas is not None and len(betas) != len(values):
        problems.append(f"{n('value_betas')}: {len(betas)} weight(s) for {len(values)} value model(s) in "
                        f"{n('value_models')}; give one per value model, in the same order (none: 1.0 each)")
    if given["vas_top_k"] is not None and not values:
        problems.append(f"{n('vas_top_k')} needs a value model in {n('value_models')}")
    return problems


def _steering_models(given: Mapping[str, Any], name: Mapping[str, str], tokenizer: Any,
                     load_args: dict[str, Any], force: bool) -> dict[str, Any]:
    """The keyword arguments of :func:`steered_generate` for the checked steering arguments (empty: none)."""
    out: dict[str, Any] = {}
    if given["expert_adapter"]:
        expert, expert_tok, _ = load(given["small_model"], given["expert_adapter"], force=force, **load_args)
        out.update(expert=expert, expert_tokenizer=expert_tok)
    elif given["expert"]:
        expert, expert_tok, _ = load(given["expert"], **load_args)
        anti, anti_tok, _ = load(given["anti_expert"], **load_args)
        check_vocabularies(expert_tok, {f"{name['anti_expert']} {given['anti_expert']}": anti_tok})
        out.update(expert=expert, anti_expert=anti, expert_tokenizer=expert_tok)
    if out:
        out["beta"] = 1.0 if given["beta"] is None else float(given["beta"])
        out["expert_chat"] = given["expert_chat"]
    paths = list(given["value_models"])
    if paths:
        betas = given["value_betas"] if given["value_betas"] is not None else [1.0] * len(paths)
        out["values"] = []
        for path, beta in zip(paths, betas):
            value_model, value_tok = load_value_model(path, **load_args)
            check_vocabularies(tokenizer, {f"{name['value_models']} {path}": value_tok})
            out["values"].append((value_model, float(beta)))
        if given["vas_top_k"] is not None:
            out["vas_top_k"] = given["vas_top_k"]
    return out


def steer(model: str | ModelConfig | None, prompts: Sequence[str], *, adapter: str | Path | None = None,
          small_model: str | None = None, expert_adapter: str | Path | None = None, expert: str | None = None,
          anti_expert: str | None = None, beta: float | None = None, expert_chat: bool | None = None,
          value_models: Sequence[str | Path] = (), value_betas: Sequence[float] | None = None,
          vas_top_k: int | None = None, dtype: str | None = None, device: str | None = None, force: bool = False,
          max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
          chat: bool | None = None, system_prompt: str | None = None, batch_size: int = 8,
          stream: Callable[[int, str], None] | None = None, seed: int | None = None, progress: bool | None = False,
          arg_names: Mapping[str, str] | None = None, threads: int | None = 0,
          ensemble_adapter: str | Path | None = None, ensemble_combine: Combine = "prob") -> list[str]:
    """The new text for each prompt from ``model`` (+ ``adapter``), loaded from names or folders, steered by
    proxy-tuning/EFT and VAS when asked; plain :func:`lmadapt.decoding.generation.generate` otherwise.

    Proxy-tuning ("Tuning Language Models by Proxy", arXiv:2401.08565) / EFT up-scaling (arXiv:2310.12962),
    ``log pi_model + beta (log pi_expert - log pi_anti)`` per token, with the expert given one of two ways:
    ``small_model`` + ``expert_adapter`` (the anti-expert is the same model with the adapter off), or
    ``expert`` + ``anti_expert`` (two model folders). ``beta`` defaults to 1.0; ``expert_chat`` renders the
    expert's prompt as a chat turn (None: as ``chat``). VAS (arXiv:2405.06639): ``value_models`` (folders from
    ``lmadapt vas-train``) with ``value_betas`` (one each, default 1.0) reweight the ``vas_top_k`` (default 10)
    best tokens. The rest is :func:`lmadapt.decoding.steering.steered_generate`'s. Inconsistent combinations
    are refused together, before anything loads, each argument named as ``arg_names`` says (the command line
    passes its flags; default: the keyword names). ``model`` None: the base the adapter records; ``chat`` and
    ``system_prompt`` None: as the adapter was trained (:func:`chat_settings`; no adapter: no chat).
    ``threads``: CPU threads, as ``train.threads`` (0: the idle cores; None: torch's setting as it is).
    ``progress``: False (default) shows nothing; None or True a bar on a terminal, else a status line every 30 s.
    ``ensemble_adapter``: the model is the ensemble of ``adapter`` and this one (LAE's offline adapter), combined
    as ``ensemble_combine`` says (:func:`load_ensemble`), decoded token by token with the steering decoder.
    """
    given = {"small_model": small_model, "expert_adapter": expert_adapter, "expert": expert,
             "anti_expert": anti_expert, "beta": beta, "expert_chat": expert_chat, "value_models": value_models,
             "value_betas": value_betas, "vas_top_k": vas_top_k}
    name = {k: k for k in given} | dict(arg_names or {})
    problems = _steering_problems(given, name)
    if problems:
        raise LmadaptError("; ".join(problems))
    with _cpu_threads(threads):
        base, tokenizer = _load_for_inference(model, adapter, ensemble_adapter, ensemble_combine, dtype=dtype,
                                              device=device, force=force)
        chat, system_prompt = chat_settings(adapter, chat, system_prompt)
        common = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                  "chat": chat, "system_prompt": system_prompt, "batch_size": batch_size, "stream": stream,
                  "seed": seed, "progress": progress}
        steering = _steering_models(given, name, tokenizer, {"dtype": dtype, "device": device}, force)
        if not steering:
            return generate(base, tokenizer, list(prompts), **common)
        return steered_generate(base, tokenizer, list(prompts), **steering, **common)


def serve(model: str | None = None, adapters: Mapping[str, str | Path] | None = None, *, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, served_model_name: str | None = None,
          dtype: str | None = None, device: str | None = None, force: bool = False, max_batch_size: int = 8,
          max_queue: int = 64, max_tokens: int = 2048, max_n: int = 16, max_body_bytes: int = 1 << 20,
          runtime_adapters: bool = True, drain_timeout: float = 30.0, threads: int | None = 0,
          log_level: str = "info", proxies: Sequence[str | ProxySpec] = ()) -> None:
    """``lmadapt serve``: an OpenAI-compatible HTTP server for ``model`` and ``adapters`` (name -> folder) until
    SIGTERM or Ctrl-C (:func:`lmadapt.serving.server.serve`, docs/serving.md). ``model`` None: the base the first
    adapter records; ``force``: serve adapters trained on other base weights. ``proxies``: proxy-tuned models of
    ``model``, each ``"NAME=EXPERT,ANTI[,BETA]"`` or a :class:`lmadapt.serving.engine_proxy.ProxySpec`. Needs
    the ``serve`` extra (fastapi, uvicorn)."""
    try:
        from lmadapt.serving.app import Limits
        from lmadapt.serving.server import serve as run_server
    except ImportError as exc:
        raise LmadaptError(f"lmadapt serve needs fastapi and uvicorn ({exc}); install them with "
                           f"pip install 'lmadapt[serve]'") from None
    adapters = {name: str(path) for name, path in (adapters or {}).items()}
    resolved = base_model(model, next(iter(adapters.values()), None))
    with _cpu_threads(threads):
        run_server(resolved.name_or_path if isinstance(resolved, ModelConfig) else resolved, adapters, host=host,
                   port=port, api_key=api_key, served_model_name=served_model_name, dtype=dtype, device=device,
                   force=force, max_batch_size=max_batch_size, max_queue=max_queue,
                   limits=Limits(max_tokens=max_tokens, max_n=max_n, max_body_bytes=max_body_bytes),
                   runtime_adapters=runtime_adapters, drain_timeout=drain_timeout, log_level=log_level,
                   proxies=proxies)
