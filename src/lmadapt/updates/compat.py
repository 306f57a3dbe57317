"""Compatibility of a model update: what the new model gets wrong that the old one got right.

Echterhoff et al., "MUSCLE: A Model Update Strategy for Compatible LLM Evolution" (arXiv:2407.09435). Over N
examples matched by id, with c_old,i and c_new,i whether each model's answer is right:

    NFR = (1/N) sum_i 1[c_old,i and not c_new,i]          negative flips: right before, wrong now
    PFR = (1/N) sum_i 1[not c_old,i and c_new,i]          positive flips
    inconsistent flips: both wrong with different predictions, also as a share of N

For generation, correctness is judged twice: by matching an accepted answer (``match``: exact after
stripping, or normalized as in SQuAD), and by a similarity to the best accepted answer at or above
``threshold``. The similarity is also the continuous per-example metric m: a negative flip there is
``m_new < m_old - tolerance``, reported with the mean decrease over those examples, and the similarity
between the old and the new output measures how much the behaviour changed beyond correctness.

:func:`compare_predictions` works on prediction rows (those :func:`lmadapt.evaluation.evaluate` writes);
:func:`compare_models` evaluates models, adapters, or reads predictions files, and writes the result.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmadapt.errors import LmadaptError
from lmadapt.evaluation.predictions import read_predictions, write_predictions
from lmadapt.evaluation.registry import get_task
from lmadapt.evaluation.tasks.generation import answer_matches, normalize_answer

FLIP_TASKS = ("classification", "multiple_choice", "generation")
Similarity = Literal["token_f1", "rouge_l"]
Match = Literal["exact", "normalized"]
REQUIRED_KEYS = ("id", "prediction", "gold", "correct")


# ------------------------------------------------------------------------------------------ similarity

def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: the harmonic mean of precision and recall of the bag of tokens after
    :func:`~lmadapt.evaluation.tasks.generation.normalize_answer` (lowercase, no punctuation or articles).
    Two empty texts score 1, one empty text 0."""
    a, b = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not a or not b:
        return float(a == b)
    common = sum((Counter(a) & Counter(b)).values())
    return 0.0 if common == 0 else 2 * common / (len(a) + len(b))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004) on the same normalised tokens: with L the longest common subsequence,
    ``2 L / (len(prediction) + len(reference))``. Two empty texts score 1, one empty text 0."""
    a, b = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return 2 * previous[-1] / (len(a) + len(b))


SIMILARITIES: dict[str, Callable[[str, str], float]] = {"token_f1": token_f1, "rouge_l": rouge_l}


def similarity_to_gold(prediction: Any, gold: Any, measure: Similarity) -> float:
    """The best similarity of ``prediction`` to any accepted answer (``gold``: a string or a list of them)."""
    answers = gold if isinstance(gold, list) else [gold]
    return max(SIMILARITIES[measure](str(prediction), str(a)) for a in answers)


# ------------------------------------------------------------------------------------------ the metrics

def flip_class(old_correct: bool, new_correct: bool, same_prediction: bool) -> str:
    """``negative`` (old right, new wrong), ``positive``, ``both_right``, or for two wrong answers
    ``both_wrong_same`` / ``both_wrong_different`` (an inconsistent flip)."""
    if old_correct:
        return "both_right" if new_correct else "negative"
    if new_correct:
        return "positive"
    return "both_wrong_same" if same_prediction else "both_wrong_different"


def flip_metrics(classes: Sequence[str]) -> dict[str, Any]:
    """Accuracies, flip counts and rates (each over all N examples) from per-example :func:`flip_class` results."""
    n = len(classes)
    if n == 0:
        raise LmadaptError("no examples to compare")
    count = Counter(classes)
    old_right, new_right = count["negative"] + count["both_right"], count["positive"] + count["both_right"]
    return {"n": n, "old_accuracy": old_right / n, "new_accuracy": new_right / n,
            "negative_flips": count["negative"], "positive_flips": count["positive"],
            "both_right": count["both_right"], "both_wrong": count["both_wrong_same"] + count["both_wrong_different"],
            "inconsistent_flips": count["both_wrong_different"],
            "nfr": count["negative"] / n, "pfr": count["positive"] / n,
            "inconsistent_flip_rate": count["both_wrong_different"] / n}


def score_change(old: float, new: float, tolerance: float) -> str:
    """``negative`` when ``new < old - tolerance``, ``positive`` when ``new > old + tolerance``, else ``same``."""
    if new < old - tolerance:
        return "negative"
    return "positive" if new > old + tolerance else "same"


def continuous_metrics(old: Sequence[float], new: Sequence[float], tolerance: float, name: str) -> dict[str, Any]:
    """Negative and positive flips of a continuous per-example metric (:func:`score_change`), their rates over
    all N, and the mean decrease ``m_old - m_new`` over the negative flips (null when there are none)."""
    n = len(old)
    changes = [score_change(o, m, tolerance) for o, m in zip(old, new)]
    drops = [o - m for o, m, c in zip(old, new, changes) if c == "negative"]
    rises = [m - o for o, m, c in zip(old, new, changes) if c == "positive"]
    return {"metric": name, "tolerance": tolerance, "n": n, "old_mean": sum(old) / n, "new_mean": sum(new) / n,
            "negative_flips": len(drops), "positive_flips": len(rises), "nfr": len(drops) / n, "pfr": len(rises) / n,
            "mean_decrease": sum(drops) / len(drops) if drops else None,
            "mean_increase": sum(rises) / len(rises) if rises else None}


@dataclass
class Comparison:
    """What :func:`compare_predictions` found: ``summary`` (the metrics, as ``compare.json`` holds them) and
    ``rows`` (one per example, with both predictions and its flip class, as ``flips.jsonl`` holds them)."""

    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(repr=False)
    path: Path | None = None  # the output folder of compare_models


def compare_predictions(old_rows: Sequence[dict[str, Any]], new_rows: Sequence[dict[str, Any]], *, task: str,
                        match: Match = "normalized", similarity: Similarity = "token_f1", threshold: float = 0.5,
                        tolerance: float = 0.0, metric: Literal["similarity", "gold_score"] | None = None,
                        old_name: str = "old", new_name: str = "new") -> Comparison:
    """Flips between two models' predictions of one task (see the module docstring; MUSCLE, arXiv:2407.09435).

    ``old_rows``/``new_rows``: rows as :func:`lmadapt.evaluation.evaluate` writes them (``id``, ``prediction``,
    ``gold``, ``correct``, ...), matched by ``id``; the result's rows follow the old rows' order. ``task``:
    ``classification``, ``multiple_choice`` or ``generation``. For generation, ``match`` re-judges both sides'
    correctness the same way whatever their files were evaluated with, ``similarity`` (``token_f1`` or
    ``rouge_l``) and ``threshold`` give the second judgement. ``metric``: the continuous per-example metric
    whose flips (beyond ``tolerance``) are also reported: ``similarity`` to the answer (generation's default),
    or ``gold_score``, the log-likelihood of the right answer (classification, multiple choice; off by
    default). ``old_name``/``new_name`` name the sides in errors (e.g. their files).
    """
    check_flip_task(task)
    _check_settings(task, match, similarity, threshold, tolerance, metric)
    for rows, name in ((old_rows, old_name), (new_rows, new_name)):
        check_prediction_rows(rows, task, name)
    pairs = match_by_id(old_rows, new_rows, old_name, new_name)
    generation = task == "generation"
    metric = metric or ("similarity" if generation else None)
    out_rows, summary = [], {"task": task, "n": len(pairs)}
    for old, new in pairs:
        row = {"id": old["id"], "gold": old["gold"], "old_prediction": old["prediction"],
               "new_prediction": new["prediction"]}
        if generation:
            row.update(_generation_row(old, new, match, similarity, threshold))
        else:
            row["same_prediction"] = old["prediction"] == new["prediction"]
            row.update(old_correct=bool(old["correct"]), new_correct=bool(new["correct"]),
                       flip=flip_class(bool(old["correct"]), bool(new["correct"]), row["same_prediction"]))
        if task == "multiple_choice":
            row["flip_per_token"] = flip_class(bool(old["correct_per_token"]), bool(new["correct_per_token"]),
                                               old["prediction_per_token"] == new["prediction_per_token"])
        if metric is not None:
            by_similarity = metric == "similarity"
            row["old_metric"] = row["old_similarity"] if by_similarity else float(old["gold_score"])
            row["new_metric"] = row["new_similarity"] if by_similarity else float(new["gold_score"])
            row["metric_flip"] = score_change(row["old_metric"], row["new_metric"], tolerance)
        out_rows.append(row)
    summary["flips"] = {"judged_by": f"match ({match})" if generation else "correct", **flip_metrics(
        [r["flip"] for r in out_rows])}
    if task == "multiple_choice":
        summary["flips_per_token"] = {"judged_by": "correct_per_token (mean log-likelihood per token)",
                                      **flip_metrics([r["flip_per_token"] for r in out_rows])}
    if generation:
        summary["flips_at_threshold"] = {"judged_by": f"{similarity} >= {threshold}", **flip_metrics(
            [r["flip_at_threshold"] for r in out_rows])}
    if metric is not None:
        name = f"{similarity} to the answer" if metric == "similarity" else "gold_score (log-likelihood of the answer)"
        summary["metric_flips"] = continuous_metrics([r["old_metric"] for r in out_rows],
                                                     [r["new_metric"] for r in out_rows], tolerance, name)
    summary["outputs"] = _output_agreement(out_rows, generation, similarity)
    return Comparison(summary, out_rows)


def _generation_row(old: dict[str, Any], new: dict[str, Any], match: Match, similarity: Similarity,
                    threshold: float) -> dict[str, Any]:
    """One generation example: correctness by ``match`` and by similarity >= threshold, the similarities."""
    answers = old["gold"] if isinstance(old["gold"], list) else [old["gold"]]
    a, b = str(old["prediction"]), str(new["prediction"])
    right = [any(answer_matches(p, g, match) for g in answers) for p in (a, b)]
    sims = [similarity_to_gold(p, answers, similarity) for p in (a, b)]
    same = answer_matches(a, b, match)
    return {"same_prediction": same, "old_correct": right[0], "new_correct": right[1],
            "flip": flip_class(right[0], right[1], same),
            "old_similarity": sims[0], "new_similarity": sims[1],
            "flip_at_threshold": flip_class(sims[0] >= threshold, sims[1] >= threshold, same),
            "output_similarity": SIMILARITIES[similarity](a, b)}


def _output_agreement(rows: list[dict[str, Any]], generation: bool, similarity: str) -> dict[str, Any]:
    """How alike the two models' outputs are, right or wrong: the share of equal predictions (for generation,
    equal under the ``match`` rule), and for generation the mean similarity of the old output to the new one."""
    n = len(rows)
    out: dict[str, Any] = {"same_prediction": sum(r["same_prediction"] for r in rows) / n}
    if generation:
        out[f"mean_{similarity}"] = sum(r["output_similarity"] for r in rows) / n
    return out


def flip_table(summary: dict[str, Any], *, markdown: bool = False) -> str:
    """A short table of a :class:`Comparison`'s ``summary``: one line per judgement of right and wrong (and one
    for the continuous metric) with both accuracies (means), the flips and their rates; then how alike the
    outputs are."""
    from lmadapt.evaluation.report import text_table

    header = ("flips", "judged by", "old", "new", "negative", "NFR", "positive", "PFR", "inconsistent", "mean drop")
    lines = []
    for view in ("flips", "flips_per_token", "flips_at_threshold", "metric_flips"):
        m = summary.get(view)
        if m is None:
            continue
        judged = m.get("judged_by") or f"{m['metric']}, tolerance {m['tolerance']:g}"
        old, new = (m["old_accuracy"], m["new_accuracy"]) if "old_accuracy" in m else (m["old_mean"], m["new_mean"])
        lines.append((view, judged, *(_cell(v) for v in (old, new, m["negative_flips"], m["nfr"], m["positive_flips"],
                                                         m["pfr"], m.get("inconsistent_flip_rate"),
                                                         m.get("mean_decrease")))))
    alike = ", ".join(f"{k} {_cell(v)}" for k, v in summary["outputs"].items())
    return text_table(header, lines, markdown) + f"\n{summary['n']} examples; old vs new outputs: {alike}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


# ------------------------------------------------------------------------------------------ input checks

def check_flip_task(task: str) -> None:
    """Raise unless ``task`` is a registered task with a right answer per example (unknown: "did you mean")."""
    get_task(task)
    if task not in FLIP_TASKS:
        raise LmadaptError(f"task {task!r} has no right or wrong answer per example, so nothing can flip; compare "
                           f"one of {', '.join(FLIP_TASKS)}")


def _check_settings(task: str, match: str, similarity: str, threshold: float, tolerance: float,
                    metric: str | None) -> None:
    problems = []
    if match not in ("exact", "normalized"):
        problems.append(f"match: 'exact' or 'normalized', got {match!r}")
    if similarity not in SIMILARITIES:
        problems.append(f"similarity: one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    if not 0 <= threshold <= 1:
        problems.append(f"threshold: a similarity in [0, 1], got {threshold}")
    if tolerance < 0:
        problems.append(f"tolerance: must be >= 0, got {tolerance}")
    wanted = {"generation": "similarity"}.get(task, "gold_score")
    if metric is not None and metric != wanted:
        problems.append(f"metric: task {task!r} takes metric {wanted!r} (or none), got {metric!r}")
    if problems:
        raise LmadaptError("; ".join(problems))


def predictions_task(row: dict[str, Any]) -> str:
    """Which task wrote a prediction row, from the keys only that task writes (docs/evaluation.md)."""
    if "prediction_per_token" in row:
        return "multiple_choice"
    if isinstance(row.get("scores"), dict):
        return "classification"
    if "tokens" in row:
        return "perplexity or completion_loss"
    return "generation"


def check_prediction_rows(rows: Sequence[dict[str, Any]], task: str, source: str) -> None:
    """Raise naming ``source`` (a file, or a side) for rows that are not ``task``'s predictions, miss a key, or
    repeat an id."""
    if not rows:
        raise LmadaptError(f"{source}: no prediction rows; evaluate the model again with --predictions")
    problems, seen = [], set()
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            problems.append(f"row {i}: expected a JSON object, got {row!r:.60}")
            continue
        missing = [k for k in REQUIRED_KEYS + _task_keys(task) if k not in row]
        example_id = row.get("id")
        if missing:
            problems.append(f"row {i}: missing {', '.join(missing)}")
        elif isinstance(example_id, bool) or not isinstance(example_id, (str, int)):
            problems.append(f"row {i}: id {example_id!r:.60} is not a string or an integer")
        elif example_id in seen:
            problems.append(f"row {i}: id {example_id!r} repeats an earlier row's")
        else:
            seen.add(example_id)
    if problems:
        raise LmadaptError(f"{source} is not a predictions file of task {task!r}: " + "; ".join(problems[:5]) +
                           (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "") +
                           ". Give the file `lmadapt eval --predictions` wrote for that task.")
    found = predictions_task(rows[0])
    if found != task:
        raise LmadaptError(f"{source} holds predictions of task {found!r} (from its keys), not of {task!r}; compare "
                           f"predictions of the same task, or evaluate the model again with --task {task}")


def _task_keys(task: str) -> tuple[str, ...]:
    return {"multiple_choice": ("correct_per_token", "prediction_per_token", "gold_score"),
            "classification": ("gold_score",)}.get(task, ())


def match_by_id(old_rows: Sequence[dict[str, Any]], new_rows: Sequence[dict[str, Any]], old_name: str = "old",
                new_name: str = "new") -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(old row, new row) pairs by ``id``, in the old rows' order; the id sets and each pair's ``gold`` must agree."""
    new_by_id = {row["id"]: row for row in new_rows}
    old_ids = [row["id"] for row in old_rows]
    only_old = [i for i in old_ids if i not in new_by_id]
    only_new = [i for i in new_by_id if i not in set(old_ids)]
    if only_old or only_new:
        raise LmadaptError(
            f"{old_name} and {new_name} do not hold the same examples: {_some(only_old)} only in {old_name}, "
            f"{_some(only_new)} only in {new_name}. An id is the data row's 'id' field, or its file:line when it "
            f"has none: evaluate both sides on the same data file (and the same max_examples), or give the rows ids")
    pairs = [(row, new_by_id[row["id"]]) for row in old_rows]
    differ = [old["id"] for old, new in pairs if old["gold"] != new["gold"]]
    if differ:
        raise LmadaptError(f"{old_name} and {new_name} give different answers (gold) for {_some(differ)}: they were "
                           f"evaluated on different data or with different settings (labels); evaluate both again "
                           f"on the same data")
    return pairs


