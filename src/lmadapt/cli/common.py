"""Flags that several ``lmadapt`` subcommands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--adapter``, ``--dtype`` and ``--force``: which model to load, as for :func:`lmadapt.api.load`."""
    p.add_argument("--model", default=None,
                   help="built-in name or local model folder (default: the base model the adapter records, else "
                        "smollm2-135m-instruct)")
    p.add_argument("--adapter", default=None, help="adapter folder (lmadapt or PEFT)")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--force", action="store_true", help="apply an adapter trained on another base model")


def add_config_command(sub: Any, name: str, help: str, config_help: str, example: str,
                       func: Callable[[argparse.Namespace], int], *,
                       resume: bool = False) -> argparse.ArgumentParser:
    """A subcommand that runs one YAML config with ``key=value`` overrides (before or after the flags) into an
    output folder; returns its parser for flags of its own."""
    p = sub.add_parser(name, help=help)
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", default=[],
                   help=f"key=value overrides, before or after the flags, e.g. {example}")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=func)
    return p


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` overrides of a config command, with ``--overwrite`` as ``overwrite=true``."""
    return list(args.overrides) + (["overwrite=true"] if args.overwrite else [])


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads N``: CPU threads as ``train.threads`` chooses them (0, the default: the idle cores)."""
    def count(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0 (0: the idle cores), got {value}")
        return value

    p.add_argument("--threads", type=count, default=0, metavar="N", help="CPU threads (default 0: the idle cores)")


def add_ensemble_args(p: argparse.ArgumentParser) -> None:
    """``--ensemble-adapter`` and ``--ensemble-combine``: the ensemble of ``--adapter`` with a second adapter (LAE's
    offline one), as :func:`lmadapt.api.load_ensemble` builds it."""
    g = p.add_argument_group("ensemble (LAE: --adapter RUN/adapter --ensemble-adapter RUN/adapter_offline)")
    g.add_argument("--ensemble-adapter", default=None, metavar="DIR",
                   help="ensemble --adapter with this adapter folder (same base model), per next token")
    g.add_argument("--ensemble-combine", default="prob", choices=["prob", "logprob", "max"],
                   help="prob: mean of the probabilities (default); logprob: mean of the log-probabilities; max: "
                        "the larger probability (LAE's official code); each renormalised (docs/lae.md)")
