"""LoRA training throughput: lmadapt against Hugging Face PEFT + transformers ``Trainer``, same run.

Both sides train the same model with the same LoRA config on the *same tokenized examples*
(variable-length BBC News prompt/completion rows rendered with the chat template, loss on the
completion only) in the *same batches, in the same order, from the same initial adapter weights*,
one after the other, each in its own fresh process so that peak RSS is its own:

- the batches are lmadapt's length-grouped plan (mega-batches of 50 x batch size sorted by length,
  as transformers' ``LengthGroupedSampler`` does); the Trainer is fed them in that order through a
  sequential sampler, so it pads each batch to its longest row exactly as it does with
  ``group_by_length`` (its best configuration here) and both sides see identical padded batches;
- the PEFT side saves its freshly initialised adapter; lmadapt starts from it (``init_adapter``),
  so the two loss curves can be compared step by step.

Both sides run in the precision that is fastest on this machine (``--precision auto``): bf16 where the
CPU has bf16 matrix units (the Trainer with ``bf16=True``: fp32 master weights, bf16 autocast; lmadapt
with a frozen base stored in bf16), fp32 where it has none (an AVX2-only CPU runs bf16 matmuls ~45x
slower than fp32, so a bf16 baseline there would be a straw man). The Trainer uses sdpa attention.

Useful tokens are the real (non-padding) tokens of the examples. Useful FLOPs are the matmul work
those tokens need (forward and input-gradient of the frozen projections, LoRA forward and backward,
causal attention, the output head only where a label carries loss); dividing by time and by this
machine's bf16 and fp32 GEMM peaks (measured here first, with the same thread count) gives the share
of each peak that each side reaches. Model loading is not timed; peak RSS includes it.

    python benchmarks/train_throughput.py                    # SmolLM2-135M-Instruct, 400 examples = 50 steps
    python benchmarks/train_throughput.py --sides lmadapt --examples 96   # lmadapt alone, for quick iterations
    python benchmarks/train_throughput.py --model tiny --examples 64      # a seconds-long smoke run

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import model_folder

LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
COMPARE_STEPS = 50  # the loss curves are compared over the first this many steps


def _rows(n: int, seed: int, min_words: int, max_words: int) -> list[dict]:
    import random

    from lmadapt.recipes.demo_data import bbc_news, make_row

    train_rows, test_rows, _ = bbc_news(seed=seed)
    pool = train_rows + test_rows  # a benchmark, not an evaluation: every article may be used
    rng = random.Random(seed)
    return [{k: v for k, v in make_row(r["text"], r["label"], rng.randint(min_words, max_words)).items()
             if k in ("prompt", "completion")} for r in pool[:n]]


def _data_config(args: argparse.Namespace, data_file: Path) -> dict:
    return {"train": [str(data_file)], "use_chat_template": True, "max_length": args.max_length,
            "batching": "length_grouped"}


def _dataset_and_plan(args: argparse.Namespace, folder: str, data_file: Path):  # noqa: ANN202
    """The tokenized examples and lmadapt's batch plan for epoch 0, exactly as ``lmadapt.train`` builds them."""
    from lmadapt.config import from_dict
    from lmadapt.data import DataConfig, load_splits
    from lmadapt.models.loading import load_tokenizer
    from lmadapt.recipes.finetune import load_run_config, run_batcher

    tok = load_tokenizer(folder)
    dataset, _, _ = load_splits(from_dict(DataConfig, _data_config(args, data_file)), tok)
    cfg = load_run_config({"data": _data_config(args, data_file), "train": {"batch_size": args.batch_size}})
    plan = [[row[0] for row in batch] for batch in run_batcher(dataset, cfg, tok).batches(0)]
    return tok, dataset, plan


def worker_lmadapt(args: argparse.Namespace, folder: str, data_file: Path, out_dir: Path) -> dict:
    from lmadapt.recipes.finetune import train

    init = out_dir.parent / "init-adapter"
    cfg = {"model": {"name_or_path": folder},  # dtype auto: bf16 storage for bf16 training of a frozen base
           "data": _data_config(args, data_file),
           "method": {"name": "lora", **LORA},
           "init_adapter": str(init) if init.is_dir() else None,
           "train": {"lr": args.lr, "batch_size": args.batch_size, "epochs": 1, "precision": args.precision,
                     "schedule": "constant", "tensorboard": False, "seed": 0},
           "output_dir": str(out_dir), "overwrite": True}
    result = train(cfg, progress=False)
    losses = [r["loss"] for r in result.loop.history if "loss" in r]
    return {"useful_tokens": result.loop.input_tokens, "seconds": result.loop.seconds, "steps": result.loop.steps,
            "losses": losses}