def _some(ids: Sequence[Any], shown: int = 3) -> str:
    if not ids:
        return "no ids"
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return f"{len(ids)} id(s) ({', '.join(repr(i) for i in ids[:shown])}{more})"


# ------------------------------------------------------------------------------------------ models

@dataclass(frozen=True)
class Side:
    """One side of a comparison as given on the command line: a predictions file, a model, or an adapter."""

    given: str  # as the user wrote it
    kind: Literal["predictions", "model", "adapter"]
    model: str | None = None  # the base to load an adapter on (None: the one it records); the model itself

    def record(self) -> dict[str, Any]:
        """What compare.json says about this side."""
        out: dict[str, Any] = {"kind": self.kind, "given": self.given}
        if self.kind == "adapter":
            out.update(adapter=str(Path(self.given).resolve()), model=self.model)
        elif self.kind == "model":
            out["model"] = self.model
        return out


def resolve_side(given: str | Path, base: str | None, what: str) -> Side:
    """What ``given`` is: an existing file (predictions JSONL), an adapter folder (``adapter_config.json``; loaded
    on ``base``, else on the base it records), a model folder or a built-in model name. ``what`` names the
    argument in errors (``OLD``)."""
    from lmadapt.adapters.format import CONFIG_NAME
    from lmadapt.models.builtins import BUILTINS, find_builtin

    text, path = str(given), Path(given).expanduser()
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return Side(text, "adapter", base)
    if base is not None:
        raise LmadaptError(f"{what} {text!r} is not an adapter folder, so there is no base model to give for it; "
                           f"leave out its --{what.lower()}-model")
    if path.is_file():
        return Side(text, "predictions")
    if path.is_dir() or find_builtin(text):
        return Side(text, "model", text)
    raise LmadaptError(f"{what} {text!r} is neither a predictions file, an adapter folder, a model folder nor a "
                       f"built-in model ({', '.join(BUILTINS)})")


