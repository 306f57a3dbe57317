"""Generation with an unmerged adapter against the same adapter merged into the weights, same run.

The adapter is LoRA r=16 on all seven projections of SmolLM2-135M-Instruct (a given adapter folder,
or a fresh one with random B so it is not a no-op). Each measurement is ``model.generate`` greedy
with a fixed number of new tokens (EOS ignored) from a batch of real prompts; merged and unmerged
runs alternate so machine noise hits both alike, and the medians are compared.

    python benchmarks/generation_speed.py                        # auto dtype, batch 1 and 8, 64 new tokens
    python benchmarks/generation_speed.py --dtype fp32 --repeats 5

The last line printed is one JSON object (keys include ``unmerged_over_merged_tokens_per_s_b1`` and
``..._b8``: 1.0 means no cost for keeping the adapter separate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _prompts(n: int) -> list[str]:
    from lmadapt.recipes.demo_data import bbc_news

    _, test_rows, _ = bbc_news(seed=0)
    return [r["prompt"][:600] for r in test_rows[:n]]


def _time_generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> float:  # noqa: ANN001
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, use_cache=True, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", default=None, help="an adapter folder (default: a fresh random LoRA r=16)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where this CPU runs bf16 matmuls faster than fp32, else fp32")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        from lmadapt.hardware import resolve_precision

        args.dtype = resolve_precision("auto", torch.device("cpu"))

    from lmadapt.adapters.format import load_adapter
    from lmadapt.decoding.generation import encode_prompt, left_pad
    from lmadapt.methods import build_method
    from lmadapt.models.loading import ModelConfig, load_model

    model, tok = load_model(ModelConfig(args.model, dtype=args.dtype))
    if args.adapter:
        method = load_adapter(model, args.adapter)
    else:
        torch.manual_seed(0)
        method = build_method({"name": "lora", "r": 16, "alpha": 32, "target_modules": TARGETS, "init": "random"})
        method.apply(model)
    model.eval()
    figures: dict = {"model": args.model, "dtype": args.dtype, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "threads": args.threads}
    print(f"{args.model} ({args.dtype}), LoRA on {len(method.module_names)} layers, {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    print(f"{'batch':>5} {'unmerged tok/s':>15} {'merged tok/s':>13} {'unmerged/merged':>16}")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        ids, mask = left_pad([encode_prompt(tok, t, chat=True) for t in _prompts(b)], tok.pad_token_id,
                             torch.device("cpu"))
        times: dict[str, list[float]] = {"unmerged": [], "merged": []}
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for state in ("unmerged", "merged"):
                (method.merge if state == "merged" else method.unmerge)(model)
                times[state].append(_time_generate(model, ids, mask, args.new_tokens))
        rate = {k: b * args.new_tokens / statistics.median(v[1:]) for k, v in times.items()}
        ratio = rate["unmerged"] / rate["merged"]
        print(f"{b:5d} {rate['unmerged']:15.1f} {rate['merged']:13.1f} {ratio:16.3f}")
        figures |= {f"unmerged_tokens_per_s_b{b}": round(rate["unmerged"], 1),
                    f"merged_tokens_per_s_b{b}": round(rate["merged"], 1),
                    f"unmerged_over_merged_tokens_per_s_b{b}": round(ratio, 3)}
    method.unmerge(model)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
