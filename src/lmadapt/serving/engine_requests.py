"""What goes into the serving engine and what comes out: requests, their events, handles, refusals.

A :class:`RequestHandle` is the caller's end of one request: iterate it (blocking) or ``async for`` over
:meth:`RequestHandle.aiter` (asyncio) to get its events (:class:`TokenEvent`), the last with a ``finish_reason``;
:meth:`RequestHandle.cancel` frees its batch row at the next step. A handle's events can be read once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lmadapt.errors import LmadaptError
from lmadapt.serving.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]


class RequestError(LmadaptError):
    """A request the engine refuses as given (bad token ids, bad sampling settings, prompt too long): HTTP 400."""


class UnknownAdapterError(RequestError):
    """The request names an adapter the engine does not hold: HTTP 404 (OpenAI's ``model_not_found``)."""


class QueueFullError(LmadaptError):
    """``max_queue`` requests are waiting already: HTTP 429 (try again later)."""


class EngineStoppedError(LmadaptError):
    """The engine is shutting down or has stopped and takes no new requests: HTTP 503."""


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: prompt token ids, the adapter to run them through (None: the base model), settings."""

    prompt_ids: Sequence[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenEvent:
    """One step of a request's output.

    Every generated token but a stop token gets one event (``token_id``, its ``logprob`` and ``top_logprobs``
    when asked for). ``text`` is the new text since the last event: possibly empty (half a UTF-8 character, or
    text that may begin a stop string, is held back), never containing a stop string or the stop token. The last
    event has a ``finish_reason``: "stop" (a stop token: then ``token_id`` is None; or a stop string), "length"
    (``max_tokens`` or the model's context), "cancelled", or "error" (with ``error``). ``completion_tokens``
    counts the tokens generated so far, the stop token included.
    """

    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class GenerationResult:
    """A request's events, gathered (:meth:`RequestHandle.result`)."""

    text: str
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[str, float]] | None]
    finish_reason: FinishReason
    error: str | None
    prompt_tokens: int
    completion_tokens: int


def gather(events: Sequence[TokenEvent]) -> GenerationResult:
    """One result from a request's events (the last one finished)."""
    tokens = [e for e in events if e.token_id is not None]
    last = events[-1]
    return GenerationResult("".join(e.text for e in events), [e.token_id for e in tokens], [e.logprob for e in tokens],
                            [e.top_logprobs for e in tokens], last.finish_reason, last.error, last.prompt_tokens,
                            last.completion_tokens)


class RequestHandle:
    """The caller's end of one request; the engine's worker puts its events in, the caller reads them once."""

    def __init__(self, request: GenerationRequest, poke: Callable[[], None]) -> None:
        self.request = request
        self._poke = poke  # wakes the engine's worker
        self._events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue[TokenEvent] | None = None
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        """``cancel()`` was called (the request may have finished anyway)."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop the request: its row is freed at the next step and its last event is finish_reason "cancelled"
        (nothing happens when it has finished already)."""
        self._cancelled.set()
        self._poke()

    def __iter__(self) -> Iterator[TokenEvent]:
        return self.events()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """The request's events as they come (blocking; TimeoutError when none comes for ``timeout`` seconds).
        Leaving the loop before the last event cancels the request."""
        done = False
        try:
            while not done:
                try:
                    event = self._events.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"no event from the engine for {timeout} s") from None
                done = event.finish_reason is not None
                yield event
        finally:
            if not done:
                self.cancel()

    async def aiter(self) -> AsyncIterator[TokenEvent]:
        """The request's events in an asyncio loop (the worker hands them over with ``call_soon_threadsafe``).
        Leaving early (``break``, the task cancelled: a client that went away) cancels the request."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:  # events that came before: moved over, then the worker posts to the loop
            while True:
                try:
                    events.put_nowait(self._events.get_nowait())
                except queue.Empty:
                    break
            self._loop, self._async_events = loop, events
        done = False
        try:
            while not done:
                event = await events.get()
                done = event.finish_reason is not None
                yield event
        finally:
            with self._lock:  # later events (and those not read) go to the blocking queue again
                self._loop = self._async_events = None
                while not events.empty():
                    self._events.put(events.get_nowait())
            if not done:
                self.cancel()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the whole output (``timeout``: the most seconds between two events)."""
        return gather(list(self.events(timeout)))

    def put(self, event: TokenEvent) -> None:
        """Hand one event over to the reader (called by the engine's worker)."""
        with self._lock:
            loop, events = self._loop, self._async_events
            if loop is None:
                self._events.put(event)
                return
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the reader's event loop is closed: nobody will read, so free the row
            self._cancelled.set()
