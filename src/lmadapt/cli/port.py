"""``lmadapt port``: :func:`lmadapt.updates.port.port_adapter` (PortLLM, arXiv:2410.10870; docs/diff.md)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``port`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("port", help="attach a LoRA adapter to another version of its base model, without training")
    p.add_argument("adapter", help="the LoRA adapter folder")
    p.add_argument("--model", required=True, help="the new base (folder or built-in name)")
    p.add_argument("--output", required=True, help="folder for the ported adapter (or, with --merge, the model)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="attach it although the new base's fingerprint is not the one the adapter was trained on "
                        "(recorded in the output)")
    p.add_argument("--merge", action="store_true", help="write a plain merged model instead of an adapter")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"], help="with --merge")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Port the adapter and print what was written."""
    from lmadapt.updates.port import port_adapter

    rep = port_adapter(args.adapter, args.model, args.output, allow_other_base=args.allow_other_base,
                       merge=args.merge, overwrite=args.overwrite, dtype=args.dtype)
    what = "merged model" if rep.merged else "adapter"
    old = rep.ported_from
    note = (f"fingerprint check overridden: trained on {old['base_model']} ({old['base_fingerprint']})"
            if old["override"] else "same base fingerprint as the adapter records")
    print(f"{what} for {rep.base_model} ({rep.base_fingerprint}) written to {rep.path}; {note}")
    return 0
