"""``lmadapt serve``: :func:`lmadapt.api.serve`, an OpenAI-compatible HTTP server over one base model and its
adapters (docs/serving.md)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from lmadapt.cli.common import add_threads_arg, positive_int

API_KEY_ENV = "LMADAPT_API_KEY"


def adapter_spec(text: str) -> tuple[str, str]:
    """An argparse ``type``: ``NAME=PATH``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (the name clients send as `model`), got {text!r}")
    return name, path


def proxy_spec(text: str) -> Any:
    """An argparse ``type``: ``NAME=EXPERT,ANTI[,BETA]`` (:class:`lmadapt.serving.engine_proxy.ProxySpec`)."""
    from lmadapt.errors import LmadaptError
    from lmadapt.serving.engine_proxy import ProxySpec

    try:
        return ProxySpec.parse(text)
    except LmadaptError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: Any) -> None:
    """Register ``serve`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("serve", help="serve a base model and its adapters over an OpenAI-compatible HTTP API")
    p.add_argument("--model", default=None,
                   help="built-in name or local model folder (default: the base model the first adapter records, "
                        "else smollm2-135m-instruct)")
    p.add_argument("--adapter", action="append", type=adapter_spec, default=[], metavar="NAME=PATH",
                   help="an adapter to serve as model NAME (repeatable)")
    p.add_argument("--proxy", action="append", type=proxy_spec, default=[], metavar="NAME=EXPERT,ANTI[,BETA]",
                   help="serve --model proxy-tuned as model NAME: its log-probs + BETA (default 1.0) x (EXPERT - "
                        "ANTI)'s. EXPERT an adapter folder and ANTI the small model it was trained on (as "
                        "generate's --proxy-expert-adapter/--proxy-small-model), or EXPERT and ANTI two small "
                        "models (--proxy-expert/--proxy-anti-expert); repeatable")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the base model's name in requests and /v1/models (default: --model as given)")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--force", action="store_true",
                   help="serve --adapter folders trained on other base weights (their fingerprint differs)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, metavar="PORT", help="port (default 8000; 0: any free port)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} when set, else no key)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-batch-size", type=positive_int, default=8, metavar="N",
                   help="requests decoded together (default 8)")
    g.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                   help="requests waiting for a batch row; more are refused with 429 (default 64)")
    g.add_argument("--max-tokens", type=positive_int, default=2048, metavar="N",
                   help="new tokens per choice a request may ask for (default 2048)")
    g.add_argument("--max-n", type=positive_int, default=16, metavar="N", help="choices per request (default 16)")
    g.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, metavar="BYTES",
                   help="request body size; larger ones get 413 (default 1048576)")
    g.add_argument("--no-runtime-adapters", action="store_true",
                   help="refuse POST /v1/load_lora_adapter and /v1/unload_lora_adapter (403)")
    g.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="seconds SIGTERM waits for requests in flight before cancelling them (default 30)")
    add_threads_arg(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C."""
    from lmadapt.api import serve

    names = [name for name, _ in args.adapter] + [spec.name for spec in args.proxy]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        from lmadapt.errors import LmadaptError

        raise LmadaptError(f"--adapter/--proxy: the name(s) {', '.join(duplicates)} are given twice; each adapter "
                           f"and proxy-tuned model needs its own name")
    serve(args.model, dict(args.adapter), host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, served_model_name=args.served_model_name,
          dtype=args.dtype, force=args.force, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
          max_tokens=args.max_tokens, max_n=args.max_n, max_body_bytes=args.max_body_bytes,
          runtime_adapters=not args.no_runtime_adapters, drain_timeout=args.drain_timeout, threads=args.threads,
          log_level=args.log_level, proxies=args.proxy)
    return 0
