"""``lmadapt inspect``: :func:`lmadapt.api.inspect`."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``inspect`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("inspect", help="describe an adapter, model, value-model, helper-model or run folder, or a "
                                       "built-in model")
    p.add_argument("path", help="a folder, or a built-in model name")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print what the folder (or built-in model) is and holds, as JSON."""
    from lmadapt.api import inspect

    print(json.dumps(inspect(args.path), indent=2, default=str))
    return 0
