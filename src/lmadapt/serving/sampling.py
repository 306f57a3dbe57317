"""Per-request decoding settings of the serving engine: how a row picks its next token, what log-probabilities it
reports, and how its tokens become text (incrementally, with stop strings).

Each row of a batch has its own :class:`SamplingParams`, so the choice is made row by row from that row's logits:

- ``temperature == 0``: greedy, ``argmax z``;
- else a draw from ``softmax(z / temperature)`` kept to the ``top_k`` most likely tokens (0: all) and then to
  the smallest set whose probability reaches ``top_p`` (1.0: all), the order of transformers' sampling
  warpers and of :func:`lmadapt.decoding.steering.sample_next`. The draw uses the request's own
  ``torch.Generator`` when it has a ``seed``, so a seeded request gives the same tokens whatever else is in the
  batch (up to float rounding of its logits, which differs with the batch's shape in the last bits only).

Log-probabilities are those of the *raw* model distribution, ``log_softmax(z)`` before temperature, top-k and
top-p, as OpenAI's API reports them: the same number whatever the sampling settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from lmadapt.decoding.steering import processed_scores

MAX_LOGPROBS = 20  # the most alternatives a row may ask for (OpenAI's limit for top_logprobs)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``problems()`` lists every invalid field (the engine refuses the request)."""

    max_tokens: int = 64  # the most new tokens (the stop token counts as one)
    temperature: float = 0.0  # 0: greedy; OpenAI's default is 1.0, which the HTTP layer passes explicitly
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p (1.0: all)
    top_k: int = 0  # keep the top_k most likely tokens (0: all)
    stop: tuple[str, ...] = ()  # stop as soon as the text contains one; the text before it is returned
    seed: int | None = None  # a per-request generator: the same tokens whatever shares the batch
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the k likeliest alternatives
    stop_token_ids: tuple[int, ...] = ()  # more ids that end the text, besides the model's EOS / end-of-turn
    ignore_eos: bool = False  # True: the model's stop tokens do not end the text (max_tokens does): for benchmarks

    def __post_init__(self) -> None:
        for name in ("stop", "stop_token_ids"):  # lists from JSON become tuples (hashable, immutable)
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))

    def problems(self) -> list[str]:
        """Every invalid field, as a sentence naming it (empty: valid)."""
        out = []
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            out.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            out.append(f"temperature must be a number >= 0 (0: greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1] (1: no limit), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            out.append(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            out.append(f"stop must be non-empty strings, got {list(self.stop)!r}")
        if self.seed is not None and not _is_int(self.seed):
            out.append(f"seed must be an integer or null, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            out.append(f"logprobs must be null or an integer from 0 to {MAX_LOGPROBS}, got {self.logprobs!r}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            out.append(f"stop_token_ids must be token ids (integers >= 0), got {list(self.stop_token_ids)!r}")
        return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


class RowSampler:
    """Picks one request's tokens from its rows of logits; holds its generator (seeded or not)."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator = None
        if params.seed is not None and params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    def choose(self, logits: torch.Tensor, argmax: int | None = None) -> int:
        """The next token from ``logits`` (vocab,) fp32: argmax (``argmax`` when the caller has it already: one
        device sync for a whole batch), or a draw from the processed distribution."""
        p = self.params
        if p.temperature == 0:
            return int(logits.argmax()) if argmax is None else argmax
        probs = processed_scores(logits, p.temperature, p.top_k, p.top_p).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def logprobs(self, logits: torch.Tensor, token: int,
                 tokenizer: PreTrainedTokenizerBase) -> tuple[float | None, list[tuple[str, float]] | None]:
        """(log-prob of ``token``, the ``logprobs`` likeliest tokens as (text, log-prob)) under the raw
        distribution ``log_softmax(logits)``; (None, None) when the request asked for none."""
        k = self.params.logprobs
        if k is None:
            return None, None
        logp = logits.log_softmax(-1)
        top = logp.topk(k) if k else None
        alternatives = [] if top is None else [(tokenizer.decode([int(i)]), float(v))
                                               for v, i in zip(top.values, top.indices)]
        return float(logp[token]), alternatives


@dataclass
class TextStream:
    """One request's text, grown a token at a time: emits only whole characters and never a stop string.

    Tokens are decoded in a window (from the token after the last one whose text was complete), so a character
    split over several byte tokens comes out once its last byte arrives, and a SentencePiece word keeps its
    leading space. Text that could be the start of a stop string is held back until it is known not to be;
    once a stop string appears, the text before it is the end of the output.
    """

    tokenizer: PreTrainedTokenizerBase
    stop: Sequence[str] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # every complete character decoded so far
    sent: int = 0  # how much of ``text`` has been handed out
    stopped: bool = False  # a stop string was found: ``text`` ends before it
    _prefix: int = 0  # ids[_prefix:_read] decode to text already in ``text``; ids[_read:] not yet
    _read: int = 0

    def add(self, token: int) -> str:
        """Take one token; the new text that may be handed out now (possibly empty; always, once stopped)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self._prefix, self._read)
        whole = self._decode(self._prefix, len(self.ids))
        if len(whole) > len(before) and not whole.endswith("\ufffd"):  # U+FFFD: half a UTF-8 character
            self._extend(whole[len(before):])
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back (a partial character, a possible stop-string start), at the end of the output."""
        if not self.stopped and self._read < len(self.ids):
            before = self._decode(self._prefix, self._read)
            self._extend(self._decode(self._prefix, len(self.ids))[len(before):])
            self._read = len(self.ids)
        return self._release(final=True)

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True) if end > start else ""

    def _extend(self, piece: str) -> None:
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, len(self.text) - longest + 1)  # a stop string may begin in text already seen
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def _held(self) -> int:
        """Length of the longest end of ``text`` that begins a stop string (held back until it resolves)."""
        for n in range(min(len(self.text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
