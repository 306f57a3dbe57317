"""``lmadapt serve``'s HTTP layer: OpenAI's request checks and error shapes, and a live server on loopback.

The live tests run one uvicorn server in a background thread (module scope) over a tiny Llama with two tiny
LoRA adapters, and talk to it with the real ``openai`` client and with ``httpx2`` (the HTTP client ``openai``
uses). The reference for every greedy answer is :func:`lmadapt.decoding.generation.generate` on the same model
loaded on its own (base alone, base + that adapter through :func:`lmadapt.api.load`); log-probabilities are
checked against a plain forward.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import torch

from lmadapt.adapters.format import load_adapter
from lmadapt.api import load
from lmadapt.decoding.generation import encode_prompt, generate, stop_token_ids
from lmadapt.serving import openai_api as oa
from lmadapt.serving.app import Limits, ServedBase, create_app
from lmadapt.serving.engine import Engine, EngineStoppedError, GenerationRequest
from lmadapt.serving.server import bind, load_engine, uvicorn_server
from lmadapt.testing import tiny_llama, tiny_lora_adapters, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ERROR_FIELDS = {"message", "type", "param", "code"}


def refusal(model: type, body: object) -> oa.ApiError:
    with pytest.raises(oa.ApiError) as caught:
        oa.parse_body(model, body)
    return caught.value


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("change, param, words", [
    ({"temperature": "0.5"}, "temperature", "valid number"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"n": True}, "n", "valid integer"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"max_tokens": 1.5}, "max_tokens", "valid integer"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
    ({"stop": ["ok", ""]}, "stop", "non-empty"),
    ({"stop": [str(i) for i in range(17)]}, "stop", "at most 16"),
    ({"seed": 2**64}, "seed", "less than or equal to"),
    ({"top_logprobs": 3}, "top_logprobs", "only allowed when logprobs is true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"colour": "red"}, "colour", "unrecognized request argument supplied: colour"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'system', 'developer', 'user' or"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "does not call tools"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "needs content"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string or a list of content parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "only text parts"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
     "messages[0].tool_calls", "does not call tools"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported by this server"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported by this server"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported by this server"),
    ({"model": ""}, "model", "at least 1 character"),
])
def test_a_bad_chat_body_is_a_400_naming_the_field(change, param, words):
    error = refusal(oa.ChatCompletionRequest, {**CHAT, **change})
    assert (error.status, error.param, error.type) == (400, param, "invalid_request_error")
    assert words in error.message and param.split("[")[0] in error.message
    assert set(error.body()["error"]) == ERROR_FIELDS


def test_every_problem_of_a_body_is_reported_at_once_and_a_missing_field_is_named():
    error = refusal(oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "temperature": "hot",
                                               "top_p": 2, "colour": 1})
    assert error.param == "model"
    for part in ("model: required", "temperature:", "top_p:", "unrecognized request argument supplied: colour"):
        assert part in error.message
    assert refusal(oa.ChatCompletionRequest, [CHAT]).message == "the request body must be a JSON object, got list"


def test_a_good_chat_body_keeps_what_was_asked_and_drops_what_only_matters_to_openai():
    request = oa.parse_body(oa.ChatCompletionRequest, {
        **CHAT, "messages": [{"role": "developer", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "a"},
                                                          {"type": "text", "text": "b"}]},
                             {"role": "assistant", "content": None, "refusal": None, "tool_calls": None}],
        "stop": "\n", "max_tokens": 5, "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 2,
        "user": "u1", "metadata": {"k": "v"}, "store": False, "presence_penalty": 0, "tools": [],
        "tool_choice": "none", "response_format": {"type": "text"}, "top_k": -1})
    assert [m.turn() for m in request.messages] == [{"role": "system", "content": "be brief"},
                                                    {"role": "user", "content": "ab"},
                                                    {"role": "assistant", "content": ""}]
    assert request.stop == ["\n"] and request.token_limit() == 7 and request.logprob_count() == 2
    assert (request.temperature, request.top_p, request.n, request.top_k) == (1.0, 1.0, 1, -1)  # OpenAI's defaults
    assert oa.parse_body(oa.ChatCompletionRequest, {**CHAT, "logprobs": True}).logprob_count() == 0
    assert oa.parse_body(oa.ChatCompletionRequest, CHAT).logprob_count() is None


@pytest.mark.parametrize("prompt, expected", [
    ("text", ["text"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1, 2], "c"], [[1, 2], "c"]),
])
def test_completion_prompts_take_every_shape_openai_allows(prompt, expected):
    assert oa.parse_body(oa.CompletionRequest, {"model": "m", "prompt": prompt}).prompt == expected


@pytest.mark.parametrize("change, param, words", [
    ({"prompt": []}, "prompt", "not empty"),
    ({"prompt": [[1, 2], 5]}, "prompt", "found an item 5"),
    ({"prompt": [True, False]}, "prompt", "must be a string"),
    ({"prompt": None}, "prompt", "must be a string"),
    ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"logprobs": True}, "logprobs", "valid integer"),
    ({"best_of": 3}, "best_of", "best_of == n"),
    ({"echo": True, "logprobs": 1}, "echo", "not supported"),
    ({"suffix": "end"}, "suffix", "not supported by this server"),
])
def test_a_bad_completion_body_is_a_400_naming_the_field(change, param, words):
    error = refusal(oa.CompletionRequest, {"model": "m", "prompt": "x", **change})
    assert (error.status, error.param) == (400, param) and words in error.message


@pytest.mark.parametrize("name, ok", [("sql", True), ("ft:sql-v2_1", True), ("a" * 64, True), ("a" * 65, False),
                                      ("a.b", False), ("-x", False), ("", False), ("a b", False), ("x/y", False)])
def test_adapter_names_are_what_a_client_can_send_and_a_model_can_hold(name, ok):
    body = {"lora_name": name, "lora_path": "/somewhere"}
    if ok:
        assert oa.parse_body(oa.LoadAdapterRequest, body).lora_name == name
    else:
        assert refusal(oa.LoadAdapterRequest, body).param == "lora_name"


def test_response_pieces_follow_openais_shapes():
    assert oa.usage(7, 5) == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    entry = oa.chat_logprob("é", -0.5, [("é", -0.5), ("a", -1.25)])
    assert entry == {"token": "é", "logprob": -0.5, "bytes": [195, 169],
                     "top_logprobs": [{"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                                      {"token": "a", "logprob": -1.25, "bytes": [97]}]}
    lp = oa.completion_logprobs([("ab", -1.0, [("ab", -1.0)]), ("c", -2.0, None)], offset=3)
    assert lp == {"tokens": ["ab", "c"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{"ab": -1.0}, {}],
                  "text_offset": [3, 5]}
    assert json.loads(json.dumps(oa.ApiError(404, "gone", param="model", code="model_not_found").body())) == {
        "error": {"message": "gone", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    assert oa.ApiError(429, "busy").type == "rate_limit_error" and oa.ApiError(500, "bug").type == "server_error"


# --- a live server ---------------------------------------------------------------------------------------------

KEY = "sk-test-key"
LIMITS = Limits(max_tokens=64, max_n=4, max_body_bytes=32_000)


@contextlib.contextmanager
def running(app: Any, drain_timeout: float = 10.0) -> Iterator[tuple[str, Any]]:
    """(base URL, uvicorn server) of ``app`` served on a free loopback port from a background thread."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app, drain_timeout=drain_timeout, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@dataclass
