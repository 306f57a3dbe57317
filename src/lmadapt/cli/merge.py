"""``lmadapt merge``: :func:`lmadapt.api.merge`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lmadapt.cli.common import add_model_args


def add_parser(sub: Any) -> None:
    """Register ``merge`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("merge", help="fold an adapter into the base weights and save a plain model")
    add_model_args(p)
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write base + adapter as one plain model folder (the base: --model, else the one the adapter records),
    its tokenizer carrying the chat template the adapter was trained with."""
    from lmadapt.api import merge

    if args.adapter is None:
        print("lmadapt merge: error: --adapter is required (the adapter folder to fold into its base model)",
              file=sys.stderr)
        return 2
    path = merge(args.model, args.adapter, args.output, overwrite=args.overwrite, dtype=args.dtype,
                 force=args.force)
    print(f"merged model written to {path}")
    return 0
