"""DPO on preference pairs built from the demo's BBC News topics: reward accuracy and margin on held-out pairs,
before and after (issue 16; objective ``dpo``, docs/objectives.md; METHODS.md section 21f).

**The pairs are made up from a classification set, not human preferences.** For each article of the demo's task
(``lmadapt.recipes.demo_data.bbc_news(seed=0, n_test=250, max_words=--max-words)``):

- prompt: the demo's chat prompt for the article (``PROMPT``: the question, the five topics, the article);
- chosen: the right topic word (``--answer word``), or one sentence naming it (``--answer sentence``:
  "The topic of this article is sport.");
- rejected: with ``--rejected hardest`` (the default), the wrong topic that SmolLM2-135M-Instruct itself scores
  highest after the prompt (lmadapt's ``classification`` scoring, chat template): its own answer where it errs,
  its runner-up where it is right; with ``--rejected random``, a wrong topic drawn uniformly (seeded).

So every pair prefers a fact over a falsehood; nothing in it is a matter of taste, and with ``hardest`` the
rejected answers are the base model's own confusions. Training pairs come from the demo's training split (the
first ``--steps`` x ``--batch-size``), held-out pairs from its held-out split (the first ``--test-pairs``).

Training: LoRA r ``--r`` (alpha 2r, dropout 0) on the seven projections, as the demo; objective ``dpo`` with
``--loss sigmoid`` (DPO, beta ``--beta``, default 0.1, reference = the same model with its adapters off) and/or
``--loss simpo`` (SimPO, reference-free; beta 2.0 and gamma 0.5 by default); ``--steps`` steps of
``--batch-size`` pairs, lr ``--lr`` (not tuned), cosine with 10% warm-up, seed 0, chat template, fp32.

Evaluation on the held-out pairs, with the trained adapter on (the policy π) and off (the reference π_ref =
the base model, which is also "before": a fresh LoRA starts as the base model). Each response's
log π(y|x), under π and π_ref, is the ``preference`` evaluation task's scoring (``pair_scores``: the pair tokenized
as training tokenizes it, the response with its end-of-turn tokens summed), and the rewards are the objective's own
``dpo_losses`` / ``simpo_losses``:

- reward accuracy: the share of pairs with reward(chosen) > reward(rejected); mean margin, reward(chosen) -
  reward(rejected); mean loss. DPO's reward is β(log π − log π_ref), so before training it is 0 for every
  response: reward accuracy 0, margin 0 and loss log 2, by construction. SimPO's reward β/|y|·log π needs no
  reference, so its "before" is the base model's;
- policy preference: the share of pairs with log π(chosen) > log π(rejected), before (the base model) and after,
  and the mean gap log π(chosen) − log π(rejected). With ``--rejected hardest`` and one-word answers, the
  base model's preference is near its classification accuracy: the same scores plus the end-of-turn tokens,
  which can tip a close pair (1 of 6 pairs in the smoke run);
- the demo's classification accuracy on the held-out articles (the ``classification`` task), before (the
  scores the pairs were built from) and after. It scores the bare topic word after the prompt, so with
  ``--answer sentence`` it measures something the pairs no longer train directly.

    python benchmarks/dpo_pairs.py --workdir runs/bench-dpo                     # DPO, about 15 minutes on 2 cores
    python benchmarks/dpo_pairs.py --workdir runs/bench-dpo --loss sigmoid simpo  # + SimPO (+8 minutes)
    python benchmarks/dpo_pairs.py --workdir runs/bench-dpo-smoke --steps 2 --batch-size 2 --test-pairs 6 \\
        --loss sigmoid simpo                                                    # smoke run

The defaults (30 steps of 4 pairs, 120 training pairs, 60 held out, articles cut at 100 words) were sized for
2 AMD EPYC cores in fp32 at about 130 trained tokens/s (a step is 8 sequences of about 200 tokens plus the
reference's forward pass: about 16 s, 8 minutes of training), plus scoring the topics of 180 articles and the 60
pairs with the adapter on and off (estimates: the smoke run shared its 2 cores with other work, and the full
run was not timed). A finished run folder (named by its settings) and the pair files are reused. The BBC text stays in
``--workdir`` (non-commercial research use; see ``demo_data``). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import model_folder
from methods import cpu_class
from updates import say, write_jsonl

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------------- data

def answer(label: str, style: str) -> str:
    return label if style == "word" else f"The topic of this article is {label}."


def build_pairs(rows: list[dict], predictions: list[dict], args: argparse.Namespace) -> list[dict]:
    """Preference rows {prompt, chosen, rejected} of ``rows``, the rejected topic chosen as ``--rejected`` says
    from the base model's ``classification`` predictions."""
    rng = random.Random(0)
    pairs = []
    for row, pred in zip(rows, predictions):
        wrong = {label: score for label, score in pred["scores"].items() if label != row["label"]}
        rejected = max(wrong, key=wrong.get) if args.rejected == "hardest" else rng.choice(sorted(wrong))
        pairs.append({"prompt": row["prompt"], "chosen": answer(row["label"], args.answer),
                      "rejected": answer(rejected, args.answer)})
    return pairs


