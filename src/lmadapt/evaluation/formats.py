"""Evaluation rows from files in lmadapt's training formats: prompt/completion, instruction and chat rows.

A task that sets :attr:`~lmadapt.evaluation.registry.EvalTask.completion` (generation, classification,
completion_loss) reads them. When the first row lacks the task's own fields, the format is detected from
its keys as training detects it (:func:`lmadapt.data.detect_format`), and every row is turned into an
example by training's own code (:func:`lmadapt.data.build_examples`, with ``use_chat_template`` = the
eval's ``chat`` and its ``system_prompt``), so prompts are rendered the way training rendered them:

- a prompt/completion or instruction row without ``chat``: ``prompt`` is the text training put before the
  completion (the prompt as written; the Alpaca-style headers of instruction rows), the gold is the
  completion (the ``output``);
- with ``chat``, and always for chat rows: ``prompt`` is the conversation up to the last assistant turn
  (system turn included), rendered by the chat template with the assistant's turn opened; the gold is the
  last assistant turn's text. Turns after it are not read. A conversation without a system turn gets
  ``system_prompt`` first when one is set (:func:`lmadapt.decoding.generation.prompt_messages`; training
  refuses ``data.system_prompt`` for chat rows, so there it never applies).
"""

from __future__ import annotations

from typing import Any

from lmadapt.data.config import DataConfig
from lmadapt.data.formats import Example as TrainingExample
from lmadapt.data.formats import build_examples, detect_format
from lmadapt.data.readers import Record
from lmadapt.evaluation.config import EvalConfig
from lmadapt.evaluation.registry import EvalTask

TRAINING_FORMATS = ("prompt_completion", "instruction", "chat")


def training_data_config(cfg: EvalConfig) -> DataConfig:
    """The ``data:`` settings that read an eval's files as training read its own."""
    return DataConfig(prompt_field=cfg.prompt_field, completion_field=cfg.completion_field,
                      instruction_field=cfg.instruction_field, input_field=cfg.input_field,
                      output_field=cfg.output_field, messages_field=cfg.messages_field,
                      use_chat_template=cfg.chat, system_prompt=cfg.system_prompt)


def training_format(records: list[Record], cfg: EvalConfig, task: EvalTask) -> str | None:
    """The training format of the files, or None when they are read in the task's own format: the task reads
    no training format, the first row has every one of the task's fields, or no training format fits."""
    if task.completion is None or not records:
        return None
    if all(cfg.field_name(key) in records[0].data for key in task.fields):
        return None
    fmt = detect_format(records[:1], training_data_config(cfg))
    return fmt if fmt in TRAINING_FORMATS else None


def training_row(record: Record, fmt: str, cfg: EvalConfig, task: EvalTask) -> tuple[dict[str, Any] | None, list[str]]:
    """(the task's fields of one training-format row, or None; its problems, each naming file, line and field)."""
    examples, problems = build_examples([record], fmt, training_data_config(cfg))
    if problems:
        return None, problems
    prompt, gold = split_example(examples[0])
    if not isinstance(gold, str):
        return None, [f"{record.source}: field '{cfg.messages_field}': the last assistant turn has no text "
                      f"(only tool calls), so there is nothing to compare with"]
    assert task.completion is not None
    return {"prompt": prompt, task.completion: gold}, []


def split_example(example: TrainingExample) -> tuple[str | list[dict[str, Any]], Any]:
    """(prompt, completion) of a training example: the untrained text and the trained one, or the turns
    before the last assistant turn and that turn's content."""
    if example.messages:
        turns = list(example.messages)
        last = max(i for i, turn in enumerate(turns) if turn.get("role") == "assistant")
        return [dict(turn) for turn in turns[:last]], turns[last].get("content")
    (prompt, _), (completion, _) = example.segments
    return prompt, completion
