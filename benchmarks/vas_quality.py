"""How much VAS raises a reward when sampling a frozen model, and what weighting several rewards does.

For each setting of the value models' weights (``--betas``), this samples ``--n-per-prompt`` completions
per held-out prompt from the frozen base model steered by VAS (``lmadapt.steering.steered_generate`` with
``values=[(V_j, beta_j)]``, top-k candidates ``--vas-top-k``) and scores them with every reward the value
models were trained on. All-zero betas are plain top-k sampling of the base (k = ``--vas-top-k``); the
first row is the base model sampled as during value training (temperature 1, full vocabulary).

    lmadapt vas-train examples/vas.yaml
    python benchmarks/vas_quality.py --values runs/vas/values/names_a_topic,runs/vas/values/brevity \\
        --prompts examples/data/topics_test.jsonl --chat --betas 0,0 1,0 2,0 4,0 0,2 2,2

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _score(rewards, prompts: list[str], outputs: list[str]) -> dict[str, float]:  # noqa: ANN001
    return {r.spec: statistics.fmean(r(prompts, outputs)) for r in rewards}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="the frozen base model that is sampled")
    p.add_argument("--values", required=True, help="comma-separated value-model folders (from lmadapt vas-train)")
    p.add_argument("--prompts", default="examples/data/topics_test.jsonl", help="held-out prompts (field 'prompt')")
    p.add_argument("--betas", nargs="+", default=["0", "1", "2", "4"],
                   help="weight settings, each one comma-separated value per value model")
    p.add_argument("--chat", action="store_true", help="render prompts as a chat turn (as in training)")
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--vas-top-k", type=int, default=10)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where this CPU runs it faster than fp32, else fp32")
    p.add_argument("--threads", type=int, default=0, help="0: as lmadapt chooses (idle cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=2, help="completions printed per setting")
    args = p.parse_args()

    from lmadapt.api import load
    from lmadapt.decoding.generation import generate
    from lmadapt.decoding.steering import steered_generate
    from lmadapt.decoding.value_model import load_value_model
    from lmadapt.hardware import choose_threads, resolve_precision
    from lmadapt.models.vocab import check_vocabularies
    from lmadapt.recipes.vas_samples import read_prompts
    from lmadapt.rewards import load_reward

    torch.set_num_threads(choose_threads(args.threads))
    args.dtype = resolve_precision(args.dtype, torch.device("cpu"))
    model, tok, _ = load(args.model, dtype=args.dtype)
    values, specs = [], []
    for path in args.values.split(","):
        vm, vtok = load_value_model(path, dtype=args.dtype)
        check_vocabularies(tok, {f"value model {path}": vtok})
        values.append(vm)
        specs.append(vm.info["reward"])
    rewards = [load_reward(s) for s in dict.fromkeys(specs)]
    settings = [[float(b) for b in s.split(",")] for s in args.betas]
    for s in settings:
        if len(s) != len(values):
            p.error(f"--betas {','.join(map(str, s))}: give one weight per value model ({len(values)})")
    held_out = read_prompts(args.prompts)
    prompts = [q for q in held_out for _ in range(args.n_per_prompt)]
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, chat=args.chat, seed=args.seed,
                  progress=True)

    rows: list[dict] = []
    start = time.perf_counter()
    outputs = generate(model, tok, prompts, **common)
    rows.append({"setting": "base, full-vocabulary sampling", "betas": None,
                 "reward": _score(rewards, prompts, outputs), "examples": outputs[:args.show]})
    for betas in settings:
        outputs = steered_generate(model, tok, prompts, values=list(zip(values, betas)), vas_top_k=args.vas_top_k,
                                   **common)
        name = "top-k sampling (VAS, betas 0)" if not any(betas) else "VAS " + ", ".join(
            f"{spec.rsplit(':', 1)[-1]}={b:g}" for spec, b in zip(specs, betas))
        rows.append({"setting": name, "betas": betas, "reward": _score(rewards, prompts, outputs),
                     "words": statistics.fmean(len(o.split()) for o in outputs), "examples": outputs[:args.show]})
    seconds = time.perf_counter() - start

    print(f"\n{len(held_out)} held-out prompts x {args.n_per_prompt} samples, temperature {args.temperature:g}, "
          f"k={args.vas_top_k}, {args.dtype}, {seconds:.0f} s. Mean reward:")
    names = [r.spec.rsplit(":", 1)[-1] for r in rewards]
    print(f"  {'setting':45} " + " ".join(f"{n:>14}" for n in names))
    for row in rows:
        print(f"  {row['setting']:45} " + " ".join(f"{row['reward'][r.spec]:14.3f}" for r in rewards))
        for text in row["examples"]:
            print(f"      e.g. {text[:100]!r}")
    print(json.dumps({"model": args.model, "values": args.values.split(","), "prompts": len(held_out),
                      "n_per_prompt": args.n_per_prompt, "temperature": args.temperature,
                      "vas_top_k": args.vas_top_k, "seconds": round(seconds, 1),
                      "rows": [{k: v for k, v in r.items() if k != "examples"} for r in rows]}))


if __name__ == "__main__":
    main()
