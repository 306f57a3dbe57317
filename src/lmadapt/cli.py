"""``lmadapt`` on the command line: a thin layer over :mod:`lmadapt.api`; each command is one library call."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from lmadapt.errors import LmadaptError


def _cmd_train(args: argparse.Namespace) -> int:
    from lmadapt.training.run import train

    overrides = list(args.overrides)
    if args.overwrite:
        overrides.append("overwrite=true")
    train(args.config, overrides, resume=args.resume, progress=not args.no_progress)
    return 0


def _cmd_help_config(args: argparse.Namespace) -> int:
    from lmadapt.config import describe
    from lmadapt.methods import available_methods, method_class
    from lmadapt.training.run import RunConfig

    rows = describe(RunConfig)
    for name in available_methods():
        rows += [(f"method.{k}  [{name}]", t, d, h) for k, t, d, h in describe(method_class(name).config_class)]
    for key, tp, default, help_text in rows:
        print(f"{key}: {tp} = {default}\n    {help_text}")
    return 0


def _eval_config(args: argparse.Namespace):
    from lmadapt.config import from_dict
    from lmadapt.evaluation.config import EvalConfig

    spec = {"task": args.task, "data": args.data, "chat": args.chat}
    if args.labels:
        spec["labels"] = args.labels.split(",")
    if args.max_examples is not None:
        spec["max_examples"] = args.max_examples
    return from_dict(EvalConfig, spec, "command line")


def _cmd_eval(args: argparse.Namespace) -> int:
    from lmadapt.api import load
    from lmadapt.evaluation.report import compare_table
    from lmadapt.evaluation.run import evaluate

    cfg = _eval_config(args)
    if args.compare and not args.adapter:
        raise LmadaptError("--compare evaluates the model with and without its adapter; give --adapter")
    model, tok, method = load(args.model, args.adapter, dtype=args.dtype, force=args.force)
    after = evaluate(model, tok, cfg)
    if method is not None and args.compare:
        from lmadapt.models.tree import adapters_disabled

        with adapters_disabled(model):
            before = evaluate(model, tok, cfg)
        print(compare_table([(cfg.task, before, after)]))
    else:
        print(json.dumps(after, indent=2, default=str))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from lmadapt.api import load
    from lmadapt.decoding.generation import generate

    problems = _steering_flag_problems(args)
    if problems:
        raise LmadaptError("; ".join(problems))
    model, tok, _ = load(args.model, args.adapter, dtype=args.dtype, force=args.force)
    prompts = list(args.prompt) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    stream = None
    if len(prompts) == 1:
        def stream(_: int, piece: str) -> None:
            print(piece, end="", flush=True)
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, chat=args.chat, stream=stream, seed=args.seed)
    steering = _steering(args, tok)
    if steering:
        from lmadapt.decoding.steering import steered_generate

        outputs = steered_generate(model, tok, prompts, **steering, **common)
    else:
        outputs = generate(model, tok, prompts, **common)
    if stream is not None:
        print()
    else:
        for prompt, out in zip(prompts, outputs):
            print(f"### {prompt}\n{out}\n")
    return 0


_EXPERT_HINT = "give --proxy-small-model with --proxy-expert-adapter, or --proxy-expert with --proxy-anti-expert"


def _steering_flag_problems(args: argparse.Namespace) -> list[str]:
    """Every inconsistent combination of the generate command's steering flags, by flag name."""
    problems = []
    if args.proxy_expert_adapter and not args.proxy_small_model:
        problems.append("--proxy-expert-adapter needs --proxy-small-model (the small base model it was trained on)")
    if args.proxy_small_model and not args.proxy_expert_adapter:
        problems.append("--proxy-small-model needs --proxy-expert-adapter (the expert = small model + adapter)")
    if bool(args.proxy_expert) != bool(args.proxy_anti_expert):
        problems.append("--proxy-expert and --proxy-anti-expert go together (the tuned and the untuned small model)")
    if (args.proxy_expert_adapter or args.proxy_small_model) and (args.proxy_expert or args.proxy_anti_expert):
        problems.append("--proxy-expert-adapter/--proxy-small-model and --proxy-expert/--proxy-anti-expert are two "
                        "ways to give the expert. Choose one.")
    has_expert = args.proxy_expert_adapter or args.proxy_small_model or args.proxy_expert or args.proxy_anti_expert
    for flag, given in (("--proxy-beta", args.proxy_beta is not None), ("--expert-chat", args.expert_chat)):
        if given and not has_expert:
            problems.append(f"{flag} needs an expert: {_EXPERT_HINT}")
    if args.value_beta and len(args.value_beta) != len(args.value_model):
        problems.append(f"--value-beta was given {len(args.value_beta)} time(s) for {len(args.value_model)} "
                        f"--value-model(s); give one per value model, in the same order (none: 1.0 each)")
    if args.vas_top_k is not None and not args.value_model:
        problems.append("--vas-top-k needs at least one --value-model")
    return problems


