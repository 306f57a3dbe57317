"""A classification head (LS-LLaMA) against SFT with label words on the demo's BBC News topics: accuracy and time
(issue 16; objective ``classify``, docs/objectives.md; METHODS.md section 16).

Two ways to teach SmolLM2-135M-Instruct the demo's task (``lmadapt demo``, ``lmadapt.recipes.demo``), with the
same budget:

- **SFT with label words** (the demo's setting): prompt/completion rows, the demo's chat prompt (``PROMPT`` of
  ``lmadapt.recipes.demo_data``: the question, the five topics, the article) -> the topic word, objective
  ``causal_lm`` with the prompt masked, chat template. Evaluated as the demo evaluates it: the ``classification``
  task scores each topic word as the continuation of the chat prompt and predicts the likeliest.
- **LS head**: ``classification`` rows whose ``text`` is the same prompt string (no chat template: the head reads
  the text, not a conversation) and whose ``label`` is the topic; objective ``classify``, a linear head on the
  pooled final hidden state, the LM head unused. Evaluated by the ``head_classification`` task. ``--heads``
  chooses the variants: ``last`` (LS-LLaMA: the last real token, causal; the default), ``mean`` (mean pooling,
  causal) and ``unllama`` (LS-unLLaMA: mean pooling, every layer unmasked).

What is the same for every run: LoRA r ``--r``, alpha 2r, dropout 0 on the seven projections (the demo's); the
training articles (the first ``--steps`` x ``--batch-size`` articles of the demo's training split,
``bbc_news(seed=0, n_test=250, max_words=--max-words)``), batched in the same order (``batching: padded``, seed
0: every step sees the same articles in every run; the demo itself groups by length, which would batch the
head's shorter rows differently); steps, batch size, ``max_length``, learning rate ``--lr`` (the demo's 1e-3, the
head trained at the same rate), linear schedule, precision (``--precision``, fp32 by default; every evaluation
loads the model in fp32, ``lmadapt.load``'s CPU default), threads. Both are scored on the same held-out
articles: the first ``--test-examples`` of the demo's held-out split. The zero-shot row is the base model under
the ``classification`` task (what the demo prints as "base (zero-shot)").

Reported per run: accuracy and macro-F1 (the mean over classes of 2TP / (2TP + FP + FN), the definition
``head_classification`` uses, computed for SFT from the ``classification`` task's confusion counts), training
seconds and seconds per step (the loop's own clock: no loading, no evaluation), evaluation seconds (the
evaluation alone, the model already loaded), and input tokens trained (real tokens, no padding). SFT rows carry
the chat template (SmolLM2's default system turn, about 30 tokens) and the answer, so they are longer than the
head's rows: that is part of what each approach costs.

    python benchmarks/ls_head.py --workdir runs/bench-ls-head                       # about 12 minutes on 2 cores
    python benchmarks/ls_head.py --workdir runs/bench-ls-head --heads last,unllama  # + LS-unLLaMA (+5 minutes)
    python benchmarks/ls_head.py --workdir runs/bench-ls-smoke --steps 2 --batch-size 4 --test-examples 8 \\
        --heads last,unllama                                                        # smoke run

The defaults (24 steps of 8 articles cut at 100 words as the demo's quick mode does, 60 held out) were sized for
2 AMD EPYC cores in fp32 at about 130 trained tokens/s (rows of about 200 tokens: about 12 s per SFT step and
10 s per head step, 9 minutes of training) and about 1 minute per evaluation of 60 articles (an estimate: the
smoke run shared its 2 cores with other work, and the full run was not timed). Raise ``--steps`` and ``--test-examples`` for a
steadier figure (60 held-out articles: one article is 1.7 points). A finished run folder (named by its settings)
is reused. The BBC text stays in ``--workdir`` (non-commercial research use; see ``demo_data``). The last line
printed is one JSON object.

What this does not show: one seed, one learning rate (not tuned for either side), one small model; the head's
rows keep the instruction text, which a head does not need (it reads the same words the SFT model reads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_common import model_folder
from methods import cpu_class
from updates import say, write_jsonl

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEADS = {"last": {"pooling": "last"},  # LS-LLaMA
         "mean": {"pooling": "mean"},
         "unllama": {"pooling": "mean", "unmask_layers": "all"}}  # LS-unLLaMA


# ------------------------------------------------------------------------------------------------------- data

def write_data(workdir: Path, args: argparse.Namespace) -> dict[str, str]:
    """The SFT and head files of the same training and held-out articles; returns their paths."""
    from lmadapt.recipes.demo_data import bbc_news

    train, test, _ = bbc_news(seed=0, n_test=250, max_words=args.max_words)
    n_train = args.steps * args.batch_size
    if n_train > len(train) or args.test_examples > len(test):
        raise SystemExit(f"--steps x --batch-size = {n_train} training articles (at most {len(train)}) and "
                         f"--test-examples {args.test_examples} (at most {len(test)})")
    train, test = train[:n_train], test[:args.test_examples]
    folder = workdir / "data"
    files = {"sft_train": folder / f"sft_train_{n_train}_w{args.max_words}.jsonl",
             "head_train": folder / f"head_train_{n_train}_w{args.max_words}.jsonl",
             "sft_test": folder / f"sft_test_{len(test)}_w{args.max_words}.jsonl",
             "head_test": folder / f"head_test_{len(test)}_w{args.max_words}.jsonl"}
    write_jsonl(files["sft_train"], [{"prompt": r["prompt"], "completion": r["completion"]} for r in train])
    write_jsonl(files["head_train"], [{"text": r["prompt"], "label": r["label"]} for r in train])
    write_jsonl(files["sft_test"], [{"prompt": r["prompt"], "label": r["label"]} for r in test])
    write_jsonl(files["head_test"], [{"text": r["prompt"], "label": r["label"]} for r in test])
    say(f"{n_train} training and {len(test)} held-out BBC articles, cut at {args.max_words} words")
    return {k: str(v) for k, v in files.items()}


# ---------------------------------------------------------------------------------------------------- training

def run_config(kind: str, files: dict[str, str], model: str, args: argparse.Namespace, out: Path) -> dict:
    """The ``lmadapt.train`` config of ``kind``: 'sft', or a head variant of ``HEADS``."""
    from lmadapt.recipes.demo_data import LABELS

    data = {"max_length": args.max_length, "validation_fraction": 0.0, "batching": "padded"}
    if kind == "sft":
        data.update(train=[files["sft_train"]], use_chat_template=True)
        objective = {"name": "causal_lm"}
    else:
        data.update(train=[files["head_train"]], format="classification", labels=list(LABELS))
        objective = {"name": "classify", "labels": list(LABELS), **HEADS[kind]}
    return {"model": {"name_or_path": model, "dtype": "auto"}, "data": data,
            "method": {"name": "lora", "r": args.r, "alpha": 2 * args.r, "dropout": 0.0, "target_modules": TARGETS},
            "objective": objective,
            "train": {"lr": args.lr, "batch_size": args.batch_size, "max_steps": args.steps, "schedule": "linear",
                      "warmup_steps": min(3, args.steps // 2), "precision": args.precision, "eval_every": 0,
                      "save_every": 0, "seed": 0, "threads": args.threads, "tensorboard": False},
            "output_dir": str(out), "overwrite": True}


def train_once(kind: str, files: dict[str, str], model: str, args: argparse.Namespace, workdir: Path) -> Path:
    """Train ``kind`` (or reuse its finished run folder); the run folder."""
    import lmadapt

    n_train = args.steps * args.batch_size
    out = workdir / "runs" / (f"{kind}_s{args.steps}_b{args.batch_size}_lr{args.lr:g}_r{args.r}_w{args.max_words}_"
                              f"n{n_train}_L{args.max_length}_{args.precision}")
    if not (out / "report.json").is_file():
        say(f"training {kind}: {args.steps} steps of {args.batch_size}")
        lmadapt.train(run_config(kind, files, model, args, out), progress=False)
    return out


# -------------------------------------------------------------------------------------------------- evaluation

def evaluate(model: str, adapter: Path | None, settings: dict, threads: int) -> tuple[dict, float]:
    """(metrics, seconds of the evaluation alone) of the model with ``adapter`` (None: the base model)."""
    import torch

    import lmadapt
    from lmadapt.evaluation.config import EvalConfig

    torch.set_num_threads(threads)
    net, tokenizer, _ = lmadapt.load(model, adapter)
    start = time.perf_counter()
    metrics = lmadapt.evaluate(net, tokenizer, EvalConfig(**settings), progress=False)
    return metrics, time.perf_counter() - start


def macro_f1(confusion: dict[str, dict[str, int]]) -> float:
    """Macro-F1 from ``confusion[gold][predicted]`` counts, as ``head_classification`` defines it."""
    from lmadapt.evaluation.tasks.head_classification import f1_scores

    pairs = [(g, p) for g, row in confusion.items() for p, n in row.items() for _ in range(n)]
    gold, predicted = [g for g, _ in pairs], [p for _, p in pairs]
    f1 = f1_scores(gold, predicted, sorted(set(gold) | set(predicted)))
    return sum(f1.values()) / len(f1)


def measure(kind: str, run: Path | None, files: dict[str, str], model: str, args: argparse.Namespace) -> dict:
    """One row of the table: accuracy, macro-F1, training and evaluation seconds, tokens trained."""
    from lmadapt.recipes.demo_data import LABELS

    if kind in ("zero-shot", "sft"):
        settings = {"task": "classification", "data": [files["sft_test"]], "labels": list(LABELS), "chat": True}
    else:
        settings = {"task": "head_classification", "data": [files["head_test"]], "max_length": args.max_length,
                    "batch_size": 8}
    metrics, eval_s = evaluate(model, None if run is None else run / "adapter", settings, args.threads)
    f1 = metrics["macro_f1"] if "macro_f1" in metrics else macro_f1(metrics["confusion"])
    row = {"run": kind, "accuracy": metrics["accuracy"], "macro_f1": f1, "n": metrics["n"], "eval_s": round(eval_s, 1)}
    if run is not None:
        report = json.loads((run / "report.json").read_text(encoding="utf-8"))
        row.update(train_s=report["seconds"], s_per_step=round(report["seconds"] / report["steps"], 2),
                   input_tokens=report["input_tokens"], input_tokens_per_s=report["input_tokens_per_s"],
                   examples=report["data"]["train_examples"], final_train_loss=report["final_train_loss"],
                   run_dir=str(run))
    say(f"{kind}: accuracy {row['accuracy']:.1%}, macro-F1 {f1:.3f} on {row['n']} held-out articles"
        + (f"; {row['train_s']:.0f} s of training" if run is not None else ""))
    return row


# ------------------------------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench-ls-head")
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or model folder")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run (one epoch of the articles)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--test-examples", type=int, default=60, help="held-out articles (at most 250)")
    p.add_argument("--max-words", type=int, default=100, help="words of each article kept (demo: 150; quick: 100)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per row (no row is cut at 150 words)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of every run (the demo's)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha 2r), the demo's 16")
    p.add_argument("--heads", default="last", help=f"head variants, comma-separated: {', '.join(HEADS)}")
    p.add_argument("--no-zero-shot", action="store_true", help="skip evaluating the base model")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"],
                   help="training precision (auto: bf16 where the CPU has bf16 units); evaluation is fp32")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in args.heads if h not in HEADS]
    if unknown or not args.heads:
        p.error(f"--heads: {', '.join(unknown) or 'none given'}; choose from {', '.join(HEADS)}")
    return args


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir)
    files = write_data(workdir, args)
    model = model_folder(args.model, workdir)
    rows = [] if args.no_zero_shot else [measure("zero-shot", None, files, model, args)]
    for kind in ["sft", *args.heads]:
        rows.append(measure(kind, train_once(kind, files, model, args, workdir), files, model, args))
    trained = [r for r in rows if "train_s" in r]
    if len({r["examples"] for r in trained}) != 1:
        say(f"warning: the runs trained on different numbers of articles: {[r['examples'] for r in trained]}")

    print(f"\nCPU: {cpu_class()}; {args.steps} steps of {args.batch_size} articles ({args.max_words} words), "
          f"LoRA r {args.r}, lr {args.lr:g}, {args.precision}; {rows[-1]['n']} held-out articles")
    print(f"{'run':>10} {'accuracy':>9} {'macro-F1':>9} {'train s':>8} {'s/step':>7} {'tokens':>8} {'tok/s':>7} "
          f"{'eval s':>7}")
    for r in rows:
        t = (f"{r['train_s']:8.1f} {r['s_per_step']:7.2f} {r['input_tokens']:8d} {r['input_tokens_per_s']:7.1f}"
             if "train_s" in r else f"{'':8} {'':7} {'':8} {'':7}")
        print(f"{r['run']:>10} {r['accuracy']:9.1%} {r['macro_f1']:9.3f} {t} {r['eval_s']:7.1f}")
    by = {r["run"]: r for r in rows}
    head = by[args.heads[0]]
    print(json.dumps({
        "benchmark": "ls_head", "cpu_class": cpu_class(), "model": args.model, "steps": args.steps,
        "batch_size": args.batch_size, "train_articles": args.steps * args.batch_size,
        "test_articles": head["n"], "max_words": args.max_words, "max_length": args.max_length, "lr": args.lr,
        "lora_r": args.r, "precision": args.precision, "threads": args.threads,
        "zero_shot_accuracy": by.get("zero-shot", {}).get("accuracy"),
        "sft_accuracy": by["sft"]["accuracy"], "sft_macro_f1": by["sft"]["macro_f1"],
        "sft_train_s": by["sft"]["train_s"], "sft_eval_s": by["sft"]["eval_s"],
        "sft_input_tokens": by["sft"]["input_tokens"],
        "head": args.heads[0], "head_accuracy": head["accuracy"], "head_macro_f1": head["macro_f1"],
        "head_train_s": head["train_s"], "head_eval_s": head["eval_s"], "head_input_tokens": head["input_tokens"],
        "runs": rows}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