class Live:
    url: str
    client: openai.OpenAI
    http: httpx2.Client
    adapters: dict[str, str]
    model_dir: str
    references: dict[str | None, tuple[Any, Any]] = field(default_factory=dict)  # adapter -> (model, tokenizer)


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory) -> Iterator[Live]:
    """A server for base "tiny" and adapter "a" ("broken" fails to load); adapter "b" is on disk for run time."""
    root = tmp_path_factory.mktemp("serve-adapters")
    adapters = dict(zip(["a", "b"], tiny_lora_adapters(root=root)))
    loaded = load_engine(str(tiny_model_dir), {"a": adapters["a"], "broken": str(root / "missing")},
                         served_model_name="tiny", max_batch_size=4, max_queue=16)
    assert list(loaded.failed) == ["broken"] and "missing" in loaded.failed["broken"]
    app = create_app(loaded.engine, loaded.tokenizer, loaded.base, api_key=KEY, limits=LIMITS)
    with running(app) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        with httpx2.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            yield Live(url, client, http, adapters, str(tiny_model_dir))


def reference(live: Live, adapter: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) loaded on their own: the base, or the base with adapter folder ``adapter``."""
    if adapter not in live.references:
        live.references[adapter] = load(live.model_dir, adapter=live.adapters[adapter] if adapter else None)[:2]
    return live.references[adapter]


def greedy(live: Live, adapter: str | None, prompt: str, n: int, chat: bool = True) -> str:
    model, tokenizer = reference(live, adapter)
    return generate(model, tokenizer, [prompt], chat=chat, max_new_tokens=n)[0]


def ask(live: Live, model: str, prompt: str, **kw: Any) -> Any:
    return live.client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def test_chat_answers_are_each_models_own_greedy_answers(live):
    for model, adapter in (("tiny", None), ("a", "a")):
        answer = ask(live, model, "hello", max_tokens=24, temperature=0)
        choice = answer.choices[0]
        assert choice.message.content == greedy(live, adapter, "hello", 24) and choice.message.role == "assistant"
        assert answer.model == model and answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
        prompt_tokens = len(encode_prompt(reference(live, None)[1], "hello", chat=True))
        assert (answer.usage.prompt_tokens, answer.usage.total_tokens) == (
            prompt_tokens, prompt_tokens + answer.usage.completion_tokens)
        assert choice.finish_reason == "length" and answer.usage.completion_tokens == 24
    assert greedy(live, "a", "hello", 24) != greedy(live, None, "hello", 24)  # the adapter changes the answer


def test_chat_streams_the_same_answer_as_server_sent_events(live):
    whole = ask(live, "a", "Say something.", max_tokens=20, temperature=0).choices[0].message.content
    chunks = list(ask(live, "a", "Say something.", max_tokens=20, temperature=0, stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1]) and {c.id for c in chunks} == {chunks[0].id}
    body = {"model": "a", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 20,
            "temperature": 0, "stream": True}
    with live.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_completions_take_text_and_token_prompts_n_choices_echo_and_stop(live):
    tokenizer = reference(live, None)[1]
    expected = greedy(live, "a", "The sky is", 16, chat=False)
    answer = live.client.completions.create(model="a", prompt=["The sky is", "x"], n=2, max_tokens=16, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3] and answer.object == "text_completion"
    assert [c.text for c in answer.choices] == [expected] * 2 + [greedy(live, "a", "x", 16, chat=False)] * 2
    assert answer.usage.prompt_tokens == len(tokenizer("The sky is").input_ids) + len(tokenizer("x").input_ids)
    ids = tokenizer("The sky is").input_ids
    by_ids = live.client.completions.create(model="a", prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == expected
    echoed = live.client.completions.create(model="a", prompt="The sky is", max_tokens=16, temperature=0, echo=True)
    assert echoed.choices[0].text == "The sky is" + expected
    stop = next(expected[i:i + 2] for i in range(3, len(expected) - 1)
                if "\ufffd" not in expected[i:i + 2] and expected.index(expected[i:i + 2]) == i)
    stopped = live.client.completions.create(model="a", prompt="The sky is", max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].text == expected[:expected.index(stop)] and stopped.choices[0].finish_reason == "stop"
    streamed = live.client.completions.create(model="a", prompt="The sky is", max_tokens=16, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_the_default_completion_length_is_openais_sixteen_tokens(live):
    answer = live.client.completions.create(model="tiny", prompt="x", temperature=0)
    assert answer.usage.completion_tokens == 16 or answer.choices[0].finish_reason == "stop"


def test_seeded_choices_are_reproducible_and_each_choice_has_its_own_seed(live):
    def sample(**kw: Any) -> list[str]:
        answer = ask(live, "tiny", "hello", max_tokens=12, temperature=1.0, **kw)
        return [c.message.content for c in answer.choices]

    two = sample(n=2, seed=7)
    assert two == sample(n=2, seed=7) and two[0] != two[1]
    assert sample(seed=7) == two[:1] and sample(seed=8) == two[1:]


def test_logprobs_are_the_models_own(live):
    model, tokenizer = reference(live, "a")
    answer = ask(live, "a", "hello", max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    ids = encode_prompt(tokenizer, "hello", chat=True)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == 4
    stops = stop_token_ids(model, tokenizer)
    for entry in entries:
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        top = torch.topk(lp, 3)
        token = int(top.indices[0])
        assert token not in stops
        assert entry.token == tokenizer.decode([token]) and entry.logprob == pytest.approx(float(lp[token]), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([int(i)]) for i in top.indices]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        ids.append(token)
    completion = live.client.completions.create(model="a", prompt="hello", max_tokens=3, temperature=0, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]


def test_models_lists_the_base_and_each_adapter_with_its_parent(live):
    cards = {m.id: m for m in live.client.models.list().data}
    assert {"tiny", "a"} <= set(cards) and "broken" not in cards
    assert cards["a"].model_extra["parent"] == "tiny" and cards["a"].model_extra["root"] == live.adapters["a"]
    assert cards["tiny"].model_extra["parent"] is None and cards["tiny"].owned_by == "lmadapt"
    assert live.client.models.retrieve("a").id == "a"
    with pytest.raises(openai.NotFoundError):
        live.client.models.retrieve("nope")


def test_an_adapter_loaded_at_run_time_is_served_then_unloaded(live):
    response = live.http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": live.adapters["b"]})
    assert response.status_code == 200 and "late" in response.text
    try:
        assert "late" in {m.id for m in live.client.models.list().data}
        answer = ask(live, "late", "hello", max_tokens=16, temperature=0)
        assert answer.choices[0].message.content == greedy(live, "b", "hello", 16) and answer.model == "late"
    finally:
        response = live.http.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert response.status_code == 200
    with pytest.raises(openai.NotFoundError) as caught:
        ask(live, "late", "hello", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"


def test_a_wrong_or_missing_api_key_is_refused_and_health_is_open(live):
    wrong = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    bare = httpx2.post(f"{live.url}/v1/chat/completions", json={})
    assert bare.status_code == 401 and set(bare.json()["error"]) == ERROR_FIELDS
    assert bare.headers["www-authenticate"] == "Bearer"
    assert httpx2.get(f"{live.url}/health").status_code == 200


def chat_body(**change: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **change}


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/chat/completions", chat_body(model="nope"), 404, "model", "model_not_found"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None, None),
    ("/v1/chat/completions", b"\xff\xfe", 400, None, None),
    ("/v1/chat/completions", [1, 2], 400, None, None),
    ("/v1/chat/completions", chat_body(messages="hi"), 400, "messages", "invalid_value"),
    ("/v1/chat/completions", chat_body(temperature=3), 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", chat_body(max_tokens=65), 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", chat_body(max_tokens=None, max_completion_tokens=65), 400, "max_completion_tokens",
     "invalid_value"),
    ("/v1/chat/completions", chat_body(n=5), 400, "n", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b", "c"], "n": 2}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": [1] * 500, "max_tokens": 20}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": [1] * 512}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 260]}, 400, "prompt", None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "tools": []}, 400, "tools", "invalid_value"),
    ("/v1/chat/completions", chat_body(tools=[{"type": "function"}]), 400, "tools", "unsupported_parameter"),
    ("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "/no/such/adapter"}, 400, "lora_path",
     "adapter_load_failed"),
    ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/no/such/adapter"}, 400, "lora_name", "adapter_exists"),
    ("/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": "/x"}, 400, "lora_name", None),
    ("/v1/load_lora_adapter", {"lora_name": "a.b", "lora_path": "/x"}, 400, "lora_name", "invalid_value"),
    ("/v1/load_lora_adapter", {"lora_name": "c"}, 400, "lora_path", "invalid_value"),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "lora_name", "model_not_found"),
    ("/v1/unload_lora_adapter", {"lora_name": "tiny"}, 400, "lora_name", None),
])
def test_every_bad_request_gets_a_4xx_in_openais_error_shape(live, path, body, status, param, code):
    send = ({"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes)
            else {"json": body})
    response = live.http.post(path, **send)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert "Traceback" not in response.text


def test_a_body_over_the_limit_is_a_413_with_or_without_a_declared_length(live):
    big = chat_body(messages=[{"role": "user", "content": "x" * 40_000}])
    assert live.http.post("/v1/chat/completions", json=big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked, counted as it arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    response = live.http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert ask(live, "tiny", "x" * 400, max_tokens=1).choices  # under the limit


def test_a_body_not_declared_as_json_is_a_415(live):
    """What a web page of another site can make a browser send without asking first (a form's content types)."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = live.http.post("/v1/load_lora_adapter", content=json.dumps(
            {"lora_name": "c", "lora_path": live.adapters["b"]}), headers=headers)
        assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    assert "c" not in {m.id for m in live.client.models.list().data}
    charset = live.http.post("/v1/chat/completions", content=json.dumps(chat_body()),
                             headers={"Content-Type": "application/json; charset=utf-8"})
    assert charset.status_code == 200


