"""How much of a LoRA fine-tune's gain proxy-tuning recovers without touching the large model's weights.

On the demo's task (BBC News topics, its fixed 250 held-out articles, classification by the likelihood
of each label word after the chat-rendered prompt), this scores:

- the large base model (SmolLM2-135M-Instruct), zero-shot;
- the large model with its own LoRA adapter (the "ceiling": what fine-tuning the large model gives);
- the small model alone and with its LoRA adapter (the expert);
- proxy-tuning: large + beta * (expert - anti-expert), the anti-expert being the small model with the
  adapter switched off, for each beta given.

and reports the share of the gap closed, ``(proxy - base) / (tuned - base)``.

    python benchmarks/proxy_quality.py --large-adapter runs/demo/adapter \\
        --small runs/helper-smollm2/model --small-adapter runs/helper-expert/adapter --betas 0.5,1,2

Each model runs once per article (the context once, the labels from its KV cache); every row of the table is
a weighted sum of those log-probabilities, renormalised per token, so extra betas cost nothing.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _examples(n: int) -> tuple[list[dict], list[str]]:
    from lmadapt.recipes.demo import SPLIT_TEST
    from lmadapt.recipes.demo_data import bbc_news

    _, test_rows, labels = bbc_news(seed=0, n_test=SPLIT_TEST)
    return [{"prompt": r["prompt"], "label": r["label"]} for r in test_rows[:n]], labels


def _settings(betas: list[float]) -> dict[str, list[float]]:
    """Weights on the four log-probability terms (large base, expert, anti-expert, large + LoRA)."""
    out = {"large base": [1, 0, 0, 0], "large + LoRA": [0, 0, 0, 1], "small base (anti-expert)": [0, 0, 1, 0],
           "small + LoRA (expert)": [0, 1, 0, 0]}
    out.update({f"proxy-tuned, beta={b:g}": [1, b, -b, 0] for b in betas})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", default="smollm2-135m-instruct")
    p.add_argument("--large-adapter", required=True, help="LoRA adapter of the large model on this task")
    p.add_argument("--small", required=True, help="the small model (same tokenizer), e.g. made by make-helper")
    p.add_argument("--small-adapter", required=True, help="LoRA adapter of the small model on this task")
    p.add_argument("--betas", default="1.0", help="comma-separated proxy weights")
    p.add_argument("--examples", type=int, default=250)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where this CPU runs it faster than fp32, else fp32")
    p.add_argument("--threads", type=int, default=0, help="0: as lmadapt chooses (idle cores)")
    args = p.parse_args()

    from tqdm.auto import tqdm

    from lmadapt.api import load
    from lmadapt.decoding.generation import encode_prompt
    from lmadapt.decoding.steered_scoring import (
        combine_continuation_logprobs,
        continuation_logprobs,
    )
    from lmadapt.decoding.steering import ModelTerm
    from lmadapt.evaluation.examples import candidate_ids
    from lmadapt.hardware import choose_threads, resolve_precision
    from lmadapt.models.vocab import check_vocabularies, common_vocab_size

    torch.set_num_threads(choose_threads(args.threads))
    args.dtype = resolve_precision(args.dtype, torch.device("cpu"))
    examples, labels = _examples(args.examples)
    large, tok, _ = load(args.large, args.large_adapter, dtype=args.dtype)
    small, small_tok, _ = load(args.small, args.small_adapter, dtype=args.dtype)
    check_vocabularies(tok, {"small model": small_tok})
    # every figure comes from one pass of each model per article: the terms' log-probabilities do not depend
    # on the weights, so each setting (a single model, or proxy-tuning at some beta) is a weighted sum of them
    terms = [ModelTerm(large, adapters_off=True), ModelTerm(small, expert_prompt=True),
             ModelTerm(small, adapters_off=True), ModelTerm(large)]
    vocab = common_vocab_size(tok, [large, small])
    label_ids = candidate_ids(tok, labels, "labels")
    settings = _settings([float(b) for b in args.betas.split(",")])
    correct = dict.fromkeys(settings, 0)
    start = time.perf_counter()
    for ex in tqdm(examples, desc="articles", unit="article"):
        context = encode_prompt(tok, ex["prompt"], chat=True)
        per_term = continuation_logprobs(terms, context, label_ids, vocab_size=vocab)
        for name, weights in settings.items():
            sums = [s.sum().item() for s in combine_continuation_logprobs(per_term, weights, label_ids)]
            correct[name] += labels[max(range(len(labels)), key=sums.__getitem__)] == ex["label"]
    scores = {name: c / len(examples) for name, c in correct.items()}
    gap = scores["large + LoRA"] - scores["large base"]
    closed = {name.split("=")[1]: (acc - scores["large base"]) / gap if gap else float("nan")
              for name, acc in scores.items() if name.startswith("proxy")}
    print(f"BBC News topics, {len(examples)} held-out articles, accuracy by label likelihood ({args.dtype}; "
          f"{time.perf_counter() - start:.0f} s)")
    for name, acc in scores.items():
        print(f"  {name:30} {100 * acc:5.1f}%")
    for beta, share in closed.items():
        print(f"  beta={beta}: proxy-tuning closes {100 * share:.1f}% of the gap between the large base and "
              f"the LoRA-tuned large model")
    print(json.dumps({"examples": len(examples), "dtype": args.dtype, "accuracy": scores,
                      "gap_closed": {b: round(s, 4) for b, s in closed.items()}}))


if __name__ == "__main__":
    main()
