"""Value models for VAS: a causal-LM backbone with a scalar head, and its folder format."""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lmadapt.errors import LmadaptError, ModelError
from lmadapt.fsutil import atomic_dir
from lmadapt.jsonfile import read_json_object
from lmadapt.models.loading import (
    check_model_folder,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)

VALUE_JSON = "lmadapt_value.json"


HEAD_FILE = "value_head.safetensors"


@dataclass
class ValueOutput:
    """``values``: (batch, seq) fp32, V of the state ending at each position; ``past_key_values``: the cache.

    A plain dataclass, not a transformers ``ModelOutput``: transformers 5.24 renames ``past_key_values`` to
    ``cache`` in every ``ModelOutput`` subclass's constructor, which broke this one's.
    """

    values: torch.Tensor | None = None
    past_key_values: Any = None


@functools.cache
def _cache_keyword(decoder_class: type[nn.Module]) -> str:
    """The keyword a decoder's ``forward`` takes its KV cache by: ``cache`` from transformers 5.24, before that
    ``past_key_values`` (5.24 still accepts it with a warning; 5.40 drops it)."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


class ValueModel(nn.Module):
    """A causal-LM backbone and a zero-initialised head: V(s) = w . h_last(s) + b (so V = 0 at init).

    ``backbone`` is the whole transformers causal LM (saved as a plain model folder); only its decoder runs,
    so no vocabulary logits are computed. Dropout is off: config dropout fields are set to 0 and the
    backbone stays in eval mode even when this module is put in train mode.
    """

    def __init__(self, backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        config = backbone.config
        for key, value in list(vars(config).items()):
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
                setattr(config, key, 0.0)
        self.backbone = backbone.eval()
        hidden = config.get_text_config().hidden_size
        device = next(backbone.parameters()).device
        self.value_head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.value_head.weight.zero_()
            self.value_head.bias.zero_()
        self.tokenizer = tokenizer
        self.info: dict[str, Any] = dict(info or {})

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def train(self, mode: bool = True) -> ValueModel:
        super().train(mode)
        self.backbone.eval()  # no dropout, ever (as in the paper and TRL)
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                use_cache: bool = False) -> ValueOutput:
        """V at every position; with ``use_cache`` the backbone's cache comes back for incremental decoding."""
        decoder = self.backbone.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache, **{_cache_keyword(type(decoder)): past_key_values})
        cache = out.get("cache", out.get("past_key_values")) if use_cache else None
        hidden = out.last_hidden_state
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # the head runs in fp32
            w, b = self.value_head.weight.float(), self.value_head.bias.float()
            values = F.linear(hidden.float(), w, b).squeeze(-1)
        return ValueOutput(values=values, past_key_values=cache)


def save_value_model(vm: ValueModel, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``path`` atomically: the backbone as a plain transformers folder (safetensors, config, tokenizer),
    ``value_head.safetensors`` and ``lmadapt_value.json`` (``vm.info`` plus the format fields)."""
    from lmadapt import __version__

    if vm.tokenizer is None:
        raise LmadaptError("save_value_model: the value model has no tokenizer; set vm.tokenizer first")
    head = {k: v.detach().float().cpu().contiguous() for k, v in vm.value_head.state_dict().items()}
    record = {"format": "lmadapt-value-model", "format_version": 1, "lmadapt_version": __version__,
              "value_head": HEAD_FILE, "hidden_size": int(head["weight"].shape[1]), **vm.info}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        vm.backbone.save_pretrained(tmp)
        vm.tokenizer.save_pretrained(tmp)
        save_file({f"value_head.{k}": v for k, v in head.items()}, str(tmp / HEAD_FILE), metadata={"format": "pt"})
        (tmp / VALUE_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def load_value_model(path: str | Path, *, dtype: str | torch.dtype | None = None,
                     device: str | torch.device | None = None) -> tuple[ValueModel, PreTrainedTokenizerBase]:
    """(value model in eval mode, its tokenizer) from a folder written by :func:`save_value_model`.

    ``dtype`` (fp32/bf16/fp16/auto or a torch dtype; None: as saved) applies to the backbone; the head stays fp32.
    ``device``: None means auto (cuda, mps, else cpu).
    """
    path = Path(path)
    missing = [n for n in (VALUE_JSON, HEAD_FILE, "config.json") if not (path / n).is_file()]
    if not path.is_dir() or missing:
        inside = sorted(p.parent.name for p in path.glob(f"*/{VALUE_JSON}")) if path.is_dir() else []
        hint = f"; it holds value models {', '.join(inside)}: pass one of those folders" if inside else \
            "; give a folder written by `lmadapt vas-train` (save_value_model)"
        what = "does not exist" if not path.exists() else f"lacks {', '.join(missing)}" if path.is_dir() \
            else "is a file"
        raise LmadaptError(f"{path} is not a value model: it {what}{hint}")
    info = read_json_object(path / VALUE_JSON)
    check_model_folder(path)  # safetensors only, whole, before transformers opens anything
    dev = device if isinstance(device, torch.device) else resolve_device(str(device or "auto"))
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    try:
        backbone = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load the value model's backbone from {path}: {exc}") from exc
    try:
        head = load_file(str(path / HEAD_FILE))
    except Exception as exc:  # safetensors raises its own error type for truncated or foreign files
        raise ModelError(f"{path / HEAD_FILE} is truncated or not safetensors ({exc}); train the value model "
                         f"again") from None
    vm = ValueModel(backbone.to(dev), load_tokenizer(path), info)
    if head.get("value_head.weight") is None or head["value_head.weight"].shape != vm.value_head.weight.shape:
        raise LmadaptError(f"{path / HEAD_FILE}: expected value_head.weight of shape "
                           f"{tuple(vm.value_head.weight.shape)} (the backbone's hidden size)")
    vm.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in head.items()})
    return vm.eval(), vm.tokenizer
