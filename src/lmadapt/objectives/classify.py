"""Sequence classification and regression heads on a decoder LM (LS-LLaMA, LS-unLLaMA).

Li et al., "Label Supervised LLaMA Finetuning" (arXiv:2310.01208): the LM head is set aside and a linear head
``score = Linear(d, C, bias=False)`` reads a pooled final hidden state h (after the final norm):

    last:  h = H[b, i_b],  i_b = the last non-pad position of row b (right or left padding)
    mean:  h = sum_t m[b, t] H[b, t] / sum_t m[b, t]             (m: 1 on real tokens, 0 on pads)
    max:   z_c = max_{t: m[b, t] = 1} (H[b, t] W^T)_c            (LS-unLLaMA's max over per-position logits)
    z = W h                                                      (C logits)

LS-unLLaMA applies ``score`` to every position and pools the logits; since the head is linear and bias-free,
mean- or last-pooling the logits equals the head applied to the mean- or last-pooled hidden state, which is what
is computed (one (B, d) x (d, C) product instead of (B, L, d) x (d, C)). ``max`` is not linear, so it pools the
per-position logits. The official LS-unLLaMA replaces the 4-D mask by zeros and so also averages pads; here pads
stay masked (METHODS.md §16).

Per sequence, summed over the batch (the loop divides by the step's number of sequences):

    single_label: CE(z, y)                            y a class index
    multi_label:  (1/C) sum_c BCE-with-logits(z_c, y_c)   y multi-hot (the mean over labels, as transformers)
    regression:   (z - y)^2                           C = 1

``unmask_layers``/``unmask_last`` remove the causal mask in chosen decoder layers (all: LS-unLLaMA; the last k:
"Do Not (Always) Look Right", Dukić & Šnajder, arXiv:2401.14556), padding still masked: see
:mod:`lmadapt.models.unmask`. The head (``model.score``, the name transformers' ``*ForSequenceClassification``
uses) is saved with the adapter under ``lmadapt_objective.score.weight`` and comes back when it is loaded, with
the unmasking; loading also needs no data: the record holds this objective's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmadapt.config import option
from lmadapt.data.tokens import IGNORE
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import ParamGroup
from lmadapt.models.unmask import check_unmaskable
from lmadapt.objectives.base import LossOutput, Objective, register_objective
from lmadapt.objectives.causal_lm import forward_inputs
from lmadapt.objectives.heads import (
    HEAD,
    HeadOptions,
    ScoreHead,
    attach_head,
    head_group,
    head_state,
    load_head_state,
)

Problem = Literal["single_label", "multi_label", "regression"]
Pooling = Literal["last", "mean", "max"]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token (``mask`` (B, L), 1 on real tokens): the position before the
    first pad with right padding (L - 1 without padding), L - 1 with left padding."""
    length = mask.shape[-1]
    return length - 1 - mask.flip(-1).long().argmax(-1)


def pooled_logits(head: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, C) logits of (B, L, d) ``hidden`` under padding ``mask`` (B, L); see the module docstring."""
    m = mask.to(hidden.device).bool()
    if pooling == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return head(hidden[rows, last_token_index(m)])
    if pooling == "mean":
        w = m.unsqueeze(-1).float()
        return head((hidden.float() * w).sum(1) / w.sum(1).clamp_min(1.0))
    if pooling == "max":
        return head(hidden).masked_fill(~m.unsqueeze(-1), float("-inf")).amax(1)
    raise ValueError(f"pooling must be last, mean or max, got {pooling!r}")


def classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                        problem: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss summed over the B sequences, detached metric sums) for (B, C) ``logits``; ``labels`` as
    :func:`lmadapt.data.batching.sequence_labels` collates them (multi-label: (B, K) class indices, -100 after
    each row's own)."""
    logits = logits.float()
    labels = labels.to(logits.device)
    if problem == "single_label":
        y = labels.long()
        correct = (logits.argmax(-1) == y).sum()
        return F.cross_entropy(logits, y, reduction="sum"), {"accuracy": correct.detach().float()}
    if problem == "multi_label":
        y = multi_hot(labels, logits.shape[-1])
        loss = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / logits.shape[-1]
        agree = ((logits > 0).float() == y).float().mean(-1).sum()
        exact = ((logits > 0).float() == y).all(-1).sum()
        return loss, {"label_accuracy": agree.detach(), "exact_match": exact.detach().float()}
    if problem == "regression":
        err = logits.squeeze(-1) - labels.float()
        return (err ** 2).sum(), {"abs_error": err.abs().sum().detach()}
    raise ValueError(f"problem must be single_label, multi_label or regression, got {problem!r}")


