"""Replay: a share of every training batch drawn from a second ("old") corpus, deterministic under resume.

"Simple and Scalable Strategies to Continually Pre-train Large Language Models" (Ibrahim et al.,
arXiv:2403.08763) mixes a fixed fraction of the old distribution's data into each batch of the new one
(5% for a weak shift, 25% for English to German). Here the share s counts **rows** of a batch of B rows
(examples; with packing, rows of ``max_length`` tokens, so then it is also the share of token slots). An
epoch is a stream of rows in which row p is a replay row when

    floor((p + 1) s + 1/2) > floor(p s + 1/2)

and the other rows are the main corpus's rows in the order of its own plan of the epoch
(:meth:`Batcher.batches`, order and packing unchanged); the stream ends with the last main row, and the
batches are consecutive runs of B rows. So the first n rows of an epoch hold floor(n s + 1/2) replay rows
(the share is exact to half a row, also when s B is not an integer, and full batch j holds
floor((j+1) s B + 1/2) - floor(j s B + 1/2)), an epoch is still one pass over the main data, and every
epoch has the same number of batches. The replay rows are a stream: replay epoch r is a permutation of the replay corpus
fixed by (seed, r) (packed into rows first when packing), the stream is replay epoch 0, then 1, ..., cycling
the corpus when it is shorter than what the run takes; main epoch e starts at position e * K of it (K
replay rows per main epoch). Everything is a pure function of (seed, epoch), so a resumed run sees the
same batches.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Any

import torch

from lmadapt.data.batching import Batch, Batcher, Row, pack_rows
from lmadapt.data.dataset import TokenizedDataset


def replay_before(rows: int, share: float) -> int:
    """Replay rows among the first ``rows`` rows of an epoch: ``floor(rows * s + 1/2)`` (s as the exact decimal it
    is written as: 0.05 is 1/20, not the binary float's nearest fraction)."""
    return math.floor(rows * Fraction(str(share)) + Fraction(1, 2))


def epoch_batches(main_rows: int, batch_size: int, share: float) -> list[int]:
    """Replay rows in each batch of an epoch whose main corpus has ``main_rows`` rows.

    The epoch is a stream of rows, row p a replay row when ``replay_before(p + 1) > replay_before(p)``, the others
    the main rows in order; it ends with the last main row (T rows in all), and batches are consecutive runs of
    ``batch_size`` rows of it (the last may be shorter).
    """
    if not 0 <= share < 1:
        raise ValueError(f"replay share must be in [0, 1), got {share}")
    lo, hi = main_rows, math.ceil(main_rows / (1 - share)) + 2  # T: the fewest rows holding main_rows main rows
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if mid - replay_before(mid, share) < main_rows else (lo, mid)
    ends = [*range(batch_size, lo, batch_size), lo]
    return [replay_before(end, share) - replay_before(start, share) for start, end in zip([0, *ends], ends)]


class ReplayBatcher:
    """Batches of ``main`` (a :class:`Batcher`) with a share of rows from ``replay``; see the module docstring.

    Collates through one :class:`Batcher` over both corpora (the replay's examples after the main ones), so a
    batch's tensors are those of any other batch of the same rows.
    """

    def __init__(self, main: Batcher, replay: TokenizedDataset, share: float) -> None:
        self.main, self.share = main, share
        self.offset = len(main.dataset)
        both = TokenizedDataset(input_ids=main.dataset.input_ids + replay.input_ids,
                                labels=main.dataset.labels + replay.labels,
                                sources=list(main.dataset.sources) + list(replay.sources))
        self.collator = Batcher(both, batch_size=main.batch_size, max_length=main.max_length, packing=main.packing,
                                group_by_length=main.group_by_length, pad_id=main.pad_id, seed=main.seed)
        self.replay_lengths = [len(ids) for ids in replay.input_ids]
        main_rows = sum(len(batch) for batch in main.batches(0))  # the same every epoch (module docstring)
        self.counts = epoch_batches(main_rows, main.batch_size, share)
        self.per_epoch = sum(self.counts)  # K: replay rows per main epoch
        self._replay: dict[int, list[Row]] = {}
        self.replay_rows = len(self._replay_epoch(0))

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        return len(self.counts)

    def batches(self, epoch: int) -> list[Batch]:
        """The plan of one epoch: each batch its main rows, then its replay rows (indices into both corpora)."""
        stream = [row for batch in self.main.batches(epoch) for row in batch]
        plan, used, cursor = [], 0, epoch * self.per_epoch
        for k in self.counts:
            take = stream[used:used + self.main.batch_size - k]
            used += len(take)
            plan.append([list(row) for row in take] + [self._replay_row(cursor + i) for i in range(k)])
            cursor += k
        return plan

    def collate(self, batch: Batch | list[int]) -> dict[str, torch.Tensor]:
        """Tensors of one batch (as :meth:`Batcher.collate`)."""
        return self.collator.collate(batch)

    def is_replay(self, row: Row) -> bool:
        """Whether a planned row comes from the replay corpus."""
        return row[0] >= self.offset

    def _replay_row(self, position: int) -> Row:
        """Row ``position`` of the replay stream, as indices into both corpora."""
        cycle, index = divmod(position, self.replay_rows)
        return [self.offset + i for i in self._replay_epoch(cycle)[index]]

    def _replay_epoch(self, cycle: int) -> list[Row]:
        """Replay epoch ``cycle``: the replay corpus shuffled by (seed, cycle), packed into rows when packing."""
        if cycle not in self._replay:
            rng = random.Random(f"lmadapt-replay:{self.main.seed}:{cycle}")
            order = list(range(len(self.replay_lengths)))
            rng.shuffle(order)
            if self.main.packing:
                rows = pack_rows(order, self.replay_lengths, self.main.max_length)
                rng.shuffle(rows)
            else:
                rows = [[i] for i in order]
            self._replay = {c: r for c, r in self._replay.items() if c >= cycle - 1}  # keep the last two
            self._replay[cycle] = rows
        return self._replay[cycle]


def with_replay(main: Batcher, replay: Any | None, share: float) -> Batcher | ReplayBatcher:
    """``main`` itself without a replay corpus, else a :class:`ReplayBatcher` over both."""
    return main if replay is None or share <= 0 else ReplayBatcher(main, replay, share)
