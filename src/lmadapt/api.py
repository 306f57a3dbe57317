"""The public Python API: what every ``lmadapt`` command does, as one function call.

``load``, ``merge``, ``inspect``, ``steer`` (generation, optionally steered, from model paths),
``evaluate_model``, ``vas_train``, ``make_helper`` and ``config_reference`` live here; ``train``
(:func:`lmadapt.recipes.finetune.train`) and ``run_demo`` (:func:`lmadapt.recipes.demo.run_demo`) are the
other two commands' calls. Each CLI command is one call to one of these; a notebook calls them the same way.

    import lmadapt
    result = lmadapt.train("examples/lora_sft.yaml", ["train.max_steps=100"])
    model, tok, method = lmadapt.load("smollm2-135m-instruct", adapter=result.adapter_dir)
    print(lmadapt.generate(model, tok, ["Hello"], chat=True))
    print(lmadapt.steer("smollm2-360m-instruct", ["Hello"], small_model="smollm2-135m-instruct",
                        expert_adapter=result.adapter_dir, chat=True))
    lmadapt.merge("smollm2-135m-instruct", result.adapter_dir, "merged/")
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmadapt.adapters.format import (
    CONFIG_NAME,
    adapter_metadata,
    adapter_shapes,
    load_adapter_contents,
    read_adapter_info,
)
from lmadapt.config import describe, from_dict
from lmadapt.decoding.generation import generate
from lmadapt.decoding.steering import steered_generate
from lmadapt.decoding.value_model import load_value_model
from lmadapt.errors import LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.predictions import base_predictions_path
from lmadapt.evaluation.run import evaluate
from lmadapt.fsutil import atomic_dir
from lmadapt.jsonfile import JsonFileError, read_json, read_json_object
from lmadapt.methods import Method, available_methods, method_class
from lmadapt.models.loading import ModelConfig, load_model, model_display_name
from lmadapt.models.tree import adapters_disabled
from lmadapt.models.vocab import check_vocabularies


def _model_config(model: str | ModelConfig, **overrides: Any) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    return ModelConfig(name_or_path=model, **{k: v for k, v in overrides.items() if v is not None})


def load(model: str | ModelConfig, adapter: str | Path | None = None, *, dtype: str | None = None,
         device: str | None = None, force: bool = False) -> tuple[Any, Any, Method | None]:
    """(model, tokenizer, method): the base model, with the adapter applied (unmerged) when given.

    The tokenizer is the one the adapter folder carries when it carries one (a method that changed the
    vocabulary saved it), else the base model's; heads an objective trained are restored onto the model.
    """
    cfg = _model_config(model, dtype=dtype, device=device)
    base, tokenizer = load_model(cfg)
    method = None
    if adapter:
        loaded = load_adapter_contents(base, adapter, tokenizer=tokenizer, force=force)
        method, tokenizer = loaded.method, loaded.tokenizer
    base.eval()
    return base, tokenizer, method


def merge(model: str | ModelConfig, adapter: str | Path, output_dir: str | Path, *, overwrite: bool = False,
          dtype: str | None = None, force: bool = False) -> Path:
    """Write base + adapter as one plain transformers model folder (safetensors, tokenizer included)."""
    cfg = _model_config(model, dtype=dtype)
    base, tokenizer, method = load(cfg, adapter, force=force)
    assert method is not None
    if not method.mergeable:
        raise LmadaptError(f"method {method.name!r} cannot be merged into the base weights; "
                           f"load it with lmadapt.load(..., adapter=...) instead")
    method.merge(base)
    method.unload(base)
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {"base_model": model_display_name(cfg), "adapter": str(Path(adapter).resolve()),
                      "method": method.name}
        (tmp / "lmadapt_merge.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return Path(output_dir)


def inspect(path: str | Path) -> dict[str, Any]:
    """What an adapter folder, a run folder or a model folder holds, as a dict.

    A file that cannot be read (a damaged config or weights header) raises an :class:`LmadaptError` naming it.
    """
    path = Path(path)
    if (path / "adapter" / CONFIG_NAME).is_file():  # a run folder
        out = inspect(path / "adapter")
        report = path / "report.json"
        if report.is_file():
            out["run_report"] = _json_file(report, read_json, "run the training again")
        return out
    if (path / CONFIG_NAME).is_file():
        return _inspect_adapter(path)
    if (path / "config.json").is_file():
        cfg = _json_file(path / "config.json", read_json_object, "copy or save the model again")
        return {"kind": "model", "architectures": cfg.get("architectures"), "model_type": cfg.get("model_type"),
                "hidden_size": cfg.get("hidden_size"), "num_hidden_layers": cfg.get("num_hidden_layers"),
                "vocab_size": cfg.get("vocab_size")}
    raise LmadaptError(f"{path}: not an adapter folder ({CONFIG_NAME}), a run folder or a model folder "
                       f"(config.json)")


def _inspect_adapter(path: Path) -> dict[str, Any]:
    info = read_adapter_info(path)
    shapes = adapter_shapes(path)
    n_params = sum(math.prod(shape) for shape in shapes.values())
    return {"kind": "adapter", "format": info.source, "method": info.method,
            "base_model": info.base_model, "base_fingerprint": info.base_fingerprint,
            "objective": info.objective, "tokenizer": info.has_tokenizer,
            "tensors": len(shapes), "parameters": n_params,
            "metadata": adapter_metadata(path), "example_tensors": dict(list(shapes.items())[:4])}


def _json_file(path: Path, read: Callable[[Path], Any], todo: str) -> Any:
    try:
        return read(path)
    except JsonFileError as exc:
        raise LmadaptError(f"{exc}; fix it, or {todo}") from None


def evaluate_model(model: str | ModelConfig, cfg: EvalConfig | dict[str, Any], adapter: str | Path | None = None, *,
                   compare: bool = False, dtype: str | None = None, device: str | None = None, force: bool = False,
                   progress: bool | None = None,
                   predictions: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(metrics of the model with its adapter, metrics of the same model with the adapter off or None).

    ``cfg`` is an :class:`EvalConfig` or its fields as a dict; the second result is computed only with
    ``compare=True`` (which needs ``adapter``): pass both to :func:`lmadapt.evaluation.report.compare_table`.
    ``predictions``: a JSONL file for the per-example predictions (with ``compare``, the base model's go to
    :func:`~lmadapt.evaluation.predictions.base_predictions_path` beside it).
    """
    if compare and not adapter:
        raise LmadaptError("compare=True evaluates the model with and without its adapter; give adapter=")
    cfg = cfg if isinstance(cfg, EvalConfig) else from_dict(EvalConfig, cfg, "the evaluation settings")
    base, tokenizer, _ = load(model, adapter, dtype=dtype, device=device, force=force)
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


