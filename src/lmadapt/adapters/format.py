"""The adapter format: ``adapter_model.safetensors`` + ``adapter_config.json`` in one folder.

For methods PEFT also has (LoRA), both files follow PEFT's layout, so ``PeftModel.from_pretrained``
loads an lmadapt adapter and lmadapt loads a PEFT one. lmadapt adds, without disturbing PEFT, a
*record*: the method name and full config, the base model's name and fingerprint, the lmadapt version,
how the training data was rendered (``chat_template``: ``{"name", "template"}``, null when no conversations
were trained; ``system_prompt``), and (when the objective trained heads) the objective's config. It is stored
as JSON under the key ``lmadapt`` of the safetensors header metadata (which PEFT ignores), and, for methods
PEFT does not have, also as ``adapter_config.json["lmadapt"]`` (PEFT warns about unknown keys in its config,
so LoRA's JSON stays PEFT's own).

What else a folder may carry (see docs/adapters.md):

- the tokenizer's files, when the method changed the tokenizer (``Method.prepare``): loading hands that
  tokenizer to ``prepare`` again, which brings the base model to the adapter's vocabulary;
- the heads an objective trained (``Objective.trainable_state``), in the same safetensors file under
  ``lmadapt_objective.<key>``. PEFT loads its own keys and ignores these (``tests/test_adapter_contents.py``
  checks this with the installed peft).

No pickles are read or written.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from lmadapt.adapters.pool import (
    DEFAULT_ADAPTER,
    adapter_parameter_names,
    delete_adapter,
)
from lmadapt.config import brief
from lmadapt.errors import AdapterError, LmadaptError
from lmadapt.fsutil import atomic_dir
from lmadapt.jsonfile import JsonFileError, read_json_object
from lmadapt.methods import Method, build_method, method_for_peft, method_spec
from lmadapt.objectives.base import Objective, build_objective, objective_spec
from lmadapt.training.distributed import gathered_state

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
RECORD_KEY = "lmadapt"
OBJECTIVE_PREFIX = "lmadapt_objective."  # objective heads' keys in the weights file: OBJECTIVE_PREFIX + <key>
TOKENIZER_MARKER = "tokenizer_config.json"  # written by every tokenizer's save_pretrained


@dataclass
class AdapterInfo:
    """What an adapter folder says about itself."""

    path: Path
    method: dict[str, Any]  # the method: section that rebuilds it
    base_model: str | None
    base_fingerprint: str | None
    source: str  # "lmadapt" or "peft"
    config: dict[str, Any]  # the raw adapter_config.json
    objective: dict[str, Any] | None = None  # the objective: section whose heads the weights file carries
    chat_template: dict[str, str] | None = None  # {"name", "template"} the training conversations used; None: none
    system_prompt: str | None = None  # the system turn training put before prompt/completion rows

    @property
    def has_tokenizer(self) -> bool:
        """The folder carries a tokenizer (saved because the method changed it)."""
        return (self.path / TOKENIZER_MARKER).is_file()


def save_adapter(model: nn.Module | None, method: Method, path: str | Path, *, base_model: str | None,
                 base_fingerprint: str | None, overwrite: bool = False, extra: dict[str, Any] | None = None,
                 tokenizer: Any = None, objective: Objective | None = None, export: bool = False,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter atomically into folder ``path`` (refusing an existing one unless ``overwrite``).

    ``tokenizer``: also write its files into the folder (give it when ``method.changes_tokenizer``).
    ``objective``: also store the heads it trained (its ``trainable_state``, under ``lmadapt_objective.<key>``)
    and its config in the record, so that loading restores them; an objective without heads adds nothing.
    Tensors are read through :func:`lmadapt.training.distributed.gathered_state`.
    ``export``: write the method's portable form (:meth:`Method.export`; e.g. a PiSSA adapter as a plain LoRA of
    the unmodified base) when it has one, with the record noting the method it came from (``exported_from``).
    ``state``: the method's tensors, written as given instead of being read from ``model`` (which may then be
    None): an adapter computed without a model, e.g. a merge of adapters (:mod:`lmadapt.updates.merging`).
    """
    from lmadapt import __version__

    exported = method.export(model) if export else None
    if exported is not None:
        extra = {**(extra or {}), "exported_from": method_spec(method)}
        method, state = exported[0], _cpu(exported[1])
    else:
        state = _cpu(state if state is not None else gathered_state(method, model))
    heads = _cpu(gathered_state(objective, model)) if objective is not None else {}
    clash = sorted(k for k in state if k.startswith(OBJECTIVE_PREFIX))
    if clash:
        raise AdapterError(f"method {method.name!r} saves tensors under {OBJECTIVE_PREFIX!r} ({clash[0]}), the "
                           f"prefix reserved for objective heads; rename its adapter_state keys")
    own = {"method": method_spec(method), "base_model": base_model,
           "base_fingerprint": base_fingerprint, "version": __version__, **(extra or {})}
    if heads:
        own["objective"] = objective_spec(objective)
    config = {**method.adapter_config(), "base_model_name_or_path": base_model}
    if method.peft_type is None:
        config["lmadapt"] = own
    meta = {"format": "pt", RECORD_KEY: json.dumps(own)}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file({**state, **{OBJECTIVE_PREFIX + k: v for k, v in heads.items()}}, str(tmp / WEIGHTS_NAME),
                  metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def read_adapter_info(path: str | Path) -> AdapterInfo:
    """Parse ``adapter_config.json`` (lmadapt's or PEFT's) and the record, without loading the tensors.

    Raises :class:`AdapterError` naming the file for anything it cannot use: a config that is not UTF-8, not
    JSON or not an object, a malformed lmadapt record, a weights file whose header cannot be read, an
    unsupported PEFT adapter.
    """
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        hint = " (PEFT's legacy adapter_model.bin pickles are not read: re-save it as safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    try:
        config = read_json_object(cfg_file)
    except JsonFileError as exc:
        raise AdapterError(f"{exc}; fix it, or save the adapter again") from None
    if RECORD_KEY in config:
        return _lmadapt_info(path, _checked_record(config[RECORD_KEY], cfg_file), config)
    peft_type = config.get("peft_type")
    cls = method_for_peft(config) if peft_type else None
    if peft_type and cls is None:
        raise AdapterError(f"{cfg_file}: PEFT adapter type {brief(peft_type)} is not supported by lmadapt")
    own = _header_record(weights)
    if own is not None:
        return _lmadapt_info(path, _checked_record(own, weights), config)
    if cls is None:
        raise AdapterError(f"{cfg_file}: not an adapter config: it has neither a 'peft_type' (PEFT) nor an "
                           f"lmadapt record (here or in {WEIGHTS_NAME}'s header); save the adapter again")
    try:
        spec = {"name": cls.name, **cls.config_from_peft(config)}
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{cfg_file}: {exc}") from None
    base = config.get("base_model_name_or_path")
    return AdapterInfo(path, spec, base if isinstance(base, str) else None, None, "peft", config)


def _lmadapt_info(path: Path, own: dict[str, Any], config: dict[str, Any]) -> AdapterInfo:
    return AdapterInfo(path, own["method"], own.get("base_model"), own.get("base_fingerprint"), "lmadapt", config,
                       own.get("objective"), own.get("chat_template"), own.get("system_prompt"))


def _checked_record(record: Any, where: Path) -> dict[str, Any]:
    """The lmadapt record, or an AdapterError naming ``where`` and the entry that is wrong."""
    again = "save the adapter again"
    if not isinstance(record, dict):
        raise AdapterError(f"{where}: {RECORD_KEY}: expected an object (the method, base model and fingerprint "
                           f"the adapter was saved with), got {_kind(record)}; {again}")
    if "method" not in record:
        raise AdapterError(f"{where}: {RECORD_KEY}.method: required (the method: section that rebuilds the "
                           f"adapter); {again}")
    wanted = {"method": (dict, "an object"), "objective": (dict, "an object"), "base_model": (str, "a string"),
              "base_fingerprint": (str, "a string"), "chat_template": (dict, "an object"),
              "system_prompt": (str, "a string")}
    for key, (kind, want) in wanted.items():
        value = record.get(key)
        if (value is not None or key == "method") and not isinstance(value, kind):
            raise AdapterError(f"{where}: {RECORD_KEY}.{key}: expected {want}, got {_kind(value)}; {again}")
    if record.get("chat_template") is not None and not isinstance(record["chat_template"].get("template"), str):
        raise AdapterError(f"{where}: {RECORD_KEY}.chat_template.template: expected the template's text, got "
                           f"{_kind(record['chat_template'].get('template'))}; {again}")
    if not isinstance(record["method"].get("name"), str):
        raise AdapterError(f"{where}: {RECORD_KEY}.method.name: expected the method's name (a string), got "
                           f"{_kind(record['method'].get('name'))}; {again}")
    return record


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _header_record(weights: Path) -> Any:
    """The lmadapt record in the weights file's header (None: it has none), read without loading tensors."""
    with _readable(weights), safe_open(str(weights), framework="pt") as fh:
        raw = (fh.metadata() or {}).get(RECORD_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise AdapterError(f"{weights}: the '{RECORD_KEY}' header entry is not valid JSON; save the adapter "
                           f"again") from None


@contextlib.contextmanager
def _readable(weights: Path) -> Iterator[None]:
    """Turn a safetensors file that cannot be read (truncated, not safetensors, a folder) into an AdapterError."""
    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights} is truncated or not safetensors ({exc}); save the adapter again") from None


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    """Replace the lmadapt record of an adapter folder (header, and the JSON copy when there is one)."""
    path = Path(path)
    tensors = load_file(str(path / WEIGHTS_NAME))
    meta = adapter_metadata(path)
    meta[RECORD_KEY] = json.dumps(record)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata=meta)
    config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    if RECORD_KEY in config:
        config[RECORD_KEY] = record
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The method's tensors; PEFT's per-adapter-name keys (``.lora_A.default.weight``) normalised, objective
    heads left out (:func:`read_objective_tensors`). :class:`AdapterError` if the file cannot be read."""
    return _split_tensors(Path(path))[0]


def read_objective_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The objective heads stored in the adapter (keys without ``lmadapt_objective.``; empty when none)."""
    return _split_tensors(Path(path))[1]


