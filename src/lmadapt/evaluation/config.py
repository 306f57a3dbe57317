"""What one evaluation is: the ``evals:`` entry of a run config and the CLI's eval flags.

In a run, an entry also says what it measures (``role``: the target domain, or a retention set that shows
forgetting) and how often it runs during training (``every``); :func:`eval_names` names the run's entries
in ``metrics.jsonl``, the report and the ``evals.png`` plot.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmadapt.config import option
from lmadapt.evaluation.registry import get_task, unknown_task_problem

RUN_SETTINGS = ("name", "role", "every")
"""Settings of a run's ``evals:`` entry that every task takes: they say how the run uses the result."""


@dataclass
class EvalConfig:
    task: str = option(help="The task's name: one of the registered tasks (lmadapt.evaluation.available_tasks(); "
                            "docs/evaluation.md lists them).")
    data: list[str] = option(help="Evaluation files or globs (JSONL, JSON, CSV, Parquet).")
    text_field: str = option("text", "perplexity: the field holding the text.")
    prompt_field: str = option("prompt", "Every task but perplexity: the prompt field (also of training-format "
                                         "prompt/completion rows).")
    answer_field: str = option("answer", "generation: expected answer (string or list of accepted strings); "
                                         "multiple_choice: index (0-based) or text of the right choice.")
    choices_field: str = option("choices", "multiple_choice: the field holding the list of choices.")
    label_field: str = option("label", "classification: the field holding the gold label.")
    tokens_field: str = option("tokens", "tagging: the field holding the list of words.")
    tags_field: str = option("tags", "tagging: the field holding the gold BIO tags, one per word.")
    completion_field: str = option("completion", "Training-format prompt/completion rows (generation, "
                                                 "classification, completion_loss): the completion field.")
    chosen_field: str = option("chosen", "preference: the preferred response (a string, or TRL's list of messages).")
    rejected_field: str = option("rejected", "preference: the dispreferred response (a string, or TRL's list of "
                                             "messages).")
    instruction_field: str = option("instruction", "Training-format instruction rows: the instruction field.")
    input_field: str = option("input", "Training-format instruction rows: the optional input field.")
    output_field: str = option("output", "Training-format instruction rows: the response field.")
    messages_field: str = option("messages", "Training-format chat rows: the list of {role, content} turns.")
    labels: list[str] = option([], "classification: candidate labels, scored as written (e.g. ' sport'); "
                                   "empty: the sorted set of labels in every row of the data files.")
    chat: bool = option(False, "Render prompts with the tokenizer's chat template, as training's "
                               "data.use_chat_template (not read by perplexity).")
    system_prompt: str | None = option(None, "System message put before each prompt; needs chat: true.")
    match: Literal["exact", "normalized"] = option(
        "normalized", "generation: exact (after stripping whitespace) or normalized (lowercase, no punctuation, "
                      "articles or extra spaces, as in SQuAD) comparison.")
    max_new_tokens: int = option(16, "generation: tokens to generate per prompt.")
    max_length: int = option(1024, "perplexity: window length in tokens, longer texts are split; "
                                   "completion_loss and preference: tokens per sequence, longer ones are cut on "
                                   "the right.")
    batch_size: int = option(4, "Sequences per forward pass (perplexity windows, generation prompts, "
                                "completion_loss examples, preference sequences).")
    beta: float = option(0.1, "preference: beta of the DPO reward beta * (log pi - log pi_ref), pi_ref the model "
                              "with its adapters off (0.1: DPO's default).")
    max_examples: int | None = option(None, "Evaluate only the first N examples (null: all).")
    name: str | None = option(None, "In a run: what metrics.jsonl (eval/<name>/<metric>), the report and "
                                    "evals.png call this evaluation; null: its first data file's name without "
                                    "the extension (e.g. en_heldout).")
    role: Literal["target", "retention"] = option(
        "target", "In a run: target (the domain trained for) or retention (what the model should keep, e.g. "
                  "general text: a worse value after training is forgetting). The report lists the two apart.")
    every: int = option(0, "In a run: also evaluate every N optimizer steps during training (0: only before "
                           "and after); the values go to metrics.jsonl and the curves to evals.png.")

    def field_name(self, key: str) -> str:
        """The data's name for the task field ``key``: the ``<key>_field`` setting, or ``key`` itself."""
        return getattr(self, f"{key}_field", key)

    def check(self) -> list[str]:
        """Every problem: an unknown task, a bad value, a setting the task does not read."""
        problems = []
        unknown = unknown_task_problem(self.task)
        if unknown:
            problems.append(unknown)
        else:
            problems += self._unread_settings()
        if not self.data:
            problems.append("data: give at least one file or glob")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.beta <= 0:
            problems.append(f"beta: must be > 0, got {self.beta}")
        if self.max_length < 2:
            problems.append(f"max_length: must be >= 2, got {self.max_length}")
        if self.max_examples is not None and self.max_examples < 1:
            problems.append(f"max_examples: must be >= 1 or null, got {self.max_examples}")
        if self.every < 0:
            problems.append(f"every: must be >= 0 (0: only before and after training), got {self.every}")
        if self.name is not None and not re.fullmatch(r"[^/\s]+", self.name):
            problems.append(f"name: {self.name!r} must be non-empty, without '/' or spaces (it is part of the "
                            f"metrics.jsonl key eval/<name>/<metric>)")
        if self.labels and len(set(self.labels)) != len(self.labels):
            problems.append(f"labels: duplicates in {self.labels}")
        unread = any(p.startswith("system_prompt:") for p in problems)  # said already
        if self.system_prompt and not self.chat and not unread:
            problems.append("system_prompt: only used with chat: true (a system turn needs the chat template)")
        return problems

    def _unread_settings(self) -> list[str]:
        """A problem for each setting changed from its default that the task never reads (it would do nothing)."""
        task = get_task(self.task)
        reads = task.settings()
        unknown = sorted(set(task.reads) - {f.name for f in dataclasses.fields(self)})
        problems = [f"task: {self.task!r} reads settings EvalConfig does not have: {unknown} (a defect of that "
                    f"task's file)"] if unknown else []
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name not in reads and f.name not in RUN_SETTINGS and getattr(self, f.name) != default:
                problems.append(f"{f.name}: task {self.task!r} does not read this setting; remove it "
                                f"(the task reads: {', '.join(sorted(reads))})")
        return problems