def _steering(args: argparse.Namespace, tok: Any) -> dict[str, Any]:
    """The keyword arguments of ``steered_generate`` for the steering flags (empty: plain generation)."""
    from lmadapt.api import load

    out: dict[str, Any] = {}
    if args.proxy_expert_adapter:
        expert, expert_tok, _ = load(args.proxy_small_model, args.proxy_expert_adapter, dtype=args.dtype,
                                     force=args.force)
        out.update(expert=expert, expert_tokenizer=expert_tok)
    elif args.proxy_expert:
        from lmadapt.models.vocab import check_vocabularies

        expert, expert_tok, _ = load(args.proxy_expert, dtype=args.dtype)
        anti, anti_tok, _ = load(args.proxy_anti_expert, dtype=args.dtype)
        check_vocabularies(expert_tok, {"--proxy-anti-expert": anti_tok})
        out.update(expert=expert, anti_expert=anti, expert_tokenizer=expert_tok)
    if out:
        out["beta"] = 1.0 if args.proxy_beta is None else args.proxy_beta
        out["expert_chat"] = True if args.expert_chat else None
    if args.value_model:
        from lmadapt.decoding.value_model import load_value_model
        from lmadapt.models.vocab import check_vocabularies

        betas = args.value_beta or [1.0] * len(args.value_model)
        out["values"] = []
        for path, beta in zip(args.value_model, betas):
            value_model, value_tok = load_value_model(path, dtype=args.dtype)
            check_vocabularies(tok, {f"--value-model {path}": value_tok})
            out["values"].append((value_model, beta))
        if args.vas_top_k is not None:
            out["vas_top_k"] = args.vas_top_k
    return out


def _cmd_vas_train(args: argparse.Namespace) -> int:
    from lmadapt.recipes.vas_train import load_vas_config, train_value_model

    overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else [])
    out = train_value_model(load_vas_config(args.config, overrides), progress=not args.no_progress)
    print(f"value models in {out / 'values'}; generate with: lmadapt generate --value-model "
          f"{out / 'values'}/<reward> --value-beta 1.0", file=sys.stderr)
    return 0


def _cmd_make_helper(args: argparse.Namespace) -> int:
    from lmadapt.recipes.helper_model import load_helper_config, make_helper

    overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else [])
    path = make_helper(load_helper_config(args.config, overrides), progress=not args.no_progress, resume=args.resume)
    print(path)
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
    from lmadapt.recipes.demo import run_demo

    run_demo(output_dir=args.output, overwrite=args.overwrite, quick=args.quick)
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local model folder")
    p.add_argument("--adapter", default=None, help="adapter folder (lmadapt or PEFT)")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--force", action="store_true", help="apply an adapter trained on another base model")


def _config_command(sub: Any, name: str, help: str, config_help: str, example: str, func: Any, *,
                    resume: bool = False) -> None:
    """A subcommand that runs one YAML config with ``key=value`` overrides into an output folder."""
    p = sub.add_parser(name, help=help)
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmadapt", description="Adapt pretrained language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    _config_command(sub, "train", "train an adapter from a YAML config", "YAML config file",
                    "train.lr=1e-4 method.r=8", _cmd_train, resume=True)

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

    p = sub.add_parser("generate", help="generate text (optionally steered by proxy-tuning/EFT or VAS)")
    _model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: stdin lines)")
    p.add_argument("--chat", action="store_true", help="render prompts with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
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
    p.set_defaults(func=_cmd_generate)

    _config_command(sub, "vas-train", "train VAS value model(s) from a YAML config (docs/vas.md)",
                    "YAML config file, e.g. examples/vas.yaml", "n_per_prompt=8 train.lr=1e-5", _cmd_vas_train)
    _config_command(sub, "make-helper", "make a small same-tokenizer Llama by distillation (docs/helper_models.md)",
                    "YAML config, e.g. examples/helper_model.yaml", "train.max_steps=20 hidden_size=256",
                    _cmd_make_helper, resume=True)

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

