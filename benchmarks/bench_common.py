"""What the benchmark scripts share: the model folder a benchmark runs on."""

from __future__ import annotations

from pathlib import Path


def model_folder(name: str, workdir: Path) -> str:
    """A model folder for ``name``: 'tiny' (lmadapt.testing's tiny Llama), a built-in name, or a folder."""
    if name == "tiny":
        from lmadapt.testing import tiny_llama, tiny_tokenizer

        folder = workdir / "tiny"
        if not folder.exists():
            tiny_llama().save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)
        return str(folder)
    from lmadapt.models.builtins import resolve_model_path

    return str(resolve_model_path(name))
