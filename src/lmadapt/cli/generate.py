"""``lmadapt generate``: :func:`lmadapt.api.steer`, text from a model optionally steered by proxy-tuning/EFT or VAS."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lmadapt.cli.common import add_ensemble_args, add_model_args, add_threads_arg


def add_parser(sub: Any) -> None:
    """Register ``generate`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("generate", help="generate text (optionally steered by proxy-tuning/EFT or VAS)")
    add_model_args(p)
    add_ensemble_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: stdin lines)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with the chat template (default: as the adapter was trained)")
    p.add_argument("--system-prompt", default=None,
                   help="system turn before each chat prompt (default: the adapter's training one; '' for none)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    add_threads_arg(p)
    p.add_argument("--jsonl", action="store_true",
                   help="print one JSON object per prompt, {\"prompt\": ..., \"output\": ...}, in order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    g = p.add_argument_group("proxy-tuning / EFT (--model, with --adapter if given, is the large base model)")
    g.add_argument("--proxy-small-model", default=None, metavar="NAME_OR_DIR",
                   help="the small base model that --proxy-expert-adapter was trained on")
    g.add_argument("--proxy-expert-adapter", default=None, metavar="DIR",
                   help="expert = small model + this adapter; anti-expert = the same model with the adapter off")
    g.add_argument("--proxy-expert", default=None, metavar="MODEL", help="a separate tuned small model")
    g.add_argument("--proxy-anti-expert", default=None, metavar="MODEL",
                   help="the untuned small model --proxy-expert was tuned from")
    g.add_argument("--proxy-beta", type=float, default=None,
                   help="weight of (expert - anti-expert) log-probabilities (default 1.0)")
    g.add_argument("--expert-chat", action="store_true",
                   help="render the expert's prompt with the chat template (the base's follows --chat)")
    g = p.add_argument_group("VAS value-guided sampling")
    g.add_argument("--value-model", action="append", default=[], metavar="DIR", help="a value model (repeatable)")
    g.add_argument("--value-beta", action="append", type=float, default=[], metavar="FLOAT",
                   help="weight of each --value-model, in order (repeatable; default 1.0 each)")
    g.add_argument("--vas-top-k", type=int, default=None, help="candidates reweighted per step (default 10)")
    p.set_defaults(func=run)


# How lmadapt.api.steer's keyword arguments are spelled on this command line (for its error messages).
FLAG_NAMES = {"small_model": "--proxy-small-model", "expert_adapter": "--proxy-expert-adapter",
              "expert": "--proxy-expert", "anti_expert": "--proxy-anti-expert", "beta": "--proxy-beta",
              "expert_chat": "--expert-chat", "value_models": "--value-model", "value_betas": "--value-beta",
              "vas_top_k": "--vas-top-k"}


def run(args: argparse.Namespace) -> int:
    """Print the generated text: streamed when there is one prompt, else ``### prompt`` then the text; with
    ``--jsonl``, one JSON line per prompt."""
    from lmadapt.api import steer

    prompts = list(args.prompt) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    stream = None
    if len(prompts) == 1 and not args.jsonl:
        def stream(_: int, piece: str) -> None:
            print(piece, end="", flush=True)
    outputs = steer(args.model, prompts, adapter=args.adapter, dtype=args.dtype, force=args.force,
                    small_model=args.proxy_small_model, expert_adapter=args.proxy_expert_adapter,
                    expert=args.proxy_expert, anti_expert=args.proxy_anti_expert, beta=args.proxy_beta,
                    expert_chat=True if args.expert_chat else None, value_models=args.value_model,
                    value_betas=args.value_beta or None, vas_top_k=args.vas_top_k,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, chat=args.chat, system_prompt=args.system_prompt, stream=stream,
                    seed=args.seed, arg_names=FLAG_NAMES, threads=args.threads,
                    ensemble_adapter=args.ensemble_adapter, ensemble_combine=args.ensemble_combine,
                    progress=False if args.no_progress or stream else None)
    if args.jsonl:
        for prompt, out in zip(prompts, outputs):
            print(json.dumps({"prompt": prompt, "output": out}, ensure_ascii=False))
    elif stream is not None:
        print()
    else:
        for prompt, out in zip(prompts, outputs):
            print(f"### {prompt}\n{out}\n")
    return 0