def test_unknown_routes_and_methods_answer_in_the_same_shape(live):
    for response, status in ((live.http.get("/v1/nothing"), 404), (live.http.get("/v1/chat/completions"), 405)):
        assert response.status_code == status and set(response.json()["error"]) == ERROR_FIELDS


def test_a_failed_adapter_load_leaves_the_others_served(live):
    folder = Path(live.adapters["a"]).parent / "garbage"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text("{not json")
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    response = live.http.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": str(folder)})
    assert response.status_code == 400 and str(folder) in response.json()["error"]["message"]
    assert "g" not in {m.id for m in live.client.models.list().data}
    assert ask(live, "a", "hello", max_tokens=8, temperature=0).choices[0].message.content == greedy(
        live, "a", "hello", 8)


def test_a_bug_is_a_plain_500_with_the_trace_left_in_the_log(live, monkeypatch, caplog):
    from lmadapt.serving.service import Service

    monkeypatch.setattr(logging.getLogger("lmadapt.serve"), "handlers", [caplog.handler])

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Service, "chat_prompt", broken)
    response = live.http.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert "a bug" not in response.text and "Traceback" not in response.text
    assert any("a bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_a_full_queue_is_a_429_and_a_stopping_server_finishes_what_it_took():
    """Own engine: one row at a time, one request waiting; the worker is held before its first step, so the
    first request (through adapter "a") waits in the queue. The server is then told to stop; the request it took
    must still finish, with the adapter's own answer."""
    gate = threading.Event()
    engine = Engine(tiny_llama(), tiny_tokenizer(), max_batch_size=1, max_queue=1,
                    before_step=lambda step: gate.wait(30))
    folder = tiny_lora_adapters()[0]
    engine.load_adapter("a", folder)
    app = create_app(engine, tiny_tokenizer(), ServedBase("tiny", "memory", engine.context, engine.vocab_size),
                     drain_timeout=30)
    body = {"model": "a", "prompt": "hello", "max_tokens": 20, "temperature": 0}
    with running(app) as (url, server), ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx2.post, f"{url}/v1/completions", json=body, timeout=60)
        deadline = time.monotonic() + 30
        while engine.stats()["waiting"] < 1:
            assert time.monotonic() < deadline and not first.done()
            time.sleep(0.01)
        second = httpx2.post(f"{url}/v1/completions", json=body)
        assert second.status_code == 429 and second.json()["error"]["code"] == "queue_full"
        assert second.json()["error"]["type"] == "rate_limit_error"
        busy = httpx2.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a"})
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "adapter_in_use"
        server.should_exit = True  # as SIGTERM does: stop taking connections, finish the ones in flight
        time.sleep(0.3)
        assert not first.done()
        gate.set()
        answer = first.result(timeout=60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 20
    reference_model = tiny_llama()
    load_adapter(reference_model, folder)
    assert answer.json()["choices"][0]["text"] == generate(reference_model, tiny_tokenizer(), ["hello"],
                                                           max_new_tokens=20)[0]
    with pytest.raises(EngineStoppedError):  # the app's shutdown stopped the engine
        engine.submit(GenerationRequest(prompt_ids=[1]))


def test_the_adapter_routes_can_be_turned_off():
    engine = Engine(tiny_llama(), tiny_tokenizer())
    app = create_app(engine, tiny_tokenizer(), ServedBase("tiny", "memory", engine.context, engine.vocab_size),
                     runtime_adapters=False)
    with running(app) as (url, _):
        for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": tiny_lora_adapters()[0]}),
                           ("/v1/unload_lora_adapter", {"lora_name": "x"})):
            response = httpx2.post(f"{url}{path}", json=body)
            assert response.status_code == 403 and "--no-runtime-adapters" in response.json()["error"]["message"]
        assert httpx2.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny"


