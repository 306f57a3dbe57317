"""Batches whose order is a pure function of (seed, epoch), so a resumed run sees exactly the same data.

A plan is a list of batches; a batch is a list of rows; a row is a list of example indices (one index
per row without packing). Three modes:

- packing: each epoch shuffles the examples, then packs them into rows of ``max_length`` tokens by
  best-fit decreasing (the row count depends only on the lengths, so every epoch has the same number
  of batches, as exact resumption needs), then shuffles the rows. Rows are padded to ``max_length``.
  ``position_ids`` restart at 0 for every example and no ``attention_mask`` is returned: transformers
  (``masking_utils.find_packed_sequence_indices``) then builds a block-diagonal causal mask from the
  position restarts, for sdpa, eager, flex and flash attention alike. That route needs the forward to
  run without a KV cache (``use_cache=False``): a cache disables it silently. The label of each
  example's first token is -100, so no example is trained to predict the next one.
- group_by_length: like transformers' ``LengthGroupedSampler``: shuffle, cut into mega-batches of
  50 x batch_size, sort each by length, cut into batches, shuffle the batch order. Right padding.
- plain: shuffled, padded to the longest in the batch.

Preference pairs (``dataset.paired``) are planned as units (a pair's length is its longer sequence), so a pair
is never split between batches or processes: a plan row is the pair (2k, 2k + 1), and :meth:`Batcher.collate`
makes it two rows, every chosen sequence first, then the rejected ones in the same order. They are not packed.

Tagging data (``dataset.tag_names``) are not packed either; their labels are tag indices per token, collated
as they are (no position is masked for a causal shift).
"""

from __future__ import annotations

import bisect
import random
from typing import Any

import torch

from lmadapt.data.tokens import IGNORE

Row = list[int]
Batch = list[Row]
MEGA_BATCH = 50


def pack_rows(order: list[int], lengths: list[int], max_length: int) -> list[Row]:
    """Best-fit decreasing bin packing of examples (in ``order`` among equal lengths) into rows.

    Each example goes to the fullest row that still has room for it, longest examples first.
    """
    rows: list[Row] = []
    room: list[tuple[int, int]] = []  # (free tokens, row number), sorted
    for i in sorted(order, key=lambda i: -lengths[i]):  # stable: ties keep the shuffled order
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k == len(room):
            rows.append([i])
            free, row = max_length - lengths[i], len(rows) - 1
        else:
            free, row = room.pop(k)
            rows[row].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, row))
    return rows


