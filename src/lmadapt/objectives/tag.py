"""Token classification (NER) on a decoder LM: a linear head on every token's final hidden state.

LS-LLaMA's token classifier (Li et al., "Label Supervised LLaMA Finetuning", arXiv:2310.01208; METHODS.md §16):
per token t, the final hidden state h_t (after the final norm), dropout (p = 0.1, in training only), the
bias-free ``score`` head of :mod:`lmadapt.objectives.heads`, and cross-entropy against the token's tag:

    z_t = W dropout(h_t)            loss = sum_{t labelled} CE(z_t, y_t)          count = labelled tokens

so the loop's loss is the mean over the step's labelled tokens. Labelled tokens (:mod:`lmadapt.data.tagging`):
each word's first sub-token, as transformers' token-classification examples align labels; with
``label_all_subtokens`` also its other sub-tokens, with the word's tag and B-X turned into I-X.

A causal model tags a token from its left context only: the first word of "New York" cannot know "York" follows.
``unmask_layers``/``unmask_last`` remove the causal mask in chosen layers (all: LS-unLLaMA; the last k: "Do Not
(Always) Look Right", Dukić & Šnajder, arXiv:2401.14556), pads still masked (:mod:`lmadapt.models.unmask`).

The tag set (``labels``) and the word separator come from the ``data:`` section when not given here (the tags
collected from the training rows when ``data.labels`` is empty); the adapter records both with the head
(``lmadapt_objective.score.weight``), so evaluation (task ``tagging``) reads words as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.data.tagging import tag_problem
from lmadapt.data.tokens import IGNORE
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import ParamGroup
from lmadapt.models.unmask import check_unmaskable
from lmadapt.objectives.base import LossOutput, Objective, register_objective
from lmadapt.objectives.causal_lm import forward_inputs
from lmadapt.objectives.heads import (
    HEAD,
    HeadOptions,
    attach_head,
    head_group,
    head_state,
    load_head_state,
)


@dataclass
class TagConfig(HeadOptions):  # + unmask_layers, unmask_last, head_lr_ratio (lmadapt.objectives.heads)
    labels: list[str] = option([], "The tag set in index order (O, B-<type>, I-<type>); empty: data.labels, or "
                                   "the tags collected from the training rows. The adapter records it.")
    label_all_subtokens: bool = option(False, "false: only the first sub-token of each word carries its tag (the "
                                              "transformers convention); true: every sub-token does, B- turned into "
                                              "I- after the first.")
    dropout: float = option(0.1, "Dropout on the hidden states before the head, in training (LS-LLaMA: 0.1).")
    word_separator: str | None = option(None, "What went between words when they were tokenized; null: "
                                              "data.word_separator. Recorded, so evaluation reads words the same way.")

    def check(self) -> list[str]:
        problems = []
        if len(set(self.labels)) != len(self.labels):
            problems.append(f"labels: names must be distinct, got {self.labels}")
        bad = [f"{tag!r}" for tag in self.labels if tag_problem(tag)]
        if bad:
            problems.append(f"labels: not BIO tags (O, B-<type>, I-<type>): {', '.join(bad)}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        return problems + self.head_problems()


@register_objective
class Tag(Objective):
    """A linear head on every token's hidden state, CE on the labelled tokens (see the module docstring).
    Rows: ``data.format: tagging``."""

    name = "tag"
    config_class = TagConfig
    data_format = "tagging"
    validation_metrics = ("accuracy",)  # per labelled token; a token-head loss has no perplexity

    def __init__(self, config: TagConfig) -> None:
        super().__init__(config)
        self.causal_attention = not config.unmasks  # an unmasked layer lets real tokens see pads: keep the mask

    def data_problems(self, report: Any, data: Any) -> list[str]:
        """Also settles the tag set (``report.tags``: ``data.labels``, or the tags the data layer collected from the
        training rows) and the word separator from the data when this config leaves them empty, and refuses lists
        or separators that differ from the data's: a row's tag becomes its index in the data's tag set."""
        problems = super().data_problems(report, data)
        if problems or data is None:
            return problems
        cfg = self.config
        given = list(report.tags)
        if cfg.labels and given != list(cfg.labels):
            where = "data.labels" if data.labels else "the tags of the training rows"
            problems.append(f"objective.labels {list(cfg.labels)} and {where} {given} differ; give the same list in "
                            "the same order (or leave objective.labels empty)")
        if cfg.word_separator is not None and cfg.word_separator != data.word_separator:
            problems.append(f"objective.word_separator {cfg.word_separator!r} and data.word_separator "
                            f"{data.word_separator!r} differ; leave objective.word_separator null")
        if len(given) < 2:
            problems.append(f"data.labels: the tag set {given} has no entity type; tag some words B-<type>")
        if not problems:
            cfg.labels, cfg.word_separator = given, data.word_separator
        return problems

    def attach(self, model: nn.Module) -> None:
        if not self.config.labels:
            raise LmadaptError("objective tag has no tag set: give objective.labels (or data.labels), or train "
                               "through lmadapt.train, which takes it from the data")
        head = attach_head(model, len(self.config.labels), self.config, self.name)
        head.tag_config = self.config  # what evaluation needs (tag names, word separator)

    def setup(self, model: nn.Module, tokenizer: Any, device: torch.device) -> None:
        self.attach(model)
        getattr(model, HEAD).requires_grad_(True)

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, L) the tag index each token is trained on, -100 where none."""
        if not batch.get("token_labels"):
            raise LmadaptError("objective tag needs a tag per token: set data.format: tagging (rows with "
                               "data.tokens_field and data.tags_field)")
        labels = batch["labels"]
        if self.config.label_all_subtokens:
            later = batch["later_labels"]
            labels = torch.where(labels != IGNORE, labels, later.to(labels.device))
        return labels

    def count(self, batch: dict[str, Any]) -> int:
        return int((self.targets(batch) != IGNORE).sum())

    def hidden_states(self, model: nn.Module, batch: dict[str, Any], *,
                      drop_padding_mask: bool = False) -> torch.Tensor:
        """(B, L, d) final hidden states of ``batch`` (the model as attached: unmasked layers included)."""
        if self.config.unmasks:
            check_unmaskable(batch)
        return model.base_model(**forward_inputs(batch, drop_padding_mask), use_cache=False).last_hidden_state

    def token_logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(B, L, C) fp32 logits at every position (no dropout: for prediction)."""
        return getattr(model, HEAD)(self.hidden_states(model, batch))

    def loss(self, model: nn.Module, batch: dict[str, Any], *, drop_padding_mask: bool = False) -> LossOutput:
        targets = self.targets(batch)
        hidden = self.hidden_states(model, batch, drop_padding_mask=drop_padding_mask)
        where = (targets != IGNORE).to(hidden.device)
        y = targets.to(hidden.device)[where]
        if y.numel() and int(y.max()) >= len(self.config.labels):
            raise LmadaptError(f"objective tag: a token has tag index {int(y.max())}, but the head has "
                               f"{len(self.config.labels)} tags (objective.labels); give the same list as data.labels")
        h = F.dropout(hidden[where], self.config.dropout, training=model.training)
        logits = getattr(model, HEAD)(h)
        loss = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(-1) == y).sum().detach().float()
        # no .logits: methods that regularise vocabulary logits (BA-LoRA) find none and say so
        return LossOutput(loss, int(y.numel()), SimpleNamespace(tag_logits=logits), {"accuracy": float(correct)})

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        return [head_group(model, "tag_head", self.config.head_lr_ratio)]

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return head_state(model)

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_head_state(model, state)


__all__ = ["Tag", "TagConfig"]
