"""The serving engine's rows and what one step does to them: prefill the joiners, decode a token per row, pick it,
send its event, drop finished rows. Only the engine's worker thread calls into a :class:`Batcher`.

Rows are kept in *groups*, one forward per group per step: the base model's group (base rows, and LoRA rows routed
per row by :func:`lmadapt.adapters.pool.adapter_per_row`), one group per adapter served on a model copy of its own,
and one per proxy-tuned model (:class:`lmadapt.serving.engine_proxy.ProxyGroup`: three forwards per step, whose
log-probabilities it combines). A group prefills (:meth:`Group.prefill`) and steps (:meth:`Group.step`) its rows;
the batcher picks their tokens from what that returns.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.adapters.pool import adapter_names, adapter_per_row
from lmadapt.models.tree import model_device
from lmadapt.serving.batch_cache import BatchCache, model_forward, prefill
from lmadapt.serving.engine_requests import (
    FinishReason,
    GenerationRequest,
    RequestHandle,
    TokenEvent,
)
from lmadapt.serving.sampling import RowSampler, TextStream

log = logging.getLogger("lmadapt.serve")


@dataclass
class Row:
    """A request the engine holds: its handle, sampler, text and progress."""

    handle: RequestHandle
    sampler: RowSampler
    text: TextStream
    stops: frozenset[int]  # token ids that end it
    pending: int = -1  # the last token chosen: fed at the next decode step
    context: int | None = None  # prompt + new tokens its model holds (None: the batcher's)
    generated: int = 0
    done: bool = False

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


@dataclass
class Group:
    """Rows that decode in one forward: a model (the base, or an own-group adapter's copy) and its batch cache."""

    model: nn.Module
    rows: list[Row] = field(default_factory=list)
    batch: BatchCache = field(default_factory=BatchCache)
    forwards = 1  # forwards per step

    def adapters(self, rows: list[Row]) -> list[str | None]:
        """The adapter each of ``rows`` takes through the model (when it is the base model, routed per row)."""
        return [r.request.adapter for r in rows]

    def prefill(self, prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, BatchCache]:
        """(next-token logits (B, vocab), their cache) of ``prompts``, left-padded into one forward."""
        return prefill(self.model, prompts, pad_id, model_device(self.model))

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``ids`` (B, 1)); the next-token logits (B, vocab). The batch grows a column."""
        mask, positions = self.batch.step_inputs()
        logits, cache = model_forward(self.model, ids, mask, positions, self.batch.cache)
        self.batch.stepped(cache)
        return logits

    def clear(self) -> None:
        """No rows, an empty cache."""
        self.rows, self.batch = [], BatchCache()


class Batcher:
    """The running rows of every group, and the step's work on them.

    ``finished(row)`` is called once per request, after its last event was sent. ``counts`` counts steps, forwards
    and prefill forwards (the forwards per generated token show how well requests batch).
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, pad_id: int, context: int | None,
                 finished: Callable[[Row], None]) -> None:
        self.model, self.tokenizer, self.pad_id, self.context = model, tokenizer, pad_id, context
        self.finished = finished
        self.groups: dict[str | None, Any] = {None: Group(model)}  # a Group or a ProxyGroup
        self.routes = bool(adapter_names(model))  # the base model holds LoRA adapters: route its rows (set on changes)
        self.counts = {"steps": 0, "forwards": 0, "prefill_forwards": 0}

    def running(self) -> int:
        """Requests running in all groups (a row that sent its last event is not counted, though still held)."""
        return sum(not row.done for group in list(self.groups.values()) for row in list(group.rows))

    def join(self, key: str | None, rows: list[Row]) -> None:
        """Prefill ``rows`` (all of group ``key``) together, take their first tokens, add them to the group's batch."""
        group = self.groups[key]
        try:
            with self._routing(group, rows):
                logits, batch = group.prefill([list(r.request.prompt_ids) for r in rows], self.pad_id)
        except Exception as exc:
            log.exception("prefill failed")
            for row in rows:
                self.finish(row, TokenEvent(None, "", finish_reason="error", error=f"prefill failed: {exc}"))
            return
        self.counts["forwards"] += group.forwards
        self.counts["prefill_forwards"] += group.forwards
        for row, row_logits, best in zip(rows, logits, logits.argmax(-1).tolist()):
            self.take_token(row, row_logits, best)
        keep = [i for i, row in enumerate(rows) if not row.done]
        batch.keep(keep)
        group.batch.extend(batch)
        group.rows += [rows[i] for i in keep]

    def decode(self) -> None:
        """One token for every running row: one forward per group."""
        for group in list(self.groups.values()):
            if group.rows:
                self._decode(group)
        self.counts["steps"] += 1

    def _decode(self, group: Group) -> None:
        rows = group.rows
        ids = torch.tensor([[r.pending] for r in rows], device=model_device(group.model))
        try:
            with self._routing(group, rows):
                logits = group.step(ids)
        except Exception as exc:
            log.exception("decode step failed")
            self.fail(group, f"decoding failed: {exc}")
            return
        self.counts["forwards"] += group.forwards
        for row, row_logits, best in zip(rows, logits, logits.argmax(-1).tolist()):
            self.take_token(row, row_logits, best)
        self._drop_done(group)

    def _routing(self, group: Group, rows: list[Row]) -> Any:
        """Per-row adapters for a forward of the base model (when it holds LoRA adapters: base rows then need
        routing too, past whatever adapter is active)."""
        if group.model is self.model and self.routes:
            return adapter_per_row(self.model, group.adapters(rows))
        return contextlib.nullcontext()

    def take_token(self, row: Row, logits: torch.Tensor, argmax: int) -> None:
        """Choose ``row``'s next token from its ``logits`` (vocab,) and send its event (the last when it finishes)."""
        try:
            token = row.sampler.choose(logits, argmax)
            logprob, top = row.sampler.logprobs(logits, token, self.tokenizer)
            row.generated += 1
            prompt = len(row.request.prompt_ids)
            counts = {"prompt_tokens": prompt, "completion_tokens": row.generated}
            if token in row.stops:
                self.finish(row, TokenEvent(None, row.text.finish(), finish_reason="stop", **counts))
                return
            text = row.text.add(token)
            reason: FinishReason | None = "stop" if row.text.stopped else None
            context = row.context if row.context is not None else self.context
            full = context is not None and prompt + row.generated >= context  # no position left to feed it
            if reason is None and (row.generated >= row.request.params.max_tokens or full):
                reason, text = "length", text + row.text.finish()
            event = TokenEvent(token, text, logprob, top, reason, **counts)
            if reason is not None:
                self.finish(row, event)
            else:
                row.pending = token
                row.handle.put(event)
        except Exception as exc:
            log.exception("sampling failed")
            self.finish(row, TokenEvent(None, "", finish_reason="error", error=f"sampling failed: {exc}"))

    def finish(self, row: Row, event: TokenEvent) -> None:
        """Send ``row``'s last event (its counts filled in) and count it out; its batch row goes at the next drop."""
        if row.done:
            return
        row.done = True
        if event.prompt_tokens == 0:
            event = TokenEvent(event.token_id, event.text, event.logprob, event.top_logprobs, event.finish_reason,
                               event.error, len(row.request.prompt_ids), row.generated)
        row.handle.put(event)
        self.finished(row)

    def _drop_done(self, group: Group) -> None:
        keep = [i for i, row in enumerate(group.rows) if not row.done]
        group.batch.keep(keep)
        group.rows = [group.rows[i] for i in keep]

    def drop_cancelled(self) -> None:
        """Finish the rows whose requests were cancelled ("cancelled", with the text held back so far)."""
        for group in self.groups.values():
            for row in group.rows:
                if row.handle.cancelled:
                    self.finish(row, TokenEvent(None, row.text.finish(), finish_reason="cancelled"))
            self._drop_done(group)

    def fail(self, group: Group, why: str, reason: FinishReason = "error") -> None:
        """Finish every row of ``group`` with ``reason`` and start its batch afresh."""
        for row in group.rows:
            self.finish(row, TokenEvent(None, row.text.finish() if reason == "cancelled" else "",
                                        finish_reason=reason, error=why))
        group.clear()

    def fail_all(self, why: str, reason: FinishReason = "error") -> None:
        for group in self.groups.values():
            self.fail(group, why, reason)