def compare_models(old: str | Path, new: str | Path, settings: dict[str, Any], output_dir: str | Path, *,
                   old_model: str | None = None, new_model: str | None = None, dtype: str | None = None,
                   device: str | None = None, force: bool = False, overwrite: bool = False,
                   similarity: Similarity = "token_f1", threshold: float = 0.5, tolerance: float = 0.0,
                   metric: Literal["similarity", "gold_score"] | None = None, threads: int | None = 0,
                   progress: bool | None = None) -> Comparison:
    """Evaluate (or read) the old and the new side on one task and compare them (:func:`compare_predictions`).

    ``old``/``new``: a predictions JSONL file (not run), an adapter folder (on ``old_model``/``new_model``, else
    the base it records), a model folder or a built-in name. ``settings``: the evaluation settings as
    :func:`lmadapt.api.evaluate_model` takes them (``task``, ``data``, ...; ``chat`` left out: as each adapter was
    trained); ``settings["match"]`` also re-judges generation answers. Writes, atomically, ``output_dir`` with
    ``compare.json`` (the summary and what was compared), ``flips.jsonl`` and each side's predictions
    (``old_predictions.jsonl``, ``new_predictions.jsonl``); an existing folder is refused unless ``overwrite``.
    """
    from lmadapt.fsutil import atomic_dir, atomic_write_json

    task = settings.get("task")
    check_flip_task(str(task))
    sides = {"old": resolve_side(old, old_model, "OLD"), "new": resolve_side(new, new_model, "NEW")}
    if any(s.kind != "predictions" for s in sides.values()) and not settings.get("data"):
        raise LmadaptError("a side is a model to evaluate: give the evaluation data (--data, settings['data'])")
    match = settings.get("match") or "normalized"
    _check_settings(str(task), match, similarity, threshold, tolerance, metric)
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        rows, evals = {}, {}
        for name, side in sides.items():
            rows[name], evals[name] = _side_rows(side, settings, tmp / f"{name}_predictions.jsonl", dtype=dtype,
                                                 device=device, force=force, threads=threads, progress=progress)
        result = compare_predictions(rows["old"], rows["new"], task=str(task), match=match, similarity=similarity,
                                     threshold=threshold, tolerance=tolerance, metric=metric,
                                     old_name=_side_name(sides["old"], "OLD"), new_name=_side_name(sides["new"], "NEW"))
        result.summary = {**result.summary,
                          **{name: {**side.record(), "eval": evals[name]} for name, side in sides.items()},
                          "settings": {k: v for k, v in settings.items() if v is not None}}
        atomic_write_json(tmp / "compare.json", result.summary)
        write_predictions(tmp / "flips.jsonl", result.rows)
    result.path = Path(output_dir)
    return result


def _side_name(side: Side, what: str) -> str:
    return f"{what} ({side.given})"


def _side_rows(side: Side, settings: dict[str, Any], path: Path, **load: Any) -> tuple[list[dict[str, Any]],
                                                                                      dict[str, Any] | None]:
    """(the side's prediction rows, written to ``path``; its evaluation metrics, None for a predictions file)."""
    from lmadapt.api import evaluate_model

    if side.kind == "predictions":
        rows = read_predictions(side.given)
        check_prediction_rows(rows, settings["task"], side.given)
        write_predictions(path, rows)
        return rows, None
    adapter = side.given if side.kind == "adapter" else None
    metrics, _ = evaluate_model(side.model, dict(settings), adapter, predictions=path, **load)
    metrics.pop("samples", None)
    return read_predictions(path), json.loads(json.dumps(metrics, default=str))
