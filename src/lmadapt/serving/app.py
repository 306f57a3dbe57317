"""The HTTP app: OpenAI's chat and completion routes, vLLM's adapter routes, over one batching engine.

``create_app(engine, tokenizer, base)`` builds the FastAPI app; :mod:`lmadapt.serving.server` runs it under
uvicorn. Routes (all JSON; ``/health`` needs no key):

    POST /v1/chat/completions   POST /v1/completions      (stream=true: server-sent events, then [DONE])
    GET  /v1/models             GET  /v1/models/{model}   (the base, and every adapter with its ``parent``)
    POST /v1/load_lora_adapter {"lora_name", "lora_path"}  POST /v1/unload_lora_adapter {"lora_name"}
    GET  /health
    GET  /   (the playground page; with /playground.js and /playground.css, served without the key)

A request's ``model`` names the base model or one adapter; each of its ``n`` choices (times each prompt of a
completion request) is one engine request, so they decode in the same batches as everyone else's. Every
failure is answered in OpenAI's error shape (:class:`~lmadapt.serving.openai_api.ApiError`): 4xx for what
the client can fix, 429 when the engine's queue is full, 503 while shutting down; anything else is a bug,
logged with its traceback here and answered with a plain 500.

Extension point: :meth:`Service.resolve` maps a ``model`` name to what the engine runs (the base, an adapter,
a proxy-tuned model); the playground page offers whatever ``/v1/models`` lists.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmadapt.serving import openai_api as oa
from lmadapt.serving.openai_api import ApiError
from lmadapt.serving.service import Service

if TYPE_CHECKING:
    from lmadapt.serving.engine import Engine

log = logging.getLogger("lmadapt.serve")
# The playground: route -> (file of this package, media type). The page holds no secret; it asks for the key.
PLAYGROUND = {"/": ("playground.html", "text/html"), "/playground.js": ("playground.js", "text/javascript"),
              "/playground.css": ("playground.css", "text/css")}
PAGE_HEADERS = {  # nothing but the page's own files and this server's API; no framing, no referrer
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
OPEN_PATHS = frozenset({"/health", *PLAYGROUND})  # answered without the API key


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the request is refused with a 4xx, never truncated silently."""

    max_tokens: int = 2048         # new tokens per choice (also the default for chat when max_tokens is unset)
    max_n: int = 16                # choices per request (n times the prompts of a completion request)
    max_body_bytes: int = 1 << 20  # request body (413 beyond it)


@dataclass(frozen=True)
class ServedBase:
    """The base model as clients see it: its ``model`` name, where it came from, and its sizes."""

    name: str
    root: str
    context_length: int | None  # prompt + new tokens (None: not limited here)
    vocab_size: int             # token ids of a completion prompt must be below it


def create_app(engine: Engine, tokenizer: Any, base: ServedBase, *, api_key: str | None = None,
               limits: Limits = Limits(), runtime_adapters: bool = True, drain_timeout: float = 30.0) -> FastAPI:
    """The app over ``engine`` (an :class:`lmadapt.serving.engine.Engine`, started with the app's lifespan
    and shut down, draining, when the app stops). ``api_key``: required as ``Authorization: Bearer`` on
    every route but ``/health``; ``runtime_adapters`` False refuses the load/unload routes (403)."""
    service = Service(engine, tokenizer, base, limits)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        log.info("draining in-flight requests (at most %.0f s)", drain_timeout)
        await run_in_threadpool(engine.shutdown, drain=True, timeout=drain_timeout)

    app = FastAPI(title="lmadapt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    for path, (file, media_type) in PLAYGROUND.items():
        app.add_api_route(path, _packaged_file(file, media_type), methods=["GET"], include_in_schema=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": service.model_cards()}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return next((c for c in service.model_cards() if c["id"] == name), None) or service.unknown_model(name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await service.chat(oa.parse_body(oa.ChatCompletionRequest, await _json(request)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.complete(oa.parse_body(oa.CompletionRequest, await _json(request)))

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request) -> Response:
        _check_runtime_adapters(runtime_adapters)
        return await service.load_adapter(oa.parse_body(oa.LoadAdapterRequest, await _json(request)))

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request) -> Response:
        _check_runtime_adapters(runtime_adapters)
        return await service.unload_adapter(oa.parse_body(oa.UnloadAdapterRequest, await _json(request)))

    return app


def _packaged_file(name: str, media_type: str) -> Callable[[], Awaitable[Response]]:
    """A route that answers with this package's file ``name``, read now (a missing file fails at start-up)."""
    body = resources.files(__package__).joinpath(name).read_bytes()

    async def route() -> Response:
        return Response(body, media_type=media_type, headers=PAGE_HEADERS)

    return route


def _check_runtime_adapters(allowed: bool) -> None:
    if not allowed:
        raise ApiError(403, "loading and unloading adapters at run time is off on this server "
                            "(it was started with --no-runtime-adapters)")


async def _json(request: Request) -> Any:
    """The request body as JSON; a 400 naming the position when it is not JSON."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(oa.status_error(exc.status_code).body(), status_code=exc.status_code, headers=exc.headers)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Guard:
    """ASGI middleware in front of every route: the API key (401), a JSON content type on every POST (415),
    then the body size (413), all checked before the body is parsed (the body is read here, at most
    ``max_body_bytes``, and handed on whole); and behind every route, the catch-all for bugs: logged with the
    traceback, answered with a plain 500.

    The content type matters for safety: a web page can make a browser send a cross-origin POST without asking
    the server first only with a form's content types (``text/plain``, ...), never ``application/json``; so
    refusing those keeps other sites' pages from loading adapters through a visitor's browser."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], api_key: str | None,
                 max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is None:
            body, refusal = await self._read_body(receive, headers)
        if refusal is not None:
            extra = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
            await JSONResponse(refusal.body(), status_code=refusal.status, headers=extra)(scope, receive, send)
            return
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the client to disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        started = False

        async def tracked(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked)
        except Exception:  # a bug: the trace goes to the log, the client gets a plain 500
            log.exception("internal error on %s %s", scope.get("method"), scope["path"])
            if not started:
                error = ApiError(500, "internal server error (the server's log has the details)")
                await JSONResponse(error.body(), status_code=500)(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> ApiError | None:
        """401 without the right key; else 415 for a POST whose body is not declared JSON; else None."""
        unauthorized = self._unauthorized(scope["path"], headers)
        if unauthorized is not None or scope["method"] != "POST":
            return unauthorized
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "application/json" or media.endswith("+json"):
            return None
        return ApiError(415, f"the request body must be sent as JSON, with the header 'Content-Type: "
                             f"application/json' (got {media or 'none'!r})", code="unsupported_media_type")

    def _unauthorized(self, path: str, headers: dict[str, str]) -> ApiError | None:
        if self.api_key is None or path in OPEN_PATHS:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return ApiError(401, "no API key given: send it as the header 'Authorization: Bearer KEY'",
                            code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return ApiError(401, "incorrect API key", code="invalid_api_key")
        return None

    async def _read_body(self, receive: Receive, headers: dict[str, str]) -> tuple[bytes, ApiError | None]:
        too_big = ApiError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} "
                                f"bytes (--max-body-bytes)", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return b"", too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None
