"""``lmadapt demo``: :func:`lmadapt.recipes.demo.run_demo`."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``demo`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("demo", help="LoRA on SmolLM2-135M-Instruct for BBC News topics, end to end")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quick", action="store_true", help="a 1-minute smoke version (few steps, few examples)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo end to end."""
    from lmadapt.recipes.demo import run_demo

    run_demo(output_dir=args.output, overwrite=args.overwrite, quick=args.quick)
    return 0
