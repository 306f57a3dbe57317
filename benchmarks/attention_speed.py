"""Training attention on CPU, forward + backward of one SmolLM2-135M layer's attention, same run:
lmadapt's matmul attention against transformers' sdpa path with a padding mask (K/V heads repeated,
as transformers does when a mask is passed) and without one (plain causal, grouped-query heads).

    python benchmarks/attention_speed.py                     # fp32 and bf16, 128/300/490 tokens
    python benchmarks/attention_speed.py --dtypes fp32 --lengths 300

Shapes: batch 8, 9 query heads over 3 KV heads, head dim 64. Medians over ``--repeats`` runs. The
last line printed is one JSON object: milliseconds per (dtype, length, implementation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lmadapt.training import attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ms(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--lengths", default="128,300,490")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    heads, kv_heads, dim = 9, 3, 64
    results = {}
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for length in (int(x) for x in args.lengths.split(",")):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(args.batch, heads, length, dim, generator=g, dtype=dtype).requires_grad_()
            k = torch.randn(args.batch, kv_heads, length, dim, generator=g, dtype=dtype).requires_grad_()
            v = torch.randn(args.batch, kv_heads, length, dim, generator=g, dtype=dtype).requires_grad_()
            mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(args.batch, 1, -1, -1)

            def matmuls() -> None:
                attention.grouped_attention(q, k, v, mask, dim ** -0.5).float().sum().backward()

            def sdpa_masked() -> None:
                rep = heads // kv_heads
                out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                     attn_mask=mask)
                out.float().sum().backward()

            def sdpa_causal() -> None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                out.float().sum().backward()

            row = {name: round(_ms(fn, args.repeats), 1) for name, fn in
                   (("matmul", matmuls), ("sdpa_mask", sdpa_masked), ("sdpa_causal", sdpa_causal))}
            results[f"{dname}_{length}"] = row
            print(f"{dname} {length:4d} tokens: matmul {row['matmul']:7.1f} ms   sdpa+mask {row['sdpa_mask']:7.1f} ms"
                  f"   sdpa causal {row['sdpa_causal']:7.1f} ms", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
