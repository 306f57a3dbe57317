"""Portable LoRA patches: a LoRA trained on one base version, attached to an evolved version without training.

"PortLLM: Personalizing Evolving Large Language Models with Training-Free and Portable Model Patches",
Khan et al., arXiv:2410.10870. A LoRA fine-tune of base ``theta_0`` is the patch ``Delta = s B A`` per module
(``s = alpha / r``, ``alpha / sqrt(r)`` with rsLoRA). When the base evolves to ``theta_t`` (continued
pretraining) the patch is applied as it is: ``theta_t + Delta``, i.e. the same LoRA weights attached to
``theta_t``. It needs the same module shapes (and tokenizer).

lmadapt ties an adapter to its base by fingerprint and refuses other bases; :func:`port_adapter`
(``lmadapt port``) overrides that explicitly and says so in what it writes:

- by default an adapter folder whose record names the new base (name and fingerprint, so that lmadapt and
  PEFT load it on that base without ``--force``) and keeps where it came from under ``ported_from``
  (old base name and fingerprint, ``override``, when);
- with ``merge`` a plain merged model (``theta_t + s B A``, through :func:`lmadapt.api.merge`), whose
  ``lmadapt_merge.json`` carries the same ``ported_from``.

Only LoRA-family adapters that are a plain PEFT LoRA on disk are ported (methods whose ``peft_type`` is
``LORA``: lora, allora, dora). See docs/diff.md.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmadapt.adapters.format import (
    CONFIG_NAME,
    RECORD_KEY,
    AdapterInfo,
    adapter_metadata,
    adapter_shapes,
    read_adapter_info,
    write_record,
)
from lmadapt.errors import AdapterError
from lmadapt.fsutil import atomic_dir, atomic_write_json
from lmadapt.inspection import MERGE_JSON
from lmadapt.methods import available_methods, method_class
from lmadapt.methods.lora import PEFT_PREFIX
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.loading import model_display_name
from lmadapt.models.shards import FolderTensors, TensorInfo, tensor_index
from lmadapt.updates.diff import when

FLAG = "--allow-other-base (allow_other_base=True)"


@dataclass
class PortReport:
    """What :func:`port_adapter` wrote."""

    path: Path
    merged: bool  # a merged model folder, else an adapter folder
    base_model: str  # the new base, as recorded
    base_fingerprint: str
    ported_from: dict[str, Any]  # old base_model and base_fingerprint, override, when


def portable_methods() -> list[str]:
    """The methods whose adapters are a plain PEFT LoRA on disk, so they can be carried to another base."""
    return [name for name in available_methods() if method_class(name).peft_type == "LORA"]


def port_adapter(adapter: str | Path, model: str | Path, output_dir: str | Path, *,
                 allow_other_base: bool = False, merge: bool = False, overwrite: bool = False,
                 dtype: str | None = None) -> PortReport:
    """Attach the LoRA ``adapter`` to base ``model`` (a folder or built-in name), PortLLM (arXiv:2410.10870):
    ``theta_t + s B A`` with the adapter's own ``B``, ``A`` and ``s``; nothing is trained.

    When ``model``'s fingerprint is not the one the adapter records (another version, or a PEFT adapter that
    records none), this is refused unless ``allow_other_base``; the output records the override. Module
    shapes that differ are always refused, each named. ``merge``: write a plain merged model (in ``dtype``)
    instead of an adapter folder. Only the safetensors headers of ``model`` are read, unless ``merge``.
    """
    info = read_adapter_info(adapter)
    name = info.method.get("name")
    if name not in portable_methods():
        raise AdapterError(f"{adapter}: an adapter of method {name!r} cannot be ported; PortLLM carries LoRA patches "
                           f"(s B A), and lmadapt ports the methods saved as a plain LoRA: "
                           f"{', '.join(portable_methods())}. (PiSSA, OLoRA, CorDA and LaMDA runs write their final "
                           f"adapter as such a plain LoRA when method.export is true, the default.)")
    index = tensor_index(model)
    new_fingerprint = fingerprint(FolderTensors(index))
    override = info.base_fingerprint != new_fingerprint
    if override and not allow_other_base:
        raise AdapterError(_refusal(info, model, new_fingerprint))
    problems = module_problems(adapter_shapes(adapter), index)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise AdapterError(f"adapter {adapter} does not fit model {model} ({len(problems)} module(s)):\n{lines}\n"
                           f"A portable patch needs the same module shapes on the new base (PortLLM); use a "
                           f"version of the same architecture")
    ported_from = {"base_model": info.base_model, "base_fingerprint": info.base_fingerprint, "override": override,
                   "adapter": str(Path(adapter).resolve()), "when": when()}
    new_name = model_display_name(str(model))
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        if merge:
            _merged(adapter, model, tmp, dtype, new_fingerprint, ported_from)
        else:
            _ported_folder(info, tmp, new_name, new_fingerprint, ported_from)
    return PortReport(Path(output_dir), merge, new_name, new_fingerprint, ported_from)


def _refusal(info: AdapterInfo, model: str | Path, new_fingerprint: str) -> str:
    if info.base_fingerprint:
        trained = f"was trained on base model {info.base_model!r} (fingerprint {info.base_fingerprint})"
    else:
        trained = (f"records no base fingerprint (trained on {info.base_model!r}, says its config), so lmadapt "
                   f"cannot tell whether {model} is that base")
    return (f"adapter {info.path} {trained}, and model {model} has fingerprint {new_fingerprint}. {FLAG} "
            f"attaches the adapter to {model} anyway, unchanged and without training (PortLLM, arXiv:2410.10870: a "
            f"LoRA patch carried to an evolved version of its base), and records the override in the output")


def module_problems(shapes: Mapping[str, list[int]], index: Mapping[str, TensorInfo]) -> list[str]:
    """Each adapted module that ``index`` (the new base) lacks or that has another shape there, as a phrase.

    ``shapes``: the adapter's tensors (PEFT keys ``base_model.model.<module>.lora_A.weight`` ...)."""
    wanted: dict[str, list[int | None]] = {}  # module -> [out, in] as the factors say
    for key, shape in shapes.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).partition(".lora_")
        if not part:
            continue
        size = wanted.setdefault(module, [None, None])
        if part.startswith("A.") and len(shape) == 2:
            size[1] = shape[1]
        elif part.startswith("B.") and len(shape) == 2:
            size[0] = shape[0]
        elif part.startswith("magnitude_vector"):
            size[0] = shape[-1]
    problems = []
    for module, (out, inp) in sorted(wanted.items()):
        weight = index.get(f"{module}.weight")
        if weight is None:
            problems.append(f"{module}: the model has no {module}.weight")
        elif len(weight.shape) != 2 or (out is not None and weight.shape[0] != out) or \
                (inp is not None and weight.shape[1] != inp):
            problems.append(f"{module}: the adapter is for a [{out}, {inp}] weight, the model's is "
                            f"{list(weight.shape)}")
    return problems


