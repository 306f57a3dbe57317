"""``lmadapt merge``: :func:`lmadapt.api.merge` (one adapter folded into its base), or
:func:`lmadapt.updates.merging.merge_adapters` / :func:`~lmadapt.updates.merging.merge_models` (several adapters
or full models combined by linear averaging, task arithmetic, TIES, DARE or DARE-TIES; docs/merging.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lmadapt.cli.common import add_model_args, positive_int

FLAGS = {"combine": "--combine", "weights": "--weights", "density": "--density", "drop_rate": "--drop-rate"}
_MERGE_ONLY = {"weights": "--weights", "density": "--density", "drop_rate": "--drop-rate", "seed": "--seed",
               "scale": "--scale", "rank": "--rank", "to": "--to"}


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of numbers, one per input (e.g. 1,0.5); got "
                                         f"{text!r}") from None


def add_parser(sub: Any) -> None:
    """Register ``merge`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("merge", conflict_handler="resolve",
                       help="fold an adapter into its base, or merge several adapters or fine-tuned models")
    add_model_args(p)
    p.add_argument("--adapter", action="append", default=None,
                   help="adapter folder (lmadapt or PEFT); repeat it to merge several (then give --combine)")
    p.add_argument("--tuned", action="append", default=None,
                   help="a full fine-tuned model folder to merge (repeat it); --model is their common base")
    p.add_argument("--combine", choices=["linear", "task_arithmetic", "ties", "dare", "dare_ties"], default=None,
                   help="how to merge several inputs (docs/merging.md)")
    p.add_argument("--weights", type=_weights, default=None, help="one weight per input, comma-separated "
                   "(default 1 each)")
    p.add_argument("--density", type=float, default=None, help="ties: the share of each update's entries kept")
    p.add_argument("--drop-rate", type=float, default=None, help="dare, dare_ties: the probability of dropping "
                   "each entry")
    p.add_argument("--seed", type=int, default=None, help="dare, dare_ties: seed of the drops (default 0)")
    p.add_argument("--scale", type=float, default=None, help="lambda: the merged update is multiplied by it "
                   "(default 1)")
    p.add_argument("--rank", type=positive_int, default=None, help="rank of the merged adapter (--to adapter; "
                   "default: the sum of the inputs' ranks)")
    p.add_argument("--to", choices=["model", "adapter"], default=None,
                   help="write a plain model (default) or, merging adapters, a LoRA adapter")
    p.add_argument("--output", required=True, help="folder for the merged model or adapter")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"lmadapt merge: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """One adapter without --combine: write base + adapter as one plain model folder (the base: --model, else the
    one the adapter records), its tokenizer carrying the chat template the adapter was trained with. Otherwise
    merge the adapters (--adapter) or full models (--tuned) with --combine."""
    adapters, tuned = args.adapter or [], args.tuned or []
    given = [flag for key, flag in _MERGE_ONLY.items() if getattr(args, key) is not None]
    if adapters and tuned:
        return _fail("--adapter and --tuned are two kinds of input (adapters, or full fine-tuned models). Choose one.")
    if not adapters and not tuned:
        return _fail("--adapter is required (the adapter folder to fold into its base model; repeat it to merge "
                     "several), or give fine-tuned models with --tuned")
    if len(adapters) == 1 and args.combine is None:
        if given:
            return _fail(f"{', '.join(given)} set(s) how inputs are merged; give --combine (e.g. --combine linear), "
                         f"or leave them out to fold the adapter into its base")
        from lmadapt.api import merge

        path = merge(args.model, adapters[0], args.output, overwrite=args.overwrite, dtype=args.dtype,
                     force=args.force)
        print(f"merged model written to {path}")
        return 0
    return _merge(args, adapters, tuned)


def _merge(args: argparse.Namespace, adapters: list[str], tuned: list[str]) -> int:
    from lmadapt.updates.merging import (
        COMBINES,
        merge_adapters,
        merge_models,
        merge_spec,
    )

    if args.combine is None:
        return _fail(f"--combine is required to merge several inputs: one of {', '.join(COMBINES)}")
    if args.dtype is not None:
        return _fail("--dtype applies to folding one adapter; a merge keeps the base model's dtype")
    options = {"weights": args.weights, "density": args.density, "drop_rate": args.drop_rate,
               "seed": 0 if args.seed is None else args.seed, "scale": 1.0 if args.scale is None else args.scale}
    merge_spec(args.combine, len(adapters or tuned), names=FLAGS, **options)  # refused here, named by flag
    progress = False if args.no_progress else None
    common = {"combine": args.combine, **options, "overwrite": args.overwrite, "progress": progress}
    if tuned:
        if args.model is None:
            return _fail("--tuned needs --model: the base model the fine-tuned models share (their task vectors "
                         "are tuned - base)")
        if args.to == "adapter" or args.rank is not None or args.force:
            return _fail("merging full models writes a model: --to adapter, --rank and --force apply to adapters")
        report = merge_models(args.model, tuned, args.output, **common)
        print(f"merged model written to {report.path}: {report.merged} tensor(s) merged ({args.combine}) from "
              f"{len(tuned)} model(s)")
        return 0
    report = merge_adapters(adapters, args.output, rank=args.rank, to=args.to or "model", model=args.model,
                            force=args.force, **common)
    if report.kind == "adapter":
        worst = max(report.relative_errors.values(), default=0.0)
        print(f"merged adapter written to {report.path}: rank {report.rank}, {report.merged} module(s); largest "
              f"relative SVD error {worst:.2e} (per module in its record)")
    else:
        print(f"merged model written to {report.path}: {report.merged} weight(s) merged ({args.combine}) from "
              f"{len(adapters)} adapter(s)")
    for note in report.notes:
        print(f"  note: {note}")
    return 0
