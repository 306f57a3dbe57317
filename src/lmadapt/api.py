"""The public Python API: ``train``, ``load``, ``merge``, ``inspect``, ``evaluate``, ``generate``.

Each CLI command is one call to these functions (or to the run, evaluation and generation functions
which they re-export); a notebook calls them the same way.

    import lmadapt
    result = lmadapt.train("examples/lora_sft.yaml", ["train.max_steps=100"])
    model, tok, method = lmadapt.load("smollm2-135m-instruct", adapter=result.adapter_dir)
    print(lmadapt.generate(model, tok, ["Hello"], chat=True))
    lmadapt.merge("smollm2-135m-instruct", result.adapter_dir, "merged/")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from lmadapt.adapters.format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_metadata,
    load_adapter,
    read_adapter_info,
)
from lmadapt.errors import LmadaptError
from lmadapt.fsutil import atomic_dir
from lmadapt.methods import Method
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.loading import ModelConfig, load_model, model_display_name


def _model_config(model: str | ModelConfig, **overrides: Any) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    return ModelConfig(name_or_path=model, **{k: v for k, v in overrides.items() if v is not None})


def load(model: str | ModelConfig, adapter: str | Path | None = None, *, dtype: str | None = None,
         device: str | None = None, force: bool = False) -> tuple[Any, Any, Method | None]:
    """(model, tokenizer, method): the base model, with the adapter applied (unmerged) when given."""
    cfg = _model_config(model, dtype=dtype, device=device)
    base, tokenizer = load_model(cfg)
    method = load_adapter(base, adapter, force=force) if adapter else None
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
    """What an adapter folder, a run folder or a model folder holds, as a dict."""
    path = Path(path)
    if (path / "adapter" / CONFIG_NAME).is_file():  # a run folder
        out = inspect(path / "adapter")
        report = path / "report.json"
        if report.is_file():
            out["run_report"] = json.loads(report.read_text(encoding="utf-8"))
        return out
    if (path / CONFIG_NAME).is_file():
        info = read_adapter_info(path)
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as fh:
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
        n_params = 0
        for shape in shapes.values():
            size = 1
            for d in shape:
                size *= d
            n_params += size
        return {"kind": "adapter", "format": info.source, "method": info.method,
                "base_model": info.base_model, "base_fingerprint": info.base_fingerprint,
                "tensors": len(shapes), "parameters": n_params,
                "metadata": adapter_metadata(path), "example_tensors": dict(list(shapes.items())[:4])}
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return {"kind": "model", "architectures": cfg.get("architectures"), "model_type": cfg.get("model_type"),
                "hidden_size": cfg.get("hidden_size"), "num_hidden_layers": cfg.get("num_hidden_layers"),
                "vocab_size": cfg.get("vocab_size")}
    raise LmadaptError(f"{path}: not an adapter folder ({CONFIG_NAME}), a run folder or a model folder "
                       f"(config.json)")


def base_fingerprint(model: str | ModelConfig) -> str:
    """The fingerprint adapters record for this base model."""
    base, _ = load_model(_model_config(model))
    return fingerprint(base)
