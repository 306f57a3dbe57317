"""The OpenAI wire format the server speaks: request bodies (checked), response bodies, and errors.

Requests are parsed here, not by FastAPI, so that every bad body gets one answer in OpenAI's error shape,
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, and names the field (``param``) as
the client wrote it (``messages[0].content``). Types are strict: ``"0.5"`` is not a number and ``true`` is
not an integer. A field this server does not know is refused ("unrecognized request argument"), as OpenAI
refuses it; fields that only matter to OpenAI's platform (``user``, ``metadata``, ``store``, ...) are
accepted and ignored; features this server lacks (tools, penalties, ``logit_bias``, JSON mode) are
accepted only at their "off" value and refused otherwise, so a client never gets an answer that silently
ignored what it asked for.

Reference: https://platform.openai.com/docs/api-reference/chat and .../completions (the bodies), vLLM's
``vllm/entrypoints/openai/protocol.py`` (the LoRA load/unload bodies, ``parent`` in ``/v1/models``,
``top_k`` as an extra sampling parameter).
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_STOP = 16          # stop sequences per request (OpenAI allows 4; vLLM does not limit them)
MAX_TOP_LOGPROBS = 20  # alternatives per token, chat's top_logprobs and completions' logprobs alike
MAX_SEED = 2**63 - 1
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_:\-]{0,63}")
"""An adapter's name: what clients send as ``model``; letters, digits, ``_``, ``-``, ``:``; 64 characters at most."""

# Fields of OpenAI's request bodies that concern its platform, not the answer: accepted and dropped.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                     "parallel_tool_calls"})
# Features this server lacks: each accepted only at a value that asks for nothing (None always counts).
_OFF: dict[str, Any] = {
    "frequency_penalty": lambda v: v == 0, "presence_penalty": lambda v: v == 0,
    "logit_bias": lambda v: v == {}, "tools": lambda v: v == [], "functions": lambda v: v == [],
    "tool_choice": lambda v: v in ("none", "auto"), "function_call": lambda v: v in ("none", "auto"),
    "response_format": lambda v: v == {"type": "text"}, "modalities": lambda v: v == ["text"],
    "audio": lambda v: False, "prediction": lambda v: False, "reasoning_effort": lambda v: False,
    "web_search_options": lambda v: False, "verbosity": lambda v: False, "suffix": lambda v: v == "",
}
CHAT_OFF = frozenset(_OFF) - {"suffix"}
COMPLETION_OFF = frozenset({"frequency_penalty", "presence_penalty", "logit_bias", "suffix"})

ERROR_TYPES = {429: "rate_limit_error"}  # besides: any other 4xx "invalid_request_error", a 5xx "server_error"


class ApiError(Exception):
    """A request the server answers with an error: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}``, OpenAI's shape (also sent as the last event of a stream that failed)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def status_error(status: int, message: str | None = None) -> ApiError:
    """An ``ApiError`` for a status Starlette raised itself (404 no such route, 405 wrong method)."""
    return ApiError(status, message or HTTPStatus(status).phrase)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the usage and no choices
    continuous_usage_stats: bool = False  # vLLM's: accepted, not sent


class _Sampling(_Body):
    """What chat and completion requests share; the server's own limits (``max_tokens``, ``n``) are checked
    later, by the app, which knows them."""

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: sampled at 1.0; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's extra: -1 or 0 for no limit
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        return stops

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


class ChatMessage(_Body):
    """One turn; only text content (a string, or a list of ``{"type": "text", "text": ...}`` parts)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | None = None
    name: str | None = None
    # What a client echoes back from an earlier answer (all None there); anything else asks for tools.
    refusal: str | None = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None

    @field_validator("tool_calls", "function_call", "audio", "annotations", mode="before")
    @classmethod
    def _echoed_only(cls, value: Any) -> Any:
        if value is not None and value != []:
            raise ValueError("not supported: this server does not call tools or produce audio (send null)")
        return None

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, value: Any) -> Any:
        if value in ("tool", "function"):
            raise ValueError(f"role {value!r} is not supported: this server does not call tools")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of content parts")  # noqa: TRY004 - pydantic wants ValueError
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported, got {kind!r}")
            texts.append(part["text"])
        return "".join(texts)

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: a {self.role} message needs content")
        return self

    def turn(self) -> dict[str, str]:
        """The turn as a chat template takes it (``developer`` is OpenAI's newer name for ``system``)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content or ""}


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    OFF: ClassVar[frozenset[str]] = CHAT_OFF  # OpenAI's fields this server takes only at their "off" value

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when logprobs is true")
        return self

    def token_limit(self) -> int | None:
        """The requested cap on new tokens per choice (None: not given)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> int | None:
        """Alternatives per token to report (None: no log-probabilities at all)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    """POST /v1/completions: ``prompt`` is a string, a list of strings, a list of token ids, or a list of those."""

    OFF: ClassVar[frozenset[str]] = COMPLETION_OFF

    prompt: list[str | list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        shape = "a string, a list of strings, a list of token ids or a list of lists of token ids"
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be {shape} (not empty)")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [value]
        for p in value:
            ok = isinstance(p, str) or (isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p))
            if not ok:
                raise ValueError(f"must be {shape}; found an item {p!r:.40}")
        return value

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported (every sample is returned)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo: echo with logprobs is not supported (no log-probabilities of prompt tokens)")
        return self

    def token_limit(self) -> int | None:
        """The requested cap on new tokens per choice (None: not given)."""
        return self.max_tokens


class LoadAdapterRequest(_Body):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: str
    lora_path: str = Field(min_length=1)

    @field_validator("lora_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_adapter_name(value)


class UnloadAdapterRequest(_Body):
    """POST /v1/unload_lora_adapter (vLLM's body; ``lora_int_id`` is vLLM's and ignored)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def check_adapter_name(name: str) -> str:
    """``name`` when it is a valid adapter name (:data:`ADAPTER_NAME`), else a ``ValueError`` saying why."""
    if not ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '-' or ':', starting with "
                         f"a letter or digit")
    return name