def worker_hf(args: argparse.Namespace, folder: str, data_file: Path, out_dir: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok, dataset, plan = _dataset_and_plan(args, folder, data_file)
    order = [i for batch in plan for i in batch]
    examples = [{"input_ids": dataset.input_ids[i], "labels": dataset.labels[i]} for i in order]
    useful = sum(len(ids) for ids in dataset.input_ids)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    model.save_pretrained(out_dir.parent / "init-adapter")  # lmadapt starts from the same weights
    targs = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=args.lr, lr_scheduler_type="constant", bf16=args.precision == "bf16", use_cpu=True,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        dataloader_num_workers=0, remove_unused_columns=False)

    class InPlanOrder(Trainer):
        """The examples arrive already in lmadapt's length-grouped batch order: read them sequentially."""

        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = InPlanOrder(model=model, args=targs, train_dataset=_ListDataset(examples), data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"useful_tokens": useful, "seconds": seconds, "steps": trainer.state.global_step, "losses": losses}


class _ListDataset:
    """A list as a map-style dataset."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def gemm_peak(dtype_name: str, threads: int, repeats: int = 7, budget_s: float = 20.0) -> float:
    """This machine's matmul rate in ``dtype_name`` (fp32 or bf16), FLOP/s: the best median over a few
    square and model-like shapes. A dtype this CPU has no fast path for is measured with fewer repeats
    and without the largest shapes, within about ``budget_s`` seconds."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    best, spent = 0.0, 0.0
    for m, k, n in ((512, 512, 512), (4096, 576, 1536), (4096, 1536, 576), (1024, 1024, 1024), (2048, 2048, 2048)):
        a = torch.randn(m, k, dtype=dtype)
        b = torch.randn(k, n, dtype=dtype)
        start = time.perf_counter()
        a @ b  # warm-up, and a first reading of how slow this is
        first = time.perf_counter() - start
        if spent + first * (repeats + 1) > budget_s:
            best = max(best, 2 * m * k * n / first)
            break
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        spent += first + sum(times)
        best = max(best, 2 * m * k * n / statistics.median(times))
    return best


def best_precision(threads: int) -> str:
    """The precision a user of either library should pick here: bf16 where its matmuls beat fp32."""
    import torch

    from lmadapt.hardware import resolve_precision

    torch.set_num_threads(threads)
    return resolve_precision("auto", torch.device("cpu"))


def worker_numerics(args: argparse.Namespace, folder: str, data_file: Path, out_dir: Path) -> dict:
    """Losses of the first batches at initialisation (LoRA B = 0: the base model) computed three ways.

    "exact" is one precision above what the sides compute in (fp32 for a bf16 run, fp64 for an fp32
    run); "hf" is what the Trainer runs (fp32 weights, under bf16 autocast in a bf16 run); "lmadapt" is
    what lmadapt runs (bf16 weights without autocast in a bf16 run) with its own attention. The gap
    between "hf" and "exact" is the size of rounding effects, the yardstick for "the same loss curve".
    """
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from lmadapt.data import Batcher
    from lmadapt.objectives.causal_lm import causal_lm_loss
    from lmadapt.training.attention import training_attention

    tok, dataset, plan = _dataset_and_plan(args, folder, data_file)
    batcher = Batcher(dataset, batch_size=args.batch_size, max_length=args.max_length, packing=False,
                      group_by_length=True, pad_id=tok.pad_token_id, seed=0)
    batches = [batcher.collate(batch) for batch in batcher.batches(0)[:4]]
    half = args.precision == "bf16"
    exact = torch.float32 if half else torch.float64  # a rung above what both sides compute in
    ours_dtype = torch.bfloat16 if half else torch.float32
    ways = {"exact": (exact, False, False), "hf": (torch.float32, half, False), "lmadapt": (ours_dtype, False, True)}
    out = {}
    for name, (dtype, use_autocast, ours) in ways.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        model.config.use_cache = False
        model.train()
        losses = []
        attention = training_attention(model, torch.device("cpu")) if ours else contextlib.nullcontext()
        with attention, torch.no_grad():
            for batch in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                    loss_sum, n, _ = causal_lm_loss(model, batch)
                losses.append((loss_sum / n).item())
        out[name] = losses
    return out


