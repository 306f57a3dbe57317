"""``lmadapt`` on the command line: a thin layer over :mod:`lmadapt.api`; each command is one library call."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lmadapt.errors import LmadaptError


def _cmd_train(args: argparse.Namespace) -> int:
    from lmadapt.train import train

    overrides = list(args.overrides)
    if args.overwrite:
        overrides.append("overwrite=true")
    train(args.config, overrides, resume=args.resume, progress=not args.no_progress)
    return 0


def _cmd_help_config(args: argparse.Namespace) -> int:
    from lmadapt.config import describe
    from lmadapt.methods import available_methods, method_class
    from lmadapt.train import RunConfig

    rows = describe(RunConfig)
    for name in available_methods():
        rows += [(f"method.{k}  [{name}]", t, d, h) for k, t, d, h in describe(method_class(name).config_class)]
    for key, tp, default, help_text in rows:
        print(f"{key}: {tp} = {default}\n    {help_text}")
    return 0


def _eval_config(args: argparse.Namespace):
    from lmadapt.config import from_dict
    from lmadapt.evaluation import EvalConfig

    spec = {"task": args.task, "data": args.data, "chat": args.chat}
    if args.labels:
        spec["labels"] = args.labels.split(",")
    if args.max_examples is not None:
        spec["max_examples"] = args.max_examples
    return from_dict(EvalConfig, spec, "command line")


def _cmd_eval(args: argparse.Namespace) -> int:
    from lmadapt.api import load
    from lmadapt.evaluation import compare_table, evaluate

    cfg = _eval_config(args)
    if args.compare and not args.adapter:
        raise LmadaptError("--compare evaluates the model with and without its adapter; give --adapter")
    model, tok, method = load(args.model, args.adapter, dtype=args.dtype, force=args.force)
    after = evaluate(model, tok, cfg)
    if method is not None and args.compare:
        from lmadapt.tree import adapters_disabled

        with adapters_disabled(model):
            before = evaluate(model, tok, cfg)
        print(compare_table([(cfg.task, before, after)]))
    else:
        print(json.dumps(after, indent=2, default=str))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from lmadapt.api import load
    from lmadapt.generation import generate

    model, tok, _ = load(args.model, args.adapter, dtype=args.dtype, force=args.force)
    prompts = list(args.prompt) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    stream = None
    if len(prompts) == 1:
        def stream(_: int, piece: str) -> None:
            print(piece, end="", flush=True)
    outputs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, chat=args.chat, stream=stream, seed=args.seed)
    if stream is not None:
        print()
    else:
        for prompt, out in zip(prompts, outputs):
            print(f"### {prompt}\n{out}\n")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from lmadapt.api import merge

    path = merge(args.model, args.adapter, args.output, overwrite=args.overwrite, dtype=args.dtype,
                 force=args.force)
    print(f"merged model written to {path}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lmadapt.api import inspect

    print(json.dumps(inspect(args.path), indent=2, default=str))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lmadapt.demo import run_demo

    run_demo(output_dir=args.output, overwrite=args.overwrite, quick=args.quick)
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local model folder")
    p.add_argument("--adapter", default=None, help="adapter folder (lmadapt or PEFT)")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--force", action="store_true", help="apply an adapter trained on another base model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmadapt", description="Adapt pretrained language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an adapter from a YAML config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4 method.r=8")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config-help", help="list every config key with its type, default and meaning")
    p.set_defaults(func=_cmd_help_config)

    p = sub.add_parser("eval", help="evaluate a model (optionally with an adapter)")
    _model_args(p)
    p.add_argument("--task", required=True, choices=["perplexity", "generation", "multiple_choice", "classification"])
    p.add_argument("--data", required=True, nargs="+", help="JSONL/JSON/CSV/Parquet files or globs")
    p.add_argument("--labels", default=None, help="classification label words, comma-separated")
    p.add_argument("--chat", action="store_true", help="render prompts with the chat template")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--compare", action="store_true", help="also evaluate the base model and print before/after")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="generate text")
    _model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: stdin lines)")
    p.add_argument("--chat", action="store_true", help="render prompts with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("merge", help="fold an adapter into the base weights and save a plain model")
    _model_args(p)
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("inspect", help="describe an adapter, run or model folder")
    p.add_argument("path")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("demo", help="LoRA on SmolLM2-135M-Instruct for BBC News topics, end to end")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quick", action="store_true", help="a 1-minute smoke version (few steps, few examples)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "adapter", None) is None and args.command == "merge":
        print("lmadapt merge: --adapter is required", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    raise SystemExit(main())

