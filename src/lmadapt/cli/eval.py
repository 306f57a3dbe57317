"""``lmadapt eval``: :func:`lmadapt.api.evaluate_model`, a model evaluated with (and without) its adapter."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lmadapt.cli.common import add_model_args
from lmadapt.errors import LmadaptError
from lmadapt.evaluation.registry import TaskNames


def add_parser(sub: Any) -> None:
    """Register ``eval`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("eval", help="evaluate a model (optionally with an adapter)")
    add_model_args(p)
    p.add_argument("--task", required=True, choices=TaskNames(), metavar="TASK",
                   help="the evaluation task: %(choices)s (docs/evaluation.md)")
    p.add_argument("--data", required=True, nargs="+", help="JSONL/JSON/CSV/Parquet files or globs")
    p.add_argument("--labels", default=None, help="classification label words, comma-separated")
    p.add_argument("--chat", action="store_true", help="render prompts with the chat template")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--compare", action="store_true", help="also evaluate the base model and print before/after")
    p.add_argument("--predictions", default=None, metavar="FILE.jsonl",
                   help="write one JSON line per example (id, prediction, gold, score, correct); with --compare "
                        "the base model's go to FILE.base.jsonl")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the metrics as JSON, or a before/after table with ``--compare``."""
    from lmadapt.api import evaluate_model
    from lmadapt.evaluation.report import compare_table

    if args.compare and not args.adapter:
        raise LmadaptError("--compare evaluates the model with and without its adapter; give --adapter")
    settings: dict[str, Any] = {"task": args.task, "data": args.data, "chat": args.chat}
    if args.labels:
        settings["labels"] = args.labels.split(",")
    if args.max_examples is not None:
        settings["max_examples"] = args.max_examples
    after, before = evaluate_model(args.model, settings, args.adapter, compare=args.compare, dtype=args.dtype,
                                   force=args.force, predictions=args.predictions)
    if before is not None:
        print(compare_table([(args.task, before, after)]))
    else:
        print(json.dumps(after, indent=2, default=str))
    return 0
