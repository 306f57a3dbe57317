"""``lmadapt config-help``: :func:`lmadapt.api.config_reference`, every config key with its type, default and meaning."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``config-help`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("config-help", help="list every config key with its type, default and meaning")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print :func:`lmadapt.api.config_reference`: the run config's keys, then every method's."""
    from lmadapt.api import config_reference

    for key, tp, default, help_text in config_reference():
        print(f"{key}: {tp} = {default}\n    {help_text}")
    return 0