def length_grouped(order: list[int], lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length: mega-batches of 50 x batch_size from ``order``, each sorted, then cut."""
    mega = MEGA_BATCH * batch_size
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def sequence_labels(targets: list[Any]) -> torch.Tensor:
    """Classification labels of a batch, one per sequence: (B,) int64 class indices, (B,) float32 values when any
    target is a float (regression), or (B, K) int64 class indices per row, -100 after each row's own (multi-label:
    tuples of indices)."""
    if any(isinstance(t, tuple) for t in targets):
        rows = [t if isinstance(t, tuple) else (t,) for t in targets]
        out = torch.full((len(rows), max(map(len, rows))), IGNORE, dtype=torch.long)
        for b, row in enumerate(rows):
            out[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out
    if any(isinstance(t, float) for t in targets):
        return torch.tensor(targets, dtype=torch.float32)
    return torch.tensor(targets, dtype=torch.long)


def _padded(rows: list[list[int]], width: int) -> torch.Tensor:
    """(B, width) int64, each row right-padded with -100."""
    out = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class Batcher:
    """Deterministic batching and collation of a tokenized dataset; see the module docstring."""

    def __init__(self, dataset: Any, *, batch_size: int, max_length: int, packing: bool,
                 group_by_length: bool, pad_id: int, seed: int, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.max_length = dataset, batch_size, max_length
        self.packing, self.group_by_length, self.drop_last = packing, group_by_length, drop_last
        self.pad_id, self.seed = pad_id, seed
        self.lengths = [len(ids) for ids in dataset.input_ids]
        self.paired = bool(getattr(dataset, "paired", False))
        if self.paired and packing:
            raise ValueError("preference pairs cannot be packed (the chosen and rejected sequences of a pair are "
                             "separate rows of one batch); use data.batching length_grouped or padded")
        if packing and getattr(dataset, "targets", None):
            raise ValueError("classification examples cannot be packed (each row carries one label); use "
                             "data.batching length_grouped or padded")
        self.tagged = bool(getattr(dataset, "tag_names", None))
        if packing and self.tagged:
            raise ValueError("tagging examples cannot be packed; use data.batching length_grouped or padded")
        too_long = [i for i, n in enumerate(self.lengths) if n > max_length]
        if packing and too_long:
            raise ValueError(f"example {too_long[0]} has {self.lengths[too_long[0]]} tokens, more than "
                             f"max_length={max_length}")
        self._len: int | None = None

    def batches(self, epoch: int) -> list[Batch]:
        """The plan of one epoch: batches of rows of example indices, fixed by (seed, epoch)."""
        rng = random.Random(f"lmadapt-batches:{self.seed}:{epoch}")
        units = self.lengths if not self.paired else [max(a, b) for a, b in zip(self.lengths[::2], self.lengths[1::2])]
        order = list(range(len(units)))
        rng.shuffle(order)
        if self.packing:
            rows = pack_rows(order, self.lengths, self.max_length)
            rng.shuffle(rows)
            plan = [rows[k:k + self.batch_size] for k in range(0, len(rows), self.batch_size)]
        elif self.group_by_length:
            grouped = length_grouped(order, units, self.batch_size, rng)
            plan = [[[i] for i in batch] for batch in grouped]
        else:
            plan = [[[i] for i in order[k:k + self.batch_size]] for k in range(0, len(order), self.batch_size)]
        if self.drop_last:
            plan = [batch for batch in plan if len(batch) == self.batch_size]
        if self.paired:  # pair k is the row (2k, 2k + 1); collate makes it two
            plan = [[[2 * k, 2 * k + 1] for [k] in batch] for batch in plan]
        return plan

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        if self._len is None:
            self._len = len(self.batches(0))
        return self._len

    def collate(self, batch: Batch | list[int]) -> dict[str, torch.Tensor]:
        """Tensors of one batch: input_ids, labels, position_ids (B, L), attention_mask (unpacked only),
        num_target_tokens (labels that count after the model's one-token shift), num_tokens (real,
        non-padding tokens), and task_ids (B, L) when the dataset has ``tasks``: each token's task id, -100 where
        labels always are (padding, each example's first token), so that ``task_ids[:, 1:]`` aligns with outputs
        at ``[:, :-1]`` as labels do.

        A bare index in ``batch`` is a row of one example. Paired data: each row of ``batch`` is a pair, collated as
        every pair's chosen sequence, then every rejected one in the same order, and ``pairs`` holds their number.
        Classification data (``dataset.targets``): ``labels`` is one label per sequence (:func:`sequence_labels`),
        and ``sequence_labels`` is True. Tagging data (``dataset.tag_names``): ``labels`` (B, L) is the tag index at
        each word's first sub-token, ``later_labels`` (B, L) at its other sub-tokens (-100 elsewhere), and
        ``token_labels`` is True.
        """
        rows = self._rows(batch)
        used = [sum(self.lengths[i] for i in row) for row in rows]
        width = self.max_length if self.packing else max(used)
        if max(used) > width:
            raise ValueError(f"a row of {max(used)} tokens does not fit max_length={width}")
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        tasks = getattr(self.dataset, "tasks", None)
        task_ids = torch.full((len(rows), width), IGNORE, dtype=torch.long) if tasks else None
        for b, row in enumerate(rows):
            pos = 0
            for i in row:
                n = self.lengths[i]
                input_ids[b, pos:pos + n] = torch.tensor(self.dataset.input_ids[i])
                labels[b, pos:pos + n] = torch.tensor(self.dataset.labels[i])
                labels[b, pos] = IGNORE  # the previous example must not predict this one
                if task_ids is not None:
                    task_ids[b, pos + 1:pos + n] = tasks[i]
                position_ids[b, pos:pos + n] = torch.arange(n)
                pos += n
            # padding is a sequence of its own when packed (positions restart), the tail otherwise
            position_ids[b, pos:] = torch.arange(width - pos) + (0 if self.packing else pos)
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
               "num_target_tokens": (labels[:, 1:] != IGNORE).sum(), "num_tokens": torch.tensor(sum(used))}
        if task_ids is not None:
            out["task_ids"] = task_ids
        if self.paired:
            out["pairs"] = len(rows) // 2
        if self.tagged:  # tag indices per token, first positions included (no causal shift)
            out["labels"], out["later_labels"] = (_padded([seq[i] for [i] in rows], width)
                                                  for seq in (self.dataset.labels, self.dataset.later_labels))
            out["token_labels"] = True
        if getattr(self.dataset, "targets", None):  # classification: one label per sequence, not per token
            out["labels"] = sequence_labels([self.dataset.targets[row[0]] for row in rows])
            out["sequence_labels"] = True
        if not self.packing:
            out["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(used)[:, None]).long()
        return out

    def padding_stats(self, epoch: int = 0) -> dict[str, float]:
        """Token slots in the epoch's batches vs tokens that are real and that carry loss."""
        slots = tokens = targets = 0
        for batch in map(self._rows, self.batches(epoch)):
            used = [sum(self.lengths[i] for i in row) for row in batch]
            slots += len(batch) * (self.max_length if self.packing else max(used))
            tokens += sum(used)
            targets += sum(sum(label != IGNORE for label in self.dataset.labels[i]) for row in batch for i in row)
        return {"slots": slots, "tokens": tokens, "target_tokens": targets,
                "useful_fraction": tokens / max(1, slots), "padding_fraction": 1 - tokens / max(1, slots)}

    def _rows(self, batch: Batch | list[int]) -> list[Row]:
        """The collated rows of ``batch``: a bare index is a row of one example; paired data's pairs are split,
        every chosen sequence first, then the rejected ones."""
        rows = [[row] if isinstance(row, int) else list(row) for row in batch]
        return [[row[0]] for row in rows] + [[row[1]] for row in rows] if self.paired else rows
