"""``lmadapt`` on the command line: a thin layer over :mod:`lmadapt.api`; each command is one library call.

One module per subcommand, each with ``add_parser(sub)`` (its flags) and ``run(args) -> int`` (the call).
Here: the parser, ``--version``, ``key=value`` overrides before or after the flags, and argparse errors that
name the subcommand and suggest the nearest flag or command (``lmadapt train: unknown flag --resum; did you
mean --resume?``). Flags must be written out: abbreviations (``--res``) are not accepted.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from lmadapt.cli import compare as compare_command
from lmadapt.cli import (
    config_help,
    demo,
    generate,
    inspect,
    make_helper,
    merge,
    recovery_data,
    serve,
    train,
    vas_train,
)
from lmadapt.cli import diff as diff_command
from lmadapt.cli import eval as eval_command
from lmadapt.cli import port as port_command
from lmadapt.cli import vocab as vocab_command
from lmadapt.errors import LmadaptError

_COMMANDS = (train, config_help, eval_command, generate, recovery_data, vas_train, make_helper, merge, diff_command,
             port_command, compare_command, inspect, demo, vocab_command, serve)
_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


class CommandParser(argparse.ArgumentParser):
    """An argparse parser whose errors name the command (``lmadapt train: ...``), suggest the nearest choice,
    and exit with 2; abbreviated flags are refused (a typo must not silently become another flag)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print the usage line and ``PROG: MESSAGE`` (with a suggestion when one is close), then exit 2."""
        found = _CHOICE.search(message)
        if found:
            choices = [c.strip().strip("'") for c in found.group(2).split(",")]
            message += suggestion(found.group(1), choices)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def suggestion(word: str, choices: Sequence[str]) -> str:
    """``'; did you mean X?'`` for the closest of ``choices`` to ``word``, else ``''``."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def build_parser() -> argparse.ArgumentParser:
    """The ``lmadapt`` argument parser with every subcommand."""
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the ``lmadapt`` parser, each subcommand's parser by name)."""
    from lmadapt import __version__

    parser = CommandParser(prog="lmadapt", description="Adapt pretrained language models.")
    parser.add_argument("--version", action="version", version=f"lmadapt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser, dict(sub.choices)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``lmadapt ARGV``: ``key=value`` overrides may come anywhere after the subcommand; an unknown flag
    or a stray argument exits 2 naming the subcommand (and the nearest flag)."""
    parser, commands = _build()
    args, extra = parser.parse_known_args(argv)
    command = commands[args.command]
    overrides = [a for a in extra if not a.startswith("-") and "=" in a and hasattr(args, "overrides")]
    for arg in extra:
        if arg in overrides:
            continue
        if arg.startswith("-") and len(arg) > 1:
            flag = arg.split("=", 1)[0]
            flags = [s for action in command._actions for s in action.option_strings]  # no public list
            command.print_usage(sys.stderr)
            command.exit(2, f"{command.prog}: unknown flag {flag}{suggestion(flag, flags)}\n")
        hint = " (overrides are key=value)" if hasattr(args, "overrides") else ""
        command.error(f"unexpected argument {arg!r}{hint}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lmadapt ARGV``; the exit code: 0 done, 2 a user error (no traceback), 130 interrupted."""
    args = parse(argv)
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
