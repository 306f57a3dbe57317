"""Carry a fine-tune from base v1 to v2 without training, on tiny random models (seconds on a CPU; nothing is
downloaded). See docs/diff.md.

    python examples/updates/diff_and_port.py              # in a temporary folder
    python examples/updates/diff_and_port.py runs/tiny    # keep the folders

Makes v1 (a random tiny Llama), v2 (v1 with every weight moved a little: a stand-in for continued pretraining),
a LoRA adapter on v1 and the full fine-tuned model v1 + LoRA, then runs the commands of docs/diff.md:

    lmadapt diff extract V1 TUNED --output DIFF --rank 4
    lmadapt diff apply DIFF --model V2 --output V2_TUNED
    lmadapt port ADAPTER --model V2 --output V2_ADAPTER --allow-other-base
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from lmadapt.adapters.format import save_adapter
from lmadapt.api import merge
from lmadapt.cli import main as lmadapt
from lmadapt.methods import build_method
from lmadapt.models.fingerprint import fingerprint
from lmadapt.testing import tiny_llama, tiny_tokenizer


def make_versions(root: Path) -> None:
    """root/v1, root/v2 (v1 + noise), root/adapter (a LoRA of v1), root/tuned (v1 + that LoRA, merged)."""
    v1 = tiny_llama(seed=0)
    v1.save_pretrained(root / "v1")
    tiny_tokenizer().save_pretrained(root / "v1")
    v2 = tiny_llama(seed=0)
    with torch.no_grad():
        for p in v2.parameters():
            p.add_(0.005 * torch.randn_like(p))
    v2.save_pretrained(root / "v2")
    tiny_tokenizer().save_pretrained(root / "v2")
    model = tiny_llama(seed=0)
    lora = build_method({"name": "lora", "r": 4, "alpha": 8, "init": "random"})  # B random: a non-zero update
    lora.apply(model)
    save_adapter(model, lora, root / "adapter", base_model=str(root / "v1"), base_fingerprint=fingerprint(v1))
    merge(str(root / "v1"), root / "adapter", root / "tuned")


def run(root: Path) -> None:
    make_versions(root)
    steps = [
        ["diff", "extract", str(root / "v1"), str(root / "tuned"), "--output", str(root / "diff"), "--rank", "4"],
        ["diff", "apply", str(root / "diff"), "--model", str(root / "v2"), "--output", str(root / "v2-tuned")],
        ["port", str(root / "adapter"), "--model", str(root / "v2"), "--output", str(root / "v2-adapter"),
         "--allow-other-base"],
    ]
    for argv in steps:
        print("$ lmadapt " + " ".join(argv))
        if lmadapt([*argv, "--no-progress"] if argv[0] == "diff" else argv) != 0:
            raise SystemExit(1)
    record = json.loads((root / "v2-tuned" / "lmadapt_diff.json").read_text())
    print(f"v2-tuned: relation {record['relation']}, {record['applied']} tensors got Delta")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp))
