"""The ``preference`` task: which of a pair's two responses the model prefers, and DPO's implicit reward.

Rows are preference pairs as training reads them (``data.format: preference``, docs/data.md): ``{prompt, chosen,
rejected}`` strings, or TRL's conversational rows (lists of messages), the prompt given or implicit (the start that
chosen and rejected share). Each pair becomes its two training sequences by lmadapt.data's own code
(:func:`lmadapt.data.build_examples`, then :func:`~lmadapt.evaluation.tasks.completion_loss.tokenized_examples`:
training's defaults ``add_eos: true``, ``truncation: right``), and each response is scored by completion_loss's
:func:`~lmadapt.evaluation.tasks.completion_loss.token_nlls`:

    log π(y|x) = sum_t log p(y_t | x, y_<t)      over the response's tokens (with its EOS / end-of-turn marker)

the sum objective ``dpo`` takes (:func:`lmadapt.objectives.preference.response_logps`). Per pair, averaged:

    preference_accuracy        = [log π(y_w|x) > log π(y_l|x)]                    the model's own preference
    logp_margin                = log π(y_w|x) − log π(y_l|x)
    length_normalised_accuracy = [log π(y_w|x)/|y_w| > log π(y_l|x)/|y_l|]        SimPO's reward (arXiv:2405.14734)

With a reference π_ref, the model with its adapters switched off (objective ``dpo``'s default reference; DPO,
Rafailov et al., arXiv:2305.18290), and r(y) = β·(log π(y|x) − log π_ref(y|x)), m = r(y_w) − r(y_l):

    reward_accuracy = [m > 0],   reward_margin = m,   dpo_loss = −log σ(m)

computed by the objective's own :func:`~lmadapt.objectives.preference.dpo_losses`. A model without adapters (the
base model before training, a merged one) is its own reference: every reward would be 0, so the reward metrics
are null and a ``note`` says why.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.data import DataConfig, Record, build_examples
from lmadapt.data import Example as TrainingExample
from lmadapt.errors import LmadaptError
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.examples import check_examples
from lmadapt.evaluation.registry import EvalTask, FieldCheck, register_task
from lmadapt.evaluation.tasks.completion_loss import token_nlls, tokenized_examples
from lmadapt.models.tree import adapters_disabled
from lmadapt.objectives.preference import DEFAULT_BETA, dpo_losses

FIELDS = ("prompt", "chosen", "rejected")
REWARD_METRICS = ("reward_accuracy", "reward_margin", "dpo_loss")
NO_REFERENCE = ("the model has no adapters to switch off (a plain model, e.g. the base model before training, or a "
                "merged one), so its reference would be the model itself and every reward 0; reward_accuracy, "
                "reward_margin and dpo_loss need a model with its adapter on (after training, lmadapt eval --adapter)")
_PROBLEM = re.compile(r"field '([^'\[.]+)([^']*)'(?:: | )?(.*)", re.DOTALL)


# ---------------------------------------------------------------------------------------------- rows and pairs

def _data_config(cfg: EvalConfig | None, chat: bool = False, system_prompt: str | None = None) -> DataConfig:
    """The ``data:`` settings under which training reads these rows (the fields named as the eval names them)."""
    names = {f"{key}_field": cfg.field_name(key) if cfg is not None else key for key in FIELDS}
    return DataConfig(**names, use_chat_template=chat, system_prompt=system_prompt if chat else None)


def pair_examples(rows: list[dict[str, Any]], *, chat: bool = False,
                  system_prompt: str | None = None) -> list[TrainingExample]:
    """Each row's training example, as ``data.format: preference`` builds it: the chosen sequence, whose
    ``rejected`` is the rejected one. String pairs go through the chat template with ``chat`` (as training's
    ``use_chat_template``, ``system_prompt`` first); conversational pairs always do, without ``system_prompt``
    (training does not put one before them either)."""
    records = [Record(f"example {i}", {k: row[k] for k in FIELDS if row.get(k) is not None})
               for i, row in enumerate(rows)]
    examples, problems = build_examples(records, "preference", _data_config(None, chat, system_prompt))
    if problems:  # rows are checked before they get here
        raise LmadaptError("preference: rows training cannot read: " + "; ".join(problems))
    return examples


def _training_problems(row: dict[str, Any], cfg: EvalConfig | None) -> list[tuple[str, str]]:
    """``(field, problem)`` for what training's reading of the pair finds wrong (its fields as the data names them),
    each problem without its ``field '...'`` opening."""
    data = {cfg.field_name(k) if cfg is not None else k: row[k] for k in FIELDS if row.get(k) is not None}
    _, found = build_examples([Record("row", data)], "preference", _data_config(cfg))
    out = []
    for problem in found[0].removeprefix("row: ").split("; field '") if found else []:
        m = _PROBLEM.match(problem if problem.startswith("field '") else "field '" + problem)
        if m is None:
            out.append(("", problem))
            continue
        name, part, rest = m.groups()
        out.append((name, f"{part}{' ' if rest.startswith('is ') else ': '}{rest}" if part else rest))
    return out


def _field_problem(key: str) -> FieldCheck:
    """The check of field ``key``: the problems training's reading of the pair names under it (what names no field
    goes to ``rejected``)."""
    def check(value: Any, row: Any, cfg: EvalConfig | None) -> str | None:
        name = cfg.field_name(key) if cfg is not None else key
        known = {cfg.field_name(k) if cfg is not None else k for k in FIELDS}
        mine = [p for owner, p in _training_problems(dict(row), cfg)
                if owner == name or (key == "rejected" and owner not in known)]
        return "; ".join(mine) or None
    return check


# ------------------------------------------------------------------------------------------------------ scoring

def pair_scores(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], *,
                chat: bool = False, system_prompt: str | None = None, max_length: int = 1024, batch_size: int = 4,
                progress: bool | None = None) -> list[dict[str, Any] | None]:
    """Per pair: ``logp_chosen``, ``logp_rejected`` (summed response log-probabilities), ``tokens_chosen``,
    ``tokens_rejected`` (response tokens), and ``ref_logp_chosen``, ``ref_logp_rejected`` under the model with its
    adapters off (None for a model without adapters); None for a pair that ``max_length`` cuts to no response
    token on either side (training drops such a pair whole)."""
    check_examples("preference", rows)
    examples = pair_examples(rows, chat=chat, system_prompt=system_prompt)
    tokens = tokenized_examples(tokenizer, [seq for e in examples for seq in (e, e.rejected)], max_length=max_length)
    kept = [bool(tokens[2 * k][0] and tokens[2 * k + 1][0]) for k in range(len(examples))]
    tokens = [t if kept[i // 2] else ([], []) for i, t in enumerate(tokens)]
    policy = token_nlls(model, tokens, batch_size=batch_size, progress=progress, desc="preference")
    reference = _reference_nlls(model, tokens, batch_size, progress)
    out: list[dict[str, Any] | None] = []
    for k, keep in enumerate(kept):
        (nll_c, n_c), (nll_r, n_r) = policy[2 * k], policy[2 * k + 1]
        ref = (-reference[2 * k][0], -reference[2 * k + 1][0]) if reference is not None else (None, None)
        out.append({"logp_chosen": -nll_c, "logp_rejected": -nll_r, "tokens_chosen": n_c, "tokens_rejected": n_r,
                    "ref_logp_chosen": ref[0], "ref_logp_rejected": ref[1]} if keep else None)
    return out


def _reference_nlls(model: nn.Module, tokens: list[tuple[list[int], list[int]]], batch_size: int,
                    progress: bool | None) -> list[tuple[float, int]] | None:
    """:func:`token_nlls` of the model with its adapters switched off; None when it has none to switch off."""
    try:
        with adapters_disabled(model):
            pass
    except LmadaptError:
        return None
    with adapters_disabled(model):
        return token_nlls(model, tokens, batch_size=batch_size, progress=progress, desc="preference (reference)")


def preference_metrics(scores: list[dict[str, Any] | None], *,
                       beta: float = DEFAULT_BETA["sigmoid"]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one prediction per pair) from :func:`pair_scores` (see the module docstring). A prediction holds
    the pair's scores, ``prediction`` (``chosen``, ``rejected`` or ``tie``: the response of higher log π), ``gold``
    (``chosen``), ``score`` (the logp margin), ``correct`` (whether the model prefers the chosen response) and
    ``reward_margin`` (null without a reference)."""
    scored = [s for s in scores if s is not None]
    if not scored:
        raise LmadaptError("preference: no pair to score (max_length cut every pair to its prompt); raise max_length")
    with_reference = scored[0]["ref_logp_chosen"] is not None
    column = {key: torch.tensor([float(s[key]) for s in scored], dtype=torch.float64) for key in scored[0]
              if with_reference or not key.startswith("ref_")}
    margin = column["logp_chosen"] - column["logp_rejected"]
    normalised = column["logp_chosen"] / column["tokens_chosen"] - column["logp_rejected"] / column["tokens_rejected"]
    metrics: dict[str, Any] = {"preference_accuracy": float((margin > 0).double().mean()),
                               "logp_margin": float(margin.mean()),
                               "length_normalised_accuracy": float((normalised > 0).double().mean()),
                               **dict.fromkeys(REWARD_METRICS)}
    rewards = [None] * len(scored)
    if with_reference:
        losses, chosen, rejected = dpo_losses(column["logp_chosen"], column["logp_rejected"],
                                              column["ref_logp_chosen"], column["ref_logp_rejected"], beta=beta)
        reward_margin = chosen - rejected
        metrics.update(reward_accuracy=float((reward_margin > 0).double().mean()),
                       reward_margin=float(reward_margin.mean()), dpo_loss=float(losses.mean()))
        rewards = reward_margin.tolist()
    notes = [] if with_reference else [NO_REFERENCE]
    if len(scored) < len(scores):
        notes.append(f"{len(scores) - len(scored)} pair(s) that max_length cuts to no response token were left out "
                     f"(null predictions); raise max_length to score them")
    metrics["n"] = len(scored)
    if notes:
        metrics["note"] = "; ".join(notes)
    return metrics, _predictions(scores, margin.tolist(), rewards)


