"""``lmadapt`` on the command line: a thin layer over :mod:`lmadapt.api`; each command is one library call.

One module per subcommand, each with ``add_parser(sub)`` (its flags) and ``run(args) -> int`` (the call).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmadapt.cli import (
    config_help,
    demo,
    generate,
    inspect,
    make_helper,
    merge,
    train,
    vas_train,
)
from lmadapt.cli import eval as eval_command
from lmadapt.errors import LmadaptError

_COMMANDS = (train, config_help, eval_command, generate, vas_train, make_helper, merge, inspect, demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``lmadapt`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="lmadapt", description="Adapt pretrained language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lmadapt ARGV``; the exit code: 0 done, 2 a user error (no traceback), 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LmadaptError as exc:
        print(f"lmadapt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmadapt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lmadapt config-help | head`
        sys.stderr.close()
        return 0
