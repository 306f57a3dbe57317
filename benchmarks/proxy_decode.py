"""Proxy-tuning decode speed: the lockstep three-model loop against its three models decoded alone.

Every run decodes a fixed number of new tokens greedily (stop tokens ignored) from the same prompts, for
batch 1 and batch 8, and reports new tokens per second (prefill included). Measured:

- each model alone through the same lockstep loop with one term (``lmadapt.steering.steer_ids``):
  the large base, the expert (small model with its adapter on) and the anti-expert (the same small
  module with its adapter off);
- the large base through Hugging Face ``model.generate``, for reference;
- proxy-tuned decoding: large + (expert - anti-expert), all three in lockstep.

``cost_ratio_vs_sum_of_models`` = proxy time per token / (sum of the three single-model times per token),
the worst over the batch sizes: 1.0 means steering costs exactly its three forwards. Repeats are
interleaved (each repeat runs every configuration once) so background load spreads evenly; the median is
reported. ``cost_ratio_cpu_time`` is the same ratio on this process's CPU time, which a busy shared
machine disturbs less than wall-clock time (with one thread it is the compute actually spent).

    python benchmarks/proxy_decode.py                                   # SmolLM2-135M-Instruct, bf16 if fast
    python benchmarks/proxy_decode.py --new-tokens 32 --repeats 3       # quicker
    python benchmarks/proxy_decode.py --large L --small S --adapter DIR   # a real small expert

Without ``--small`` the large model itself serves as the small model and the expert is a randomly
perturbed LoRA on a second copy of it (the output says so). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "Explain, in simple terms, why the sky is blue and why sunsets are red.",
    "List three uses of a paperclip:",
    "Q: What is the capital of France?\nA:",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "def fibonacci(n):",
    "Summarise the plot of a detective novel in two sentences.",
]

HF, PROXY = "large (HF generate)", "proxy (large + expert - anti)"
SINGLES = ("large", "expert (small + adapter)", "anti-expert (adapter off)")


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module, PreTrainedTokenizerBase, str]:
    """(large, small-with-adapter, tokenizer, description of the expert)."""
    from lmadapt.api import load
    from lmadapt.methods import build_method
    from lmadapt.models.loading import ModelConfig

    large, tok, _ = load(ModelConfig(args.large, dtype=args.dtype, device="cpu"))
    if args.small is not None:
        if args.adapter is None:
            raise SystemExit("--small needs --adapter (the expert's adapter, trained on the small model)")
        small, _, _ = load(ModelConfig(args.small, dtype=args.dtype, device="cpu"), args.adapter)
        return large, small, tok, f"small {args.small} + adapter {args.adapter}"
    small, _, _ = load(ModelConfig(args.large, dtype=args.dtype, device="cpu"), args.adapter)
    if args.adapter is None:
        build_method({"name": "lora", "r": 16, "alpha": 32, "init": "random"}).apply(small)
        return large, small, tok, "NO SMALL MODEL GIVEN: small = a second copy of the large model, expert = a " \
                                  "randomly perturbed LoRA (r=16) on it"
    return large, small, tok, f"small = the large model + adapter {args.adapter}"


def _timer(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _runs(large: torch.nn.Module, small: torch.nn.Module, tok: PreTrainedTokenizerBase, batch: int,
          new_tokens: int) -> dict[str, Callable[[], object]]:
    from transformers import GenerationConfig

    from lmadapt.decoding.generation import encode_prompt, left_pad
    from lmadapt.decoding.steering import ModelTerm, proxy_terms, steer_ids

    rows = [encode_prompt(tok, PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = left_pad(rows, pad, torch.device("cpu"))
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=pad, eos_token_id=None)

    def loop(terms: list) -> Callable[[], object]:
        return lambda: steer_ids(terms, rows, max_new_tokens=new_tokens, stops=set(), pad_id=pad)

    def hf() -> object:
        with torch.inference_mode():
            return large.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    return {HF: hf, SINGLES[0]: loop([ModelTerm(large)]), SINGLES[1]: loop([ModelTerm(small)]),
            SINGLES[2]: loop([ModelTerm(small, adapters_off=True)]),
            PROXY: loop(proxy_terms(large, expert=small, beta=1.0))}


def measure(args: argparse.Namespace, large: torch.nn.Module, small: torch.nn.Module,
            tok: PreTrainedTokenizerBase) -> dict[int, dict[str, tuple[float, float]]]:
    """{batch: {run: (median wall-clock seconds, median CPU seconds)}}."""
    results = {}
    for batch in args.batch_sizes:
        print(f"timing batch {batch} ...", file=sys.stderr, flush=True)
        runs = _runs(large, small, tok, batch, args.new_tokens)
        for fn in _runs(large, small, tok, batch, 4).values():  # warm-up: allocator, kernels, caches
            fn()
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(_timer(fn))
        results[batch] = {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
                          for name, t in times.items()}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", default="smollm2-135m-instruct", help="the large base model (built-in name or folder)")
    p.add_argument("--small", default=None, help="the small base model (default: the large model itself)")
    p.add_argument("--adapter", default=None, help="the expert's adapter on the small model (default: random LoRA)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where this CPU runs it faster than fp32, else fp32")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a small shared machine, more threads than free cores "
                        "make each forward spin-wait and the timings meaningless)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lmadapt.hardware import resolve_precision

    args.dtype = resolve_precision(args.dtype, torch.device("cpu"))
    large, small, tok, expert = _load(args)
    print(f"large {args.large} ({args.dtype}); expert: {expert}")
    print(f"{args.new_tokens} new tokens, greedy, stop tokens ignored; median of {args.repeats} interleaved "
          f"repeats; {args.threads} threads")
    results = measure(args, large, small, tok)
    print(f"{'run':32} {'batch':>5} {'tokens/s':>9} {'ms/step':>8} {'CPU ms/step':>12}")
    summary = {}
    for batch, runs in results.items():
        for name, (wall, cpu) in runs.items():
            rate, step_ms = batch * args.new_tokens / wall, 1000 * wall / args.new_tokens
            print(f"{name:32} {batch:5d} {rate:9.1f} {step_ms:8.1f} {1000 * cpu / args.new_tokens:12.1f}")
        ratios = [runs[PROXY][i] / sum(runs[n][i] for n in SINGLES) for i in (0, 1)]
        print(f"{'proxy / sum of the three alone':32} {batch:5d} {ratios[0]:9.3f} {'':8} {ratios[1]:12.3f}")
        summary[str(batch)] = {"tokens_per_s": {n: round(batch * args.new_tokens / w, 2) for n, (w, _) in runs.items()},
                               "cost_ratio_vs_sum_of_models": round(ratios[0], 4),
                               "cost_ratio_cpu_time": round(ratios[1], 4),
                               "lockstep_vs_hf_generate_single": round(runs["large"][0] / runs[HF][0], 4)}
    print(json.dumps({"large": args.large, "expert": expert, "dtype": args.dtype, "new_tokens": args.new_tokens,
                      "repeats": args.repeats, "threads": args.threads,
                      "cost_ratio_vs_sum_of_models": max(v["cost_ratio_vs_sum_of_models"] for v in summary.values()),
                      "cost_ratio_cpu_time": max(v["cost_ratio_cpu_time"] for v in summary.values()),
                      "by_batch": summary}))


if __name__ == "__main__":
    main()