def _split_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    weights = path / WEIGHTS_NAME
    with _readable(weights):
        tensors = load_file(str(weights))
    method = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()
              if not k.startswith(OBJECTIVE_PREFIX)}
    heads = {k.removeprefix(OBJECTIVE_PREFIX): v for k, v in tensors.items() if k.startswith(OBJECTIVE_PREFIX)}
    return method, heads


def adapter_shapes(path: str | Path) -> dict[str, list[int]]:
    """Every tensor's shape, from the safetensors header alone (:class:`AdapterError` if it cannot be read)."""
    weights = Path(path) / WEIGHTS_NAME
    with _readable(weights), safe_open(str(weights), framework="pt") as fh:
        return {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - a handle, not a dict


def adapter_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata (:class:`AdapterError` if the file cannot be read)."""
    weights = Path(path) / WEIGHTS_NAME
    with _readable(weights), safe_open(str(weights), framework="pt") as fh:
        return dict(fh.metadata() or {})


def check_base(info: AdapterInfo, model: nn.Module, base_fingerprint: str | None = None) -> None:
    """Raise unless ``model`` (fingerprint ``base_fingerprint``, computed when None) is the base the
    adapter was trained on. Adapters that recorded no fingerprint (PEFT's own) pass."""
    from lmadapt.models.fingerprint import fingerprint

    if not info.base_fingerprint:
        return
    actual = base_fingerprint or fingerprint(model)
    if actual != info.base_fingerprint:
        name = getattr(model, "name_or_path", "")  # transformers models know where they were loaded from
        raise AdapterError(
            f"adapter {info.path} was trained on base model {info.base_model!r} (fingerprint "
            f"{info.base_fingerprint}), but the model it is being applied to"
            f"{f' ({name!r})' if name else ''} has fingerprint {actual}. "
            f"Load the right base model, or pass --force (force=True) to apply it anyway.")


@dataclass
class LoadedAdapter:
    """What :func:`load_adapter_contents` put into the model, and the tokenizer to use with it."""

    method: Method
    tokenizer: Any  # what method.prepare returned: the folder's tokenizer, else the one given (None: neither)
    objective: Objective | None  # rebuilt when the folder carries an objective's heads


def load_adapter(model: nn.Module, path: str | Path, *, tokenizer: Any = None, name: str = DEFAULT_ADAPTER,
                 trainable: bool | None = None, base_fingerprint: str | None = None, force: bool = False) -> Method:
    """Apply the adapter in ``path`` to ``model`` in place and return its method (see
    :func:`load_adapter_contents`, which also returns the tokenizer to use and the rebuilt objective)."""
    return load_adapter_contents(model, path, tokenizer=tokenizer, name=name, trainable=trainable,
                                 base_fingerprint=base_fingerprint, force=force).method


def load_adapter_contents(model: nn.Module, path: str | Path, *, tokenizer: Any = None,
                          name: str = DEFAULT_ADAPTER, trainable: bool | None = None,
                          base_fingerprint: str | None = None, force: bool = False) -> LoadedAdapter:
    """Apply the adapter in ``path`` to ``model`` in place: ``method.prepare`` -> ``method.apply`` -> its
    tensors -> the objective's heads, if the folder carries any (``objective.attach`` then
    ``load_trainable_state``).

    ``prepare`` gets the tokenizer the folder carries, else ``tokenizer``; an adapter whose method changes
    the tokenizer (``changes_tokenizer``) needs one of the two. Every file is read and checked before the
    model is touched; a failure after ``prepare`` (which may resize the embeddings) can leave the model
    changed, so load into a fresh one then.

    ``base_fingerprint`` is the fingerprint of ``model``'s base weights (computed here when None, leaving
    out the factors of LoRA adapters already loaded); an adapter trained on other weights is refused
    unless ``force``.

    ``name`` loads a LoRA adapter as a further named adapter of a model that holds others (see
    :mod:`lmadapt.adapters.pool`): it does not become active, and it is frozen unless ``trainable``
    (None: only the adapter named "default" trains). When its tensors do not fit, it is removed again.
    """
    from lmadapt.models.fingerprint import fingerprint

    info = read_adapter_info(path)
    state, heads = _split_tensors(info.path)
    if not force:
        if info.base_fingerprint and base_fingerprint is None:
            base_fingerprint = fingerprint(model, exclude=adapter_parameter_names(model).__contains__)
        check_base(info, model, base_fingerprint)
    method, objective = _build(info, heads)
    named = method.named_adapters  # methods that can share a model with others (LoRA)
    if not named and (name != DEFAULT_ADAPTER or trainable is not None):
        raise AdapterError(f"{info.path}: a {method.name!r} adapter cannot be loaded under a name or as "
                           f"frozen: only plain LoRA adapters can share a model; load it on its own")
    tokenizer = adapter_tokenizer(info.path) if info.has_tokenizer else tokenizer
    if method.changes_tokenizer and tokenizer is None:
        raise AdapterError(f"{info.path}: method {method.name!r} changes the tokenizer, but the folder carries "
                           f"none ({TOKENIZER_MARKER} is missing); pass the tokenizer it was trained with "
                           f"(tokenizer=...), or save the adapter again with save_adapter(..., tokenizer=...)")
    if named:
        method.adapter_name, method.trainable = name, trainable
    tokenizer = method.prepare(model, tokenizer)
    method.apply(model)
    try:
        _load_method_state(model, method, info, state)
    except AdapterError:
        if named:
            delete_adapter(model, name)
        raise
    if objective is not None:
        _load_heads(model, objective, info, heads)
    return LoadedAdapter(method, tokenizer, objective)


def _build(info: AdapterInfo, heads: dict[str, torch.Tensor]) -> tuple[Method, Objective | None]:
    """The method of the folder, and the objective whose heads it carries (None: it carries none)."""
    try:
        method = build_method(info.method)
    except (LmadaptError, TypeError, ValueError, KeyError) as exc:  # ConfigError: the section's problems
        raise AdapterError(f"{info.path / CONFIG_NAME}: {exc}") from None
    if not heads:
        return method, None
    if info.objective is None:
        raise AdapterError(f"{info.path / WEIGHTS_NAME} holds objective heads ({OBJECTIVE_PREFIX}*) but its record "
                           f"names no objective; save the adapter again")
    try:
        return method, build_objective(info.objective)
    except (LmadaptError, TypeError, ValueError, KeyError) as exc:
        raise AdapterError(f"{info.path / WEIGHTS_NAME}: the record's objective: {exc}") from None


def adapter_tokenizer(path: str | Path) -> Any:
    """The tokenizer an adapter folder carries (:class:`AdapterError` if there is none or it cannot be read)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / TOKENIZER_MARKER).is_file():
        raise AdapterError(f"{path} carries no tokenizer ({TOKENIZER_MARKER} is missing)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"could not load the tokenizer the adapter {path} carries ({exc}); save the adapter "
                           f"again") from None
    if tok.pad_token is None and (tok.eos_token or tok.unk_token):  # as the base model's (models.loading)
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_adapter_weights(model: nn.Module, method: Method, info: AdapterInfo) -> None:
    """Copy the adapter's tensors into ``model``, to which ``method`` has been applied."""
    _load_method_state(model, method, info, read_adapter_tensors(info.path))


def _load_method_state(model: nn.Module, method: Method, info: AdapterInfo, state: dict[str, torch.Tensor]) -> None:
    if info.method.get("name") != method.name:
        raise AdapterError(f"{info.path}: holds a {info.method.get('name')!r} adapter, not {method.name!r}")
    try:
        method.load_adapter_state(model, state)
    except (KeyError, ValueError) as exc:
        raise AdapterError(f"{info.path / WEIGHTS_NAME}: {exc}") from None


def _load_heads(model: nn.Module, objective: Objective, info: AdapterInfo, heads: dict[str, torch.Tensor]) -> None:
    """``objective.attach`` then ``load_trainable_state``: the heads the adapter carries, back in the model."""
    try:
        objective.attach(model)
        objective.load_trainable_state(model, heads)
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise AdapterError(f"{info.path / WEIGHTS_NAME}: the heads of objective {objective.name!r} do not fit "
                           f"this model ({exc}); load the adapter into the kind of model it was trained with"
                           ) from None