def steer(model: str | ModelConfig, prompts: Sequence[str], *, adapter: str | Path | None = None,
          small_model: str | None = None, expert_adapter: str | Path | None = None, expert: str | None = None,
          anti_expert: str | None = None, beta: float | None = None, expert_chat: bool | None = None,
          value_models: Sequence[str | Path] = (), value_betas: Sequence[float] | None = None,
          vas_top_k: int | None = None, dtype: str | None = None, device: str | None = None, force: bool = False,
          max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
          chat: bool = False, system_prompt: str | None = None, batch_size: int = 8,
          stream: Callable[[int, str], None] | None = None, seed: int | None = None, progress: bool | None = False,
          arg_names: Mapping[str, str] | None = None) -> list[str]:
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
    passes its flags; default: the keyword names).
    """
    given = {"small_model": small_model, "expert_adapter": expert_adapter, "expert": expert,
             "anti_expert": anti_expert, "beta": beta, "expert_chat": expert_chat, "value_models": value_models,
             "value_betas": value_betas, "vas_top_k": vas_top_k}
    name = {k: k for k in given} | dict(arg_names or {})
    problems = _steering_problems(given, name)
    if problems:
        raise LmadaptError("; ".join(problems))
    base, tokenizer, _ = load(model, adapter, dtype=dtype, device=device, force=force)
    common = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
              "chat": chat, "system_prompt": system_prompt, "batch_size": batch_size, "stream": stream, "seed": seed,
              "progress": progress}
    steering = _steering_models(given, name, tokenizer, {"dtype": dtype, "device": device}, force)
    if not steering:
        return generate(base, tokenizer, list(prompts), **common)
    return steered_generate(base, tokenizer, list(prompts), **steering, **common)
