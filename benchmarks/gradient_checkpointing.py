"""What ``train.gradient_checkpointing`` costs and saves: peak RSS and tokens/s of the same LoRA run without
and with it.

Both runs train the same model with the same LoRA config on the same tokenized examples (BBC News
prompt/completion rows rendered with the chat template, loss on the completion) in the same batches and
order, one after the other, each in its own fresh process so that its peak RSS is its own. Checkpointing
keeps only each decoder block's input for the backward pass and recomputes the rest there (Chen et al.,
arXiv:1604.06174), so activation memory falls and each step does about one more forward pass of work; the
loss curves must agree (the gradients are the same up to rounding; the largest per-step gap is printed).

Peak RSS includes the model and optimizer state, which checkpointing does not change; the difference
between the two peaks is the activation memory saved. Tokens/s counts every real (non-padding) token.
Model loading is not timed.

    python benchmarks/gradient_checkpointing.py                   # SmolLM2-135M-Instruct, 96 examples = 12 steps
    python benchmarks/gradient_checkpointing.py --model tiny --examples 16   # a seconds-long smoke run

The last line printed is one JSON object with every figure; docs/benchmarks.md records measured ones.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import model_folder

LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
SIDES = {"off": False, "on": True}  # the value of train.gradient_checkpointing on each side


def write_rows(path: Path, n: int, min_words: int, max_words: int, seed: int = 0) -> None:
    """``n`` BBC News prompt/completion rows, articles cut to a random length in [min_words, max_words]."""
    from lmadapt.recipes.demo_data import bbc_news, make_row

    train_rows, test_rows, _ = bbc_news(seed=seed)
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for r in (train_rows + test_rows)[:n]:
            row = make_row(r["text"], r["label"], rng.randint(min_words, max_words))
            fh.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"]}) + "\n")


def worker(args: argparse.Namespace, side: str) -> dict:
    """One LoRA run with ``train.gradient_checkpointing`` as ``side`` says; its figures and peak RSS."""
    from lmadapt.recipes.finetune import train

    workdir = Path(args.workdir)
    cfg = {"model": {"name_or_path": model_folder(args.model, workdir)},
           "data": {"train": [str(workdir / "data.jsonl")], "use_chat_template": True,
                    "max_length": args.max_length, "batching": "length_grouped"},
           "method": {"name": "lora", **LORA},
           "train": {"lr": 2e-4, "batch_size": args.batch_size, "epochs": 1, "precision": args.precision,
                     "schedule": "constant", "tensorboard": False, "seed": 0, "threads": args.threads,
                     "gradient_checkpointing": SIDES[side]},
           "output_dir": str(workdir / f"out-{side}"), "overwrite": True}
    loop = train(cfg, progress=False).loop
    return {"tokens": loop.input_tokens, "seconds": loop.seconds, "steps": loop.steps,
            "losses": [r["loss"] for r in loop.history if "loss" in r],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_side(side: str, args: argparse.Namespace, workdir: Path) -> dict:
    """:func:`worker` in a fresh process (its own peak RSS); its JSON line."""
    cmd = [sys.executable, __file__, "--worker", side, "--workdir", str(workdir), "--model", args.model,
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--precision", args.precision, "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the gradient_checkpointing={side} run failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(args: argparse.Namespace, runs: dict[str, dict]) -> dict:
    """The JSON figures: each side's tokens/s and peak RSS, and the ratios of "on" to "off"."""
    off, on = runs["off"], runs["on"]
    figures = {"model": args.model, "examples": args.examples, "batch_size": args.batch_size,
               "max_length": args.max_length, "precision": args.precision, "threads": args.threads,
               "steps": off["steps"], "tokens": off["tokens"]}
    for side, r in runs.items():
        figures |= {f"{side}_tokens_per_s": round(r["tokens"] / r["seconds"], 1), f"{side}_seconds": round(r["seconds"], 2),
                    f"{side}_peak_rss_mb": round(r["peak_rss_mb"], 1), f"{side}_final_loss": r["losses"][-1]}
    figures |= {"speed_ratio_on_off": round(figures["on_tokens_per_s"] / figures["off_tokens_per_s"], 3),
                "peak_rss_ratio_on_off": round(on["peak_rss_mb"] / off["peak_rss_mb"], 3),
                "peak_rss_saved_mb": round(off["peak_rss_mb"] - on["peak_rss_mb"], 1),
                "max_abs_loss_diff": max(abs(a - b) for a, b in zip(off["losses"], on["losses"]))}
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, model folder, or 'tiny'")
    p.add_argument("--examples", type=int, default=96, help="a multiple of the batch size (96 = 12 steps of 8)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--min-words", type=int, default=150, help="shortest article cut (about 250 tokens)")
    p.add_argument("--max-words", type=int, default=330, help="longest article cut (about 512 tokens)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="compute precision of both runs; auto: bf16 where this CPU runs bf16 matmuls faster")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args, args.worker)))
        return
    if args.examples % args.batch_size:
        p.error("--examples must be a multiple of --batch-size (every batch full on both sides)")
    if args.precision == "auto":
        import torch

        from lmadapt.hardware import resolve_precision

        torch.set_num_threads(args.threads)
        args.precision = resolve_precision("auto", torch.device("cpu"))  # both runs use what was chosen here

    workdir = Path(tempfile.mkdtemp(prefix="lmadapt-gc-bench-"))
    write_rows(workdir / "data.jsonl", args.examples, args.min_words, args.max_words)
    model_folder(args.model, workdir)  # convert a built-in once, outside the measured processes
    runs = {side: run_side(side, args, workdir) for side in SIDES}
    figures = summarise(args, runs)
    for side in SIDES:
        print(f"gradient_checkpointing={side:3}: {figures[f'{side}_tokens_per_s']:9.1f} tokens/s, peak RSS "
              f"{figures[f'{side}_peak_rss_mb']:7.0f} MB, {figures[f'{side}_seconds']:.1f} s", file=sys.stderr)
    print(f"on/off: speed x{figures['speed_ratio_on_off']:.2f}, peak RSS x{figures['peak_rss_ratio_on_off']:.2f} "
          f"({figures['peak_rss_saved_mb']:.0f} MB saved); largest per-step loss gap "
          f"{figures['max_abs_loss_diff']:.1e}", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