def _predictions(scores: list[dict[str, Any] | None], margins: list[float],
                 rewards: list[float | None]) -> list[dict[str, Any]]:
    out, k = [], 0
    for s in scores:
        if s is None:
            out.append({"prediction": None, "gold": "chosen", "score": None, "correct": None, "reward_margin": None})
            continue
        m = margins[k]
        out.append({"prediction": "chosen" if m > 0 else "rejected" if m < 0 else "tie", "gold": "chosen",
                    "score": m, "correct": m > 0, **s, "reward_margin": rewards[k]})
        k += 1
    return out


def preference_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], *,
                        chat: bool = False, system_prompt: str | None = None, max_length: int = 1024,
                        batch_size: int = 4, beta: float = DEFAULT_BETA["sigmoid"],
                        progress: bool | None = None) -> dict[str, Any]:
    """The metrics of the module docstring for ``rows`` (``{prompt, chosen, rejected}``, canonical names)."""
    scores = pair_scores(model, tokenizer, rows, chat=chat, system_prompt=system_prompt, max_length=max_length,
                         batch_size=batch_size, progress=progress)
    return preference_metrics(scores, beta=beta)[0]


def _run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], cfg: EvalConfig,
         progress: bool | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    scores = pair_scores(model, tokenizer, rows, chat=cfg.chat, system_prompt=cfg.system_prompt,
                         max_length=cfg.max_length, batch_size=cfg.batch_size, progress=progress)
    return preference_metrics(scores, beta=cfg.beta)


TASK = register_task(EvalTask(
    name="preference", fields={key: _field_problem(key) for key in FIELDS}, optional=("prompt",),
    reads=("chat", "system_prompt", "max_length", "batch_size", "beta"), run=_run,
    summary="how often the model prefers the chosen response of a pair, and DPO's reward against its adapters-off "
            "self"))
