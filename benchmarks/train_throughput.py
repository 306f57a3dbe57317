"""LoRA training throughput: lmadapt against Hugging Face PEFT + transformers ``Trainer``, same run.

Both sides train the same model with the same LoRA config on the *same tokenized examples*
(variable-length BBC News prompt/completion rows rendered with the chat template, loss on the
completion only), one after the other, each in its own fresh process so that peak RSS is its own.
lmadapt runs one epoch over the examples with its default batching (length-grouped; ``--lmadapt-batching``
picks packed or padded); the Trainer runs the same examples once with padding, grouped by length
(its best configuration here) or in random order.

Useful tokens are the real (non-padding) tokens of the examples; both sides process exactly the same
examples once, so the ratio of useful tokens/s is the ratio of wall-clock training time. Padding
and packing slots are not useful tokens. Model loading is not timed; peak RSS
includes it (both load the same cached fp32 folder).

    python benchmarks/train_throughput.py                    # SmolLM2-135M-Instruct, 96 examples
    python benchmarks/train_throughput.py --model tiny --examples 64     # a seconds-long smoke run

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _rows(n: int, seed: int, min_words: int, max_words: int) -> list[dict]:
    import random

    from lmadapt.demo_data import bbc_news, make_row

    train_rows, _, _ = bbc_news(seed=seed)
    rng = random.Random(seed)
    return [{k: v for k, v in make_row(r["text"], r["label"], rng.randint(min_words, max_words)).items()
             if k in ("prompt", "completion")} for r in train_rows[:n]]


def _model_folder(name: str, workdir: Path) -> str:
    if name == "tiny":
        from lmadapt.testing import tiny_llama, tiny_tokenizer

        folder = workdir / "tiny"
        if not folder.exists():
            tiny_llama().save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)
        return str(folder)
    from lmadapt.models import resolve_model_path

    return str(resolve_model_path(name))


def _data_config(args: argparse.Namespace, data_file: Path) -> dict:
    return {"train": [str(data_file)], "use_chat_template": True, "max_length": args.max_length,
            "batching": args.lmadapt_batching}


def worker_lmadapt(args: argparse.Namespace, folder: str, data_file: Path, out_dir: Path) -> dict:
    from lmadapt.train import train

    cfg = {"model": {"name_or_path": folder, "dtype": "fp32"},
           "data": _data_config(args, data_file),
           "method": {"name": "lora", **LORA},
           "train": {"lr": args.lr, "batch_size": args.batch_size, "epochs": 1, "precision": args.precision,
                     "schedule": "constant", "tensorboard": False, "seed": 0},
           "output_dir": str(out_dir), "overwrite": True}
    result = train(cfg, progress=False)
    losses = [r["loss"] for r in result.loop.history if "loss" in r]
    return {"useful_tokens": result.loop.input_tokens, "seconds": result.loop.seconds, "steps": result.loop.steps,
            "first_loss": losses[0], "final_loss": losses[-1]}


def worker_hf(args: argparse.Namespace, folder: str, data_file: Path, out_dir: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lmadapt.config import from_dict
    from lmadapt.data import DataConfig, load_splits
    from lmadapt.models import load_tokenizer

    tok = load_tokenizer(folder)
    dataset, _, _ = load_splits(from_dict(DataConfig, _data_config(args, data_file)), tok)
    examples = [{"input_ids": ids, "labels": labels, "length": len(ids)}
                for ids, labels in zip(dataset.input_ids, dataset.labels)]
    useful = sum(len(ids) for ids in dataset.input_ids)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    targs = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=args.lr, lr_scheduler_type="constant", bf16=args.precision == "bf16", use_cpu=True,
        train_sampling_strategy="group_by_length" if args.hf_group_by_length else "random",
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        dataloader_num_workers=0, remove_unused_columns=False)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=targs, train_dataset=_ListDataset(examples), data_collator=_drop_length(collator))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"useful_tokens": useful, "seconds": seconds, "steps": trainer.state.global_step,
            "first_loss": losses[0], "final_loss": losses[-1]}


class _ListDataset:
    """A list as a map-style dataset; ``column_names`` lets the Trainer's length grouping read lengths."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        self.column_names = list(rows[0])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):  # noqa: ANN001
        if isinstance(key, str):
            return [r[key] for r in self.rows]
        return self.rows[key]


