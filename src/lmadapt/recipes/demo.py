"""``lmadapt demo``: LoRA SFT of SmolLM2-135M-Instruct on BBC News topic classification, end to end.

It is an ordinary run through the public API: the data are written as JSONL into the cache folder, a
config dict is built (``examples/bbc_demo.yaml`` spells out the same run), ``lmadapt.train`` trains
with classification evaluations before and after, and a few held-out articles are answered by
generation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lmadapt.fsutil import atomic_write_json
from lmadapt.models.builtins import default_cache_dir
from lmadapt.recipes.demo_data import LABELS, bbc_news

# The recipe (measured on 2 CPU cores; figures in docs/demo.md): 512 training articles, the first 150
# words of each, 61 optimizer steps of 8 length-grouped articles (5% held out for validation loss).
TRAIN_EXAMPLES = 512
TEST_EXAMPLES = 250
RECIPE: dict[str, Any] = {
    "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "auto"},
    "data": {"use_chat_template": True, "max_length": 512, "validation_fraction": 0.05},
    "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "train": {"lr": 1e-3, "batch_size": 8, "grad_accum": 1, "epochs": 1, "precision": "auto",
              "schedule": "linear", "warmup_steps": 3, "eval_every": 20, "save_every": 20, "seed": 0},
}
SPLIT_TEST = 250  # the fixed held-out split; the demo scores its first TEST_EXAMPLES (class-balanced shuffle)
QUICK = {"train_examples": 48, "test_examples": 25, "max_steps": 6}


def _write_jsonl(rows: list[dict], path: Path, keys: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({k: row[k] for k in keys}) + "\n")


def demo_config(output_dir: str, *, overwrite: bool = False, quick: bool = False,
                data_dir: Path | None = None,
                split: tuple[list[dict], list[dict], list[str]] | None = None) -> dict[str, Any]:
    """The demo's run config; writes its train/test JSONL files into ``data_dir`` (a cache folder).

    ``split`` is ``bbc_news(seed=0, n_test=SPLIT_TEST)`` when the caller has already read it.
    """
    n_train = QUICK["train_examples"] if quick else TRAIN_EXAMPLES
    n_test = QUICK["test_examples"] if quick else TEST_EXAMPLES
    train_rows, test_rows, labels = split or bbc_news(seed=0, n_test=SPLIT_TEST)
    data_dir = data_dir or default_cache_dir() / "demo-data"
    train_file, test_file = data_dir / f"bbc_train_{n_train}.jsonl", data_dir / f"bbc_test_{n_test}.jsonl"
    _write_jsonl(train_rows[:n_train], train_file, ("prompt", "completion"))
    _write_jsonl(test_rows[:n_test], test_file, ("prompt", "label"))
    cfg = json.loads(json.dumps(RECIPE))
    cfg["data"]["train"] = [str(train_file)]
    cfg["evals"] = [{"task": "classification", "data": [str(test_file)], "labels": labels, "chat": True}]
    cfg["output_dir"] = output_dir
    cfg["overwrite"] = overwrite
    if quick:
        cfg["train"].update(max_steps=QUICK["max_steps"], eval_every=0, save_every=0)
    return cfg


def run_demo(output_dir: str = "runs/demo", *, overwrite: bool = False, quick: bool = False) -> dict[str, Any]:
    """Run the demo and return its report (also written to ``output_dir/report.json``)."""
    from lmadapt.api import load
    from lmadapt.decoding.generation import generate
    from lmadapt.recipes.finetune import train

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    split = bbc_news(seed=0, n_test=SPLIT_TEST)
    cfg = demo_config(output_dir, overwrite=overwrite, quick=quick, split=split)
    say(f"lmadapt demo: LoRA on SmolLM2-135M-Instruct, BBC News topics ({', '.join(LABELS)}); "
        f"{'quick smoke run' if quick else 'about 10 minutes on 2 CPU cores'}")
    result = train(cfg)
    before, after = result.evals_before[0], result.evals_after[0]
    say(f"held-out accuracy: base (zero-shot) {before['accuracy']:.1%} -> LoRA {after['accuracy']:.1%} "
        f"on {after['n']} articles")

    test_rows = split[1]
    model, tokenizer, _ = load(cfg["model"]["name_or_path"], adapter=result.adapter_dir)
    shown = test_rows[TEST_EXAMPLES - 4:TEST_EXAMPLES]
    answers = generate(model, tokenizer, [r["prompt"] for r in shown], chat=True, max_new_tokens=5)
    say("a few held-out articles, answered by the adapted model (greedy generation):")
    for row, answer in zip(shown, answers):
        headline = row["text"].splitlines()[0][:70]
        say(f"  {headline!r:74} -> {answer.strip()!r} (label: {row['label']})")
    report = dict(result.report)
    report["demo"] = {"zero_shot_accuracy": before["accuracy"], "adapted_accuracy": after["accuracy"],
                      "test_articles": after["n"], "generations": [
                          {"headline": r["text"].splitlines()[0], "answer": a, "label": r["label"]}
                          for r, a in zip(shown, answers)]}
    atomic_write_json(Path(output_dir) / "report.json", report)
    return report