# what classification_loss sums per problem, reported by validation as val_<key> per sequence
VALIDATION_METRICS = {"single_label": ("accuracy",), "multi_label": ("label_accuracy", "exact_match"),
                      "regression": ("abs_error",)}


def multi_hot(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(B, C) 0/1 float targets from (B, K) class indices (-100 ignored) or (B,) single indices."""
    idx = labels.long().reshape(labels.shape[0], -1)
    keep = (idx != IGNORE).float()
    out = torch.zeros(idx.shape[0], num_labels, device=labels.device)
    return out.scatter_add_(1, idx.clamp_min(0), keep).clamp_max_(1.0)


@dataclass
class ClassifyConfig(HeadOptions):  # + unmask_layers, unmask_last, head_lr_ratio (lmadapt.objectives.heads)
    problem: Problem = option("single_label", "single_label: cross-entropy over the classes; multi_label: "
                                              "binary cross-entropy per class (rows give lists of labels); "
                                              "regression: squared error of one output (rows give numbers).")
    labels: list[str] = option([], "The class names in index order (the same list as data.labels); the adapter "
                                   "records them, so predictions and evaluations can name the classes.")
    num_labels: int = option(0, "Outputs of the head; 0: len(labels) (1 for regression). Give it when rows "
                                "label classes by index and no names are given.")
    pooling: Pooling = option("last", "last: the last real token's hidden state (LS-LLaMA); mean: the mean over "
                                      "the real tokens (LS-unLLaMA's default); max: the max of per-token logits.")

    @property
    def outputs(self) -> int:
        """The head's number of outputs."""
        if self.num_labels:
            return self.num_labels
        return 1 if self.problem == "regression" else len(self.labels)

    def check(self) -> list[str]:
        problems = []
        if len(set(self.labels)) != len(self.labels):
            problems.append(f"labels: names must be distinct, got {self.labels}")
        if self.num_labels < 0:
            problems.append(f"num_labels: must be >= 0, got {self.num_labels}")
        elif self.num_labels and self.labels and self.num_labels != len(self.labels):
            problems.append(f"num_labels: {self.num_labels}, but labels names {len(self.labels)} classes; give one "
                            f"of the two")
        if self.problem == "regression" and self.outputs != 1:
            problems.append(f"num_labels: regression has one output, got {self.outputs}")
        elif self.problem != "regression" and self.outputs < 2:
            problems.append(f"labels: {self.problem} needs at least 2 classes: list their names in labels "
                            f"(as in data.labels) or set num_labels")
        return problems + self.head_problems()


@register_objective
class Classify(Objective):
    """A linear head on the pooled final hidden state; CE, BCE or MSE per sequence (see the module docstring),
    normalised by the step's number of sequences. Rows: ``data.format: classification``."""

    name = "classify"
    config_class = ClassifyConfig
    data_format = "classification"

    def __init__(self, config: ClassifyConfig) -> None:
        super().__init__(config)
        # a bidirectional layer lets a real token see later pads: the loop must keep the padding mask
        self.causal_attention = not config.unmasks
        # validation: the loss per sequence and classification_loss's metric sums per sequence, no perplexity
        self.validation_metrics = VALIDATION_METRICS.get(config.problem, ())

    def data_problems(self, report: Any, data: Any) -> list[str]:
        """Also: ``data.labels`` (names to indices) and ``objective.labels`` (the head's classes, recorded in the
        adapter) must be one list in one order when both are given."""
        problems = super().data_problems(report, data)
        given = list(getattr(data, "labels", []) or [])
        if given and self.config.labels and given != list(self.config.labels):
            problems.append(f"objective.labels {list(self.config.labels)} and data.labels {given} differ; a row's "
                            "label becomes its index in data.labels and the head's outputs follow objective.labels, "
                            "so give the same list in the same order (a YAML anchor writes it once)")
        return problems

    def attach(self, model: nn.Module) -> None:
        head = attach_head(model, self.config.outputs, self.config, self.name)
        head.classify_config = self.config  # what evaluation needs to read the head (pooling, problem, class names)

    def setup(self, model: nn.Module, tokenizer: Any, device: torch.device) -> None:
        self.attach(model)
        getattr(model, HEAD).requires_grad_(True)

    def count(self, batch: dict[str, Any]) -> int:
        if not batch.get("sequence_labels"):
            raise LmadaptError("objective classify needs one label per sequence: set data.format: classification "
                               "(rows with data.text_field and data.label_field)")
        return int(batch["labels"].shape[0])

    def logits(self, model: nn.Module, batch: dict[str, Any], *, drop_padding_mask: bool = False) -> torch.Tensor:
        """(B, C) logits of the head on ``batch`` (input_ids and attention_mask); the model as attached."""
        if self.config.unmasks:
            check_unmaskable(batch)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        hidden = model.base_model(**forward_inputs(batch, drop_padding_mask), use_cache=False).last_hidden_state
        return pooled_logits(getattr(model, HEAD), hidden, mask, self.config.pooling)

    def loss(self, model: nn.Module, batch: dict[str, Any], *, drop_padding_mask: bool = False) -> LossOutput:
        n = self.count(batch)
        logits = self.logits(model, batch, drop_padding_mask=drop_padding_mask)
        self._check_labels(batch["labels"])
        loss, sums = classification_loss(logits, batch["labels"], self.config.problem)
        # no .logits: methods that regularise vocabulary logits (BA-LoRA) find none and say so
        return LossOutput(loss, n, SimpleNamespace(class_logits=logits), {k: float(v) for k, v in sums.items()})

    def _check_labels(self, labels: torch.Tensor) -> None:
        if self.config.problem == "regression":
            return
        real = labels[labels != IGNORE] if self.config.problem == "multi_label" else labels
        c = self.config.outputs
        if real.numel() and (bool((real < 0).any()) or bool((real >= c).any())):
            raise LmadaptError(f"objective classify: a row has class index {int(real.max())}, but the head has "
                               f"{c} outputs (objective.labels / num_labels); give objective.labels the same list "
                               f"as data.labels")
        if labels.is_floating_point() and bool((labels != labels.round()).any()):
            raise LmadaptError("objective classify: problem single_label, but some rows' labels are fractional "
                               "numbers; use problem: regression for them")

    def parameter_groups(self, model: nn.Module) -> list[ParamGroup]:
        return [head_group(model, "classify_head", self.config.head_lr_ratio)]

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return head_state(model)

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_head_state(model, state)


def predict(model: nn.Module, objective: Classify, batch: dict[str, Any]) -> torch.Tensor:
    """(B, C) logits, in eval mode and without gradients (the adapter's head and unmasking as attached)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return objective.logits(model, batch)
    finally:
        model.train(was)


def export_peft_classifier(adapter: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a LoRA adapter trained with objective ``classify`` in PEFT's sequence-classification form: the head as
    a ``modules_to_save`` module (``base_model.model.score.weight``, ``"modules_to_save": ["score"]``,
    ``"task_type": "SEQ_CLS"``), so that ``PeftModel.from_pretrained(AutoModelForSequenceClassification
    .from_pretrained(base, num_labels=C, pad_token_id=...), out)`` loads it.

    transformers' classifier pools the last token that is not the pad id and attends causally, so it reproduces
    this objective only with ``pooling: last`` and no unmasked layer (refused otherwise), and only when the
    model config's ``pad_token_id`` is the tokenizer's pad token and differs from EOS. The folder has no lmadapt
    record: lmadapt loads the original folder (which keeps the head under ``lmadapt_objective.score.weight``).
    """
    import json

    from safetensors.torch import save_file

    from lmadapt.adapters.format import (
        CONFIG_NAME,
        WEIGHTS_NAME,
        read_adapter_info,
        read_adapter_tensors,
        read_objective_tensors,
    )
    from lmadapt.fsutil import atomic_dir

    info = read_adapter_info(adapter)
    if info.config.get("peft_type") != "LORA" or not info.objective or info.objective.get("name") != Classify.name:
        raise LmadaptError(f"{adapter}: export_peft_classifier takes a LoRA adapter trained with objective classify")
    cfg = ClassifyConfig(**{k: v for k, v in info.objective.items() if k != "name"})
    if cfg.pooling != "last" or cfg.unmasks:
        raise LmadaptError(f"{adapter}: trained with pooling {cfg.pooling!r} and unmasked layers "
                           f"{cfg.unmask_layers!r}/{cfg.unmask_last}; transformers' sequence classifier pools the last "
                           f"token under a causal mask, so only pooling: last without unmasking exports")
    tensors = {**read_adapter_tensors(adapter),
               f"base_model.model.{HEAD}.weight": read_objective_tensors(adapter)[f"{HEAD}.weight"]}
    config = {**info.config, "task_type": "SEQ_CLS", "modules_to_save": [HEAD]}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(out)


__all__ = ["Classify", "ClassifyConfig", "ScoreHead", "classification_loss", "export_peft_classifier",
           "last_token_index", "multi_hot",
           "pooled_logits", "predict"]