def _drop_length(collator):  # noqa: ANN001, ANN202
    return lambda rows: collator([{k: v for k, v in r.items() if k != "length"} for r in rows])


def _run_worker(side: str, args: argparse.Namespace, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--workdir", str(workdir)] + args.passthrough
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {side} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, model folder, or 'tiny'")
    p.add_argument("--examples", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--min-words", type=int, default=15, help="shortest article cut (about 32+ tokens with the prompt)")
    p.add_argument("--max-words", type=int, default=330, help="longest article cut (about 512 tokens)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf-group-by-length", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lmadapt-batching", default="length_grouped", choices=["length_grouped", "packed", "padded"],
                   help="how lmadapt forms batches (data.batching; its default is length_grouped)")
    p.add_argument("--worker", choices=["lmadapt", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.passthrough = [a for a in sys.argv[1:] if not a.startswith("--worker") and not a.startswith("--workdir")]

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        workdir = Path(args.workdir)
        folder = _model_folder(args.model, workdir)
        fn = worker_lmadapt if args.worker == "lmadapt" else worker_hf
        out = fn(args, folder, workdir / "data.jsonl", workdir / f"out-{args.worker}")
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return

    workdir = Path(tempfile.mkdtemp(prefix="lmadapt-bench-"))
    with open(workdir / "data.jsonl", "w", encoding="utf-8") as fh:
        for row in _rows(args.examples, 0, args.min_words, args.max_words):
            fh.write(json.dumps(row) + "\n")
    _model_folder(args.model, workdir)  # convert a built-in once, outside the timed workers
    hf = _run_worker("hf", args, workdir)
    lm = _run_worker("lmadapt", args, workdir)
    for side in (hf, lm):
        side["useful_tokens_per_s"] = side["useful_tokens"] / side["seconds"]
    hf_name = f"PEFT + Trainer ({'group_by_length' if args.hf_group_by_length else 'random order'})"
    print(f"model {args.model}, {args.examples} examples, batch {args.batch_size}, {args.precision}, "
          f"{args.threads} threads, LoRA r={LORA['r']} on all projections")
    print(f"{'':34} {'useful tok/s':>12} {'seconds':>9} {'steps':>6} {'peak RSS MB':>12} {'loss first→last':>18}")
    for name, side in ((hf_name, hf), (f"lmadapt ({args.lmadapt_batching})", lm)):
        print(f"{name:34} {side['useful_tokens_per_s']:12.1f} {side['seconds']:9.1f} {side['steps']:6d} "
              f"{side['peak_rss_mb']:12.0f} {side['first_loss']:8.3f}→{side['final_loss']:.3f}")
    speedup = lm["useful_tokens_per_s"] / hf["useful_tokens_per_s"]
    rss_ratio = lm["peak_rss_mb"] / hf["peak_rss_mb"]
    print(f"speed-up (useful tokens/s): {speedup:.2f}x   peak RSS ratio (lmadapt / HF): {rss_ratio:.2f}")
    print(json.dumps({
        "model": args.model, "examples": args.examples, "batch_size": args.batch_size,
        "precision": args.precision, "threads": args.threads, "useful_tokens": lm["useful_tokens"],
        "lmadapt_batching": args.lmadapt_batching,
        "lmadapt_useful_tokens_per_s": round(lm["useful_tokens_per_s"], 1),
        "hf_useful_tokens_per_s": round(hf["useful_tokens_per_s"], 1),
        "speedup_useful_tokens_per_s": round(speedup, 3),
        "lmadapt_peak_rss_mb": round(lm["peak_rss_mb"], 1), "hf_peak_rss_mb": round(hf["peak_rss_mb"], 1),
        "peak_rss_ratio": round(rss_ratio, 3),
        "lmadapt_seconds": round(lm["seconds"], 2), "hf_seconds": round(hf["seconds"], 2),
        "lmadapt_final_loss": lm["final_loss"], "hf_final_loss": hf["final_loss"],
    }))


if __name__ == "__main__":
    main()
