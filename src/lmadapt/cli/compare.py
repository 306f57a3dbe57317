"""``lmadapt compare``: :func:`lmadapt.updates.compat.compare_models`, the flips between an old and a new model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lmadapt.cli.common import add_threads_arg
from lmadapt.cli.eval import add_task_args, as_flag, settings
from lmadapt.errors import ConfigError


def add_parser(sub: Any) -> None:
    """Register ``compare`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("compare", help="what a model update breaks: accuracy of both, negative and positive flips")
    p.add_argument("old", metavar="OLD", help="the old model: a predictions JSONL file (not run), an adapter folder, "
                                              "a model folder or a built-in name")
    p.add_argument("new", metavar="NEW", help="the new model, as OLD")
    p.add_argument("--old-model", default=None, help="base model for an OLD adapter (default: the one it records)")
    p.add_argument("--new-model", default=None, help="base model for a NEW adapter, e.g. version 2 for a ported "
                                                     "adapter (default: the one it records)")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--force", action="store_true", help="apply an adapter trained on another base model")
    add_task_args(p, data_required=False)
    p.add_argument("--similarity", default="token_f1", choices=["token_f1", "rouge_l"],
                   help="generation: similarity of an answer to the gold one and to the other model's (default "
                        "token_f1)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="generation: an answer this similar to the gold one counts as right (default 0.5)")
    p.add_argument("--metric", default=None, choices=["similarity", "gold_score"],
                   help="the continuous per-example metric whose drops count as flips (default: similarity for "
                        "generation, none otherwise; gold_score: log-likelihood of the right answer)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="a metric flip is a drop of more than this (default 0)")
    p.add_argument("--output", required=True, help="folder for compare.json, flips.jsonl and both predictions")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    add_threads_arg(p)
    p.add_argument("--json", action="store_true", help="print compare.json instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the flips as a table (``--json``: the whole summary) and where the files went."""
    from lmadapt.updates.compat import compare_models, flip_table

    given = {k: v for k, v in settings(args).items() if not (k == "data" and v is None)}
    try:
        result = compare_models(args.old, args.new, given, args.output, old_model=args.old_model,
                                new_model=args.new_model, dtype=args.dtype, force=args.force,
                                overwrite=args.overwrite, similarity=args.similarity, threshold=args.threshold,
                                tolerance=args.tolerance, metric=args.metric, threads=args.threads,
                                progress=False if args.no_progress else None)
    except ConfigError as exc:
        raise ConfigError([as_flag(p) for p in exc.problems], "the compare flags") from None
    if args.json:
        print(json.dumps(result.summary, indent=2, default=str))
        return 0
    print(flip_table(result.summary))
    print(f"\nold: {args.old}\nnew: {args.new}\nwritten to {result.path} (compare.json, flips.jsonl)")
    return 0