def write_data(workdir: Path, model: str, args: argparse.Namespace) -> dict:
    """Pair files (training, held-out), the held-out prompts with their labels, and the base model's held-out
    accuracy; written once per setting and reused."""
    from lmadapt.fsutil import atomic_write_json
    from lmadapt.recipes.demo_data import LABELS, bbc_news

    n_train = args.steps * args.batch_size
    folder = workdir / "data" / f"w{args.max_words}_n{n_train}_t{args.test_pairs}_{args.rejected}_{args.answer}"
    meta = folder / "meta.json"
    if meta.is_file():
        return json.loads(meta.read_text(encoding="utf-8"))
    train, test, _ = bbc_news(seed=0, n_test=250, max_words=args.max_words)
    if n_train > len(train) or args.test_pairs > len(test):
        raise SystemExit(f"--steps x --batch-size = {n_train} training pairs (at most {len(train)}) and "
                         f"--test-pairs {args.test_pairs} (at most {len(test)})")
    train, test = train[:n_train], test[:args.test_pairs]
    say(f"scoring the five topics of {n_train + len(test)} articles with the base model (to pick rejected answers)")
    predictions = base_predictions(model, train + test, args.threads)
    held = predictions[n_train:]
    files = {"train": folder / "train_pairs.jsonl", "test": folder / "test_pairs.jsonl",
             "test_prompts": folder / "test_prompts.jsonl"}
    write_jsonl(files["train"], build_pairs(train, predictions[:n_train], args))
    write_jsonl(files["test"], build_pairs(test, held, args))
    write_jsonl(files["test_prompts"], [{"prompt": r["prompt"], "label": r["label"]} for r in test])
    info = {**{k: str(v) for k, v in files.items()}, "labels": list(LABELS),
            "base_accuracy": sum(p["correct"] for p in held) / len(held),
            "train_base_accuracy": sum(p["correct"] for p in predictions[:n_train]) / n_train}
    atomic_write_json(meta, info)  # written last: its presence means the files are whole
    return info


def base_predictions(model: str, rows: list[dict], threads: int) -> list[dict]:
    """The ``classification`` task's per-article predictions (every topic's score) of the base model."""
    import torch

    import lmadapt
    from lmadapt.evaluation.tasks.classification import classification_predictions
    from lmadapt.recipes.demo_data import LABELS

    torch.set_num_threads(threads)
    net, tokenizer, _ = lmadapt.load(model)
    return classification_predictions(net, tokenizer, [{"prompt": r["prompt"], "label": r["label"]} for r in rows],
                                      list(LABELS), chat=True, progress=False)


# ---------------------------------------------------------------------------------------------------- training

