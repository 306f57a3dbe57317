"""``lmadapt make-helper``: :func:`lmadapt.api.make_helper` on a YAML config."""

from __future__ import annotations

import argparse
from typing import Any

from lmadapt.cli.common import add_config_command, config_overrides


def add_parser(sub: Any) -> None:
    """Register ``make-helper`` on the subcommand parsers ``sub``."""
    add_config_command(sub, "make-helper", "make a small same-tokenizer Llama by distillation (docs/helper_models.md)",
                       "YAML config, e.g. examples/helper_model.yaml", "train.max_steps=20 hidden_size=256",
                       run, resume=True)


def run(args: argparse.Namespace) -> int:
    """Make the helper model and print its folder."""
    from lmadapt.api import make_helper

    path = make_helper(args.config, config_overrides(args), progress=not args.no_progress, resume=args.resume)
    print(path)
    return 0