def eval_names(evals: list[EvalConfig]) -> list[str]:
    """The name of each of a run's evaluations: its ``name``, else its first data file's stem (``data/en.txt`` ->
    ``en``; the task for a glob), else, when two would share one, the stem and the task (``val-classification``),
    else those and the position (``val-perplexity-2``)."""
    def stem(e: EvalConfig) -> str:
        first = Path(e.data[0]).stem if e.data else ""
        return first if first and not re.search(r"[*?\[\]/\s]", first) else e.task
    names = [e.name or stem(e) for e in evals]
    for suffix in (lambda i, e: f"-{e.task}", lambda i, e: f"-{i}"):
        names = [f"{n}{suffix(i, e)}" if e.name is None and names.count(n) > 1 else n
                 for i, (n, e) in enumerate(zip(names, evals))]
    return names


def duplicate_name_problems(evals: list[EvalConfig]) -> list[str]:
    """A problem for each ``name`` given to an earlier one of a run's evaluations too."""
    first: dict[str, int] = {}
    problems = []
    for i, e in enumerate(evals):
        if e.name is None:
            continue
        if e.name in first:
            problems.append(f"evals[{i}].name: {e.name!r} is also the name of evals[{first[e.name]}]; give each "
                            f"evaluation its own name")
        first.setdefault(e.name, i)
    return problems
