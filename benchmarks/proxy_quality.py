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

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _examples(n: int) -> tuple[list[dict], list[str]]:
    from lmadapt.demo import SPLIT_TEST
    from lmadapt.demo_data import bbc_news

    _, test_rows, labels = bbc_news(seed=0, n_test=SPLIT_TEST)
    return [{"prompt": r["prompt"], "label": r["label"]} for r in test_rows[:n]], labels


def _proxy_accuracy(large, small, tok, examples: list[dict], labels: list[str], beta: float) -> float:  # noqa: ANN001
    from tqdm.auto import tqdm

    from lmadapt.steering import proxy_logprobs

    correct = 0
    for ex in tqdm(examples, desc=f"proxy beta={beta:g}", unit="article"):
        scores = proxy_logprobs(large, tok, [ex["prompt"]], labels, expert=small, beta=beta, chat=True)[0]
        correct += labels[max(range(len(labels)), key=scores.__getitem__)] == ex["label"]
    return correct / len(examples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", default="smollm2-135m-instruct")
    p.add_argument("--large-adapter", required=True, help="LoRA adapter of the large model on this task")
    p.add_argument("--small", required=True, help="the small model (same tokenizer), e.g. made by make-helper")
    p.add_argument("--small-adapter", required=True, help="LoRA adapter of the small model on this task")
    p.add_argument("--betas", default="1.0", help="comma-separated proxy weights")
    p.add_argument("--examples", type=int, default=250)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from lmadapt.api import load
    from lmadapt.evaluation import classification_accuracy
    from lmadapt.tree import adapters_disabled

    examples, labels = _examples(args.examples)
    large, tok, _ = load(args.large, args.large_adapter, dtype=args.dtype)
    small, small_tok, _ = load(args.small, args.small_adapter, dtype=args.dtype)
    scores: dict[str, float] = {}
    start = time.perf_counter()
    with adapters_disabled(large):
        scores["large base"] = classification_accuracy(large, tok, examples, labels, chat=True)["accuracy"]
    scores["large + LoRA"] = classification_accuracy(large, tok, examples, labels, chat=True)["accuracy"]
    with adapters_disabled(small):
        scores["small base (anti-expert)"] = classification_accuracy(small, small_tok, examples, labels,
                                                                     chat=True)["accuracy"]
    scores["small + LoRA (expert)"] = classification_accuracy(small, small_tok, examples, labels, chat=True)["accuracy"]
    gap = scores["large + LoRA"] - scores["large base"]
    closed = {}
    with adapters_disabled(large):  # proxy-tuning steers the untouched large model
        for beta in [float(b) for b in args.betas.split(",")]:
            acc = _proxy_accuracy(large, small, tok, examples, labels, beta)
            scores[f"proxy-tuned, beta={beta:g}"] = acc
            closed[beta] = (acc - scores["large base"]) / gap if gap else float("nan")
    print(f"BBC News topics, {len(examples)} held-out articles, accuracy by label likelihood ({args.dtype}; "
          f"{time.perf_counter() - start:.0f} s)")
    for name, acc in scores.items():
        print(f"  {name:30} {100 * acc:5.1f}%")
    for beta, share in closed.items():
        print(f"  beta={beta:g}: proxy-tuning closes {100 * share:.1f}% of the gap between the large base and "
              f"the LoRA-tuned large model")
    print(json.dumps({"examples": len(examples), "dtype": args.dtype, "accuracy": scores,
                      "gap_closed": {str(b): round(s, 4) for b, s in closed.items()}}))


if __name__ == "__main__":
    main()
