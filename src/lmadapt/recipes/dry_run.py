"""``lmadapt train --dry-run`` (:func:`dry_run`, also :func:`lmadapt.preview`): check a run without training it.

Everything :func:`lmadapt.recipes.finetune.train` checks before it writes is checked here the same way, and
nothing is written: the config, the output folder (or, with ``resume``, the run it would continue), the
model and tokenizer, the method's ``prepare`` and ``apply`` (which fails when no module matches its targets;
skipped for methods that calibrate on data first), the training and validation data, every evaluation's
files and the ``init_adapter`` folder. Teachers and other models an objective loads in ``setup`` are not
loaded. What comes back shows the first training examples as the loop will see them: their text, decoded
token by token, with the tokens that carry loss between :data:`LOSS_START` and :data:`LOSS_END` (as axolotl's
``preprocess --debug`` shows them), and the data summary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmadapt.data import DataReport, load_splits
from lmadapt.data.dataset import load_replay
from lmadapt.data.tokens import IGNORE, chosen_template, set_chat_template, uses_chat
from lmadapt.errors import LmadaptError
from lmadapt.methods import build_method
from lmadapt.models.fingerprint import fingerprint
from lmadapt.models.loading import load_model
from lmadapt.models.tree import count_parameters
from lmadapt.objectives.base import build_objective
from lmadapt.recipes.finetune import (
    RunConfig,
    check_eval_data,
    load_run_config,
    read_init_adapter,
    training_model_config,
)
from lmadapt.training.run import Run

LOSS_START, LOSS_END = "⟦", "⟧"  # around the tokens that carry loss in RenderedExample.marked()


@dataclass
class RenderedExample:
    """One training example as the loop sees it: token ids, labels (-100: no loss) and the decoded pieces."""

    source: str  # file:line of the row it came from
    input_ids: list[int]
    labels: list[int]
    pieces: list[tuple[str, bool]] = field(default_factory=list)  # consecutive tokens decoded, and whether they
    # carry loss; "".join of the texts is the whole example

    @property
    def loss_tokens(self) -> int:
        """How many tokens carry loss."""
        return sum(label != IGNORE for label in self.labels)

    def marked(self, start: str = LOSS_START, end: str = LOSS_END) -> str:
        """The example's text with each run of loss-carrying tokens between ``start`` and ``end``."""
        return "".join(f"{start}{text}{end}" if trained else text for text, trained in self.pieces)


@dataclass
class Preview:
    """What :func:`dry_run` found: the validated config, the first examples, the data summary, the method."""

    config: RunConfig
    examples: list[RenderedExample]
    data: DataReport
    method: str
    total_parameters: int
    trainable_parameters: int | None  # None: the method calibrates on data before it applies, so not counted
    chat_template: str | None  # the template conversations were rendered with (None: the data has none)

    def text(self) -> str:
        """The preview for people: each example, then the data, method and template, then what was written."""
        lines = []
        for i, ex in enumerate(self.examples, 1):
            header = (f"--- example {i} of {self.data.train_examples:,} ({ex.source}): {len(ex.input_ids)} tokens, "
                      f"{ex.loss_tokens} carry loss (between {LOSS_START} {LOSS_END})")
            lines += [header, ex.marked(), ""]
        lines.append(self.data.summary())
        if self.trainable_parameters is not None:
            share = 100 * self.trainable_parameters / max(self.total_parameters, 1)
            lines.append(f"method {self.method}: {self.trainable_parameters:,} trainable parameters of "
                         f"{self.total_parameters:,} ({share:.3f}%)")
        else:
            lines.append(f"method {self.method}: calibrates on the data before it applies; not applied here")
        if self.chat_template is not None:
            lines.append(f"chat template: {self.chat_template}")
        lines.append(f"dry run: everything checked, nothing written (output_dir {self.config.output_dir})")
        return "\n".join(lines)


def dry_run(config: str | Path | dict[str, Any] | RunConfig, overrides: Sequence[str] | dict[str, Any] = (),
            n: int = 3, *, resume: bool = False) -> Preview:
    """Check the run ``config`` (with ``key=value`` overrides) describes as training would, write nothing, and
    return the first ``n`` training examples rendered (see the module docstring)."""
    if n < 0:
        raise LmadaptError(f"n: the number of examples to show must be >= 0, got {n}")
    extra = overrides if isinstance(overrides, dict) else list(overrides)
    cfg = load_run_config(config, extra)
    run = Run.from_environment(cfg.output_dir, cfg.train, cfg.model.device, overwrite=cfg.overwrite, resume=resume,
                               config=cfg)  # the output folder (or the run to resume) is checked, not created
    cfg = dataclasses.replace(cfg, train=run.train)
    method, _ = build_method(cfg.method), build_objective(cfg.objective)
    model, tokenizer = load_model(dataclasses.replace(training_model_config(cfg, method), device=str(run.device)))
    base_fp = fingerprint(model)
    tokenizer = set_chat_template(method.prepare(model, tokenizer), cfg.data)
    train_set, _, report = load_splits(cfg.data, tokenizer)
    if cfg.data.replay.train:  # read and checked as training reads it
        load_replay(cfg.data, tokenizer)
    check_eval_data(cfg.evals)
    if cfg.init_adapter:
        read_init_adapter(cfg.init_adapter, method, model, base_fp)
    if cfg.train.lae_offline_init:
        read_init_adapter(cfg.train.lae_offline_init, method, model, base_fp, key="train.lae_offline_init")
    trainable = None
    if not method.calibration_batches:
        method.apply(model)
        trainable = count_parameters(model)[0]
    examples = [render_example(train_set.sources[i], train_set.input_ids[i], train_set.labels[i], tokenizer)
                for i in range(min(n, len(train_set)))]
    template = chosen_template(tokenizer, cfg.data).name if uses_chat(cfg.data, report.format) else None
    return Preview(cfg, examples, report, method.name, count_parameters(model)[1], trainable, template)


def render_example(source: str, input_ids: list[int], labels: list[int], tokenizer: Any) -> RenderedExample:
    """``input_ids`` decoded in runs of tokens that do or do not carry loss (special tokens shown)."""
    pieces: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            pieces.append((text, labels[start] != IGNORE))
            start = i
    return RenderedExample(source, list(input_ids), list(labels), pieces)