def train_once(loss: str, data: dict, model: str, args: argparse.Namespace, workdir: Path) -> Path:
    """Train (or reuse) the LoRA of ``loss`` ('sigmoid' or 'simpo'); its run folder."""
    import lmadapt

    beta = args.beta if loss == "sigmoid" else args.simpo_beta
    gamma = f"_gamma{args.gamma}" if loss == "simpo" and args.gamma is not None else ""
    out = workdir / "runs" / (f"{loss}_s{args.steps}_b{args.batch_size}_lr{args.lr:g}_beta{beta}{gamma}_r{args.r}_"
                              f"{Path(data['train']).parent.name}")
    if (out / "report.json").is_file():
        return out
    say(f"training {loss}: {args.steps} steps of {args.batch_size} pairs")
    objective = {"name": "dpo", "loss": loss, "beta": beta, **({"gamma": args.gamma} if gamma else {})}
    lmadapt.train({
        "model": {"name_or_path": model, "dtype": "fp32"},
        "data": {"train": [data["train"]], "format": "preference", "use_chat_template": True,
                 "max_length": args.max_length, "validation_fraction": 0.0},
        "method": {"name": "lora", "r": args.r, "alpha": 2 * args.r, "dropout": 0.0, "target_modules": TARGETS},
        "objective": objective,
        "train": {"lr": args.lr, "batch_size": args.batch_size, "max_steps": args.steps, "schedule": "cosine",
                  "warmup_steps": max(1, args.steps // 10), "precision": "fp32", "eval_every": 0, "save_every": 0,
                  "seed": 0, "threads": args.threads, "tensorboard": False},
        "output_dir": str(out), "overwrite": True}, progress=False)
    return out


# -------------------------------------------------------------------------------------------------- evaluation

def pair_logps(net: Any, tokenizer: Any, pairs: list[dict], max_length: int) -> tuple[dict, dict]:
    """(policy, reference), each {"chosen", "rejected"}: (summed log π(y|x), response tokens) as float64 / int64
    tensors, by the ``preference`` task's ``pair_scores`` (the reference: ``net`` with its adapters off)."""
    import torch

    from lmadapt.evaluation.tasks.preference import pair_scores

    scores = pair_scores(net, tokenizer, pairs, chat=True, max_length=max_length, batch_size=8, progress=False)
    if None in scores:
        raise SystemExit(f"--max-length {max_length} cuts some held-out pairs to their prompt; raise it")
    def side(prefix: str, name: str) -> tuple:
        return (torch.tensor([s[f"{prefix}logp_{name}"] for s in scores], dtype=torch.float64),
                torch.tensor([s[f"tokens_{name}"] for s in scores], dtype=torch.int64))
    return ({name: side("", name) for name in ("chosen", "rejected")},
            {name: side("ref_", name) for name in ("chosen", "rejected")})


def pair_metrics(policy: dict, reference: dict, loss: str, beta: float, gamma: float) -> dict:
    """Reward accuracy, mean margin and mean loss of the objective's own formulas, and the policy's preference."""
    from lmadapt.objectives.preference import dpo_losses, simpo_losses

    (pc, nc), (pr, nr) = policy["chosen"], policy["rejected"]
    if loss == "sigmoid":
        losses, chosen, rejected = dpo_losses(pc, pr, reference["chosen"][0], reference["rejected"][0], beta=beta)
    else:
        losses, chosen, rejected = simpo_losses(pc, pr, nc, nr, beta=beta, gamma=gamma)
    margin = chosen - rejected
    return {"reward_accuracy": float((margin > 0).double().mean()), "mean_margin": float(margin.mean()),
            "mean_loss": float(losses.mean()), "policy_preference": float((pc > pr).double().mean()),
            "mean_logp_gap": float((pc - pr).mean())}


def measure(loss: str, run: Path, data: dict, model: str, args: argparse.Namespace) -> dict:
    """Before/after figures of one trained adapter on the held-out pairs and prompts."""
    import torch

    import lmadapt
    from lmadapt.evaluation.config import EvalConfig
    from lmadapt.objectives.preference import DEFAULT_GAMMA

    torch.set_num_threads(args.threads)
    pairs = [json.loads(line) for line in Path(data["test"]).read_text(encoding="utf-8").splitlines()]
    net, tokenizer, _ = lmadapt.load(model, run / "adapter")
    start = time.perf_counter()
    policy, reference = pair_logps(net, tokenizer, pairs, args.max_length)
    after_cls = lmadapt.evaluate(net, tokenizer, EvalConfig(task="classification", data=[data["test_prompts"]],
                                                            labels=data["labels"], chat=True), progress=False)
    eval_s = time.perf_counter() - start
    beta = args.beta if loss == "sigmoid" else args.simpo_beta
    gamma = DEFAULT_GAMMA if args.gamma is None else args.gamma
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    row = {"loss": loss, "beta": beta, **({"gamma": gamma} if loss == "simpo" else {}),
           "before": pair_metrics(reference, reference, loss, beta, gamma),
           "after": pair_metrics(policy, reference, loss, beta, gamma),
           "accuracy_before": data["base_accuracy"], "accuracy_after": after_cls["accuracy"],
           "train_s": report["seconds"], "eval_s": round(eval_s, 1), "input_tokens": report["input_tokens"],
           "final_train_loss": report["final_train_loss"], "run_dir": str(run)}
    say(f"{loss}: reward accuracy {row['before']['reward_accuracy']:.1%} -> {row['after']['reward_accuracy']:.1%}, "
        f"policy preference {row['before']['policy_preference']:.1%} -> {row['after']['policy_preference']:.1%}, "
        f"topic accuracy {row['accuracy_before']:.1%} -> {row['accuracy_after']:.1%}")
    return row


# ------------------------------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench-dpo")
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or model folder")
    p.add_argument("--loss", nargs="+", default=["sigmoid"], choices=["sigmoid", "simpo"],
                   help="sigmoid: DPO; simpo: SimPO; both: one run each")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (one epoch of the pairs)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (2 sequences each)")
    p.add_argument("--test-pairs", type=int, default=60, help="held-out pairs (at most 250)")
    p.add_argument("--rejected", choices=["hardest", "random"], default="hardest",
                   help="hardest: the base model's likeliest wrong topic; random: a random wrong topic")
    p.add_argument("--answer", choices=["word", "sentence"], default="word", help="the answers' form")
    p.add_argument("--max-words", type=int, default=100, help="words of each article kept (demo: 150)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (none is cut at 150 words)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate (not tuned)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    p.add_argument("--simpo-beta", type=float, default=2.0, help="SimPO's beta")
    p.add_argument("--gamma", type=float, default=None, help="SimPO's target margin (default 0.5)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha 2r)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir)
    model = model_folder(args.model, workdir)
    data = write_data(workdir, model, args)
    say(f"base model: {data['base_accuracy']:.1%} held-out topic accuracy ({data['train_base_accuracy']:.1%} on the "
        f"training articles); rejected answers: {args.rejected}, answers as a {args.answer}")
    rows = [measure(loss, train_once(loss, data, model, args, workdir), data, model, args)
            for loss in dict.fromkeys(args.loss)]

    print(f"\nCPU: {cpu_class()}; {args.steps} steps of {args.batch_size} pairs, LoRA r {args.r}, lr {args.lr:g}, fp32; "
          f"{args.test_pairs} held-out pairs (rejected: {args.rejected}, answers: {args.answer})")
    print(f"{'run':>8} {'':>6} {'reward acc':>10} {'margin':>8} {'loss':>7} {'π prefers':>9} {'logp gap':>9} "
          f"{'topic acc':>9} {'train s':>8}")
    for r in rows:
        for when in ("before", "after"):
            m = r[when]
            print(f"{r['loss']:>8} {when:>6} {m['reward_accuracy']:10.1%} {m['mean_margin']:8.4f} {m['mean_loss']:7.4f} "
                  f"{m['policy_preference']:9.1%} {m['mean_logp_gap']:9.3f} {r['accuracy_' + when]:9.1%} "
                  + (f"{r['train_s']:8.1f}" if when == "after" else ""))
    first = rows[0]
    print(json.dumps({
        "benchmark": "dpo_pairs", "cpu_class": cpu_class(), "model": args.model, "steps": args.steps,
        "batch_size": args.batch_size, "train_pairs": args.steps * args.batch_size, "test_pairs": args.test_pairs,
        "rejected": args.rejected, "answer": args.answer, "max_words": args.max_words, "lr": args.lr,
        "lora_r": args.r, "precision": "fp32", "threads": args.threads,
        "loss": first["loss"], "reward_accuracy_before": first["before"]["reward_accuracy"],
        "reward_accuracy_after": first["after"]["reward_accuracy"], "margin_after": first["after"]["mean_margin"],
        "policy_preference_before": first["before"]["policy_preference"],
        "policy_preference_after": first["after"]["policy_preference"],
        "accuracy_before": first["accuracy_before"], "accuracy_after": first["accuracy_after"],
        "train_s": first["train_s"], "runs": rows}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
