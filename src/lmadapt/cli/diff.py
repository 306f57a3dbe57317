"""``lmadapt diff extract`` / ``lmadapt diff apply``: :func:`lmadapt.updates.diff.extract_diff` and
:func:`lmadapt.updates.diff.apply_diff` (fine-tuning transfer, arXiv:2503.20110; docs/diff.md)."""

from __future__ import annotations

import argparse
from typing import Any

from lmadapt.cli.common import positive_int


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_parser(sub: Any) -> None:
    """Register ``diff`` (with its ``extract`` and ``apply`` actions) on the subcommand parsers ``sub``."""
    p = sub.add_parser("diff", help="extract a fine-tune's diff vector (tuned - base) and add it to another base")
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    ex = actions.add_parser("extract", help="write Delta = TUNED - BASE for every tensor that changed")
    ex.add_argument("base", help="the base model (folder or built-in name)")
    ex.add_argument("tuned", help="the fine-tuned model (folder)")
    ex.add_argument("--output", required=True, help="folder for the diff")
    ex.add_argument("--rank", type=positive_int, default=None, help="store each 2-D Delta as a rank-R SVD factor pair")
    ex.add_argument("--energy", type=_fraction, default=None,
                    help="low rank as --rank, at the smallest rank keeping this share of squared singular values")
    ex.add_argument("--top-k", type=_fraction, default=None, metavar="FRACTION",
                    help="store each 2-D Delta sparse: this share of its entries, largest in magnitude")
    ex.add_argument("--compress-embeddings", action="store_true",
                    help="low-rank the embedding and output matrices too (default: kept whole; see docs/diff.md)")
    ex.add_argument("--delta-dtype", choices=["fp32", "fp64"], default="fp32",
                    help="dtype of Delta (fp64: base + Delta gives an fp32 tuned model back bit for bit)")
    ap = actions.add_parser("apply", help="write NEWBASE + alpha * Delta as a plain transformers model")
    ap.add_argument("diff", help="a diff folder from lmadapt diff extract")
    ap.add_argument("--model", required=True, help="the base to add it to (folder or built-in name)")
    ap.add_argument("--output", required=True, help="folder for the new model")
    ap.add_argument("--alpha", type=float, default=1.0, help="scale of Delta (default 1.0)")
    for q in (ex, ap):
        q.add_argument("--allow-mismatch", action="store_true",
                       help="skip tensors whose names or shapes do not match (listed in the output) instead of "
                            "refusing")
        q.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the action and print what it wrote."""
    from lmadapt.updates.diff import apply_diff, extract_diff

    progress = False if args.no_progress else None
    if args.action == "extract":
        ex = extract_diff(args.base, args.tuned, args.output, rank=args.rank, energy=args.energy,
                          top_k_fraction=args.top_k, compress_embeddings=args.compress_embeddings,
                          delta_dtype=args.delta_dtype, allow_mismatch=args.allow_mismatch,
                          overwrite=args.overwrite, progress=progress)
        stored = ", ".join(f"{n} {k}" for k, n in ex.encodings.items() if n)
        print(f"diff written to {ex.path}: {ex.changed} changed tensor(s) ({stored or 'none'}), {ex.unchanged} "
              f"unchanged; {ex.stored_bytes / 2**20:.1f} MiB stored ({ex.dense_bytes / 2**20:.1f} MiB dense)")
        skipped = ex.skipped
    else:
        rep = apply_diff(args.diff, args.model, args.output, alpha=args.alpha, allow_mismatch=args.allow_mismatch,
                         overwrite=args.overwrite, progress=progress)
        what = "the diff's own base" if rep.relation == "same_version" else "another base version (transfer)"
        print(f"model written to {rep.path}: {rep.applied} tensor(s) + {rep.alpha:g} * Delta, {rep.unchanged} as "
              f"they were; {args.model} is {what}")
        skipped = rep.skipped
    for line in skipped:
        print(f"  skipped {line}")
    return 0
