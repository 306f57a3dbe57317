"""``lmadapt vas-train``: :func:`lmadapt.api.vas_train` on a YAML config."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lmadapt.cli.common import add_config_command, config_overrides


def add_parser(sub: Any) -> None:
    """Register ``vas-train`` on the subcommand parsers ``sub``."""
    add_config_command(sub, "vas-train", "train VAS value model(s) from a YAML config (docs/vas.md)",
                       "YAML config file, e.g. examples/vas.yaml", "n_per_prompt=8 train.lr=1e-5", run)


def run(args: argparse.Namespace) -> int:
    """Train the value models and say how to generate with them."""
    from lmadapt.api import vas_train

    out = vas_train(args.config, config_overrides(args), progress=not args.no_progress)
    print(f"value models in {out / 'values'}; generate with: lmadapt generate --value-model "
          f"{out / 'values'}/<reward> --value-beta 1.0", file=sys.stderr)
    return 0
