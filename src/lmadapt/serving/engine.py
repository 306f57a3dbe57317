"""The serving engine: continuous batching of many requests over one base model and its adapters.

One worker thread runs the loop. Each step it

1. runs queued adapter loads and unloads (so the model changes only between steps) and drops cancelled requests;
2. admits waiting requests while fewer than ``max_batch_size`` rows run, and *prefills* them: the joiners of
   one group, left-padded, in one forward that also gives their first token; their KV-cache rows are appended to
   the group's batch cache (:class:`~lmadapt.serving.batch_cache.BatchCache`: left-aligned, one mask column per
   cache column, each row at its own positions), so short and long prompts share a batch;
3. *decodes* one token for every running row, one forward per group: the base model's group holds the base rows
   and the rows of every LoRA adapter, each row routed through its own adapter
   (:func:`lmadapt.adapters.pool.adapter_per_row`); an adapter of another method has a group (a model copy)
   of its own (:mod:`lmadapt.serving.engine_adapters`), and so has each proxy-tuned model (three forwards:
   the base model and a small expert pair, :mod:`lmadapt.serving.engine_proxy`);
4. samples each row's token with its own settings (:mod:`lmadapt.serving.sampling`), sends its event, and drops
   the rows that finished (stop token, stop string, ``max_tokens``, the model's context).

A row's output is what its adapter alone gives: greedy decoding of the same prompt through ``model.generate``
yields the same tokens (the padding columns are masked out; only float rounding in the last bits differs).
An exception in a forward fails that group's requests (finish_reason "error"); one in a row's sampling fails that
row; the engine goes on serving. Not done: prefix caching, paged attention, chunked prefill, speculative decoding.

    engine = Engine(model, tokenizer, max_batch_size=8, max_queue=64)
    engine.load_adapter("sql", "adapters/sql")
    engine.start()
    handle = engine.submit(GenerationRequest(prompt_ids=ids, adapter="sql", params=SamplingParams(max_tokens=64)))
    for event in handle: print(event.text, end="")
    engine.shutdown(drain=True)
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmadapt.adapters.pool import adapter_names
from lmadapt.decoding.generation import stop_token_ids
from lmadapt.errors import AdapterError, LmadaptError
from lmadapt.models.tree import model_device
from lmadapt.serving.engine_adapters import (
    ServedAdapter,
    check_servable,
    held_adapters,
    load_served,
    probe,
    unload_served,
)
from lmadapt.serving.engine_proxy import ProxyGroup, ProxyModel, ProxySpec, load_proxy
from lmadapt.serving.engine_requests import (
    EngineStoppedError,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    RequestError,
    RequestHandle,
    TokenEvent,
    UnknownAdapterError,
)
from lmadapt.serving.engine_steps import Batcher, Group, Row
from lmadapt.serving.sampling import RowSampler, SamplingParams, TextStream

__all__ = ["Engine", "EngineStoppedError", "GenerationRequest", "GenerationResult", "ProxyModel", "ProxySpec",
           "QueueFullError", "RequestError", "RequestHandle", "SamplingParams", "TokenEvent", "UnknownAdapterError",
           "load_proxy"]

log = logging.getLogger("lmadapt.serve")
T = TypeVar("T")


class Engine:
    """Continuous batching over ``model`` (a loaded base, possibly holding LoRA adapters) and ``tokenizer``.

    ``max_batch_size``: rows decoding at once (all groups together); ``max_queue``: requests waiting to start
    (:meth:`submit` raises :class:`QueueFullError` beyond); ``stop_ids``: token ids that end every request
    (default: the model's EOS and the chat end-of-turn tokens, :func:`lmadapt.decoding.generation.stop_token_ids`);
    ``before_step(step)``: called by the worker at the start of every step, before admission (tests use it to
    make a request join at a chosen step). The model is put in eval mode.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_batch_size: int = 8,
                 max_queue: int = 64, stop_ids: set[int] | None = None,
                 before_step: Callable[[int], None] | None = None) -> None:
        problems = [f"{name} must be an integer >= 1, got {value!r}"
                    for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue))
                    if not isinstance(value, int) or value < 1]
        if problems:
            raise LmadaptError("Engine: " + "; ".join(problems))
        self.model, self.tokenizer = model.eval(), tokenizer
        # the worker decodes with its own copy: a fast tokenizer used from two threads at once can fail with
        # "Already borrowed" when one of them changes its padding or truncation settings
        self._decoder = copy.deepcopy(tokenizer)
        self.max_batch_size, self.max_queue, self.before_step = max_batch_size, max_queue, before_step
        self.device = model_device(model)
        self.stop_ids = frozenset(stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids, default=0)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.context = getattr(model.config, "max_position_embeddings", None)
        probe(model)  # a model whose KV cache the batch cannot edit is refused here, not at the first request
        self._adapters: dict[str, ServedAdapter] = held_adapters(model)
        self._proxies: dict[str, ProxyGroup] = {}
        self._base_fingerprint: str | None = None
        self._batcher = Batcher(model, self._decoder, pad_id=self.pad_id, context=self.context, finished=self._finished)
        self._lock = threading.RLock()  # re-entrant: a handle dropped (and so cancelled) inside the worker is fine
        self._wake = threading.Condition(self._lock)
        self._model_lock = threading.RLock()  # held by the worker during a step, and by direct changes when idle
        self._waiting: collections.deque[Row] = collections.deque()
        self._control: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._in_flight: collections.Counter[str | None] = collections.Counter()
        self._state = "new"  # new -> running -> stopping -> stopped
        self._abort = False
        self._thread: threading.Thread | None = None

    # --- the caller's side ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (requests submitted before wait until now)."""
        with self._lock:
            if self._state != "new":
                raise EngineStoppedError(f"the engine is {self._state}; it can be started once")
            self._state = "running"
            self._thread = threading.Thread(target=self._work, name="lmadapt-engine", daemon=True)
            self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = 30.0) -> bool:
        """Stop taking requests; with ``drain`` finish every request already submitted (running or waiting),
        without it cancel them; then stop the worker. Requests still running after ``timeout`` seconds are
        cancelled. True when every request finished on its own."""
        with self._lock:
            started = self._thread is not None
            if self._state in ("new", "running"):
                self._state = "stopping"
            self._abort = self._abort or not drain or not started
            self._wake.notify_all()
        if not started:
            with self._lock:
                self._state, unfinished = "stopped", len(self._waiting)
            self._stop_all("the engine was shut down before it started")
            return not unfinished
        self._thread.join(timeout)
        clean = not self._thread.is_alive() and drain
        if self._thread.is_alive():
            with self._lock:
                self._abort = True
                self._wake.notify_all()
            self._thread.join()
        return clean

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request``; its events come through the returned handle. Raises :class:`RequestError` (bad
        request), :class:`UnknownAdapterError`, :class:`QueueFullError` or :class:`EngineStoppedError`."""
        with self._lock:
            proxy = self._proxies.get(request.adapter) if request.adapter is not None else None
        self._check(request, proxy)
        params = request.params
        handle = RequestHandle(request, self._poke)
        model_stops = self.stop_ids | (proxy.stop_ids if proxy is not None else frozenset())
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else model_stops)
        row = Row(handle, RowSampler(params, self.device), TextStream(self._decoder, params.stop), stops,
                  context=proxy.context if proxy is not None else None)
        with self._lock:
            if self._state in ("stopping", "stopped"):
                raise EngineStoppedError("the engine is shutting down and takes no new requests")
            if request.adapter is not None and request.adapter not in (*self._adapters, *self._proxies):
                raise self._unknown(request.adapter)
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting already (max_queue "
                                     f"{self.max_queue}); try again later")
            self._waiting.append(row)
            self._in_flight[request.adapter] += 1
            self._wake.notify_all()
        return handle

    def adapters(self) -> dict[str, dict[str, Any]]:
        """name -> {"path", "method", "base", "routed", "chat_template", "system_prompt"} of every adapter served."""
        with self._lock:
            return {name: served.describe() for name, served in self._adapters.items()}

    def proxies(self) -> dict[str, dict[str, Any]]:
        """name -> {"expert", "anti_expert", "beta", "context_length", ...} of every proxy-tuned model served."""
        with self._lock:
            return {name: group.describe() for name, group in self._proxies.items()}

    def add_proxy(self, proxy: ProxyModel) -> None:
        """Serve ``proxy`` (:func:`lmadapt.serving.engine_proxy.load_proxy`) as model ``proxy.name``: this engine's
        base model steered by the proxy's small expert pair. Raises LmadaptError, changing nothing, when the name
        is taken or the small models' tokenizers differ from the engine's (see :class:`ProxyGroup`)."""
        self._check_free(proxy.name)
        group = ProxyGroup(self.model, proxy, self.tokenizer)

        def add() -> None:
            self._check_free(proxy.name)
            with self._lock:
                self._proxies[proxy.name] = group
            self._batcher.groups[proxy.name] = group

        self._between_steps(add)
        log.info("proxy-tuned model %r added", proxy.name)

    def _check_free(self, name: str) -> None:
        with self._lock:
            if name in self._adapters or name in self._proxies:
                kind = "an adapter" if name in self._adapters else "a proxy-tuned model"
                raise LmadaptError(f"the name {name!r} is taken by {kind} already; choose another")

    def stats(self) -> dict[str, int]:
        """Rows running, requests waiting, steps and forwards so far."""
        with self._lock:
            return {"running": self._batcher.running(), "waiting": len(self._waiting), **self._batcher.counts}

    def load_adapter(self, name: str, path: str | Path, *, force: bool = False) -> None:
        """Load the adapter folder ``path`` as ``name`` (between decode steps; the folder is read and checked
        first). Raises :class:`AdapterError` naming what is wrong; a failed load changes nothing. ``force``: load
        an adapter trained on other base weights (its fingerprint differs)."""
        info = check_servable(name, path)
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is loaded already; unload it first")
            if name in self._proxies:
                raise AdapterError(f"the name {name!r} is taken by a proxy-tuned model; choose another")

        def load() -> None:
            if name in self._adapters:  # a concurrent load of the same name got there first
                raise AdapterError(f"an adapter named {name!r} is loaded already; unload it first")
            served = load_served(self.model, self.tokenizer, name, info, force=force,
                                 base_fingerprint=None if force else self._fingerprint())
            with self._lock:
                self._adapters[name] = served
            if served.routed:
                self._batcher.routes = True
            else:
                self._batcher.groups[name] = Group(served.model)

        self._between_steps(load)
        log.info("adapter %r loaded from %s", name, path)

    def unload_adapter(self, name: str) -> None:
        """Unload adapter ``name``. Refused (AdapterError) while requests for it run or wait: cancel them or let
        them finish first. From then on, requests naming it are refused."""
        with self._lock:
            if name not in self._adapters:
                raise AdapterError(f"no adapter named {name!r} is loaded; loaded: {sorted(self._adapters) or 'none'}")
            if self._in_flight[name]:
                raise AdapterError(f"adapter {name!r} has {self._in_flight[name]} request(s) running or waiting; "
                                   f"unload it when they have finished (or cancel them)")
            served = self._adapters.pop(name)

        def unload() -> None:
            unload_served(served)
            self._batcher.groups.pop(name, None)
            self._batcher.routes = bool(adapter_names(self.model))

        self._between_steps(unload)
        log.info("adapter %r unloaded", name)

    # --- checks -------------------------------------------------------------------------------------------------
    def _check(self, request: GenerationRequest, proxy: ProxyGroup | None) -> None:
        problems = [f"params: {p}" for p in request.params.problems()]
        ids = request.prompt_ids
        vocab, context = (self.vocab_size, self.context) if proxy is None else (proxy.input_vocab, proxy.context)
        if not isinstance(ids, (list, tuple)) or not ids:
            problems.append("prompt_ids must be a non-empty list of token ids")
        else:
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                problems.append(f"prompt_ids: {bad[0]!r} is not a token id of this model (0 to {vocab - 1})")
            if context is not None and len(ids) >= context:
                problems.append(f"the prompt has {len(ids)} tokens, but the model's context holds {context} "
                                f"(prompt and completion together)")
        if problems:
            raise RequestError("; ".join(problems))

    def _unknown(self, name: str) -> UnknownAdapterError:
        served = sorted(self._adapters) + sorted(self._proxies)
        return UnknownAdapterError(f"no adapter named {name!r} is loaded, nor a proxy-tuned model; loaded: "
                                   f"{served or 'none'}")

    def _fingerprint(self) -> str:
        """The base model's fingerprint (LoRA factors left out), computed once."""
        if self._base_fingerprint is None:
            from lmadapt.adapters.pool import adapter_parameter_names
            from lmadapt.models.fingerprint import fingerprint

            self._base_fingerprint = fingerprint(self.model, exclude=adapter_parameter_names(self.model).__contains__)
        return self._base_fingerprint

    # --- between steps ----------------------------------------------------------------------------------------
    def _poke(self) -> None:
        with self._lock:
            self._wake.notify_all()

    def _between_steps(self, change: Callable[[], T]) -> T:
        """Run ``change`` (which edits the model) where no step is running: queued to the worker while it runs,
        else here."""
        with self._lock:
            queued = self._state in ("running", "stopping") and threading.current_thread() is not self._thread
            if queued:
                future: Future = Future()
                self._control.append((change, future))
                self._wake.notify_all()
        if queued:
            return future.result()
        with self._model_lock, torch.inference_mode(False):  # also when called from before_step, inside a step
            return change()

    def _run_control(self) -> None:
        while True:
            with self._lock:
                if not self._control:
                    return
                change, future = self._control.popleft()
            _settle(future, change)

    # --- the worker ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while self._wait_for_work():
                with self._model_lock:
                    self._run_control()  # outside inference mode: loaded adapters' tensors are ordinary ones
                    try:
                        with torch.inference_mode():
                            self._step()
                    except Exception as exc:  # a bug in a step: fail what runs, keep serving
                        log.exception("engine step failed")
                        self._batcher.fail_all(f"engine step failed: {exc}")
        finally:
            with self._lock:
                self._state = "stopped"
            self._stop_all("the engine shut down")

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False when the worker should stop."""
        with self._lock:
            while not (self._control or self._waiting or self._batcher.running() or self._abort
                       or self._state == "stopping"):
                self._wake.wait()
            if self._abort:
                return False
            return bool(self._control or self._waiting or self._batcher.running())

    def _step(self) -> None:
        self._batcher.drop_cancelled()
        with self._lock:
            cancelled = [r for r in self._waiting if r.handle.cancelled]
            self._waiting = collections.deque(r for r in self._waiting if not r.handle.cancelled)
        for row in cancelled:
            self._batcher.finish(row, TokenEvent(None, "", finish_reason="cancelled"))
        if self.before_step is not None:
            self.before_step(self._batcher.counts["steps"])
        free = self.max_batch_size - self._batcher.running()
        with self._lock:
            joiners = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        by_group: dict[str | None, list[Row]] = {}
        for row in joiners:
            name = row.request.adapter
            served = self._adapters.get(name) if name is not None else None
            own = name in self._proxies or (served is not None and not served.routed)  # a group of its own
            by_group.setdefault(name if own else None, []).append(row)
        for key, rows in by_group.items():
            self._batcher.join(key, rows)
        self._batcher.decode()

    def _finished(self, row: Row) -> None:
        """A request sent its last event: it no longer holds its adapter."""
        with self._lock:
            self._in_flight[row.request.adapter] -= 1
            if self._in_flight[row.request.adapter] <= 0:
                del self._in_flight[row.request.adapter]

    def _stop_all(self, why: str) -> None:
        """Cancel every running and waiting request and run queued changes (the worker is gone)."""
        self._batcher.fail_all(why, "cancelled")
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
            control, self._control = list(self._control), collections.deque()
        for row in waiting:
            self._batcher.finish(row, TokenEvent(None, "", finish_reason="cancelled", error=why))
        for change, future in control:
            with self._model_lock:
                _settle(future, change)


def _settle(future: Future, change: Callable[[], Any]) -> None:
    """Run ``change`` and hand its result, or its exception, to whoever waits on ``future``."""
    try:
        future.set_result(change())
    except BaseException as exc:  # noqa: BLE001 - handed to the caller waiting on the future
        future.set_exception(exc)
