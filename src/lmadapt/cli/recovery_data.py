"""``lmadapt recovery-data``: :func:`lmadapt.api.make_recovery_data`, continuations sampled from a model and
written as a dataset to replay while it learns something new (docs/recovery_data.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lmadapt.cli.common import add_model_args, add_threads_arg, positive_int


def add_parser(sub: Any) -> None:
    """Register ``recovery-data`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("recovery-data", help="sample a model's own continuations and write them as a dataset "
                                             "(recovery data to replay)")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="prompt files or globs: rows with 'prompt', 'text' (its first --prompt-tokens tokens) or "
                        "'messages' (up to the last user turn)")
    p.add_argument("--from-scratch", type=positive_int, default=0, metavar="N",
                   help="instead of INPUT files: N prompts of the BOS token alone (unconditional samples)")
    p.add_argument("--max-prompts", type=positive_int, default=0, metavar="N",
                   help="use only the first N prompt rows of the INPUT files (all are checked)")
    p.add_argument("--output", required=True, metavar="FILE.jsonl",
                   help="the dataset to write; its provenance goes to FILE.jsonl.meta.yaml")
    add_model_args(p)
    add_threads_arg(p)
    p.add_argument("--format", choices=["text", "completion", "chat"], default=None,
                   help="rows: text {text}, completion {prompt, completion} or chat {messages} (default: chat with "
                        "--chat, else text)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with the chat template (default: on for messages rows and --format chat)")
    p.add_argument("--system-prompt", default=None,
                   help="system turn before each chat prompt (default: the adapter's training one)")
    p.add_argument("--prompt-tokens", type=positive_int, default=32, metavar="N",
                   help="text rows: the prompt is the first N tokens (default 32)")
    p.add_argument("--samples-per-prompt", type=positive_int, default=1, metavar="K")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="default 1.0: the model's own distribution; 0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: no limit")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: no limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=8, help="samples generated together (default 8)")
    p.add_argument("--dedup", action="store_true", help="drop rows identical to an earlier one")
    p.add_argument("--min-new-tokens", type=int, default=0, metavar="M",
                   help="drop continuations of fewer than M tokens")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the dataset, then print what was written, how fast, and the data keys that read it."""
    from lmadapt.api import make_recovery_data

    report = make_recovery_data(
        output=args.output, inputs=list(args.inputs), from_scratch=args.from_scratch, max_prompts=args.max_prompts,
        model=args.model, adapter=args.adapter, dtype=args.dtype, force=args.force, threads=args.threads,
        format=args.format,
        chat=args.chat, system_prompt=args.system_prompt, prompt_tokens=args.prompt_tokens,
        samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        batch_size=args.batch_size, dedup=args.dedup, min_new_tokens=args.min_new_tokens,
        overwrite=args.overwrite, progress=False if args.no_progress else None)
    c = report.counts
    dropped = ", ".join(f"{c[f'dropped_{why}']} {why}" for why in ("empty", "short", "duplicate"))
    print(f"wrote {c['rows']} {report.format} rows to {report.path} ({c['prompts']} prompts, {c['samples']} "
          f"samples in {report.seconds:.1f} s, {c['samples'] / max(report.seconds, 1e-9):.2f} samples/s; "
          f"dropped: {dropped})")
    print(f"provenance: {report.meta_path}")
    fmt = report.data_keys["format"]
    extra = "".join(f", data.{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in report.data_keys.items()
                    if k != "format")
    print(f"train on it as data.train (data.format: {fmt}) or as data.replay.train (data.replay.format: {fmt})"
          f"{extra}")
    return 0
