"""What each route of the app does: checked OpenAI requests become engine requests, events become answers.

One HTTP request is one :class:`Batch`: ``n`` choices per prompt, each its own engine request (choice ``j``
of a prompt sampled with ``seed + j`` when a seed is given, so the choices differ but the answer is
reproducible). Chat
prompts are rendered by the chat template the adapter was trained with (its record's), else the tokenizer's,
with the adapter's recorded system prompt when the conversation has no system turn, as ``lmadapt generate``
prompts it; completion prompts are tokenized as written (:func:`lmadapt.decoding.generation.encode_prompt`).
A proxy-tuned model's prompt is rendered as the base model's (its three models read the same ids).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import jinja2
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.concurrency import run_in_threadpool

from lmadapt.data import render_chat
from lmadapt.decoding.generation import encode_prompt, prompt_messages
from lmadapt.errors import LmadaptError
from lmadapt.serving import openai_api as oa
from lmadapt.serving.engine import (
    EngineStoppedError,
    GenerationRequest,
    QueueFullError,
    RequestError,
    SamplingParams,
    UnknownAdapterError,
)
from lmadapt.serving.openai_api import ApiError

if TYPE_CHECKING:
    from lmadapt.serving.app import Limits, ServedBase
    from lmadapt.serving.engine import Engine

log = logging.getLogger("lmadapt.serve")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server's limit
TokenLogprob = tuple[str, float, list[tuple[str, float]] | None]


@dataclass
class Choice:
    """One choice as it accumulates from its engine request's events."""

    index: int
    prefix: str = ""  # the echoed prompt (completions with echo)
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Batch:
    """The engine requests of one HTTP request: a :class:`Choice` and a handle for each choice."""

    model: str
    prompt_tokens: int  # each prompt once, however many choices it has
    logprobs: bool
    choices: list[Choice] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict[str, int]:
        return oa.usage(self.prompt_tokens, sum(c.completion_tokens for c in self.choices))

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Service:
    """The routes' work over one engine and tokenizer; ``base`` and ``limits`` as :func:`create_app` takes them."""

    def __init__(self, engine: Engine, tokenizer: Any, base: ServedBase, limits: Limits) -> None:
        self.engine, self.tokenizer, self.base, self.limits = engine, tokenizer, base, limits
        self.started = int(time.time())

    # --- models ---

    def resolve(self, name: str) -> str | None:
        """What the engine runs for ``model``: an adapter's or a proxy-tuned model's name (the engine request's
        ``adapter``), or None for the base model; 404 for any other name."""
        if name == self.base.name:
            return None
        if name in self.engine.adapters() or name in self.engine.proxies():
            return name
        self.unknown_model(name)

    def unknown_model(self, name: str) -> NoReturn:
        raise ApiError(404, f"the model `{name}` does not exist here; GET /v1/models lists the base model, the "
                            f"adapters and the proxy-tuned models", param="model", code="model_not_found")

    def model_cards(self) -> list[dict[str, Any]]:
        """The base, each adapter, then each proxy-tuned model: its ``parent`` is the base (the large model), its
        ``root`` the expert, and ``proxy`` names the expert, the anti-expert and beta."""
        ctx = self.base.context_length
        cards = [oa.model_card(self.base.name, self.base.root, None, self.started, ctx)]
        for name, info in sorted(self.engine.adapters().items()):
            cards.append(oa.model_card(name, info["path"], self.base.name, self.started, ctx))
        for name, info in sorted(self.engine.proxies().items()):
            proxy = {k: v for k, v in info.items() if k != "context_length"}
            cards.append({**oa.model_card(name, info.get("expert_adapter", info["expert"]), self.base.name,
                                          self.started, info["context_length"]), "proxy": proxy})
        return cards

    async def load_adapter(self, request: oa.LoadAdapterRequest) -> Response:
        name, path = request.lora_name, request.lora_path
        if name == self.base.name:
            raise ApiError(400, f"lora_name: {name!r} is the base model's name", param="lora_name")
        if name in self.engine.adapters():
            raise ApiError(400, f"the adapter {name!r} is loaded already; unload it first", param="lora_name",
                           code="adapter_exists")
        if name in self.engine.proxies():
            raise ApiError(400, f"lora_name: {name!r} is a proxy-tuned model's name; choose another",
                           param="lora_name", code="adapter_exists")
        try:
            await run_in_threadpool(self.engine.load_adapter, name, path)
        except (LmadaptError, OSError) as exc:
            log.warning("adapter %r from %s not loaded: %s", name, path, exc)
            raise ApiError(400, f"could not load adapter {name!r} from {path}: {exc}", param="lora_path",
                           code="adapter_load_failed") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, request: oa.UnloadAdapterRequest) -> Response:
        name = request.lora_name
        if name == self.base.name:
            raise ApiError(400, f"lora_name: {name!r} is the base model, which cannot be unloaded", param="lora_name")
        if name in self.engine.proxies():
            raise ApiError(400, f"lora_name: {name!r} is a proxy-tuned model (--proxy), which stays while the "
                                f"server runs", param="lora_name")
        if name not in self.engine.adapters():
            raise ApiError(404, f"the adapter {name!r} is not loaded", param="lora_name", code="model_not_found")
        try:
            await run_in_threadpool(self.engine.unload_adapter, name)
        except LmadaptError as exc:
            raise ApiError(409, f"could not unload adapter {name!r}: {exc}", param="lora_name",
                           code="adapter_in_use") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    # --- prompts ---

    def _style(self, adapter: str | None) -> tuple[str | None, str | None]:
        """(chat template, system prompt) the adapter records (None, None: the tokenizer's template, none)."""
        if adapter is None:
            return None, None
        info = self.engine.adapters().get(adapter) or {}
        return info.get("chat_template"), info.get("system_prompt")

    def chat_prompt(self, request: oa.ChatCompletionRequest, adapter: str | None) -> list[int]:
        template, system = self._style(adapter)
        turns = [m.turn() for m in request.messages]
        try:
            if template is None:
                return encode_prompt(self.tokenizer, turns, chat=True, system_prompt=system)
            text = render_chat(self.tokenizer, prompt_messages(turns, system), add_generation_prompt=True,
                               template=template)
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        except (jinja2.TemplateError, ValueError) as exc:  # e.g. a template that allows no system turn
            raise ApiError(400, f"messages: the chat template cannot render this conversation: {exc}",
                           param="messages") from None

    def completion_prompts(self, request: oa.CompletionRequest) -> list[tuple[list[int], str]]:
        """(token ids, the text to echo) of each prompt."""
        prompts = []
        for i, prompt in enumerate(request.prompt):
            where = "prompt" if len(request.prompt) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                ids, text = encode_prompt(self.tokenizer, prompt), prompt
            else:
                bad = [t for t in prompt if not 0 <= t < self.base.vocab_size]
                if bad:
                    raise ApiError(400, f"{where}: token id {bad[0]} is outside the vocabulary "
                                        f"(0 to {self.base.vocab_size - 1})", param=where)
                ids, text = list(prompt), self.tokenizer.decode(prompt) if request.echo else ""
            prompts.append((ids, text if request.echo else ""))
        return prompts

    def budget(self, requested: int | None, prompt_tokens: int, default: int, param: str, prompt_param: str,
               context: int | None = None) -> int:
        """New tokens per choice: as requested (at most the server's limit and what the context leaves), else
        ``default`` cut to what the context leaves. ``param``, ``prompt_param``: the fields to blame; ``context``:
        the model's (None: the base model's)."""
        limit = self.limits.max_tokens
        context = self.base.context_length if context is None else context
        if requested is not None and requested > limit:
            raise ApiError(400, f"{param}: {requested} is more than this server's limit of {limit} (--max-tokens)",
                           param=param, code="invalid_value")
        room = None if context is None else context - prompt_tokens
        wanted = requested if requested is not None else default
        if room is not None and (room < 1 or (requested is not None and requested > room)):
            raise ApiError(400, f"this model's context holds {context} tokens, but the prompt has {prompt_tokens} "
                                f"and {wanted} new tokens were asked for; shorten the prompt or lower {param}",
                           param=prompt_param if room < 1 else param,
                           code="context_length_exceeded")
        return wanted if room is None else min(wanted, room)

    # --- generation ---

    def submit(self, request: Any, adapter: str | None, prompts: list[tuple[list[int], str]], default: int,
               param: str, logprobs: int | None) -> Batch:
        """Every choice of the request queued on the engine (none when one is refused: 429 when full)."""
        if request.n * len(prompts) > self.limits.max_n:
            raise ApiError(400, f"n: {request.n} choices of {len(prompts)} prompt(s) is more than this server's "
                                f"limit of {self.limits.max_n} per request (--max-n)", param="n", code="invalid_value")
        prompt_param = "messages" if isinstance(request, oa.ChatCompletionRequest) else "prompt"
        context = self.engine.proxies().get(adapter, {}).get("context_length") if adapter is not None else None
        budgets = [self.budget(request.token_limit(), len(ids), default, param, prompt_param, context)
                   for ids, _ in prompts]
        batch = Batch(request.model, sum(len(ids) for ids, _ in prompts), logprobs is not None)
        try:
            for (ids, prefix), max_tokens in zip(prompts, budgets):
                for j in range(request.n):  # choice j of each prompt samples with seed + j
                    params = SamplingParams(
                        max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                        top_k=max(request.top_k, 0), stop=list(request.stop or []),
                        seed=None if request.seed is None else request.seed + j, logprobs=logprobs)
                    batch.handles.append(self.engine.submit(GenerationRequest(prompt_ids=ids, adapter=adapter,
                                                                              params=params)))
                    batch.choices.append(Choice(len(batch.choices), prefix))
        except LmadaptError as exc:
            batch.cancel()
            raise self._refused(exc, adapter) from None
        return batch

    def _refused(self, exc: LmadaptError, adapter: str | None) -> ApiError:
        """The engine's refusal of a request as the client gets it."""
        if isinstance(exc, UnknownAdapterError):  # unloaded since the request was checked
            return ApiError(404, f"the model `{adapter}` does not exist here (it was unloaded)", param="model",
                            code="model_not_found")
        if isinstance(exc, QueueFullError):
            return ApiError(429, f"the server is busy ({exc}); retry later", code="queue_full")
        if isinstance(exc, EngineStoppedError):
            return ApiError(503, f"the server is shutting down ({exc})", code="shutting_down")
        if isinstance(exc, RequestError):
            return ApiError(400, str(exc), code="invalid_value")
        raise exc

    async def events(self, batch: Batch) -> AsyncIterator[tuple[Choice, Any, TokenLogprob | None]]:
        """(choice, event, its token's log-probability entry) as the choices' events arrive, interleaved;
        every engine request is cancelled when the caller stops early (a client that went away)."""
        queue: asyncio.Queue[tuple[Choice, Any]] = asyncio.Queue()

        async def pump(choice: Choice, handle: Any) -> None:
            try:
                async for event in handle.aiter():
                    await queue.put((choice, event))
            except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
                await queue.put((choice, exc))
            await queue.put((choice, None))

        tasks = [asyncio.create_task(pump(c, h)) for c, h in zip(batch.choices, batch.handles)]
        try:
            left = len(tasks)
            while left:
                choice, event = await queue.get()
                if event is None:
                    left -= 1
                elif isinstance(event, Exception):
                    raise event
                else:
                    yield choice, event, self._record(choice, event)
        finally:
            for task in tasks:
                task.cancel()
            batch.cancel()

    def _record(self, choice: Choice, event: Any) -> TokenLogprob | None:
        if event.finish_reason == "error":
            raise ApiError(500, f"generation failed: {event.error}", code="generation_failed")
        if event.finish_reason == "cancelled":
            raise ApiError(503, "the request was cancelled: the server is shutting down", code="shutting_down")
        choice.text += event.text
        choice.completion_tokens = event.completion_tokens
        choice.finish_reason = event.finish_reason or choice.finish_reason
        if event.token_id is None or event.logprob is None:
            return None
        entry = (self.tokenizer.decode([event.token_id]), event.logprob, event.top_logprobs)
        choice.tokens.append(entry)
        return entry

    # --- chat ---

    async def chat(self, request: oa.ChatCompletionRequest) -> Response:
        adapter = self.resolve(request.model)
        ids = self.chat_prompt(request, adapter)
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        batch = self.submit(request, adapter, [(ids, "")], self.limits.max_tokens, param, request.logprob_count())
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return _event_stream(self._chat_chunks(batch, include_usage))
        async for _ in self.events(batch):
            pass
        return JSONResponse({
            "id": f"chatcmpl-{batch.id}", "object": "chat.completion", "created": batch.created,
            "model": batch.model, "system_fingerprint": None, "usage": batch.usage(),
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": {"content": [oa.chat_logprob(*t) for t in c.tokens]} if batch.logprobs else None,
                         "finish_reason": c.finish_reason} for c in batch.choices]})

    async def _chat_chunks(self, batch: Batch, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        def chunk(choices: list[dict[str, Any]], **usage: Any) -> dict[str, Any]:
            return {"id": f"chatcmpl-{batch.id}", "object": "chat.completion.chunk", "created": batch.created,
                    "model": batch.model, "system_fingerprint": None, "choices": choices,
                    **({"usage": usage.get("usage")} if include_usage else {})}

        for c in batch.choices:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for c, event, entry in self.events(batch):
            if event.text or entry:
                logprobs = {"content": [oa.chat_logprob(*entry)] if entry else []} if batch.logprobs else None
                yield chunk([{"index": c.index, "delta": {"content": event.text}, "logprobs": logprobs,
                              "finish_reason": None}])
            if event.finish_reason:
                yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])
        if include_usage:
            yield chunk([], usage=batch.usage())

    # --- completions ---

    async def complete(self, request: oa.CompletionRequest) -> Response:
        adapter = self.resolve(request.model)
        prompts = self.completion_prompts(request)
        batch = self.submit(request, adapter, prompts, COMPLETION_DEFAULT_MAX_TOKENS, "max_tokens", request.logprobs)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return _event_stream(self._completion_chunks(batch, include_usage))
        async for _ in self.events(batch):
            pass
        return JSONResponse({
            "id": f"cmpl-{batch.id}", "object": "text_completion", "created": batch.created, "model": batch.model,
            "system_fingerprint": None, "usage": batch.usage(),
            "choices": [{"index": c.index, "text": c.prefix + c.text, "finish_reason": c.finish_reason,
                         "logprobs": oa.completion_logprobs(c.tokens, len(c.prefix)) if batch.logprobs else None}
                        for c in batch.choices]})

    async def _completion_chunks(self, batch: Batch, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        def chunk(choices: list[dict[str, Any]], **usage: Any) -> dict[str, Any]:
            return {"id": f"cmpl-{batch.id}", "object": "text_completion", "created": batch.created,
                    "model": batch.model, "system_fingerprint": None, "choices": choices,
                    **({"usage": usage.get("usage")} if include_usage else {})}

        for c in batch.choices:
            if c.prefix:
                yield chunk([{"index": c.index, "text": c.prefix, "logprobs": None, "finish_reason": None}])
        async for c, event, entry in self.events(batch):
            if event.text or entry:
                at = len(c.prefix) + len(c.text) - len(event.text)
                logprobs = oa.completion_logprobs([entry] if entry else [], at) if batch.logprobs else None
                yield chunk([{"index": c.index, "text": event.text, "logprobs": logprobs, "finish_reason": None}])
            if event.finish_reason:
                yield chunk([{"index": c.index, "text": "", "logprobs": None, "finish_reason": c.finish_reason}])
        if include_usage:
            yield chunk([], usage=batch.usage())


def _event_stream(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events: each chunk as ``data: {json}``, then ``data: [DONE]``; a failure after the stream has
    begun (the status is sent already) becomes a last ``data: {"error": ...}`` event before ``[DONE]``."""
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except ApiError as exc:
            yield sse(exc.body())
        except Exception:  # a bug: logged with its traceback, sent without
            log.exception("internal error while streaming")
            yield sse(ApiError(500, "internal server error (the server's log has the details)").body())
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
