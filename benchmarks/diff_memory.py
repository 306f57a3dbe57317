"""Peak memory of ``lmadapt diff extract`` and ``lmadapt diff apply`` on a model larger than 1 GB.

Both work tensor by tensor from safetensors shards (lmadapt.models.shards), so their peak resident memory
should stay near one model (at most one output shard plus a few tensors), not two or three models.

    python benchmarks/diff_memory.py                    # a random 1.1 GB fp32 Llama, in a temporary folder
    python benchmarks/diff_memory.py --layers 24 --dir /scratch --max-shard-gb 0.5

Builds a random Llama from a config (fp32, ``save_pretrained``), writes a "tuned" copy tensor by tensor with
every other layer and the embeddings perturbed, then runs extract and apply (onto the base) each in a fresh
child process, reading the child's peak RSS from ``os.wait4`` (the kernel's ru_maxrss of that child; this
process imports neither torch nor lmadapt, so the children inherit no large high-water mark from it). A child
that only imports lmadapt and torch is measured too: the floor every step pays; each step's RSS above that
floor is also given as a ratio to the model. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30
IMPORTS = "import torch, lmadapt.updates.diff"


def build_models(root: Path, layers: int, hidden: int = 1024, vocab: int = 32000) -> int:
    """Write ``root/base`` (random Llama) and ``root/tuned`` (a perturbed copy, tensor by tensor); returns the
    model's tensor bytes. Run in a child of its own (``--build``), so that this process stays small: a child
    forked from a large process reports that process's RSS as its own peak (Linux keeps the high-water mark
    across fork and exec)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmadapt.models.shards import (
        ShardWriter,
        copy_model_files,
        read_tensor,
        tensor_index,
    )
    from lmadapt.testing import tiny_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    del model
    gc.collect()
    index = tensor_index(root / "base")
    (root / "tuned").mkdir()
    gen = torch.Generator().manual_seed(1)
    with ShardWriter(root / "tuned") as writer:
        for name in index:
            tensor = read_tensor(index, name)
            layer = name.split(".")[2] if name.startswith("model.layers.") else None
            if "embed" in name or (layer is not None and int(layer) % 2 == 0):
                tensor = tensor + 0.01 * torch.randn(tensor.shape, generator=gen)
            writer.add(name, tensor)
    copy_model_files(root / "base", root / "tuned")
    return sum(info.nbytes for info in index.values())


def measure(code: str) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of ``python -c code`` run as a fresh child."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {code}")
    return usage.ru_maxrss * 1024, seconds  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=18, help="decoder layers (18: about 1.1 GB in fp32)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (MLP: 2.75x)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary rows")
    p.add_argument("--dir", default=None, help="where the temporary folder goes (needs ~4x the model on disk)")
    p.add_argument("--max-shard-gb", type=float, default=None, help="output shard size (default: lmadapt's)")
    p.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: write the models into this folder
    args = p.parse_args()
    if args.build:
        print(build_models(Path(args.build), args.layers, args.hidden, args.vocab))
        return
    shard = "" if args.max_shard_gb is None else f", max_shard_bytes={int(args.max_shard_gb * GiB)}"
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="lmadapt-diff-memory-") as tmp:
        root = Path(tmp)
        built = subprocess.run([sys.executable, __file__, "--build", str(root), "--layers", str(args.layers),
                                "--hidden", str(args.hidden), "--vocab", str(args.vocab)],
                               check=True, stdout=subprocess.PIPE, text=True)
        model_bytes = int(built.stdout.split()[-1])
        print(f"model: {model_bytes / GiB:.2f} GiB of fp32 tensors ({args.layers} layers)", flush=True)
        steps = {
            "imports_only": IMPORTS,
            "extract": f"{IMPORTS}; lmadapt.updates.diff.extract_diff({str(root / 'base')!r}, "
                       f"{str(root / 'tuned')!r}, {str(root / 'diff')!r}, progress=False{shard})",
            "apply": f"{IMPORTS}; lmadapt.updates.diff.apply_diff({str(root / 'diff')!r}, {str(root / 'base')!r}, "
                     f"{str(root / 'out')!r}, progress=False{shard})",
        }
        result: dict[str, object] = {"model_bytes": model_bytes, "layers": args.layers,
                                     "max_shard_gb": args.max_shard_gb}
        floor = 0
        for step, code in steps.items():
            rss, seconds = measure(code)
            floor = floor or rss
            print(f"{step:>12}: peak RSS {rss / GiB:.2f} GiB = {rss / model_bytes:.2f} x model "
                  f"({(rss - floor) / model_bytes:.2f} x model above the imports), {seconds:.0f} s", flush=True)
            result[step] = {"peak_rss_bytes": rss, "ratio_to_model": round(rss / model_bytes, 3),
                            "above_imports_ratio": round((rss - floor) / model_bytes, 3),
                            "seconds": round(seconds, 1)}
        diff_bytes = sum(f.stat().st_size for f in (root / "diff").glob("*.safetensors"))
        result["diff_bytes"] = diff_bytes
    print(json.dumps(result))


if __name__ == "__main__":
    main()