def test_sigterm_drains_the_requests_in_flight_and_exits_cleanly(tiny_model_dir):
    """``lmadapt serve`` in a subprocess, one row at a time: three streams (one decoding, two queued) when
    SIGTERM comes; each must still get all its tokens and ``[DONE]``, and the process must exit 0."""
    command = [sys.executable, "-m", "lmadapt", "serve", "--model", str(tiny_model_dir), "--served-model-name", "tiny",
               "--port", "0", "--max-batch-size", "1", "--threads", "1", "--log-level", "warning"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = next(m.group(1) for line in process.stderr if (m := re.search(r"(http://\S+)/v1 serving tiny", line)))
        deadline = time.monotonic() + 60
        while not _healthy(url):
            assert time.monotonic() < deadline and process.poll() is None, "the server did not start"
            time.sleep(0.05)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 300, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        answering, first_chunk = threading.Semaphore(0), threading.Event()

        def stream(_: int) -> list[str]:
            with httpx2.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
                answering.release()  # the server took the request (its headers came back)
                events = []
                for line in response.iter_lines():
                    if line:
                        events.append(line)
                        first_chunk.set()
                return events

        with ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(stream, i) for i in range(3)]
            assert all(answering.acquire(timeout=60) for _ in streams) and first_chunk.wait(60)
            assert not any(s.done() for s in streams)  # one decoding, two waiting
            process.send_signal(signal.SIGTERM)
            results = [s.result(timeout=120) for s in streams]
        assert process.wait(timeout=60) == 0
        log = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in log
    for events in results:
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == 300
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert not _healthy(url)


def _healthy(url: str) -> bool:
    try:
        return httpx2.get(f"{url}/health", timeout=5).status_code == 200
    except httpx2.TransportError:
        return False
