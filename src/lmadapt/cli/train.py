"""``lmadapt train``: :func:`lmadapt.recipes.finetune.train` on a YAML config, or with ``--dry-run``
:func:`lmadapt.api.preview` (everything checked, nothing written)."""

from __future__ import annotations

import argparse
from typing import Any

from lmadapt.cli.common import add_config_command, config_overrides


def add_parser(sub: Any) -> None:
    """Register ``train`` on the subcommand parsers ``sub``."""
    p = add_config_command(sub, "train", "train an adapter from a YAML config", "YAML config file",
                           "train.lr=1e-4 method.r=8", run, resume=True)
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and write nothing; print how the first training examples are rendered, "
                        "with the tokens that carry loss marked, and the data summary")
    p.add_argument("--examples", type=int, default=3, metavar="N", help="examples --dry-run shows (default 3)")


def run(args: argparse.Namespace) -> int:
    """Train one run, or with ``--dry-run`` print its preview."""
    if args.dry_run:
        from lmadapt.api import preview

        print(preview(args.config, config_overrides(args), args.examples, resume=args.resume).text())
        return 0
    from lmadapt.recipes.finetune import train

    train(args.config, config_overrides(args), resume=args.resume, progress=not args.no_progress)
    return 0
