"""Every registered adaptation method on one real task: size, speed, memory, quality and forgetting, one table.

Each method in ``lmadapt.methods.available_methods()`` (whatever is registered once ``lmadapt.methods`` is
imported, except those built from already trained adapters, ``NEEDS_ADAPTERS``) trains SmolLM2-135M-Instruct through ``lmadapt.train`` for the same number of optimizer steps on the
same data, in the same batches (same seed, batch size, schedule), in its own fresh process so that its peak
RSS is its own. The task is the demo's BBC News topic classification (``lmadapt.recipes.demo_data``: prompt =
the first 150 words of an article, answer = its topic, chat template, loss on the answer): a fixed subset of
the demo's training split for training, the next articles for the validation loss, and the first articles of
the demo's held-out split for accuracy (lmadapt's ``classification`` evaluation, as the demo scores it).

Forgetting is measured on text that ships with Python and is not news: a fixed slice of the Python language
reference in ``pydoc_data.topics`` (the first 2,000 characters of the first topics in sorted order), scored
by lmadapt's ``perplexity`` evaluation before training (the base model, in the run's own precision) and after.
The printed change is perplexity after minus before: positive means the method forgot general text.

What each row reports:

- trainable parameters, as the run counts them;
- adapter bytes: the size of the saved adapter folder's ``adapter_model.safetensors``;
- seconds per step: the median over the timed steps (the first ``--untimed`` steps are warm-up and left
  out), from the loop's own step clock (evaluations and saving are not in it);
- peak RSS of the method's process (model load, training and both evaluations included);
- validation loss after training, held-out accuracy after training, retention perplexity change.

Settings that must differ between methods (the learning rate of full fine-tuning against adapters; each
method's rank) are in ``SETTINGS`` below; every other setting is shared. A method not in ``SETTINGS`` runs
with its own defaults (adapting ``TARGETS`` where it has a ``target_modules`` option) at ``ADAPTER_LR``. A
method that fails gets its error in its row; the others still run.

    python benchmarks/methods.py                               # every method, 20 steps of 8 (see docs/benchmarks.md)
    python benchmarks/methods.py --methods lora,full --steps 5  # a subset, shorter
    python benchmarks/methods.py --tiny --methods lora,freeze   # lmadapt.testing's tiny Llama: a smoke run in seconds

The last line printed is one JSON object mapping each method name to its figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import model_folder

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_LR = 1e-3  # the demo's LoRA learning rate (docs/demo.md): the default for every adapter method
SVD_LR = 2e-4  # inits from W's singular vectors start the factors large, not at B = 0: a LoRA-sized lr moves W far

# The per-method settings that must differ: (learning rate, method options). Rank 16 (alpha 32 where the
# scale is alpha/r) everywhere it means a rank; an option a method's config does not have is dropped with a
# note, so that the table still runs while a method's options change. Not tuned per method: one fair setting.
SETTINGS: dict[str, tuple[float, dict]] = {
    "lora": (ADAPTER_LR, {"r": 16, "alpha": 32}),
    "dora": (ADAPTER_LR, {"r": 16, "alpha": 32}),
    "allora": (ADAPTER_LR, {"r": 16, "eta": 2.0}),  # scale fixed to 1 (no alpha); c(0) = eta = 2 = LoRA's alpha/r
    "lamda": (SVD_LR, {"r": 16, "alpha": 32}),  # spectral start: B = U_r, S = Sigma_r / s
    "nola": (ADAPTER_LR, {"r": 16, "alpha": 4}),  # its LLaMA-2 script's r and alpha; trains basis coefficients
    "miss": (ADAPTER_LR, {"r": 32}),  # r is the shard size: 32 * d_out parameters, LoRA r=16's on a square layer
    "balora": (SVD_LR, {"r": 16, "alpha": 32}),  # PiSSA start
    "pissa": (SVD_LR, {"r": 16, "alpha": 32}),
    "olora": (SVD_LR, {"r": 16, "alpha": 32}),
    "corda": (SVD_LR, {"r": 16, "alpha": 32}),  # calibrates on training batches by its own default
    "ia3": (1e-2, {"target_modules": ["k_proj", "v_proj", "down_proj"]}),  # PEFT's Llama targets; 57,600 scales
    "prompt_tuning": (3e-2, {"num_virtual_tokens": 20, "init": "text",  # 20 x 576; soft prompts need large steps
                             "init_text": "Classify the topic of this news article: business, entertainment, "
                                          "politics, sport or tech."}),
    "bottleneck": (ADAPTER_LR, {"target_modules": ["down_proj"], "bottleneck_size": 256}),  # paper's best: series
    "spiel": (2e-4, {"density": 0.033, "reselection_steps": 10,  # 0.033: about LoRA r=16's count; 2 regrows
                     "selection_accumulation_steps": 2}),
    "lofit": (5e-3, {"stage1_fraction": 0.5}),  # the paper's lrs: A at 5e-3, then v at 1e-2 (stage2_lr_scale 2)
    "full": (5e-5, {}),  # every weight trains: a fine-tuning lr, 20x below the adapters'
    "freeze": (1e-4, {"last_n_layers": 2}),  # the last 2 of 30 blocks, about 7M parameters
}

# Methods built from adapters trained first: not a method to train from the base alone (benchmarks/updates.py
# measures MeteoRA on the topics and sentiment adapters it trains).
NEEDS_ADAPTERS = ("meteora",)

FIGURES = ("trainable_params", "adapter_bytes", "s_per_step", "peak_rss_mb", "val_loss", "accuracy",
           "retention_ppl_change")

# --tiny: lmadapt.testing's byte-level tiny Llama (512 positions): short articles and windows
TINY = {"max_words": 12, "retention_chars": 300, "retention_window": 256}
REAL = {"max_words": 150, "retention_chars": 2000, "retention_window": 512}  # 150 words: the demo's cut


# --------------------------------------------------------------------------------------------- machine and data

def cpu_class() -> str:
    """This CPU's model name and its best matrix units (what decides bf16 against fp32 here)."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if name != "unknown CPU" and flags:
                    break
    except OSError:
        pass
    units = ("AMX bf16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags
             else "AVX-512, no bf16" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2")
    return f"{name} ({units})"


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def _pairs(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def retention_texts(n: int, chars: int) -> list[str]:
    """The first ``chars`` characters (cut at a space) of the first ``n`` topics, in sorted order, of the
    Python language reference that ships with CPython (``pydoc_data.topics``): English prose, not news."""
    from pydoc_data.topics import topics

    texts = []
    for key in sorted(topics)[:n]:
        text = topics[key].strip()
        texts.append(text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0])
    return texts


def write_data(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    """The train, validation, held-out and retention files, the same for every method."""
    from lmadapt.recipes.demo import SPLIT_TEST
    from lmadapt.recipes.demo_data import bbc_news

    scale = TINY if args.tiny else REAL
    train_rows, test_rows, _ = bbc_news(seed=0, n_test=SPLIT_TEST, max_words=scale["max_words"])
    n, v = args.train_examples, args.val_examples
    if n + v > len(train_rows) or args.eval_examples > len(test_rows):
        raise SystemExit(f"at most {len(train_rows)} train + validation and {len(test_rows)} held-out articles")
    texts = retention_texts(args.retention_texts, scale["retention_chars"])
    return {"train": _write_jsonl(workdir / "train.jsonl", _pairs(train_rows[:n])),
            "validation": _write_jsonl(workdir / "validation.jsonl", _pairs(train_rows[n:n + v])),
            "test": _write_jsonl(workdir / "test.jsonl", [{"prompt": r["prompt"], "label": r["label"]}
                                                          for r in test_rows[:args.eval_examples]]),
            "retention": _write_jsonl(workdir / "retention.jsonl", [{"text": t} for t in texts])}


# ------------------------------------------------------------------------------------------------ one method

def method_settings(name: str) -> tuple[float, dict, list[str]]:
    """(lr, method section, notes) for ``name``: its ``SETTINGS`` row, ``TARGETS`` where it has target_modules,
    minus the options its config does not have (each one noted)."""
    from lmadapt.methods import method_class

    lr, options = SETTINGS.get(name, (ADAPTER_LR, {}))
    config_class = method_class(name).config_class
    fields = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    wanted = {"target_modules": TARGETS, **options} if "target_modules" in fields else dict(options)
    notes = [f"{name} has no option {key!r}: its default is used" for key in wanted if key not in fields]
    return lr, {"name": name, **{k: v for k, v in wanted.items() if k in fields}}, notes


def run_config(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    """The ``lmadapt.train`` config of ``name``'s run: everything but its ``SETTINGS`` row is shared."""
    from lmadapt.recipes.demo_data import LABELS

    files = json.loads((workdir / "files.json").read_text(encoding="utf-8"))
    lr, method, _ = method_settings(name)
    window = (TINY if args.tiny else REAL)["retention_window"]
    return {
        "model": {"name_or_path": model_folder("tiny" if args.tiny else args.model, workdir), "dtype": "auto"},
        "data": {"train": [files["train"]], "validation": [files["validation"]], "use_chat_template": True,
                 "max_length": 512},
        "method": method,
        "train": {"lr": lr, "batch_size": args.batch_size, "max_steps": args.steps, "precision": args.precision,
                  "schedule": "linear", "warmup_steps": args.steps // 10, "eval_every": 0, "save_every": 0,
                  "seed": 0, "threads": args.threads, "tensorboard": False},
        "evals": [{"task": "classification", "data": [files["test"]], "labels": LABELS, "chat": True},
                  {"task": "perplexity", "data": [files["retention"]], "max_length": window}],
        "output_dir": str(workdir / f"run-{name}"), "overwrite": True}


def seconds_per_step(history: list[dict], untimed: int) -> float:
    """Median seconds of the steps after the first ``untimed`` (all of them when there are no others)."""
    elapsed = [r["elapsed_s"] for r in history if "elapsed_s" in r]
    steps = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    return statistics.median(steps[untimed:] or steps)


def worker(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Train ``name`` and measure it; runs in its own process (``--one NAME``)."""
    from lmadapt.recipes.finetune import train

    result = train(run_config(name, args, workdir), progress=False)
    (accuracy_before, retention_before), (accuracy_after, retention_after) = (
        [(evals[0]["accuracy"], evals[1]["perplexity"]) for evals in (result.evals_before, result.evals_after)])
    return {"trainable_params": result.report["trainable_parameters"],
            "adapter_bytes": (result.adapter_dir / "adapter_model.safetensors").stat().st_size,
            "s_per_step": seconds_per_step(result.loop.history, args.untimed),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "val_loss": result.loop.val_loss, "accuracy": accuracy_after,
            "retention_ppl_change": retention_after - retention_before,
            "base_accuracy": accuracy_before, "base_retention_ppl": retention_before}


def run_method(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    """``name``'s figures from a fresh process, or ``{"error": ...}`` when it failed."""
    shared = ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--untimed", str(args.untimed), "--precision", args.precision, "--threads", str(args.threads), "--lr", args.lr]
    cmd = [sys.executable, __file__, "--one", name, "--workdir", str(workdir), *shared, *(["--tiny"] * args.tiny)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env,
                              timeout=args.method_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within --method-timeout {args.method_timeout} s"}
    finally:
        shutil.rmtree(workdir / f"run-{name}", ignore_errors=True)  # a full model's weights: free the disk
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if args.verbose:
        sys.stderr.write(proc.stderr[-4000:])
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"error": f"exit {proc.returncode}: {errors[-1].strip() if errors else 'no message'}"}


# ------------------------------------------------------------------------------------------------- the table

def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None  # strict JSON: no NaN


def print_table(results: dict[str, dict]) -> None:
    print(f"{'method':10} {'trainable':>12} {'adapter bytes':>14} {'s/step':>8} {'peak RSS MB':>12} "
          f"{'val loss':>9} {'accuracy':>9} {'retention ppl after-before':>27}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:10} FAILED: {r['error']}")
            continue
        print(f"{name:10} {r['trainable_params']:12,} {r['adapter_bytes']:14,} {r['s_per_step']:8.2f} "
              f"{r['peak_rss_mb']:12.0f} {r['val_loss']:9.4f} {r['accuracy']:9.1%} "
              f"{r['retention_ppl_change']:+27.3f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="", help="comma-separated subset (default: every registered method)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or model folder")
    p.add_argument("--tiny", action="store_true", help="lmadapt.testing's tiny Llama, short articles: a smoke run")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps, the same for every method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-examples", type=int, default=160, help="training articles (160 = 20 steps of 8)")
    p.add_argument("--val-examples", type=int, default=40, help="articles for the validation loss")
    p.add_argument("--eval-examples", type=int, default=100, help="held-out articles for the accuracy")
    p.add_argument("--retention-texts", type=int, default=12, help="pydoc_data topics in the retention set")
    p.add_argument("--untimed", type=int, default=2, help="first steps left out of s/step (warm-up)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="every method's train.precision; auto: bf16 where this CPU runs it faster than fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", default="", help="NAME=LR[,NAME=LR...]: replace SETTINGS' learning rate of these methods")
    p.add_argument("--method-timeout", type=int, default=1800, help="seconds before a method counts as failed")
    p.add_argument("--verbose", action="store_true", help="show a failed method's stderr")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    counts = ("steps", "batch_size", "train_examples", "val_examples", "eval_examples", "retention_texts", "threads")
    small = [f"--{k.replace('_', '-')}" for k in counts if getattr(args, k) < 1]
    if small:
        p.error(f"{', '.join(small)}: must be >= 1")
    for item in filter(None, args.lr.split(",")):
        name, _, value = item.partition("=")
        try:
            SETTINGS[name] = (float(value), SETTINGS.get(name, (ADAPTER_LR, {}))[1])
        except ValueError:
            p.error(f"--lr {item!r}: expected NAME=LR, e.g. nola=1e-2")
    return args


def main() -> None:
    args = parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.one, args, Path(args.workdir))))
        return

    import torch

    from lmadapt.hardware import resolve_precision
    from lmadapt.methods import available_methods

    registered = available_methods()
    names = [n for n in args.methods.split(",") if n] or [n for n in registered if n not in NEEDS_ADAPTERS]
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise SystemExit(f"not registered: {unknown}; registered methods: {registered}")
    torch.set_num_threads(args.threads)
    if args.precision == "auto":
        args.precision = resolve_precision("auto", torch.device("cpu"))  # chosen once: every method runs it
    workdir = Path(tempfile.mkdtemp(prefix="lmadapt-bench-methods-"))
    try:
        (workdir / "files.json").write_text(json.dumps(write_data(args, workdir)), encoding="utf-8")
        model = "tiny" if args.tiny else args.model
        model_folder(model, workdir)  # convert a built-in once, before the workers
        print(f"CPU: {cpu_class()}; {args.threads} threads; precision {args.precision}; model {model}")
        print(f"BBC topics: {args.train_examples} training articles, {args.steps} steps of {args.batch_size}, "
              f"{args.val_examples} validation, {args.eval_examples} held-out; retention: "
              f"{args.retention_texts} pydoc_data topics (Python {sys.version.split()[0]})")
        for name in names:
            lr, method, notes = method_settings(name)
            print(f"  {name}: lr {lr:g}, {json.dumps({k: v for k, v in method.items() if k != 'target_modules'})}"
                  + "".join(f"; note: {n}" for n in notes), flush=True)
        results = {}
        for name in names:
            results[name] = run_method(name, args, workdir)
            print(f"  {name}: {'FAILED' if 'error' in results[name] else 'done'}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    first = next((name for name, r in results.items() if "error" not in r), None)
    if first is not None:
        print(f"base model (zero-shot, before training in the {first} run): held-out accuracy "
              f"{results[first]['base_accuracy']:.1%}, retention perplexity {results[first]['base_retention_ppl']:.3f}")
    print_table(results)
    print(json.dumps({name: {k: _finite(r[k]) for k in FIGURES} if "error" not in r else {"error": r["error"]}
                      for name, r in results.items()}))


if __name__ == "__main__":
    main()