def _ported_folder(info: AdapterInfo, tmp: Path, new_name: str, new_fingerprint: str,
                   ported_from: dict[str, Any]) -> None:
    """Copy the adapter folder into ``tmp`` and make its record (and PEFT config) name the new base."""
    for item in info.path.iterdir():
        if item.is_file():
            shutil.copyfile(item, tmp / item.name)
        elif item.is_dir():
            shutil.copytree(item, tmp / item.name)
    raw = adapter_metadata(tmp).get(RECORD_KEY)
    record = json.loads(raw) if raw else {"method": info.method}
    write_record(tmp, {**record, "base_model": new_name, "base_fingerprint": new_fingerprint,
                       "ported_from": ported_from})
    config = json.loads((tmp / CONFIG_NAME).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = new_name
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _merged(adapter: str | Path, model: str | Path, tmp: Path, dtype: str | None, new_fingerprint: str,
            ported_from: dict[str, Any]) -> None:
    """``model + s B A`` into ``tmp`` through :func:`lmadapt.api.merge` (fingerprint check overridden), with
    ``ported_from`` added to its provenance."""
    from lmadapt.api import merge

    merge(model, adapter, tmp, overwrite=True, dtype=dtype, force=True)
    provenance = json.loads((tmp / MERGE_JSON).read_text(encoding="utf-8"))
    provenance.update(base_fingerprint=new_fingerprint, ported_from=ported_from)
    atomic_write_json(tmp / MERGE_JSON, provenance)