def parse_body(model: type[BaseModel], body: Any) -> Any:
    """``body`` (parsed JSON) checked against ``model``; every problem in one 400 ``ApiError`` whose ``param``
    is the first field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    fields = dict(body)
    for name in IGNORED & fields.keys():
        del fields[name]
    refused = []
    for name in sorted(getattr(model, "OFF", frozenset()) & fields.keys()):
        value = fields.pop(name)
        if value is not None and not _OFF[name](value):
            refused.append(name)
    if refused:
        raise ApiError(400, f"{', '.join(refused)}: not supported by this server (leave unset)", param=refused[0],
                       code="unsupported_parameter")
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        problems = [_problem(e) for e in exc.errors(include_url=False)]
        raise ApiError(400, "; ".join(p for p, _ in problems), param=problems[0][1],
                       code="invalid_value") from None


def _problem(error: dict[str, Any]) -> tuple[str, str | None]:
    """(a sentence, the field path) of one pydantic error."""
    param = _path(error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if error["type"] == "missing":
        return f"{param}: required", param
    head, sep, rest = message.partition(": ")
    if sep and head.isidentifier():  # a check of the whole body or message names its field: "stop: ..."
        param, message = f"{param}.{head}" if param else head, rest
    return (f"{param}: {message[0].lower()}{message[1:]}" if param else message), param


def _path(loc: tuple[Any, ...]) -> str | None:
    """``("messages", 0, "content")`` as ``messages[0].content``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or None


# --- response bodies -------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage``: the prompt's tokens (each prompt once, however many choices) and every choice's."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprob(token: str, logprob: float, top: list[tuple[str, float]] | None) -> dict[str, Any]:
    """One entry of a chat choice's ``logprobs.content``: the token, its log-probability and the alternatives."""
    def entry(text: str, value: float) -> dict[str, Any]:
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}
    return {**entry(token, logprob), "top_logprobs": [entry(t, v) for t, v in top or []]}


def completion_logprobs(tokens: list[tuple[str, float, list[tuple[str, float]] | None]],
                        offset: int = 0) -> dict[str, Any]:
    """A completion choice's ``logprobs``: parallel lists over its tokens; ``text_offset`` counts characters of
    the choice's text from ``offset`` (the echoed prompt's length)."""
    offsets, at = [], offset
    for text, _, _ in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": [t for t, _, _ in tokens], "token_logprobs": [v for _, v, _ in tokens],
            "top_logprobs": [dict(top or []) for _, _, top in tokens], "text_offset": offsets}


def model_card(name: str, root: str | None, parent: str | None, created: int,
               context_length: int | None) -> dict[str, Any]:
    """One entry of ``/v1/models``: OpenAI's fields, and vLLM's ``root`` (where it was loaded from; None for an
    adapter the model held already), ``parent`` (an adapter's base model; None for the base itself) and
    ``max_model_len``."""
    return {"id": name, "object": "model", "created": created, "owned_by": "lmadapt", "root": root,
            "parent": parent, "max_model_len": context_length}