def useful_flops(folder: str, lengths: list[int], targets: int) -> float:
    """Matmul FLOPs that LoRA training on these examples needs, whatever the implementation.

    Per real token: frozen projections forward + input gradient (4 N), LoRA forward + both gradients
    (6 N_lora); per sequence of n tokens and layer: causal attention, forward 2 n^2 d and backward
    twice that; per loss-bearing token: the output head forward + input gradient (4 d V).
    """
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(folder)
    d, f, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    head_dim = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    frozen = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(LORA["r"] * (i + o) for i, o in shapes)
    tokens = sum(lengths)
    attention = layers * sum(6 * n * n * q for n in lengths)
    return tokens * (4 * frozen + 6 * lora) + attention + targets * 4 * d * vocab


def _run_worker(side: str, args: argparse.Namespace, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--workdir", str(workdir)] + args.passthrough
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {side} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_losses(reference: list[float], other: list[float], steps: int = COMPARE_STEPS) -> dict:
    """How far ``other``'s per-step losses are from ``reference``'s over the first ``steps`` steps."""
    n = min(steps, len(reference), len(other))
    diffs = [abs(a - b) for a, b in zip(reference[:n], other[:n])]
    mean_ref = statistics.fmean(reference[:n])
    return {"steps_compared": n, "mean_abs_diff": statistics.fmean(diffs), "max_abs_diff": max(diffs),
            "mean_rel_diff": statistics.fmean(diffs) / mean_ref}


def _plot(hf: list[float], lm: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(hf) + 1), hf, label="PEFT + Trainer", lw=2, alpha=0.7)
    ax.plot(range(1, len(lm) + 1), lm, label="lmadapt", lw=1, ls="--")
    ax.set_xlabel("step (same batches, same order, same initial adapter)")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, model folder, or 'tiny'")
    p.add_argument("--examples", type=int, default=400, help="a multiple of the batch size (400 = 50 steps of 8)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--min-words", type=int, default=15, help="shortest article cut (about 32+ tokens with the prompt)")
    p.add_argument("--max-words", type=int, default=330, help="longest article cut (about 512 tokens)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="both sides' compute precision; auto: bf16 where this CPU runs bf16 matmuls faster "
                        "than fp32 (each library's best configuration here), else fp32")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", default="both", choices=["both", "lmadapt", "hf"])
    p.add_argument("--plot", default="train_throughput_loss.png", help="where to draw both loss curves")
    p.add_argument("--worker", choices=["lmadapt", "hf", "numerics"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.passthrough = [a for a in sys.argv[1:] if not a.startswith("--worker") and not a.startswith("--workdir")]
    if args.examples % args.batch_size:
        p.error("--examples must be a multiple of --batch-size (every batch full on both sides)")
    if args.precision == "auto" and not args.worker:
        args.precision = best_precision(args.threads)
        args.passthrough += ["--precision", args.precision]  # the workers run what was chosen here

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        workdir = Path(args.workdir)
        folder = model_folder(args.model, workdir)
        fn = {"lmadapt": worker_lmadapt, "hf": worker_hf, "numerics": worker_numerics}[args.worker]
        out = fn(args, folder, workdir / "data.jsonl", workdir / f"out-{args.worker}")
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return

    workdir = Path(tempfile.mkdtemp(prefix="lmadapt-bench-"))
    with open(workdir / "data.jsonl", "w", encoding="utf-8") as fh:
        for row in _rows(args.examples, 0, args.min_words, args.max_words):
            fh.write(json.dumps(row) + "\n")
    folder = model_folder(args.model, workdir)  # convert a built-in once, outside the timed workers
    _, dataset, _ = _dataset_and_plan(args, folder, workdir / "data.jsonl")
    lengths = [len(ids) for ids in dataset.input_ids]
    targets = sum(sum(1 for t in labels[1:] if t != -100) for labels in dataset.labels)
    flops = useful_flops(folder, lengths, targets)
    peaks = {name: gemm_peak(name, args.threads) for name in ("fp32", "bf16")}
    sides = {}
    for side in (["hf", "lmadapt"] if args.sides == "both" else [args.sides]):
        sides[side] = _run_worker(side, args, workdir)
    # a busy neighbour on a shared machine can halve one reading: measure again after, keep the higher
    peaks = {name: max(peak, gemm_peak(name, args.threads)) for name, peak in peaks.items()}
    peak = peaks["bf16"]
    for r in sides.values():
        r["useful_tokens_per_s"] = r["useful_tokens"] / r["seconds"]
        r["share_of_bf16_peak"] = flops / r["seconds"] / peak
        r["share_of_fp32_peak"] = flops / r["seconds"] / peaks["fp32"]

    print(f"model {args.model}, {args.examples} examples ({sum(lengths)} tokens, {min(lengths)}-{max(lengths)} "
          f"per example), batch {args.batch_size}, {args.precision}, {args.threads} threads, LoRA r={LORA['r']} "
          f"on all projections; GEMM peak bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.1f} "
          f"GFLOP/s; useful work {flops / 1e12:.2f} TFLOP")
    print(f"{'':24} {'useful tok/s':>12} {'seconds':>9} {'steps':>6} {'peak RSS MB':>12} {'% bf16 peak':>11} "
          f"{'% fp32 peak':>11} {'loss first→last':>16}")
    names = {"hf": "PEFT + Trainer", "lmadapt": "lmadapt"}
    for side, r in sides.items():
        print(f"{names[side]:24} {r['useful_tokens_per_s']:12.1f} {r['seconds']:9.1f} {r['steps']:6d} "
              f"{r['peak_rss_mb']:12.0f} {100 * r['share_of_bf16_peak']:11.1f} {100 * r['share_of_fp32_peak']:11.1f} "
              f"{r['losses'][0]:7.3f}→{r['losses'][-1]:.3f}")
    figures = {"model": args.model, "examples": args.examples, "useful_tokens": sum(lengths),
               "batch_size": args.batch_size, "precision": args.precision, "threads": args.threads,
               "bf16_gemm_peak_gflops": round(peaks["bf16"] / 1e9, 1),
               "fp32_gemm_peak_gflops": round(peaks["fp32"] / 1e9, 1), "useful_tflop": round(flops / 1e12, 3)}
    for side, r in sides.items():
        figures |= {f"{side}_useful_tokens_per_s": round(r["useful_tokens_per_s"], 1),
                    f"{side}_seconds": round(r["seconds"], 2), f"{side}_peak_rss_mb": round(r["peak_rss_mb"], 1),
                    f"{side}_share_of_bf16_peak": round(r["share_of_bf16_peak"], 4),
                    f"{side}_share_of_fp32_peak": round(r["share_of_fp32_peak"], 4),
                    f"{side}_final_loss": r["losses"][-1]}
    if len(sides) == 2:
        numerics = _run_worker("numerics", args, workdir)
        noise = statistics.fmean(abs(a - b) for a, b in zip(numerics["hf"], numerics["exact"]))
        ours_vs_hf = statistics.fmean(abs(a - b) for a, b in zip(numerics["lmadapt"], numerics["hf"]))
        ours_vs_exact = statistics.fmean(abs(a - b) for a, b in zip(numerics["lmadapt"], numerics["exact"]))
        hf, lm = sides["hf"], sides["lmadapt"]
        speedup = lm["useful_tokens_per_s"] / hf["useful_tokens_per_s"]
        rss_ratio = lm["peak_rss_mb"] / hf["peak_rss_mb"]
        curve = compare_losses(hf["losses"], lm["losses"])
        _plot(hf["losses"], lm["losses"], Path(args.plot))
        print(f"speed-up (useful tokens/s): {speedup:.2f}x   peak RSS ratio (lmadapt / HF): {rss_ratio:.2f}")
        print(f"loss curves over the first {curve['steps_compared']} steps: mean |diff| {curve['mean_abs_diff']:.2e} "
              f"({100 * curve['mean_rel_diff']:.2e}% of the mean loss), max |diff| {curve['max_abs_diff']:.2e}; "
              f"plot in {args.plot}")
        exact = "fp32" if args.precision == "bf16" else "fp64"
        print(f"rounding at initialisation (first {len(numerics['exact'])} batches, mean |diff| of the loss): "
              f"Trainer vs exact {exact} {noise:.2e}; lmadapt vs Trainer {ours_vs_hf:.2e}; "
              f"lmadapt vs exact {exact} {ours_vs_exact:.2e}")
        figures |= {"speedup_useful_tokens_per_s": round(speedup, 3), "peak_rss_ratio": round(rss_ratio, 3),
                    "loss_curve": {k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in curve.items()},
                    "init_loss_mean_abs_diff": {f"hf_vs_{exact}": float(f"{noise:.3g}"),
                                                "lmadapt_vs_hf": float(f"{ours_vs_hf:.3g}"),
                                                f"lmadapt_vs_{exact}": float(f"{ours_vs_exact:.3g}")},
                    "hf_losses": hf["losses"][:COMPARE_STEPS], "lmadapt_losses": lm["losses"][:COMPARE_STEPS]}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
