"""``lmadapt train``: :func:`lmadapt.recipes.finetune.train` on a YAML config."""

from __future__ import annotations

import argparse
from typing import Any

from lmadapt.cli.common import add_config_command, config_overrides


def add_parser(sub: Any) -> None:
    """Register ``train`` on the subcommand parsers ``sub``."""
    add_config_command(sub, "train", "train an adapter from a YAML config", "YAML config file",
                       "train.lr=1e-4 method.r=8", run, resume=True)


def run(args: argparse.Namespace) -> int:
    """Train one run."""
    from lmadapt.recipes.finetune import train

    train(args.config, config_overrides(args), resume=args.resume, progress=not args.no_progress)
    return 0
