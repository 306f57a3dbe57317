"""``lmadapt eval``: :func:`lmadapt.api.evaluate_model`, a model evaluated with (and without) its adapter."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lmadapt.cli.common import add_ensemble_args, add_model_args, add_threads_arg
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.evaluation.registry import TaskNames

# EvalConfig settings the command line sets, by flag (a flag left out keeps the setting's default)
SETTING_FLAGS = {"labels": "--labels", "chat": "--chat", "system_prompt": "--system-prompt",
                 "max_new_tokens": "--max-new-tokens", "match": "--match", "batch_size": "--batch-size",
                 "max_length": "--max-length", "max_examples": "--max-examples"}


def add_parser(sub: Any) -> None:
    """Register ``eval`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("eval", help="evaluate a model (optionally with an adapter)")
    add_model_args(p)
    add_task_args(p)
    add_ensemble_args(p)
    add_threads_arg(p)
    p.add_argument("--compare", action="store_true", help="also evaluate the base model and print before/after")
    p.add_argument("--predictions", default=None, metavar="FILE.jsonl",
                   help="write one JSON line per example (id, prediction, gold, score, correct); with --compare "
                        "the base model's go to FILE.base.jsonl")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON (with --compare: {\"adapted\": ..., \"base\": ...})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    p.set_defaults(func=run)


def add_task_args(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    """``--task``, ``--data`` and the flags of :data:`SETTING_FLAGS` (read back by :func:`settings`)."""
    p.add_argument("--task", required=True, choices=TaskNames(), metavar="TASK",
                   help="the evaluation task: %(choices)s (docs/evaluation.md)")
    p.add_argument("--data", required=data_required, nargs="+",
                   help="JSONL/JSON/CSV/Parquet files or globs: rows with the task's fields, or training rows "
                        "(prompt/completion, instruction, chat messages)")
    p.add_argument("--labels", default=None, help="classification label words, comma-separated "
                                                  "(default: every label in the data files)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with the chat template (default: as the adapter was trained)")
    p.add_argument("--system-prompt", default=None, help="system turn before each prompt (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation: tokens per answer (default 16)")
    p.add_argument("--match", choices=["exact", "normalized"], default=None,
                   help="generation: how answers are compared (default normalized)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per forward pass: perplexity, generation, completion_loss (default 4)")
    p.add_argument("--max-length", type=int, default=None,
                   help="perplexity: window; completion_loss: tokens per example (default 1024)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N rows")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation settings the flags give (``chat`` None: as the adapter was trained)."""
    out: dict[str, Any] = {"task": args.task, "data": args.data, "chat": args.chat}
    for key in SETTING_FLAGS:
        value = getattr(args, key)
        if value is not None and key != "chat":
            out[key] = value.split(",") if key == "labels" else value
    return out


def run(args: argparse.Namespace) -> int:
    """Print a table of the metrics (before/after with ``--compare``), or JSON with ``--json``."""
    from lmadapt.api import evaluate_model
    from lmadapt.evaluation.report import compare_table, result_table

    if args.compare and not args.adapter:
        raise LmadaptError("--compare evaluates the model with and without its adapter; give --adapter")
    try:
        after, before = evaluate_model(args.model, settings(args), args.adapter, compare=args.compare,
                                       dtype=args.dtype, force=args.force, predictions=args.predictions,
                                       threads=args.threads, progress=False if args.no_progress else None,
                                       ensemble_adapter=args.ensemble_adapter, ensemble_combine=args.ensemble_combine)
    except ConfigError as exc:
        raise ConfigError([as_flag(p) for p in exc.problems], "the eval flags") from None
    if args.json:
        result = after if before is None else {"adapted": after, "base": before}
        print(json.dumps(result, indent=2, default=str))
    elif before is not None:
        print(compare_table([(args.task, before, after)]))
    else:
        print(result_table([(args.task, after)]))
    return 0


def as_flag(problem: str) -> str:
    """A settings problem (``"max_new_tokens: ..."``) named by its flag (``"--max-new-tokens: ..."``)."""
    key = problem.split(":", 1)[0]
    return SETTING_FLAGS[key] + problem[len(key):] if key in SETTING_FLAGS else problem
